"""`qlora-kit data CONFIG` / `train --dry-run`: the data a run trains on, without training (issue 21)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from conftest import arithmetic_rows, run_cli, snapshot, write_jsonl
from data_rows import rows_in_format
from tool_rows import weather_row

pytestmark = pytest.mark.e2e


@pytest.fixture
def workspace(tmp_path: Path, tiny_llama: Path) -> Path:
    """Two sources (messages + tool calls, Alpaca) and a copy of the tiny model *without its weights*."""
    model = tmp_path / "model-no-weights"
    shutil.copytree(tiny_llama, model, ignore=shutil.ignore_patterns("*.safetensors"))
    chat = write_jsonl(tmp_path / "chat.jsonl", arithmetic_rows(30) + [weather_row(i) for i in range(6)])
    with chat.open("a") as f:
        f.write('{"messages": [{"role": "user", "content": "cut\n')
    (tmp_path / "alpaca.json").write_text(json.dumps(rows_in_format("alpaca", 20)))
    cfg = {"model": {"name_or_path": str(model), "chat_template": "chatml"},
           "data": {"datasets": [{"path": str(chat)}, {"path": str(tmp_path / "alpaca.json"), "weight": 2}],
                    "max_bad_fraction": 0.05},
           "train": {"max_length": 512}, "output_dir": str(tmp_path / "out")}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))
    return tmp_path


def test_dry_run_audits_without_weights_and_writes_nothing(workspace: Path) -> None:
    before = snapshot(workspace)
    proc = run_cli("data", str(workspace / "run.yaml"), "--json", cwd=workspace)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout)
    assert [(s["key"], s["format"], s["bad_rows"], s["weight"]) for s in summary["sources"]] == [
        ("data.datasets[1]", "messages", [37], 1.0), ("data.datasets[2]", "alpaca", [], 2.0)]
    assert summary["tool_rows"] == 6 and summary["train_rows"] == 34 + 2 * 19  # 2 + 1 held out
    assert all("«" in s["preview"] for s in summary["sources"])
    assert "nothing was written" in proc.stderr
    proc = run_cli("train", str(workspace / "run.yaml"), "--dry-run", cwd=workspace)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.count("preview (trained tokens") == 2  # one per source
    assert "per source" in proc.stderr and "tool-calling rows" in proc.stderr
    assert snapshot(workspace) == before and not (workspace / "out").exists()


def test_dry_run_stops_where_train_stops(workspace: Path, tiny_llama: Path) -> None:
    bad = write_jsonl(workspace / "bad.jsonl", rows_in_format("sharegpt", 5) + [{"conversations": 1}] * 5)
    overrides = ["--set", f'data.datasets=[{{"path": "{bad}"}}]', "--set", f"model.name_or_path={tiny_llama}"]
    dry = run_cli("data", str(workspace / "run.yaml"), *overrides, cwd=workspace)
    real = run_cli("train", str(workspace / "run.yaml"), *overrides, cwd=workspace)
    assert dry.returncode == real.returncode == 2
    error = [line for line in dry.stderr.splitlines() if line.startswith("error:")]
    assert error and error == [line for line in real.stderr.splitlines() if line.startswith("error:")]
    assert "5 of 10 rows" in error[0]
    tools_only = run_cli("data", str(workspace / "run.yaml"), "--set", "model.chat_template=null", cwd=workspace)
    assert tools_only.returncode == 2 and "cannot render them" in tools_only.stderr
