"""LoRA variants on tiny models: LoRA+, LoRA-GA, LoftQ, PiSSA, OLoRA, AdaLoRA, VeRA.

Each variant trains through the real recipe on the NF4 base (loss falls), resumes exactly
after a preemption, exports onto the weights it was trained against with verification
passing, and its adapter loads with plain peft.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import arithmetic_rows, gpu, metrics_of, write_config, write_jsonl
from safetensors.torch import load_file

from qlora_kit.core.config import dump_config, load_config, validate
from qlora_kit.core.errors import ConfigError, ModelError, Preempted
from qlora_kit.export import command
from qlora_kit.export import command as ex
from qlora_kit.inference import load
from qlora_kit.model import base as qmodel_base
from qlora_kit.model import lora as qmodel_lora
from qlora_kit.ops import checkpointing
from qlora_kit.rundir import residual
from qlora_kit.rundir.target import Start
from qlora_kit.train.loop import train
from qlora_kit.train.outputs import begin
from qlora_kit.train.recipe import run_training
from qlora_kit.train.setup import setup

STEPS, STOP_AT = 6, 4  # checkpoints every 3 steps; the stop comes after step 4 (between saves)
VARIANTS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "loraplus_8bit": ({}, {"loraplus_lr_ratio": 8.0, "optimizer": "paged_adamw_8bit"}),
    "lora_ga": ({"init": "lora_ga", "loraga_samples": 12}, {}),
    "loftq": ({"init": "loftq"}, {}),
    "loftq_iter2_dora": ({"init": "loftq", "loftq_iter": 2, "use_dora": True}, {}),
    "pissa": ({"init": "pissa"}, {}),
    "olora_rslora": ({"init": "olora", "use_rslora": True}, {}),
    "adalora": ({"type": "adalora", "r": 8, "adalora_target_r": 4, "adalora_tinit_ratio": 0.0,
                 "adalora_tfinal_ratio": 0.34}, {"learning_rate": 3e-2}),
    "vera": ({"type": "vera", "r": 32}, {"learning_rate": 2e-2}),
}
BASE_CHANGING = {"lora_ga", "loftq_iter2_dora", "pissa", "olora_rslora"}


class StopAt:
    """A StopRequest stand-in that asks for a checkpoint once the run reaches ``step``."""

    signal_name = "SIGTERM"

    def __init__(self, run: Any, step: int):
        self.run, self.step = run, step

    @property
    def requested(self) -> bool:
        return self.run.step >= self.step


@pytest.fixture(scope="module")
def data_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("variant-data") / "data.jsonl", arithmetic_rows(48))


def _config(root: Path, name: str, model: Path, data: Path, out: str, **train: Any) -> Path:
    lora, extra = VARIANTS[name]
    return write_config(root / f"{out}.yaml", model, data, root / out, lora=lora,
                        train={"max_steps": STEPS, "save_steps": 3, "save_total_limit": 5, **extra, **train})


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, tiny_llama: Path, data_file: Path):
    """Factory: an uninterrupted run of a variant (trained once per module)."""
    runs: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in runs:
            root = tmp_path_factory.mktemp(name)
            assert run_training(_config(root, name, tiny_llama, data_file, "run"), []) == 0
            runs[name] = root / "run"
        return runs[name]

    return get


def _interrupted_then_resumed(root: Path, name: str, model: Path, data: Path) -> tuple[Path, Any]:
    cfg_path = _config(root, name, model, data, "run")
    cfg, sources = load_config(cfg_path)
    out = Path(cfg.output_dir)
    start = Start(out, "fresh")
    run = setup(cfg, dump_config(cfg, sources), out, start, skip_memory_check=True)
    begin(run, start)
    with pytest.raises(Preempted):
        train(run, StopAt(run, STOP_AT))
    assert run_training(cfg_path, [], resume=True) == 0
    return out, run


def _logits(model: Any, ids: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(input_ids=ids).logits.float()


@pytest.mark.parametrize("name", list(VARIANTS))
def test_variant_trains_resumes_exports_and_loads_with_peft(name: str, trained, tiny_llama: Path, data_file: Path,
                                                            tmp_path: Path, one_thread) -> None:
    reference = trained(name)
    losses = [r["loss"] for r in metrics_of(reference) if "loss" in r]
    assert losses[-1] < losses[0] - 0.02, f"{name}: loss did not fall: {losses}"

    resumed, first_part = _interrupted_then_resumed(tmp_path, name, tiny_llama, data_file)
    a = load_file(reference / "adapter/adapter_model.safetensors")
    b = load_file(resumed / "adapter/adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f"{name}: resumed adapter differs"
    assert metrics_of(resumed) == metrics_of(reference), f"{name}: resumed losses differ"

    manifest = json.loads((reference / "manifest.json").read_text())
    variant = manifest["lora"]["variant"]
    lora, train_cfg = VARIANTS[name]
    assert variant["type"] == lora.get("type", "lora") and variant["init"] == lora.get("init", "default")
    assert variant["loraplus_lr_ratio"] == train_cfg.get("loraplus_lr_ratio")
    assert bool(manifest["lora"]["residual_base"]) == (name in BASE_CHANGING)
    if name == "loraplus_8bit":
        lrs = sorted({g["initial_lr"] for g in first_part.optimizer.param_groups if g["params"]})
        assert lrs == [5e-3, 8 * 5e-3] and type(first_part.optimizer).__name__ == "PagedAdamW8bit"

    out = tmp_path / "export"
    assert ex.export_run(reference, out, show_progress=False, verify_prompts=3) == 0
    report = json.loads((out / "export_report.json").read_text())
    assert report["verification"]["status"] == "passed", report["verification"]["failures"]
    assert report["adapter"]["residual_base_modules"] == (len(manifest["lora"]["target_modules"]) * 2
                                                           if name in BASE_CHANGING else 0)
    card = (out / "README.md").read_text()
    assert f"type={variant['type']}, init={variant['init']}" in card

    # Plain peft: the adapter loads onto the NF4 base (+ the stored residual for base-changing inits)
    # and computes what the verified export computes.
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    cfg = load_config(reference / "config.yaml")[0]
    base = qmodel_base.load_quantized_base(tiny_llama, cfg.model, torch.float32, torch.device("cpu"))
    residual.load_residual_base(base, reference, manifest)
    tuned = PeftModel.from_pretrained(base, reference / "adapter").eval()
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = torch.tensor([[4, 10, 20, 30, 5, 60, 7]])
    expected, got = _logits(merged, ids), _logits(tuned, ids)
    assert (expected - got).abs().max() <= 0.03 * expected.std(), f"{name}: plain peft differs from the export"


def test_adalora_reallocates_ranks_and_keeps_its_schedule(trained, tmp_path: Path, one_thread) -> None:
    run = trained("adalora")
    ranks = json.loads((run / "manifest.json").read_text())["lora"]["variant"]["ranks"]
    assert ranks["total"] < ranks["initial_total"] and ranks["min"] < ranks["max"], ranks
    config = json.loads((run / "adapter/adapter_config.json").read_text())
    stored = {k: v.shape[0] for k, v in load_file(run / "adapter/adapter_model.safetensors").items()
              if k.endswith("lora_A")}
    assert sorted(stored.values()) != [8] * len(stored), "the saved adapter was not pruned to the rank pattern"
    assert {sum(v) for v in config["rank_pattern"].values()} == set(stored.values())

    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    with pytest.raises(ConfigError, match="lora.type=adalora.*train.max_steps"):
        run_training(copy / "config.yaml", [f"output_dir={copy}", "train.max_steps=9"], resume=True)


# --------------------------------------------------------------------------- export of residual bases


def test_residual_base_is_what_the_merge_needs(trained, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               one_thread) -> None:
    run = trained("pissa")
    with pytest.raises(ModelError, match="--merge-base original cannot be merged exactly for lora.init=pissa"):
        ex.export_run(run, tmp_path / "orig", merge_base="original", show_progress=False)
    # merging onto NF4 of the original weights instead of the stored residual is caught by verification
    real = command.merge_context
    monkeypatch.setattr(command, "merge_context", lambda *a: dataclasses.replace(real(*a), residual_modules=frozenset()))
    assert ex.export_run(run, tmp_path / "wrong", show_progress=False, verify_prompts=3) == 5
    monkeypatch.undo()

    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    (copy / "base_residual.safetensors").write_bytes(b"x" + (copy / "base_residual.safetensors").read_bytes()[1:])
    with pytest.raises(ModelError, match="sha256"):
        load.load_run_for_inference(copy, device=torch.device("cpu"))
    (copy / "base_residual.safetensors").unlink()
    with pytest.raises(ModelError, match="missing"):
        ex.export_run(copy, tmp_path / "gone", show_progress=False)


# --------------------------------------------------------------------------- LoRA-GA gradient estimate


def _summed_loss(model: Any):
    return lambda batch: model(**batch, num_items_in_batch=1, use_cache=False).loss


def test_loraga_gradient_estimate_equals_autograd_on_the_dequantised_weights(tiny_llama: Path, one_thread) -> None:
    import bitsandbytes as bnb
    from transformers import AutoModelForCausalLM

    from qlora_kit.variants.init import dequantised, estimate_gradients

    cfg = validate({"model": {"name_or_path": str(tiny_llama)}, "data": {"path": "x"}, "output_dir": "o"})
    base = qmodel_base.load_quantized_base(tiny_llama, cfg.model, torch.float32, torch.device("cpu"))
    checkpointing.enable_gradient_checkpointing(base)  # the hooks must see each layer once despite recomputation
    ids = torch.randint(6, 300, (2, 12), generator=torch.Generator().manual_seed(0))
    batches = [{"input_ids": ids, "labels": ids, "attention_mask": torch.ones_like(ids)}] * 2
    n_items = 2 * 2 * 11
    modules = {n: m for n, m in base.named_modules()
               if isinstance(m, bnb.nn.Linear4bit) and n.rsplit(".", 1)[-1] in ("q_proj", "v_proj")}
    grads = estimate_gradients(base, modules, batches, _summed_loss(base), n_items)

    ref = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    for name, module in base.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            ref.get_submodule(name).weight.data = dequantised(module)
    ref.requires_grad_(False)
    for name in grads:
        ref.get_submodule(name).weight.requires_grad_(True)
    for batch in batches:
        ref(**batch, num_items_in_batch=n_items).loss.backward()
    assert set(grads) == {f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")}
    for name, grad in grads.items():
        expected = ref.get_submodule(name).weight.grad
        assert torch.allclose(grad, expected, rtol=1e-4, atol=1e-6 * expected.abs().max()), name


def _loraga_model(tiny_llama: Path, lora: dict[str, Any], tiled: bool = False, fused: bool = False
                  ) -> tuple[Any, Any]:
    """A LoRA-GA model built in train.build_model's order (fused loss head before the adapters)."""
    from qlora_kit.ops import loss, packing, tiled_mlp

    cfg = validate({"model": {"name_or_path": str(tiny_llama)}, "lora": {"init": "lora_ga", "r": 4, **lora},
                    "data": {"path": "x"}, "output_dir": "o"})
    base = qmodel_base.load_quantized_base(tiny_llama, cfg.model, torch.float32, torch.device("cpu"))
    if fused:
        loss.add_fused_loss(base)
    model = qmodel_lora.attach_lora(base, cfg.lora, torch.float32, True)
    packing.use_packed_attention(model)
    if tiled:
        tiled_mlp.tile_mlps(model, tile_tokens=5)
    return cfg, model


def test_loraga_in_passes_and_on_the_training_path_gives_the_same_init(tiny_llama: Path, one_thread) -> None:
    """Splitting LoRA-GA's gradients into groups (less memory) changes nothing in the factors; the estimate runs
    with the adapters disabled (a trained adapter does not change it) on packed rows, through tiled MLPs and
    through the fused loss head (the loop's ``causal_lm_loss``, summed)."""
    from qlora_kit.ops.loss import causal_lm_loss
    from qlora_kit.ops.packing import pack_batch
    from qlora_kit.variants.init import loraga_factors

    gen = torch.Generator().manual_seed(0)
    pieces = [(ids := torch.randint(6, 300, (n,), generator=gen).tolist(), [-100] + ids[1:]) for n in (9, 14, 6)]
    batches = [pack_batch(pieces)]
    targets = "all-linear"
    results = []
    for passes, tiled, fused in ((1, False, False), (3, False, False), (2, True, False), (1, False, True)):
        cfg, model = _loraga_model(tiny_llama, {"loraga_passes": passes, "target_modules": targets}, tiled, fused)
        if passes == 3:  # non-zero adapters must not leak into the base model's gradient
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.data.normal_()
        summed = (lambda batch, m=model: causal_lm_loss(m, batch, 1, True)) if fused else _summed_loss(model)
        torch.manual_seed(0)  # peft's LoRA-GA SVD is randomised
        results.append(loraga_factors(model, cfg.lora, batches, summed, 26, tiny_llama))
    assert len(results[0]) == 2 * 7
    for other in results[1:]:
        assert other.keys() == results[0].keys()
        for name, (a, b) in results[0].items():
            (a, b), (a2, b2) = _signs_fixed(a, b), _signs_fixed(*other[name])
            assert torch.allclose(a, a2, atol=1e-5) and torch.allclose(b, b2, atol=1e-5), name


def _signs_fixed(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """LoRA-GA's A rows and B columns are singular vectors, each defined up to its sign (last-bit differences in
    the gradient, e.g. fused vs full-logits loss, can flip one): make each one's largest entry positive."""
    def fix(m: torch.Tensor) -> torch.Tensor:  # rows of m
        return m * m.gather(1, m.abs().argmax(1, keepdim=True)).sign()

    return fix(a), fix(b.T).T


def test_loraga_without_enough_rows_is_one_line(tmp_path: Path, tiny_llama: Path, data_file: Path) -> None:
    cfg = write_config(tmp_path / "c.yaml", tiny_llama, data_file, tmp_path / "run",
                       lora={"init": "lora_ga", "loraga_samples": 500})
    with pytest.raises(ConfigError, match=r"lora.init=lora_ga .*lora.loraga_samples=500.* only 43"):
        run_training(cfg, [])
    assert not (tmp_path / "run").exists()


# --------------------------------------------------------------------------- config


@pytest.mark.parametrize("lora,train,both", [
    ({"type": "vera", "use_dora": True}, {}, ("lora.type=vera", "lora.use_dora")),
    ({"type": "vera", "use_rslora": True}, {}, ("lora.type=vera", "lora.use_rslora")),
    ({"type": "adalora", "use_dora": True}, {}, ("lora.type=adalora", "lora.use_dora")),
    ({"type": "adalora", "init": "pissa"}, {}, ("lora.type=adalora", "lora.init=pissa")),
    ({"type": "vera", "init": "loftq"}, {}, ("lora.type=vera", "lora.init=loftq")),
    ({"type": "adalora", "r": 4, "adalora_target_r": 8}, {}, ("lora.adalora_target_r", "lora.r")),
    ({"type": "adalora", "adalora_tinit_ratio": 0.5, "adalora_tfinal_ratio": 0.5}, {},
     ("lora.adalora_tinit_ratio", "lora.adalora_tfinal_ratio")),
    ({"type": "vera"}, {"loraplus_lr_ratio": 16}, ("train.loraplus_lr_ratio", "lora.type=vera")),
])
def test_invalid_variant_combinations_name_both_settings(lora: dict, train: dict, both: tuple[str, str]) -> None:
    raw = {"model": {"name_or_path": "m"}, "lora": lora, "data": {"path": "d"}, "train": train, "output_dir": "o"}
    with pytest.raises(ConfigError) as err:
        validate(raw)
    message = err.value.message
    assert "\n" not in message and all(setting in message for setting in both), message


def test_variant_settings_validate() -> None:
    raw = {"model": {"name_or_path": "m"}, "data": {"path": "d"}, "output_dir": "o"}
    with pytest.raises(ConfigError, match="lora.init"):
        validate({**raw, "lora": {"init": "gaussian"}})
    with pytest.raises(ConfigError, match="loraplus_lr_ratio"):
        validate({**raw, "train": {"loraplus_lr_ratio": 0.5}})
    cfg = validate({**raw, "lora": {"init": "lora_ga", "use_dora": True}, "train": {"loraplus_lr_ratio": 16}})
    assert cfg.lora.init == "lora_ga" and cfg.train.loraplus_lr_ratio == 16


# --------------------------------------------------------------------------- planner


@pytest.mark.parametrize("lora", [
    {"type": "lora", "use_dora": True}, {"type": "adalora", "r": 8, "adalora_target_r": 4},
    {"type": "vera", "r": 32}])
def test_planner_counts_each_variants_trainable_parameters(tiny_llama: Path, lora: dict) -> None:
    from qlora_kit.plan.estimate import estimate
    from qlora_kit.plan.shape import load_shape_file

    cfg = validate({"model": {"name_or_path": str(tiny_llama)}, "lora": {**lora, "target_modules": "all-linear"},
                    "data": {"path": "d"}, "train": {"max_steps": 10}, "output_dir": "o"})
    plan = estimate(cfg, load_shape_file(tiny_llama / "config.json"))
    base = qmodel_base.load_quantized_base(tiny_llama, cfg.model, torch.float32, torch.device("cpu"))
    model = qmodel_lora.attach_lora(base, cfg.lora, torch.float32, False, total_steps=10)
    assert plan.trainable_parameters == qmodel_lora.count_parameters(model)[0]
    parts = plan.phases["loss"]
    assert ("vera_projections" in parts) == (lora["type"] == "vera")
    assert ("adalora_importance" in parts) == (lora["type"] == "adalora")


def test_planner_accounts_for_the_init(tiny_llama: Path) -> None:
    from qlora_kit.plan.estimate import estimate
    from qlora_kit.plan.shape import linear_layers, load_shape_file

    shape = load_shape_file(tiny_llama / "config.json")
    raw = {"model": {"name_or_path": str(tiny_llama)}, "data": {"path": "d"}, "output_dir": "o"}
    assert "init" not in estimate(validate(raw), shape).phases
    ga = estimate(validate({**raw, "lora": {"init": "lora_ga"}}), shape).phases["init"]
    attention = sum(lin.numel for lin in linear_layers(shape).values() if lin.group.startswith("attn"))
    assert ga["loraga_gradients"] == 4 * shape.num_layers * attention
    pissa = estimate(validate({**raw, "lora": {"init": "pissa"}}), shape).phases["init"]
    assert pissa["init_working"] > 0 and "loraga_gradients" not in pissa


# --------------------------------------------------------------------------- exporter's adapter reader


def test_merge_refuses_what_it_cannot_merge_exactly() -> None:
    from qlora_kit.variants import merge

    with pytest.raises(ModelError, match="IA3 is not merged"):
        merge.peft_type({"peft_type": "IA3"})
    with pytest.raises(ModelError, match="save_projection=false"):
        merge.peft_type({"peft_type": "VERA", "save_projection": False})
    config = {"peft_type": "ADALORA", "init_r": 8, "lora_alpha": 16,
              "rank_pattern": {"model.layers.0.self_attn.q_proj.lora_E": [True, False] * 4}}
    shapes = {"A": [3, 64], "B": [64, 3], "E": [3, 1]}
    with pytest.raises(ModelError, match="rank 3, its rank pattern says 4"):
        merge.module_scale(config, "ADALORA", "model.layers.0.self_attn.q_proj", shapes)
    assert merge.module_scale(config, "ADALORA", "model.layers.0.self_attn.q_proj",
                              {"A": [4, 64], "B": [64, 4], "E": [4, 1]}) == 16 / (8 + 1e-5)


# --------------------------------------------------------------------------- why the inits are ours (peft 0.21)


def test_peft_inits_on_a_4bit_base_behave_as_documented(tiny_llama: Path) -> None:
    """What qlora_kit.variants documents about peft's own inits on a bitsandbytes 4-bit base.

    If a peft upgrade changes this, revisit variants/init.py (it may then be able to use peft directly).
    """
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora.config import LoraGAConfig
    from peft.tuners.lora.loraga import preprocess_loraga

    cfg = validate({"model": {"name_or_path": str(tiny_llama)}, "data": {"path": "d"}, "output_dir": "o"})

    def base() -> Any:
        return qmodel_base.load_quantized_base(tiny_llama, cfg.model, torch.float32, torch.device("cpu"))

    with pytest.raises(TypeError, match="PiSSA"):
        get_peft_model(base(), LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights="pissa"))
    with pytest.raises(ValueError, match="quantized"):
        preprocess_loraga(base(), LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights="lora_ga",
                                             lora_ga_config=LoraGAConfig()), lambda: None)


@gpu
@pytest.mark.parametrize("name", ["lora_ga", "pissa", "adalora", "vera", "loraplus_8bit"])
def test_cuda_bf16_variants_train_and_reload(name: str, tiny_llama: Path, data_file: Path, tmp_path: Path) -> None:
    """bf16 adapters on CUDA (VeRA's shared projections cast with them), paged 8-bit LoRA+; export verifies."""
    cfg = _config(tmp_path, name, tiny_llama, data_file, "run")
    assert run_training(cfg, []) == 0
    out = tmp_path / "export"
    assert ex.export_run(tmp_path / "run", out, show_progress=False, verify_prompts=3) == 0
    report = json.loads((out / "export_report.json").read_text())
    assert report["verification"]["status"] == "passed", report["verification"]["failures"]
