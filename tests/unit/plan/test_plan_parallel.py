"""The planner per GPU when several train together."""

from __future__ import annotations

from pathlib import Path


def test_plan_per_gpu(tmp_path: Path) -> None:
    from qlora_kit.core.config import validate
    from qlora_kit.plan.estimate import estimate
    from qlora_kit.plan.parallel import Parallel
    from qlora_kit.plan.shape import load_builtin_shape

    shape = load_builtin_shape("llama-3.1-8b")
    cfg = validate({"model": {"name_or_path": "meta-llama/Llama-3.1-8B-Instruct"}, "data": {"path": "x.jsonl"},
                    "lora": {"target_modules": "all-linear"}, "output_dir": str(tmp_path),
                    "train": {"max_length": 2048, "optimizer": "adamw_8bit", "checkpoint_every_n_layers": 1,
                              "tiled_mlp": False, "activation_offload": False}})
    one = estimate(cfg, shape)
    ddp = estimate(cfg, shape, parallel=Parallel(2, "ddp"))
    fsdp = estimate(cfg, shape, parallel=Parallel(2, "fsdp"))
    off = estimate(cfg, shape, parallel=Parallel(2, "fsdp-offload"))
    grads = one.phases["backward"]["lora_gradients"]
    assert ddp.phases["backward"]["ddp_gradient_buckets"] == grads
    assert ddp.allocated_peak == one.allocated_peak + grads, "DDP: the whole model on every GPU, plus buckets"
    b1, bf = one.phases["backward"], fsdp.phases["backward"]
    assert bf["nf4_weights"] < 0.55 * b1["nf4_weights"], "FSDP shards the packed 4-bit values"
    assert bf["lora_gradients"] == grads // 2 and bf["fsdp_gathered_layers"] > 0
    assert off.phases["backward"]["lora_parameters"] == 0 and off.host_bytes > 0
    assert off.allocated_peak < fsdp.allocated_peak < one.allocated_peak
    assert fsdp.phases["load"] == one.phases["load"], "every rank quantises the whole base on its GPU"
    assert off.phases["load"]["nf4_weights"] < 0.1 * one.phases["load"]["nf4_weights"], "offload: loaded on the CPU"
