"""A run on several sources with tool calls: exact resume (files moved), a changed source refused, and the
export keeping the tool template and checking tool rows (issue 21)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import arithmetic_rows, assert_same_result, interrupted_copy, run_cli, write_jsonl
from data_rows import rows_in_format
from tool_rows import QWEN25_TOOLS, weather_row

pytestmark = pytest.mark.e2e

ENV_1_THREAD = {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
TRAIN = {"max_steps": 8, "save_steps": 4, "logging_steps": 1, "save_total_limit": 10, "learning_rate": 5e-3,
         "micro_batch_size": 2, "gradient_accumulation_steps": 2, "max_length": 512, "warmup_steps": 0, "seed": 3,
         "optimizer": "adamw_torch"}


def write_sources(folder: Path) -> list[Path]:
    """Tool conversations, chat rows and Alpaca rows (the tool source first: its rows lead the export check)."""
    folder.mkdir(parents=True, exist_ok=True)
    alpaca = folder / "alpaca.json"
    alpaca.write_text(json.dumps(rows_in_format("alpaca", 16)))
    return [write_jsonl(folder / "tools.jsonl", [weather_row(i) for i in range(12)]),
            write_jsonl(folder / "chat.jsonl", arithmetic_rows(40)), alpaca]


def write_run_config(path: Path, model: Path, files: list[Path], out: Path) -> Path:
    weights = [2, 1, 0.5]
    cfg: dict[str, Any] = {
        "model": {"name_or_path": str(model)}, "lora": {"r": 8, "alpha": 16, "dropout": 0.1},
        "data": {"datasets": [{"path": str(f), "weight": w} for f, w in zip(files, weights)], "val_fraction": 0.15},
        "train": TRAIN, "output_dir": str(out)}
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def tool_model(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model with a Qwen2.5-shaped tool template (and default system prompt) in its tokenizer."""
    from transformers import AutoTokenizer

    out = tmp_path_factory.mktemp("tool-model") / "model"
    shutil.copytree(tiny_llama, out)
    tok = AutoTokenizer.from_pretrained(out)
    tok.chat_template = QWEN25_TOOLS
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def mix_run(tool_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("mix")
    config = write_run_config(root / "run.yaml", tool_model, write_sources(root / "data"), root / "run")
    proc = run_cli("train", str(config), env=ENV_1_THREAD)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root / "run"


def test_resume_of_a_mix_is_exact_after_moving_the_files(mix_run: Path, tool_model: Path, tmp_path: Path) -> None:
    summary = json.loads((mix_run / "data_summary.json").read_text())
    assert [(s["key"], s["weight"], s["tool_rows"]) for s in summary["sources"]] == [
        ("data.datasets[1]", 2.0, 12), ("data.datasets[2]", 1.0, 0), ("data.datasets[3]", 0.5, 0)]
    assert "inserts its default system prompt" in summary["system_prompt_note"]
    run = interrupted_copy(mix_run, tmp_path / "run", last_step=4)
    moved = write_sources(tmp_path / "elsewhere")  # the same bytes in another folder
    config = write_run_config(tmp_path / "moved.yaml", tool_model, moved, run)
    proc = run_cli("train", str(config), "--resume", env=ENV_1_THREAD)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from checkpoint-4" in proc.stderr
    assert_same_result(run, mix_run)


def test_resume_refuses_a_changed_source_naming_it(mix_run: Path, tool_model: Path, tmp_path: Path) -> None:
    run = interrupted_copy(mix_run, tmp_path / "run", last_step=4)
    files = write_sources(tmp_path / "data")
    write_jsonl(files[1], arithmetic_rows(41))
    proc = run_cli("train", str(write_run_config(tmp_path / "c.yaml", tool_model, files, run)), "--resume",
                   env=ENV_1_THREAD)
    assert proc.returncode == 2 and "data.datasets[2]" in proc.stderr and "changed since" in proc.stderr, \
        proc.stderr[-2000:]


def test_export_keeps_the_tool_template_and_checks_tool_rows(mix_run: Path, tmp_path: Path) -> None:
    from qlora_kit.export.command import export_run

    heldout = [json.loads(line) for line in (mix_run / "heldout.jsonl").read_text().splitlines()]
    assert heldout[0]["tools"][0]["function"]["name"] == "get_weather"
    out = tmp_path / "hf"
    assert export_run(mix_run, out, show_progress=False, verify_prompts=4) == 0
    report = json.loads((out / "export_report.json").read_text())
    assert report["verification"]["status"] == "passed" and report["verification"]["prompts"] == 4
    config = json.loads((out / "tokenizer_config.json").read_text())
    template = config.get("chat_template") or (out / "chat_template.jinja").read_text()
    assert template == QWEN25_TOOLS
    gguf = tmp_path / "gguf"
    assert export_run(mix_run, gguf, fmt="gguf", quant="f16", verify=False, show_progress=False) == 0
    from gguf import GGUFReader

    reader = GGUFReader(next(gguf.glob("*.gguf")))
    field = reader.fields["tokenizer.chat_template"]
    assert bytes(field.parts[field.data[0]]).decode() == QWEN25_TOOLS  # tool rendering included
    modelfile = (gguf / "Modelfile").read_text()
    assert "chat format: chatml" in modelfile and 'PARAMETER stop "<|im_end|>"' in modelfile
    assert "# warning: the run trained tool calls, which this Modelfile's TEMPLATE does not render" in modelfile
    report = json.loads((gguf / "export_report.json").read_text())
    assert any("llama-server --jinja" in w for w in report["modelfile"]["warnings"])
