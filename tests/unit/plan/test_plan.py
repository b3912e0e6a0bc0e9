"""Memory planner: hand-computed figures, what-fits searches, shape sources, train's pre-flight, CLI."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import CONFIGS, SHIPPED_24GB

from qlora_kit.core import config
from qlora_kit.core.config import load_config, validate
from qlora_kit.core.errors import EXIT_OOM, ModelError, OutOfMemoryError
from qlora_kit.ops import checkpointing
from qlora_kit.plan import estimate, fit, techniques, terms
from qlora_kit.plan import shape as plan_shape

GiB, MiB = 1024**3, 1024**2


def make_cfg(name: str = "meta-llama/Llama-3.1-8B-Instruct", **sections) -> config.Config:
    # The hand computations below model the paged 8-bit optimizer, unpacked rows and full logits, with
    # every memory setting concrete unless a test changes it.
    raw = {"model": {"name_or_path": name}, "data": {"path": "/data/x.jsonl", "packing": False}, "output_dir": "/out/x",
           "lora": {"r": 16, "alpha": 32, "dropout": 0.05, "target_modules": "all-linear"},
           "train": {"micro_batch_size": 1, "max_length": 2048, "optimizer": "paged_adamw_8bit", "fused_loss": False,
                     "activation_offload": False, "tiled_mlp": False, "checkpoint_every_n_layers": 1}}
    for key, value in sections.items():
        raw.setdefault(key, {}).update(value)
    return validate(raw)


def tiny_shape() -> plan_shape.ModelShape:
    return plan_shape.shape_from_config({"model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
                                   "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                                   "vocab_size": 100, "max_position_embeddings": 512})


def test_nf4_bytes_double_quant_is_about_0516_bytes_per_param():
    # 4096x4096: 4 bits/value, 1 byte per 64-value absmax, 4 bytes per 256 absmax values.
    n = 4096 * 4096
    assert terms.nf4_bytes(n) == n // 2 + n // 64 + 4 * (n // 64 // 256) == 8_654_848
    assert terms.nf4_bytes(n) / n == pytest.approx(0.5159, abs=1e-4)
    assert terms.nf4_bytes(n, double_quant=False) == n // 2 + 4 * (n // 64)  # fp32 absmax: 0.5625 B/param


def test_llama31_8b_static_memory_matches_hand_computation():
    cfg = make_cfg()
    p = estimate.estimate(cfg, plan_shape.load_builtin_shape("llama-3.1-8b"))
    parts = p.phases["loss"]
    # Per layer (H=4096, kv=1024, I=14336): q, o 4096x4096; k, v 4096x1024; gate, up, down 4096x14336.
    q = 4096 * 4096 // 2 + 4096 * 4096 // 64 + 4 * 1024
    k = 4096 * 1024 // 2 + 4096 * 1024 // 64 + 4 * 256
    mlp = 4096 * 14336 // 2 + 4096 * 14336 // 64 + 4 * 3584
    assert (q, k, mlp) == (8_654_848, 2_163_712, 30_291_968)
    assert parts["nf4_weights"] == 32 * (2 * q + 2 * k + 3 * mlp) == 3_600_416_768  # 3.35 GiB ("3.6 GB")
    # bf16 embeddings + untied lm_head (2 x 128256 x 4096) + 65 RMSNorm vectors.
    assert parts["weights_16bit"] == 2 * (2 * 128256 * 4096 + 65 * 4096) == 2_101_878_784  # "2.1 GB"
    # LoRA r=16 on all 7 projections: 16*(in+out) each; fp32 master weights and gradients (4 bytes each).
    per_layer = 16 * ((4096 + 4096) * 2 + (4096 + 1024) * 2 + (4096 + 14336) * 3)
    assert p.trainable_parameters == 32 * per_layer == 41_943_040
    assert parts["lora_parameters"] == parts["lora_gradients"] == 4 * 41_943_040  # 160 MiB each
    # 8-bit AdamW: 2 bytes/param + two fp32 absmax per 256 values (every tensor >= 4096 values).
    assert parts["optimizer_state"] == 2 * 41_943_040 + 8 * 41_943_040 // 256 == 85_196_800
    # autocast keeps a bf16 copy of every adapter weight during the forward pass.
    assert parts["autocast_adapter_copies"] == 2 * 41_943_040
    # Paged (>= 1e5 values): gate/up lora_B and down lora_A, 14336x16 each, uint8 states.
    assert p.paged_optimizer_bytes == 32 * 3 * (14336 * 16) * 2 == 44_040_192
    bf16 = estimate.estimate(make_cfg(lora={"adapter_dtype": "bfloat16"}), plan_shape.load_builtin_shape("llama-3.1-8b"))
    assert bf16.phases["loss"]["lora_parameters"] == 2 * 41_943_040
    assert bf16.phases["loss"]["autocast_adapter_copies"] == 0  # bf16 adapters: no autocast
    non_paged = estimate.estimate(make_cfg(train={"optimizer": "adamw_8bit"}), plan_shape.load_builtin_shape("llama-3.1-8b"))
    assert non_paged.paged_optimizer_bytes == 0 and non_paged.torch_allocated_peak == non_paged.allocated_peak


def test_tiny_shape_every_component_by_hand():
    # H=64, I=128, L=2, 4 heads / 2 kv heads (d=16), V=100; one packed row of 32 tokens, all labelled; LoRA r=4
    # on q/k/v/o with dropout; bf16 on CUDA (flash attention), fp32 adapters, 8-bit AdamW, fused loss.
    cfg = make_cfg(lora={"r": 4, "dropout": 0.1, "target_modules": "attention"}, data={"packing": True},
                   train={"max_length": 32, "optimizer": "adamw_8bit", "fused_loss": True})
    p = estimate.estimate(cfg, tiny_shape())
    n = 32
    # Per token: each adapter keeps its dropout output (bf16) + bool mask + its r-wide middle: 4 x (3*64 + 2*4);
    # the input RMSNorm its fp32 input + fp32 reciprocal norm; flash attention q, k (after RoPE), v, out (bf16)
    # and an fp32 log-sum-exp per head.
    attention = 4 * (3 * 64 + 2 * 4) + (4 * 64 + 4) + 2 * (64 + 32) + 2 * 32 + 2 * 64 + 4 * 4
    mlp = (4 * 64 + 4) + 3 * 2 * 128  # post-attention norm; gate, SiLU output, up
    assert (attention, mlp) == (1460, 1028)
    tech = techniques.techniques(cfg, tiny_shape())
    assert terms.layer_saved_bytes(tiny_shape(), tech, 1, n) == (attention * n, mlp * n)
    # Static: NF4 q,o 64x64 -> 2048+64+4; k,v 64x32 -> 1024+32+4; gate/up/down 64x128 -> 4096+128+4.
    nf4 = 2 * (2 * 2116 + 2 * 1060 + 3 * 4228)
    adapters = 2 * (4 * (64 + 64) * 2 + 4 * (64 + 32) * 2)  # A and B of q, o, k, v on 2 layers
    assert nf4 == 38_072 and adapters == 3584
    static = {"nf4_weights": nf4, "weights_16bit": 2 * (2 * 100 * 64 + 5 * 64), "lora_parameters": 4 * adapters,
              "lora_gradients": 4 * adapters, "optimizer_state": 8 * adapters}  # tensors < 4096 values: fp32 states
    common = {"step_inputs": n * (24 + 2 * 2 * 16),  # int64 ids/labels/positions, bf16 RoPE cos/sin (d=16)
              "checkpoints": 2 * 2 * 64 * n, "layer_activations": 0, "attention_mask": 0}
    # Fused loss: one projection buffer of 32 labelled rows x 32768 (trl allocates it 32768 wide whatever the
    # vocabulary); forward keeps the hidden state and the labelled copy (bf16), backward the copy + fp32
    # gradient + its cast; 48 bytes of scalars per label.
    tile = 32 * 32768
    fused = max(2 * 64 * (n + n) + 2 * tile, (2 * 2 + 4) * 64 * n + 2 * tile) + 48 * n
    assert p.phases["loss"] == {**static, **common, "autocast_adapter_copies": 2 * adapters,
                                "final_norm": (4 * 64 + 4) * n, "fused_loss": fused}
    # Backward: the MLP stage of the recomputed last layer peaks: its saved activations, the incoming gradient
    # (bf16 [n, H]), the two [n, I] gradients of the down projection's input, one dequantised 64x128 matrix.
    assert p.stage == "mlp"
    assert p.phases["backward"] == {**static, **common, "autocast_adapter_copies": 2 * adapters // 2,
                                    "layer_recompute": (attention + mlp) * n,
                                    "backward_working": 2 * 64 * n + 2 * 2 * 128 * n, "dequant_buffer": 2 * 64 * 128}
    assert sum(p.phases["backward"].values()) == 252_728
    assert p.peak_phase == "loss"  # the loss's 32 x 32768 bf16 buffer (2 MiB) outweighs this tiny layer
    assert p.allocated_peak == sum(p.phases["loss"].values()) == 2_263_224
    assert p.fragmentation == int(2_263_224 * 0.05) and p.total_bytes == 2_263_224 + 113_161 + 500 * MiB


def test_attention_backward_buffers_include_the_gqa_expansion():
    shape = plan_shape.load_builtin_shape("llama-3.1-8b")  # 32 query heads, 8 kv heads, d=128
    tech = techniques.techniques(make_cfg(), shape)
    # FlashAttention-2 backward: dq, dk, dv (bf16), fp32 dq accumulator, fp32 softmax_d per head,
    # dk/dv expanded to 32 heads for grouped-query attention.
    assert terms.flash_backward_per_token(shape, tech) == 2 * 4096 + 2 * 2 * 1024 + 4 * 4096 + 4 * 32 + 2 * 2 * 4096
    mha = plan_shape.load_builtin_shape("llama-2-7b")  # 32 kv heads: no expansion
    assert terms.flash_backward_per_token(mha, techniques.techniques(make_cfg(), mha)) == 2 * 4096 * 3 + 4 * 4096 + 128


def test_fused_loss_is_flat_in_the_vocabulary_and_full_logits_are_not():
    shape = plan_shape.load_builtin_shape("llama-3.1-8b")
    fused = techniques.techniques(make_cfg(train={"fused_loss": True}), shape)
    at = {n: estimate.fused_loss_bytes(shape, fused, 1, n, n) for n in (4096, 8192, 65536)}
    # beyond the hidden states (the backbone's output in the forward; in the backward the labelled copy, its fp32
    # gradient and the gradient's bf16 cast) and scalars, one bf16 tile
    tile = 2 * 4096 * 32768
    assert at[4096] - tile == at[8192] - tile - (8 * 4096 + 48) * 4096
    assert at[65536] == (2 * 2 + 4) * 4096 * 65536 + tile + 48 * 65536
    assumed_all = estimate.estimate(make_cfg(train={"fused_loss": True}), shape, max_length=8192)
    replies = estimate.estimate(make_cfg(train={"fused_loss": True}), shape, max_length=8192, labelled_tokens=1024)
    assert assumed_all.phases["loss"]["fused_loss"] > replies.phases["loss"]["fused_loss"]
    full = estimate.estimate(make_cfg(), shape, max_length=8192).phases["loss"]["logits_and_loss"]
    assert full == (2 + 12) * 128256 * 8192  # 13.7 GiB of logits at 8K tokens
    assert estimate.estimate(make_cfg(train={"fused_loss": True}), shape, max_length=8192).phases["loss"][
        "fused_loss"] < full / 8


def test_offload_keeps_two_checkpoints_on_the_gpu_and_the_rest_in_host_memory():
    shape = plan_shape.load_builtin_shape("llama-3.1-8b")
    on = estimate.estimate(make_cfg(train={"activation_offload": True}), shape, max_length=32768)
    off = estimate.estimate(make_cfg(train={"activation_offload": False}), shape, max_length=32768)
    per_layer = 2 * 4096 * 32768  # bf16 layer input: 256 KiB per token
    assert off.phases["backward"]["checkpoints"] == 32 * per_layer and off.host_bytes == 0
    assert on.phases["backward"]["checkpoints"] == 2 * per_layer and on.host_bytes == 32 * per_layer
    assert off.total_bytes - on.total_bytes > 29 * per_layer
    cpu = estimate.estimate(make_cfg(train={"activation_offload": True}), shape, device="cpu")
    assert cpu.host_bytes == 0  # a no-op on CPU


def test_every_n_layers_keeps_the_other_layers_whole():
    shape = plan_shape.load_builtin_shape("llama-3.1-8b")
    cfg = make_cfg(train={"checkpoint_every_n_layers": 4})
    p = estimate.estimate(cfg, shape)
    layer = sum(terms.layer_saved_bytes(shape, techniques.techniques(cfg, shape), 1, 2048))
    assert p.phases["backward"]["checkpoints"] == 8 * 2 * 4096 * 2048  # layers 0, 4, ..., 28
    assert p.phases["backward"]["layer_activations"] == 24 * layer
    # the last layer (31) is not checkpointed: the backward peaks there, with nothing recomputed
    assert p.phases["backward"].get("layer_recompute", 0) == 0
    no_ckpt = estimate.estimate(make_cfg(train={"gradient_checkpointing": False}), shape)
    assert no_ckpt.phases["backward"]["layer_activations"] == 32 * layer and no_ckpt.phases["backward"][
        "checkpoints"] == 0


def test_tiled_mlp_shrinks_the_recomputed_layer_at_long_lengths_only():
    shape = plan_shape.load_builtin_shape("llama-3.1-8b")
    untiled = make_cfg(data={"packing": True}, train={"fused_loss": True})
    tiled = make_cfg(data={"packing": True}, train={"fused_loss": True, "tiled_mlp": True})
    assert estimate.estimate(tiled, shape, max_length=4096).total_bytes == estimate.estimate(untiled, shape,
                                                                                      max_length=4096).total_bytes
    long_untiled = estimate.estimate(untiled, shape, max_length=65536)
    long_tiled = estimate.estimate(tiled, shape, max_length=65536)
    t = techniques.techniques(tiled, shape)
    # tiled: the MLP half keeps its norm and its input; the intermediates (3 x 14336 bf16 + adapter copies) go
    assert terms.layer_saved_bytes(shape, t, 1, 65536)[1] == (4 * 4096 + 4 + 2 * 4096) * 65536
    assert long_tiled.total_bytes < long_untiled.total_bytes - 7 * GiB
    assert (long_untiled.stage, long_tiled.stage) == ("mlp", "norm")  # the RMSNorm backward is the next wall


def test_lora_dropout_costs_the_documented_copies():
    shape = plan_shape.load_builtin_shape("llama-3.1-8b")
    with_drop = sum(terms.layer_saved_bytes(shape, techniques.techniques(make_cfg(lora={"dropout": 0.05}), shape), 1, 2048))
    without = sum(terms.layer_saved_bytes(shape, techniques.techniques(make_cfg(lora={"dropout": 0.0}), shape), 1, 2048))
    # dropout > 0: each adapted module keeps its own dropout output (bf16) + 1-byte mask; without, one shared
    # input per group: q,k,v 3*3*4096 vs 2*4096; o 3*4096 vs 0 (flash keeps the attention output anyway);
    # gate,up 2*3*4096 vs 2*4096; down 3*I vs 2*I.
    extra = (9 * 4096 - 2 * 4096) + 3 * 4096 + (6 * 4096 - 2 * 4096) + (3 * 14336 - 2 * 14336)
    assert with_drop - without == extra * 2048


def test_cpu_kernels_are_modelled_separately():
    shape = plan_shape.load_builtin_shape("llama-3.1-8b")
    cfg = make_cfg(model={"compute_dtype": "bfloat16"}, train={"fused_loss": True})
    gpu, cpu = techniques.techniques(cfg, shape, "cuda"), techniques.techniques(cfg, shape, "cpu")
    assert (gpu.attention, gpu.mask_bytes, cpu.attention, cpu.mask_bytes) == ("flash", 1, "sdpa_cpu", 2)
    # CUDA (Triton) projects the 512 labelled positions and folds tiles in place; CPU projects all 1023 positions
    # and folds with torch ops: fp32 temporaries of tile size (7 + a bool mask in the backward, trl 1.16).
    assert estimate.fused_loss_rows(gpu, 1, 1024, 512) == 512 and estimate.fused_loss_rows(cpu, 1, 1024, 512) == 1023
    gpu_tile, cpu_tile = 512 * 32768, 1023 * 32768
    assert estimate.fused_loss_bytes(shape, gpu, 1, 1024, 512) == (2 * 2 + 4) * 4096 * 512 + 2 * gpu_tile + 48 * 512
    assert estimate.fused_loss_bytes(shape, cpu, 1, 1024, 512) == (
        2 * 4096 * 1024 + (2 + 4) * 4096 * 1023 + 2 * cpu_tile + 29 * cpu_tile + 48 * 1023)
    assert techniques.techniques(make_cfg(), shape, "cpu").s == 4  # compute_dtype auto: fp32 on CPU


def test_options_move_memory_in_the_expected_direction():
    shape = plan_shape.load_builtin_shape("llama-3.1-8b")
    base = estimate.estimate(make_cfg(), shape).total_bytes
    assert estimate.estimate(make_cfg(train={"gradient_checkpointing": False}), shape).total_bytes > base
    assert estimate.estimate(make_cfg(train={"optimizer": "paged_adamw_32bit"}), shape).total_bytes > base
    assert estimate.estimate(make_cfg(model={"double_quant": False}), shape).total_bytes > base
    assert estimate.estimate(make_cfg(model={"compute_dtype": "float32"}), shape).total_bytes > base
    assert estimate.estimate(make_cfg(lora={"target_modules": "attention"}), shape).total_bytes < base
    assert estimate.estimate(make_cfg(train={"fused_loss": True}), shape).total_bytes < base
    eager = estimate.estimate(make_cfg(model={"attn_implementation": "eager"}), shape)
    assert eager.phases["backward"]["layer_recompute"] > estimate.estimate(make_cfg(), shape).phases["backward"][
        "layer_recompute"] + 32 * 2048 * 2048  # T*T scores per head


def test_qwen2_bias_and_phi3_fused_projections():
    qwen = plan_shape.load_builtin_shape("qwen2.5-7b")
    assert qwen.qkv_bias and qwen.q_dim == 3584 and qwen.kv_dim == 512
    w = estimate.estimate(make_cfg("Qwen/Qwen2.5-7B-Instruct"), qwen).phases["load"]["weights_16bit"]
    assert w == 2 * (2 * 152064 * 3584 + 57 * 3584 + 28 * (3584 + 2 * 512))
    phi3 = plan_shape.shape_from_config({"model_type": "phi3", "hidden_size": 3072, "intermediate_size": 8192,
                                   "num_hidden_layers": 32, "num_attention_heads": 32, "vocab_size": 32064})
    assert plan_shape.resolve_targets("attention", phi3) == ["qkv_proj", "o_proj"]
    assert plan_shape.linear_layers(phi3)["gate_up_proj"].out_features == 2 * 8192


def test_unknown_target_module_is_a_model_error():
    with pytest.raises(ModelError, match="not linear layers"):
        estimate.estimate(make_cfg(lora={"target_modules": ["q_proj", "wq"]}), plan_shape.load_builtin_shape("llama-2-7b"))


def test_mixture_of_experts_is_refused():
    with pytest.raises(ModelError, match="mixture-of-experts"):
        plan_shape.shape_from_config({"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                                "num_attention_heads": 32, "vocab_size": 32000, "num_local_experts": 8})


def test_max_length_and_micro_batch_searches_are_tight():
    cfg, shape, budget = make_cfg(), plan_shape.load_builtin_shape("llama-3.1-8b"), 24 * GiB
    length = fit.max_length_that_fits(cfg, shape, budget)
    assert length is not None and length % 64 == 0
    assert fit.fits(cfg, shape, budget, max_length=length)
    assert not fit.fits(cfg, shape, budget, max_length=length + 64)
    batch = fit.micro_batch_size_that_fits(cfg, shape, budget)
    assert batch is not None and fit.fits(cfg, shape, budget, micro_batch_size=batch)
    assert not fit.fits(cfg, shape, budget, micro_batch_size=batch + 1)
    assert fit.max_length_that_fits(cfg, shape, 4 * GiB) is None  # weights alone exceed 4 GiB
    # Llama-2 fits its whole 4096 context: the search stops at max_position_embeddings.
    assert fit.max_length_that_fits(cfg, plan_shape.load_builtin_shape("llama-2-7b"), budget) == 4096


def test_shipped_llama31_config_reaches_the_issue_8_lengths_by_the_plan():
    # The planner's prediction (not a measurement): issue 8 asks for 32,768 tokens without offload and 81,920
    # with it on a 24 GiB card, and a 2,048-token peak under 12 GB. The lowest-memory arrangement (every layer
    # checkpointed) has that peak; "auto" then spends the card's spare memory on fewer recomputed layers.
    cfg, _ = load_config(next(p for p in SHIPPED_24GB if "llama-3.1-8b" in p.name))
    shape, budget = plan_shape.read_shape(cfg.model), 24 * GiB
    assert fit.max_length_that_fits(cfg, shape, budget, offload=False) >= 32768
    assert fit.max_length_that_fits(cfg, shape, budget, offload=True) >= 81920
    lowest = _set(fit.resolve_auto(cfg, shape, budget), checkpoint_every_n_layers=1, optimizer="adamw_8bit")
    assert estimate.estimate(lowest, shape, max_length=2048).total_bytes <= 12 * 10**9
    auto_2k = fit.resolve_auto(_set(cfg, max_length=2048), shape, budget)
    assert 12 * 10**9 < estimate.estimate(auto_2k, shape).total_bytes <= 0.9 * budget


def test_resolve_auto_offloads_and_tiles_only_when_needed():
    cfg, _ = load_config(next(p for p in SHIPPED_24GB if "llama-3.1-8b" in p.name))
    shape, budget = plan_shape.read_shape(cfg.model), 24 * GiB
    short = fit.resolve_auto(cfg, shape, budget)
    assert (short.train.activation_offload, short.train.tiled_mlp, short.train.optimizer) == (False, False,
                                                                                           "adamw_torch")
    assert cfg.train.activation_offload == "auto"  # the input is not changed
    mid = fit.resolve_auto(_set(cfg, max_length=32768), shape, budget)
    assert (mid.train.activation_offload, mid.train.tiled_mlp, mid.train.checkpoint_every_n_layers) == (False, True,
                                                                                                       1)
    long = fit.resolve_auto(_set(cfg, max_length=81920), shape, budget)
    assert (long.train.activation_offload, long.train.tiled_mlp) == (True, True)
    assert estimate.estimate(long, shape).total_bytes <= budget
    # user values are kept, even when they do not fit
    kept = fit.resolve_auto(_set(cfg, max_length=81920, activation_offload=False), shape, budget)
    assert kept.train.activation_offload is False and estimate.estimate(kept, shape).total_bytes > budget
    nothing = fit.resolve_auto(_set(cfg, max_length=131072), shape, budget)  # the lowest-memory arrangement
    assert (nothing.train.activation_offload, nothing.train.tiled_mlp) == (True, True)


def test_resolve_auto_spends_spare_memory_on_fewer_checkpoints():
    cfg = make_cfg(lora={"target_modules": "attention", "dropout": 0.0},
                   train={"checkpoint_every_n_layers": "auto", "optimizer": "adamw_8bit", "fused_loss": True,
                          "max_length": 4096})
    shape = plan_shape.load_builtin_shape("llama-3.1-8b")
    L = shape.num_layers
    for budget in (24 * GiB, 80 * GiB):
        roomy = fit.resolve_auto(cfg, shape, budget)
        count = len(checkpointing.checkpointed_layers(L, roomy.train.checkpoint_every_n_layers))
        assert count < L and estimate.estimate(roomy, shape).total_bytes <= 0.9 * budget
        if count > 1:  # one checkpoint fewer (one more layer keeping its activations) would not fit
            fewer = _set(roomy, checkpoint_every_n_layers=checkpointing.every_n_for(L, count - 1))
            assert estimate.estimate(fewer, shape).total_bytes > 0.9 * budget
    # the shipped Llama-3.1-8B config at 4K on 24 GiB: between every layer (n = 1) and every second one (n = 2),
    # where an integer n has nothing (the planner's prediction: 20 of 32 layers checkpointed)
    shipped, _ = load_config(next(p for p in SHIPPED_24GB if "llama-3.1-8b" in p.name))
    assert 1 < fit.resolve_auto(_set(shipped, max_length=4096), shape, 24 * GiB).train.checkpoint_every_n_layers < 2
    every_layer = estimate.estimate(_set(cfg, checkpoint_every_n_layers=1), shape).total_bytes
    tight = fit.resolve_auto(cfg, shape, every_layer)  # fits, but with nothing to spare
    assert tight.train.checkpoint_every_n_layers == 1


def test_every_n_for_reaches_every_count_and_keeps_integer_layouts():
    for L in (2, 28, 32, 40, 80):
        for count in range(1, L + 1):
            n = checkpointing.every_n_for(L, count)
            layout = checkpointing.checkpointed_layers(L, n)
            assert len(layout) == count and layout[0] == 0, (L, count, n)
            if float(n).is_integer():  # transformers' own every_n_layers layout
                assert layout == list(range(0, L, int(n)))


def test_resolve_auto_takes_sync_free_fp32_adamw_only_from_spare_memory():
    # bitsandbytes 0.50's 8-bit step synchronises the GPU once per parameter; torch's fused AdamW does not.
    # fp32 states are taken only from memory the rest of the plan leaves unused: never a shorter context,
    # never more recomputed layers.
    cfg = make_cfg(lora={"target_modules": "all-linear"},
                   train={"checkpoint_every_n_layers": "auto", "optimizer": "auto", "fused_loss": True})
    shape = plan_shape.load_builtin_shape("llama-3.1-8b")
    eight = estimate.estimate(_set(cfg, optimizer="adamw_8bit", checkpoint_every_n_layers=1), shape).total_bytes
    fp32 = estimate.estimate(_set(cfg, optimizer="adamw_torch", checkpoint_every_n_layers=1), shape).total_bytes
    assert fp32 > eight
    roomy = fit.resolve_auto(cfg, shape, 24 * GiB)
    assert roomy.train.optimizer == "adamw_torch" and estimate.estimate(roomy, shape).total_bytes <= 0.9 * 24 * GiB
    pinned = fit.resolve_auto(_set(cfg, optimizer="adamw_8bit"), shape, 24 * GiB)
    assert roomy.train.checkpoint_every_n_layers == pinned.train.checkpoint_every_n_layers
    edge = fit.resolve_auto(cfg, shape, int(eight / 0.9) + (fp32 - eight) // 2)
    assert (edge.train.optimizer, edge.train.checkpoint_every_n_layers) == ("adamw_8bit", 1)
    long = fit.max_length_that_fits(cfg, shape, 24 * GiB, offload=False)
    assert fit.resolve_auto(_set(cfg, max_length=long), shape, 24 * GiB).train.optimizer != "adamw_torch"


def test_resolve_auto_pages_the_optimizer_only_when_that_makes_it_fit():
    cfg = make_cfg(train={"optimizer": "auto", "fused_loss": True})
    shape = plan_shape.load_builtin_shape("llama-3.1-8b")
    p = estimate.estimate(_set(cfg, optimizer="adamw_8bit"), shape)
    pageable = 32 * 3 * (14336 * 16) * 2  # the 8-bit states of the three 14336x16 adapter matrices per layer
    assert fit.resolve_auto(cfg, shape, p.total_bytes).train.optimizer == "adamw_8bit"
    assert fit.resolve_auto(cfg, shape, p.total_bytes - pageable // 2).train.optimizer == "paged_adamw_8bit"
    assert fit.resolve_auto(cfg, shape, p.total_bytes - 2 * pageable).train.optimizer == "adamw_8bit"


def _set(cfg: config.Config, **train) -> config.Config:
    copy = cfg.model_copy(deep=True)
    for key, value in train.items():
        setattr(copy.train, key, value)
    return copy


@pytest.mark.parametrize("path", SHIPPED_24GB, ids=lambda p: p.name)
def test_shipped_24gb_configs_fit_with_margin(path: Path):
    cfg, _ = load_config(path)
    assert cfg.data.path.startswith("/data/") and cfg.output_dir.startswith("/out/")
    shape = plan_shape.read_shape(cfg.model)  # built-in shape: no network
    p = estimate.estimate(cfg, shape)
    assert p.total_bytes <= 0.85 * 24 * GiB, f"{path.name}: {p.total_bytes / GiB:.2f} GiB leaves < 15% headroom"


def test_every_config_loads_and_plans_where_the_shape_is_known():
    assert len(SHIPPED_24GB) >= 4
    for path in CONFIGS:
        cfg, _ = load_config(path)
        name = cfg.model.name_or_path
        if plan_shape.builtin_shape_name(name) or Path(name).exists():
            assert estimate.estimate(cfg, plan_shape.read_shape(cfg.model)).total_bytes > 0


def test_builtin_shapes_are_the_published_configs():
    l2, l3 = plan_shape.load_builtin_shape("llama-2-7b"), plan_shape.load_builtin_shape("llama-3.1-8b")
    mis, qw = plan_shape.load_builtin_shape("mistral-7b-v0.3"), plan_shape.load_builtin_shape("qwen2.5-7b")
    assert (l2.hidden_size, l2.intermediate_size, l2.num_kv_heads, l2.vocab_size) == (4096, 11008, 32, 32000)
    assert (l3.intermediate_size, l3.num_kv_heads, l3.vocab_size) == (14336, 8, 128256)
    assert (mis.intermediate_size, mis.num_kv_heads, mis.vocab_size) == (14336, 8, 32768)
    assert (qw.hidden_size, qw.num_layers, qw.num_heads, qw.num_kv_heads, qw.vocab_size) == (3584, 28, 28, 4, 152064)
    with pytest.raises(ModelError, match="choose one of"):
        plan_shape.load_builtin_shape("gpt-5")


def test_local_directory_gguf_and_hub_sources(tiny_llama: Path, tmp_path: Path, monkeypatch):
    shape = plan_shape.read_shape(make_cfg(str(tiny_llama)).model)
    assert (shape.hidden_size, shape.num_layers, shape.num_kv_heads) == (64, 2, 2)
    gguf = pytest.importorskip("gguf")
    import numpy as np

    path = tmp_path / "m.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    for add, value in [(writer.add_block_count, 3), (writer.add_embedding_length, 64),
                       (writer.add_feed_forward_length, 160), (writer.add_head_count, 4),
                       (writer.add_head_count_kv, 1), (writer.add_context_length, 1024)]:
        add(value)
    writer.add_tensor("token_embd.weight", np.zeros((90, 64), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    g = plan_shape.read_shape(make_cfg(str(path)).model)
    assert (g.num_layers, g.intermediate_size, g.num_kv_heads, g.vocab_size, g.tie_word_embeddings) == (
        3, 160, 1, 90, True)
    # Hub: only config.json is fetched; offline gives a clear error naming the fix.
    import huggingface_hub

    local_config = tiny_llama / "config.json"
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda repo, fname, revision=None: str(local_config))
    assert plan_shape.read_shape(make_cfg("some-org/some-model").model).hidden_size == 64

    def offline(*args, **kwargs):
        raise huggingface_hub.errors.LocalEntryNotFoundError("offline and not cached")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    with pytest.raises(ModelError, match="cannot get config.json") as err:
        plan_shape.read_shape(make_cfg("some-org/some-model").model)
    assert "local directory" in err.value.hint
    # Known ids never touch the hub.
    assert plan_shape.read_shape(make_cfg("Qwen/Qwen2.5-7B-Instruct").model).vocab_size == 152064


def test_missing_local_paths_are_model_errors(tmp_path: Path):
    with pytest.raises(ModelError, match="no config.json"):
        plan_shape.read_shape(make_cfg(str(tmp_path)).model)
    with pytest.raises(ModelError, match="not found"):
        plan_shape.read_shape(make_cfg(str(tmp_path / "missing.gguf")).model)


def _fake_cuda(monkeypatch, free: int, total: int = 24 * GiB) -> None:
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free, total))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 0)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Fake RTX 4090")


def test_check_fits_refuses_with_numbers_and_the_knob(monkeypatch, tmp_path: Path):
    (tmp_path / "config.json").write_text((plan_shape.SHAPES_DIR / "llama-3.1-8b.json").read_text())
    cfg = make_cfg(str(tmp_path), train={"max_length": 16384})
    _fake_cuda(monkeypatch, free=int(23.5 * GiB))
    with pytest.raises(OutOfMemoryError) as err:
        fit.check_fits(cfg, tmp_path, "cuda")
    assert err.value.exit_code == EXIT_OOM
    assert "23.5 GiB is free on Fake RTX 4090" in err.value.message and "max_length=16384" in err.value.message
    assert "--set train.max_length=" in err.value.hint and "--skip-memory-check" in err.value.hint
    fitting = int(err.value.hint.split("train.max_length=")[1].split()[0])
    assert fit.fits(cfg, plan_shape.load_shape_file(tmp_path / "config.json"), int(23.5 * GiB) + 500 * MiB,
                     max_length=fitting)
    fit.check_fits(make_cfg(str(tmp_path)), tmp_path, "cuda")  # 2048 tokens: fits, no exception
    fit.check_fits(cfg, tmp_path, "cpu")  # never checks on CPU


def test_planner_constants_are_the_codes():
    from trl.kernels.chunked_logprob import TOKEN_CHUNK_SIZE
    from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE

    from qlora_kit.ops import tiled_mlp

    assert terms.MLP_TILE_TOKENS == tiled_mlp.MLP_TILE_TOKENS
    assert (terms.LOSS_TOKEN_TILE, terms.LOSS_VOCAB_TILE) == (TOKEN_CHUNK_SIZE, _CHUNKED_LOGPROB_CHUNK_SIZE)
