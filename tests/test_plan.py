"""Memory planner: hand-computed figures, what-fits searches, shape sources, train's pre-flight, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from qlora_kit import plan
from qlora_kit.config import load_config, validate
from qlora_kit.errors import EXIT_OOM, ModelError, OutOfMemoryError
from conftest import run_cli

GiB, MiB = 1024**3, 1024**2
CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))
SHIPPED_24GB = [p for p in CONFIGS if p.name.endswith("_qlora_24gb.yaml")]


def make_cfg(name: str = "meta-llama/Llama-3.1-8B-Instruct", **sections) -> plan.Config:
    # The hand computations below model the paged 8-bit optimizer, unpacked rows and full logits.
    raw = {"model": {"name_or_path": name}, "data": {"path": "/data/x.jsonl", "packing": False}, "output_dir": "/out/x",
           "lora": {"r": 16, "alpha": 32, "dropout": 0.05, "target_modules": "all-linear"},
           "train": {"micro_batch_size": 1, "max_length": 2048, "optimizer": "paged_adamw_8bit", "fused_loss": False}}
    for key, value in sections.items():
        raw.setdefault(key, {}).update(value)
    return validate(raw)


def tiny_shape() -> plan.ModelShape:
    return plan.shape_from_config({"model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
                                   "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                                   "vocab_size": 100, "max_position_embeddings": 512})


# --------------------------------------------------------------------------- hand-computed figures


def test_nf4_bytes_double_quant_is_about_0516_bytes_per_param():
    # 4096x4096: 4 bits/value, 1 byte per 64-value absmax, 4 bytes per 256 absmax values.
    n = 4096 * 4096
    assert plan.nf4_bytes(n) == n // 2 + n // 64 + 4 * (n // 64 // 256) == 8_654_848
    assert plan.nf4_bytes(n) / n == pytest.approx(0.5159, abs=1e-4)
    assert plan.nf4_bytes(n, double_quant=False) == n // 2 + 4 * (n // 64)  # fp32 absmax: 0.5625 B/param


def test_llama31_8b_static_memory_matches_hand_computation():
    cfg = make_cfg()
    p = plan.estimate(cfg, plan.load_builtin_shape("llama-3.1-8b"))
    parts = p.phases["loss"]
    # Per layer (H=4096, kv=1024, I=14336): q, o 4096x4096; k, v 4096x1024; gate, up, down 4096x14336.
    q = 4096 * 4096 // 2 + 4096 * 4096 // 64 + 4 * 1024
    k = 4096 * 1024 // 2 + 4096 * 1024 // 64 + 4 * 256
    mlp = 4096 * 14336 // 2 + 4096 * 14336 // 64 + 4 * 3584
    assert (q, k, mlp) == (8_654_848, 2_163_712, 30_291_968)
    assert parts["nf4_weights"] == 32 * (2 * q + 2 * k + 3 * mlp) == 3_600_416_768  # 3.35 GiB ("3.6 GB")
    # bf16 embeddings + untied lm_head (2 x 128256 x 4096) + 65 RMSNorm vectors.
    assert parts["weights_16bit"] == 2 * (2 * 128256 * 4096 + 65 * 4096) == 2_101_878_784  # "2.1 GB"
    # LoRA r=16 on all 7 projections: 16*(in+out) each.
    per_layer = 16 * ((4096 + 4096) * 2 + (4096 + 1024) * 2 + (4096 + 14336) * 3)
    assert p.trainable_parameters == 32 * per_layer == 41_943_040
    assert parts["lora_parameters"] == parts["lora_gradients"] == 2 * 41_943_040
    # 8-bit AdamW: 2 bytes/param + two fp32 absmax per 256 values (every tensor >= 4096 values).
    assert parts["optimizer_state"] == 2 * 41_943_040 + 8 * 41_943_040 // 256 == 85_196_800
    # Paged (>= 1e5 values): gate/up lora_B and down lora_A, 14336x16 each, uint8 states.
    assert p.paged_optimizer_bytes == 32 * 3 * (14336 * 16) * 2 == 44_040_192


def test_llama31_8b_activations_and_total_match_hand_computation():
    p = plan.estimate(make_cfg(), plan.load_builtin_shape("llama-3.1-8b"))
    tokens = 1 * 2048
    loss = p.phases["loss"]
    assert loss["checkpoints"] == 32 * 2 * 4096 * tokens == 512 * MiB
    assert loss["final_norm"] == 4 * 4096 * tokens
    assert loss["logits_and_loss"] == (2 + 12) * 128256 * tokens  # bf16 logits + 3 fp32 copies
    assert loss["attention_mask"] == 0  # micro-batch 1, no packing: causal sdpa, no mask
    static = 3_600_416_768 + 2_101_878_784 + 2 * 83_886_080 + 85_196_800
    assert p.peak_phase == "loss"
    assert p.allocated_peak == static + 536_870_912 + 33_554_432 + 3_677_356_032 == 10_203_045_888
    assert p.fragmentation == 10_203_045_888 // 10
    assert p.total_bytes == 10_203_045_888 + 1_020_304_588 + 500 * MiB == 11_747_638_476  # 10.94 GiB
    assert p.torch_allocated_peak == 10_203_045_888 - 44_040_192
    assert p.weights_bytes == 3_600_416_768 + 2_101_878_784


def test_tiny_shape_every_component_by_hand():
    # H=64, I=128, L=2, 4 heads / 2 kv heads (d=16), V=100; B=2, T=32 -> a materialised sdpa mask and
    # repeated k/v heads; attention targets, dropout>0 (separate copies), r=4, bf16, 8-bit AdamW.
    cfg = make_cfg(lora={"r": 4, "dropout": 0.1, "target_modules": "attention"},
                   train={"micro_batch_size": 2, "max_length": 32})
    p = plan.estimate(cfg, tiny_shape())
    tokens = 64
    # layer saved/token: norms 8*64 + q,k,v (k/v widened to 64) 2*192 + attn out 2*64 + MLP 3*2*128
    # + LoRA inputs with dropout (2+1)*64 for q,k,v,o + r-wide middles 4*2*4.
    per_token = 512 + 384 + 128 + 768 + 4 * 3 * 64 + 32
    assert per_token == 2592
    back = p.phases["backward"]
    assert back["layer_recompute"] == per_token * tokens + 2 * 32 * 32 * 2 == 169_984  # + bf16 B*T*T mask copy
    assert back["attention_mask"] == 2 * 32 * 32  # bool mask kept all step
    assert back["checkpoints"] == 2 * 2 * 64 * tokens
    assert back["backward_working"] == 2 * (3 * 128 + 2 * 64) * tokens
    assert back["dequant_buffer"] == 64 * 128 * 2
    assert "logits_kept" not in back  # the step keeps only the loss, not the logits
    # Weights: q,o 64x64 -> 2048+64+4; k,v 64x32 -> 1024+32+4; gate/up/down 64x128 -> 4096+128+4.
    assert back["nf4_weights"] == 2 * (2 * 2116 + 2 * 1060 + 3 * 4228) == 38_072
    assert back["weights_16bit"] == 2 * (2 * 100 * 64 + 5 * 64) == 26_240
    assert p.trainable_parameters == 2 * 4 * ((64 + 64) * 2 + (64 + 32) * 2) == 3584
    assert back["optimizer_state"] == 8 * 3584  # every tensor < 4096 values: fp32 states
    loss = p.phases["loss"]
    assert loss["final_norm"] == 4 * 64 * tokens and loss["logits_and_loss"] == 14 * 100 * tokens
    assert sum(loss.values()) == 231_736
    assert sum(back.values()) == 377_656
    assert p.phases["load"]["quantisation_buffer"] == 64 * 128 * 2 + 4 * (64 * 128 // 64)
    assert p.peak_phase == "backward" and p.allocated_peak == 377_656
    assert p.total_bytes == 377_656 + 37_765 + 500 * MiB


def test_lora_dropout_costs_the_documented_copies():
    shape = plan.load_builtin_shape("llama-3.1-8b")
    with_drop = plan.estimate(make_cfg(lora={"dropout": 0.05}), shape).phases["backward"]["layer_recompute"]
    without = plan.estimate(make_cfg(lora={"dropout": 0.0}), shape).phases["backward"]["layer_recompute"]
    # dropout > 0: each adapted module keeps its own dropout output (bf16) + 1-byte mask instead of one
    # shared input: q,k,v 3*3*4096 vs 2*4096; o 3*4096 vs 2*4096; gate,up 2*3*4096 vs 2*4096; down 3*I vs 2*I.
    extra = (9 * 4096 - 2 * 4096) + (3 * 4096 - 2 * 4096) + (6 * 4096 - 2 * 4096) + (3 * 14336 - 2 * 14336)
    assert with_drop - without == extra * 2048


def test_options_move_memory_in_the_expected_direction():
    shape = plan.load_builtin_shape("llama-3.1-8b")
    base = plan.estimate(make_cfg(), shape).total_bytes
    assert plan.estimate(make_cfg(train={"gradient_checkpointing": False}), shape).total_bytes > base
    assert plan.estimate(make_cfg(train={"optimizer": "paged_adamw_32bit"}), shape).total_bytes > base
    assert plan.estimate(make_cfg(model={"double_quant": False}), shape).total_bytes > base
    assert plan.estimate(make_cfg(model={"compute_dtype": "float32"}), shape).total_bytes > base
    assert plan.estimate(make_cfg(lora={"target_modules": "attention"}), shape).total_bytes < base
    eager = plan.estimate(make_cfg(model={"attn_implementation": "eager"}), shape)
    assert eager.phases["backward"]["layer_recompute"] > plan.estimate(make_cfg(), shape).phases["backward"][
        "layer_recompute"] + 32 * 2048 * 2048  # T*T scores per head


def test_qwen2_bias_and_phi3_fused_projections():
    qwen = plan.load_builtin_shape("qwen2.5-7b")
    assert qwen.qkv_bias and qwen.q_dim == 3584 and qwen.kv_dim == 512
    w = plan.estimate(make_cfg("Qwen/Qwen2.5-7B-Instruct"), qwen).phases["load"]["weights_16bit"]
    assert w == 2 * (2 * 152064 * 3584 + 57 * 3584 + 28 * (3584 + 2 * 512))
    phi3 = plan.shape_from_config({"model_type": "phi3", "hidden_size": 3072, "intermediate_size": 8192,
                                   "num_hidden_layers": 32, "num_attention_heads": 32, "vocab_size": 32064})
    assert plan.resolve_targets("attention", phi3) == ["qkv_proj", "o_proj"]
    assert plan.linear_layers(phi3)["gate_up_proj"].out_features == 2 * 8192


def test_unknown_target_module_is_a_model_error():
    with pytest.raises(ModelError, match="not linear layers"):
        plan.estimate(make_cfg(lora={"target_modules": ["q_proj", "wq"]}), plan.load_builtin_shape("llama-2-7b"))


def test_mixture_of_experts_is_refused():
    with pytest.raises(ModelError, match="mixture-of-experts"):
        plan.shape_from_config({"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                                "num_attention_heads": 32, "vocab_size": 32000, "num_local_experts": 8})


# --------------------------------------------------------------------------- what fits


def test_max_length_and_micro_batch_searches_are_tight():
    cfg, shape, budget = make_cfg(), plan.load_builtin_shape("llama-3.1-8b"), 24 * GiB
    length = plan.max_length_that_fits(cfg, shape, budget)
    assert length is not None and length % 64 == 0
    assert plan.fits(cfg, shape, budget, max_length=length)
    assert not plan.fits(cfg, shape, budget, max_length=length + 64)
    batch = plan.micro_batch_size_that_fits(cfg, shape, budget)
    assert batch is not None and plan.fits(cfg, shape, budget, micro_batch_size=batch)
    assert not plan.fits(cfg, shape, budget, micro_batch_size=batch + 1)
    assert plan.max_length_that_fits(cfg, shape, 4 * GiB) is None  # weights alone exceed 4 GiB
    # Llama-2 fits its whole 4096 context: the search stops at max_position_embeddings.
    assert plan.max_length_that_fits(cfg, plan.load_builtin_shape("llama-2-7b"), budget) == 4096


@pytest.mark.parametrize("path", SHIPPED_24GB, ids=lambda p: p.name)
def test_shipped_24gb_configs_fit_with_margin(path: Path):
    cfg, _ = load_config(path)
    assert cfg.data.path.startswith("/data/") and cfg.output_dir.startswith("/out/")
    shape = plan.read_shape(cfg.model)  # built-in shape: no network
    p = plan.estimate(cfg, shape)
    assert p.total_bytes <= 0.85 * 24 * GiB, f"{path.name}: {p.total_bytes / GiB:.2f} GiB leaves < 15% headroom"


def test_every_config_loads_and_plans_where_the_shape_is_known():
    assert len(SHIPPED_24GB) >= 4
    for path in CONFIGS:
        cfg, _ = load_config(path)
        name = cfg.model.name_or_path
        if plan.builtin_shape_name(name) or Path(name).exists():
            assert plan.estimate(cfg, plan.read_shape(cfg.model)).total_bytes > 0


def test_builtin_shapes_are_the_published_configs():
    l2, l3 = plan.load_builtin_shape("llama-2-7b"), plan.load_builtin_shape("llama-3.1-8b")
    mis, qw = plan.load_builtin_shape("mistral-7b-v0.3"), plan.load_builtin_shape("qwen2.5-7b")
    assert (l2.hidden_size, l2.intermediate_size, l2.num_kv_heads, l2.vocab_size) == (4096, 11008, 32, 32000)
    assert (l3.intermediate_size, l3.num_kv_heads, l3.vocab_size) == (14336, 8, 128256)
    assert (mis.intermediate_size, mis.num_kv_heads, mis.vocab_size) == (14336, 8, 32768)
    assert (qw.hidden_size, qw.num_layers, qw.num_heads, qw.num_kv_heads, qw.vocab_size) == (3584, 28, 28, 4, 152064)
    with pytest.raises(ModelError, match="choose one of"):
        plan.load_builtin_shape("gpt-5")


# --------------------------------------------------------------------------- shape sources


def test_local_directory_gguf_and_hub_sources(tiny_llama: Path, tmp_path: Path, monkeypatch):
    shape = plan.read_shape(make_cfg(str(tiny_llama)).model)
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
    g = plan.read_shape(make_cfg(str(path)).model)
    assert (g.num_layers, g.intermediate_size, g.num_kv_heads, g.vocab_size, g.tie_word_embeddings) == (
        3, 160, 1, 90, True)
    # Hub: only config.json is fetched; offline gives a clear error naming the fix.
    import huggingface_hub

    local_config = tiny_llama / "config.json"
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda repo, fname, revision=None: str(local_config))
    assert plan.read_shape(make_cfg("some-org/some-model").model).hidden_size == 64

    def offline(*args, **kwargs):
        raise huggingface_hub.errors.LocalEntryNotFoundError("offline and not cached")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    with pytest.raises(ModelError, match="cannot get config.json") as err:
        plan.read_shape(make_cfg("some-org/some-model").model)
    assert "local directory" in err.value.hint
    # Known ids never touch the hub.
    assert plan.read_shape(make_cfg("Qwen/Qwen2.5-7B-Instruct").model).vocab_size == 152064


def test_missing_local_paths_are_model_errors(tmp_path: Path):
    with pytest.raises(ModelError, match="no config.json"):
        plan.read_shape(make_cfg(str(tmp_path)).model)
    with pytest.raises(ModelError, match="not found"):
        plan.read_shape(make_cfg(str(tmp_path / "missing.gguf")).model)


# --------------------------------------------------------------------------- train's pre-flight


def _fake_cuda(monkeypatch, free: int, total: int = 24 * GiB) -> None:
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free, total))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 0)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Fake RTX 4090")


def test_check_fits_refuses_with_numbers_and_the_knob(monkeypatch, tmp_path: Path):
    (tmp_path / "config.json").write_text((plan.SHAPES_DIR / "llama-3.1-8b.json").read_text())
    cfg = make_cfg(str(tmp_path), train={"max_length": 16384})
    _fake_cuda(monkeypatch, free=int(23.5 * GiB))
    with pytest.raises(OutOfMemoryError) as err:
        plan.check_fits(cfg, tmp_path, "cuda")
    assert err.value.exit_code == EXIT_OOM
    assert "23.5 GiB is free on Fake RTX 4090" in err.value.message and "max_length=16384" in err.value.message
    assert "--set train.max_length=" in err.value.hint and "--skip-memory-check" in err.value.hint
    fitting = int(err.value.hint.split("train.max_length=")[1].split()[0])
    assert plan.fits(cfg, plan.load_shape_file(tmp_path / "config.json"), int(23.5 * GiB) + 500 * MiB,
                     max_length=fitting)
    plan.check_fits(make_cfg(str(tmp_path)), tmp_path, "cuda")  # 2048 tokens: fits, no exception
    plan.check_fits(cfg, tmp_path, "cpu")  # never checks on CPU


# --------------------------------------------------------------------------- CLI


def test_cli_json_and_table(tmp_path: Path):
    cfg = SHIPPED_24GB[0]
    res = run_cli("plan", str(cfg), "--gpu-memory", "24", "--json", timeout=120)
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout)
    for key in ("weights_bytes", "total_bytes", "fits", "max_length_that_fits", "micro_batch_size_that_fits",
                "breakdown"):
        assert key in report
    assert report["fits"] is True and report["total_bytes"] == sum(report["breakdown"].values())
    small = run_cli("plan", str(cfg), "--gpu-memory", "8", "--set", "train.max_length=8192", timeout=120)
    assert small.returncode == EXIT_OOM
    assert "does NOT fit" in small.stdout and "fix:" in small.stdout
    bad = run_cli("plan", str(cfg), "--set", "model.name_or_path=" + str(tmp_path / "nope"), timeout=120)
    assert bad.returncode == 2 and "error:" in bad.stderr
