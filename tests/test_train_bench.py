"""benchmarks/train_bench.py: the tiny CPU run end to end (CI), and its search/FLOPs/sharding logic."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "train_bench.py"


def load_bench():
    spec = importlib.util.spec_from_file_location("train_bench", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bench = load_bench()


def _qlora_kit_trainer_available() -> bool:
    try:
        import qlora_kit.data  # noqa: F401
        import qlora_kit.train  # noqa: F401
    except ImportError:
        return False
    return True


def test_tiny_run_end_to_end_on_cpu(tmp_path: Path):
    recipes = "qlora-kit,stock" if _qlora_kit_trainer_available() else "stock"
    out = tmp_path / "results" / "tiny.json"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "" if not _has_cuda() else os.environ.get("CUDA_VISIBLE_DEVICES", "")}
    res = subprocess.run([sys.executable, str(SCRIPT), "--shape", "tiny", "--steps", "2", "--seq-len", "64",
                          "--recipes", recipes, "--out", str(out)], capture_output=True, text=True, timeout=600,
                         cwd=tmp_path, env=env)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["device"]["type"] in ("cpu", "cuda")
    for name in ("torch", "transformers", "peft", "bitsandbytes", "trl", "qlora-kit"):
        assert report["versions"][name]
    assert report["settings"]["seq_len"] == 64 and report["settings"]["steps"] == 2
    assert report["model"]["config"]["num_hidden_layers"] == 2 and report["model"]["flops_per_token"] > 0
    for recipe in recipes.split(","):
        r = report["results"][recipe]
        assert r["status"] == "ok", r.get("error")
        assert len(r["losses"]) == 2 and all(loss > 0 for loss in r["losses"])
        assert r["tokens_per_second"] > 0
        assert r["planner"]["total_bytes"] > r["planner"]["torch_allocated_peak_bytes"] > 0
        if report["device"]["type"] == "cpu":
            assert r["peak_allocated_bytes"] is None and r["mfu"] is None  # no cap/peak on CPU: null, not invented
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


def test_max_seq_len_search_reports_real_errors(monkeypatch):
    monkeypatch.setattr(bench, "run_job", lambda job, isolate: {"status": "error", "error": "boom",
                                                                "peak_reserved_bytes": None})
    with pytest.raises(RuntimeError, match="boom"):
        bench.find_max_seq_len({"seq_len": 256, "steps": 1}, start=256, limit=1024, isolate=False)


def test_flops_per_token_llama31_8b_by_hand(tmp_path: Path):
    (tmp_path / "config.json").write_text((ROOT / "qlora_kit" / "model_shapes" / "llama-3.1-8b.json").read_text())
    f = bench.flops_per_token(tmp_path, 2048, 16, "all-linear")
    per_layer = 4096 * 4096 * 2 + 4096 * 1024 * 2 + 4096 * 14336 * 3
    assert f["n_matmul"] == 32 * per_layer + 128256 * 4096 == 7_504_658_432
    assert f["n_lora"] == 41_943_040
    attention = 6 * 32 * 2048 * 4096  # causal: forward 2*T*q_dim per layer, backward twice that
    assert f["flops_per_token"] == 4 * 7_504_658_432 + 6 * 41_943_040 + attention == 31_880_904_704


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

    from qlora_kit.tiny import build_tokenizer

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
    from qlora_kit.tiny import build_tokenizer

    tok = build_tokenizer(tmp_path / "tok")
    path = bench.write_rows(tmp_path / "rows.jsonl", 3, 512)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(rows) == 3
    assert all(len(tok(tok.apply_chat_template(r["messages"], tokenize=False))["input_ids"]) > 512 for r in rows)
