"""benchmarks/variants_bench.py on a tiny config: every field measured, a table written."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from conftest import ROOT, arithmetic_rows, write_config, write_jsonl

SCRIPT = ROOT / "benchmarks" / "variants_bench.py"


def test_tiny_config_two_variants(tmp_path: Path, tiny_llama: Path) -> None:
    data = write_jsonl(tmp_path / "data.jsonl", arithmetic_rows(48))
    cfg = write_config(tmp_path / "cfg.yaml", tiny_llama, data, tmp_path / "unused",
                       train={"max_steps": 4, "save_steps": 4, "logging_steps": 2})
    out = tmp_path / "res" / "variants.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--config", str(cfg), "--variants", "lora,pissa",
                           "--workdir", str(tmp_path / "work"), "--threads", "1", "--out", str(out),
                           "--note", "test"], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["environment"]["note"] == "test" and report["environment"]["versions"]["peft"]
    by_name = {r["variant"]: r for r in report["results"]}
    assert set(by_name) == {"lora", "pissa"}
    for r in by_name.values():
        assert r["steps"] == 4 and r["heldout_rows"] > 0 and 0 <= r["exact_match"] <= 1
        assert r["final_train_loss"] > 0 and r["final_eval_loss"] > 0 and r["trainable_parameters"] > 0
        assert r["seconds_per_step"] > 0 and r["peak_rss_bytes"] > 0 and r["torch_threads"] == 1
    assert by_name["pissa"]["overrides"][-1] == "lora.init=pissa" and by_name["pissa"]["residual_base"]
    assert by_name["pissa"]["init_seconds"] is not None and by_name["lora"]["init_seconds"] is None
    table = out.with_suffix(".md").read_text()
    assert "| pissa |" in table and "held-out exact match" in table
