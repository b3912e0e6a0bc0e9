"""benchmarks/train_bench.py: the tiny CPU run end to end (CI), and its search/FLOPs/sharding logic."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

SCRIPT = ROOT / "benchmarks" / "train_bench.py"


def load_bench():
    spec = importlib.util.spec_from_file_location("train_bench", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bench = load_bench()


def test_tiny_run_end_to_end_on_cpu(tmp_path: Path):
    out = tmp_path / "results" / "tiny.json"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "" if not _has_cuda() else os.environ.get("CUDA_VISIBLE_DEVICES", "")}
    res = subprocess.run([sys.executable, str(SCRIPT), "--shape", "tiny", "--steps", "3", "--warmup-steps", "1",
                          "--seq-len", "256", "--micro-batch-size", "2", "--out", str(out)], capture_output=True,
                         text=True, timeout=900, cwd=tmp_path, env=env)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["device"]["type"] in ("cpu", "cuda")
    for name in ("torch", "transformers", "peft", "bitsandbytes", "trl", "qlora-kit"):
        assert report["versions"][name]
    assert report["settings"]["seq_len"] == 256 and report["settings"]["steps"] == 3
    assert report["model"]["config"]["num_hidden_layers"] == 2 and "padding" in report["flops"]
    assert set(report["results"]) == {"chat", "full"}
    for mix, recipes in report["results"].items():
        assert set(recipes) == {"qlora-kit", "stock", "classic"}
        for name, r in recipes.items():
            assert r["status"] == "ok", (mix, name, r.get("error"))
            assert len(r["losses"]) == 3 and all(loss > 0 for loss in r["losses"])
            assert r["window"]["steps"] == 2 and r["window"]["seconds"] > 0
            assert r["tokens_per_second"] > 0 and r["computed_tokens_per_second"] >= r["tokens_per_second"]
            assert r["model_tflops_per_second"] > 0 and r["hardware_tflops_per_second"] > 0
            if report["device"]["type"] == "cpu":
                assert r["peak_allocated_bytes"] is None and r["mfu"] is None  # no cap/peak on CPU: null, not invented
        assert recipes["qlora-kit"]["planner"]["total_bytes"] > recipes["qlora-kit"]["planner"][
            "torch_allocated_peak_bytes"] > 0
        assert recipes["stock"]["planner"] is None and recipes["classic"]["planner"] is None
    chat, full = report["results"]["chat"], report["results"]["full"]
    # Chat lengths: the padded recipes pad two samples per row, qlora-kit packs several samples per row.
    assert chat["stock"]["padding_fraction"] > 0 and chat["classic"]["padding_fraction"] > 0
    assert chat["qlora-kit"]["padding_fraction"] == 0
    assert chat["qlora-kit"]["tokens_per_step"] > chat["stock"]["tokens_per_step"]
    assert full["stock"]["padding_fraction"] == 0 and full["stock"]["tokens_per_step"] == 2 * 256
    # Which loss each recipe took is on record.
    assert "fused LM head" in chat["stock"]["recipe_info"]["loss_path"]
    assert chat["classic"]["recipe_info"]["loss_path"].startswith("full logits")
    assert chat["qlora-kit"]["recipe_info"]["memory_settings"]["fused_loss"] is True
    if report["device"]["type"] == "cpu":
        assert report["settings"]["cap_gib"] is None and report["max_seq_len"] is None
    assert "results:" in res.stdout


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def test_max_seq_len_search_doubles_then_bisects(monkeypatch):
    calls = []

    def fake_run_job(job, isolate):
        calls.append(job["seq_len"])
        ok = job["seq_len"] <= 3000
        return {"status": "ok" if ok else "oom", "peak_reserved_bytes": None}

    monkeypatch.setattr(bench, "run_job", fake_run_job)
    found = bench.find_max_seq_len({"seq_len": 2048, "steps": 10}, start=1024, limit=65536, isolate=False)
    assert found["max_seq_len"] == 2816 and not found["capped_by_limit"]  # largest multiple of 256 <= 3000
    assert calls[:3] == [1024, 2048, 4096]  # doubling until the first OOM
    assert all(c % 256 == 0 for c in calls)
    calls.clear()
    capped = bench.find_max_seq_len({"seq_len": 512, "steps": 10}, start=512, limit=2048, isolate=False)
    assert capped["max_seq_len"] == 2048 and capped["capped_by_limit"] and calls == [512, 1024, 2048]
    calls.clear()  # a limit that doubling would overshoot is tried itself
    below = bench.find_max_seq_len({"seq_len": 1024, "steps": 10}, start=1024, limit=2900, isolate=False)
    assert below["max_seq_len"] == 2816 and below["capped_by_limit"] and calls == [1024, 2048, 2816]


def test_max_seq_len_search_reports_real_errors(monkeypatch):
    monkeypatch.setattr(bench, "run_job", lambda job, isolate: {"status": "error", "error": "boom",
                                                                "peak_reserved_bytes": None})
    with pytest.raises(RuntimeError, match="boom"):
        bench.find_max_seq_len({"seq_len": 256, "steps": 1}, start=256, limit=1024, isolate=False)


def test_flop_counts_by_hand(tmp_path: Path):
    (tmp_path / "config.json").write_text((ROOT / "qlora_kit" / "model_shapes" / "llama-3.1-8b.json").read_text())
    fm = bench.flop_model(tmp_path, 16, "all-linear")
    per_layer = 4096 * 4096 * 2 + 4096 * 1024 * 2 + 4096 * 14336 * 3
    assert fm["layer_matmul_params"] == per_layer and fm["lm_head_params"] == 128256 * 4096
    assert 32 * per_layer + 128256 * 4096 == 7_504_658_432  # N of "4*N FLOPs per token"
    assert fm["layer_lora_params"] * 32 == 41_943_040
    # One packed row of two samples (100 + 300 tokens, 50 labelled): model FLOPs count real tokens only,
    # the whole lm_head per token and causal attention per sample.
    packed = {"real": 400, "computed": 400, "rows": 1, "row_length": 400, "lengths": [100, 300], "labelled": 50,
              "packed": True}
    qlora = {"checkpointed_layers": ("every", 1), "lm_head_positions": "labelled", "loss_recomputes_projection": True}
    model, hardware = bench.step_flops(packed, fm, qlora)
    n = 7_504_658_432
    attention = 6 * 32 * 4096 * (100**2 + 300**2)
    assert model == 400 * (4 * n + 6 * 41_943_040) + attention
    # Hardware: the decoder without the lm_head, every layer's forward again (recompute), and the lm_head
    # only for the 50 labelled tokens, projected three times (forward, recompute, input gradient).
    decoder = 32 * per_layer
    expected = (400 * (4 * decoder + 6 * 41_943_040) + attention
                + 32 * (400 * 2 * (per_layer + 41_943_040 // 32) + 2 * 4096 * (100**2 + 300**2))
                + 50 * 6 * 128256 * 4096)
    assert hardware == expected
    # Two padded rows (lengths 100 and 300, padded to 300): hardware counts the padding and the full
    # logits of every position; the model FLOPs are those of the same two samples.
    padded = {"real": 400, "computed": 600, "rows": 2, "row_length": 300, "lengths": [100, 300], "labelled": 400,
              "packed": False}
    classic = {"checkpointed_layers": ("every", 1), "lm_head_positions": "all", "loss_recomputes_projection": False}
    model2, hardware2 = bench.step_flops(padded, fm, classic)
    assert model2 == model
    square = 2 * 300**2
    assert hardware2 == (600 * (4 * decoder + 6 * 41_943_040) + 6 * 32 * 4096 * square
                         + 32 * (600 * 2 * (per_layer + 41_943_040 // 32) + 2 * 4096 * square)
                         + 600 * 4 * 128256 * 4096)


def test_batch_stats_of_padded_and_packed_batches():
    import torch

    padded = {"input_ids": torch.zeros(2, 5, dtype=torch.long), "attention_mask": torch.tensor([[1] * 5, [1, 1, 0, 0, 0]]),
              "labels": torch.tensor([[-100, 1, 1, 1, 1], [-100, 1, -100, -100, -100]])}
    assert bench.batch_stats(padded) == {"real": 7, "computed": 10, "rows": 2, "row_length": 5, "lengths": [5, 2],
                                         "labelled": 5, "packed": False}
    packed = {"input_ids": torch.zeros(1, 9, dtype=torch.long), "labels": torch.tensor([[-100, 1, 1, -100, 1, 1, 1,
                                                                                         -100, 1]]),
              "packed_seq_lens": (3, 4, 2)}
    assert bench.batch_stats(packed)["lengths"] == [3, 4, 2] and bench.batch_stats(packed)["labelled"] == 6
    free = {"input_ids": torch.zeros(1, 6, dtype=torch.long), "labels": torch.zeros(1, 6, dtype=torch.long),
            "position_ids": torch.tensor([[0, 1, 2, 0, 1, 2]])}
    assert bench.batch_stats(free)["lengths"] == [3, 3]


def test_chat_lengths_are_log_normal_around_400_tokens():
    import statistics

    lengths = bench.chat_lengths(4000, 2048)
    assert 360 <= statistics.median(lengths) <= 440
    assert min(lengths) >= bench.CHAT_MIN_TOKENS and max(lengths) == 2048  # the tail is cut at max_length
    assert 0.02 < sum(n == 2048 for n in lengths) / len(lengths) < 0.1
    assert bench.chat_lengths(10, 2048) == bench.chat_lengths(10, 2048)  # seeded


def test_chat_rows_have_about_the_requested_token_counts(tmp_path: Path):
    from qlora_kit.model.tiny import build_tokenizer

    tok = build_tokenizer(tmp_path / "tok")
    wpt = 1 / bench.tokens_per_word(tok)
    path = bench.write_chat_rows(tmp_path / "chat.jsonl", [64, 400, 1500], wpt)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    for want, row in zip([64, 400, 1500], rows):
        got = len(tok(tok.apply_chat_template(row["messages"], tokenize=False))["input_ids"])
        assert 0.8 * want <= got <= 1.25 * want + 16, (want, got)


@pytest.mark.parametrize("name, tflops", [
    ("NVIDIA H100 80GB HBM3", 989.4), ("NVIDIA H100 PCIe", 756.0), ("NVIDIA H200", 989.4),
    ("NVIDIA A100-SXM4-80GB", 312.0), ("NVIDIA A10G", 125.0), ("NVIDIA L40S", 362.1), ("NVIDIA L4", 121.0),
    ("NVIDIA GeForce RTX 4090", 165.2), ("NVIDIA GeForce RTX 3090", 71.0), ("Some Future GPU", None),
])
def test_peak_tflops_detection(name, tflops):
    assert bench.detect_peak_tflops(name) == tflops


def test_real_shape_config_and_sharded_random_weights(tmp_path: Path):
    import torch
    from safetensors.torch import load_file

    from qlora_kit.model.tiny import build_tokenizer

    tok = build_tokenizer(tmp_path / "tok")
    config = bench.shape_config("llama-3.1-8b", tok)
    assert (config.hidden_size, config.num_key_value_heads, config.vocab_size) == (4096, 8, 128256)
    assert config.eos_token_id == tok.eos_token_id and config.pad_token_id == tok.pad_token_id
    shapes = {"model.embed_tokens.weight": (64, 16), "model.norm.weight": (16,), "lm_head.weight": (64, 16),
              "model.layers.0.self_attn.q_proj.bias": (16,)}
    bench.write_random_weights(shapes, tmp_path, torch.bfloat16, "cpu", seed=0, shard_bytes=3000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(shapes)
    tensors = {}
    for fname in set(index["weight_map"].values()):
        tensors.update(load_file(str(tmp_path / fname)))
    assert torch.all(tensors["model.norm.weight"] == 1)
    assert torch.all(tensors["model.layers.0.self_attn.q_proj.bias"] == 0)
    assert tensors["lm_head.weight"].dtype == torch.bfloat16 and 0.005 < tensors["lm_head.weight"].float().std() < 0.05


def test_synthetic_rows_fill_the_sequence(tmp_path: Path):
    from qlora_kit.model.tiny import build_tokenizer

    tok = build_tokenizer(tmp_path / "tok")
    path = bench.write_full_rows(tmp_path / "rows.jsonl", 3, 512)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(rows) == 3
    assert all(len(tok(tok.apply_chat_template(r["messages"], tokenize=False))["input_ids"]) > 512 for r in rows)
