"""What a run shows and refuses before it starts: log window, progress bar, warnings."""

from __future__ import annotations

import io
import json
import logging
import re
from pathlib import Path

import pytest
import torch
from conftest import arithmetic_rows, write_jsonl
from rich.console import Console

from qlora_kit.core import logs
from qlora_kit.core.errors import OutputError
from qlora_kit.train import progress as qtrain_progress
from qlora_kit.train import recipe
from qlora_kit.train import state as qtrain_state


def test_window_state_round_trips_exactly() -> None:
    window = qtrain_state.LogWindow()
    for value in (0.1, 0.2, 0.30000001):
        window.add(torch.tensor(value, dtype=torch.float32), 7)
    again = qtrain_state.LogWindow.from_state(json.loads(json.dumps(window.to_state())), torch.device("cpu"))
    assert torch.equal(again.loss, window.loss) and (again.steps, again.tokens) == (3, 21)
    assert qtrain_state.LogWindow.from_state(None, torch.device("cpu")).steps == 0  # checkpoints written before


def _shown_lines(raw: str) -> list[str]:
    """What a terminal shows: ANSI codes dropped, each line's text after its last carriage return."""
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", raw)
    return [line.rsplit("\r", 1)[-1] for line in text.split("\n")]


def test_log_lines_never_run_into_the_progress_bar(monkeypatch: pytest.MonkeyPatch) -> None:
    out = io.StringIO()
    terminal = Console(file=out, force_terminal=True, width=120, color_system=None)
    monkeypatch.setitem(logs._STDERR, "console", terminal)
    handler = logs.ConsoleHandler(console=terminal, show_path=False, show_time=False, markup=False)
    logger = logging.getLogger("qlora_kit")
    level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    try:
        progress = qtrain_progress.Progress(total=4, done=0)
        assert progress.bar is not None and progress.bar.console is terminal
        for step in range(1, 5):
            progress.advance(step)
            progress.bar.refresh()
            progress.update(step, {"loss": 1.0 / step, "learning_rate": 1e-3, "tokens_per_second": 100.0})
            logger.warning("a line at step %d", step)
        progress.close()
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    shown = _shown_lines(out.getvalue())
    logged = [line for line in shown if "a line at step" in line or re.search(r"step \d +loss", line)]
    assert len(logged) == 8
    assert all(line.lstrip().startswith(("INFO", "WARNING")) and "━" not in line for line in logged), logged


def test_unwritable_output_dir_is_one_line_naming_docker_user(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                                               ) -> None:
    monkeypatch.setattr(recipe.os, "access", lambda path, mode: False)  # root may write anywhere: pretend
    with pytest.raises(OutputError) as err:
        recipe.check_writable(tmp_path / "out" / "run")
    assert "not writable" in err.value.message and "\n" not in err.value.message
    assert "--user $(id -u):$(id -g)" in (err.value.hint or "")


def test_validation_rows_from_another_file_are_warned_about(tmp_path: Path, caplog: pytest.LogCaptureFixture
                                                            ) -> None:
    from qlora_kit.core.config import load_config

    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text("model: {name_or_path: m}\ndata: {path: mine.jsonl, val_path: demo/heldout.jsonl}\n"
                        "output_dir: out\n")
    with caplog.at_level(logging.WARNING, logger="qlora_kit"):
        recipe.warn_if_validation_elsewhere(*load_config(cfg_path))
        recipe.warn_if_validation_elsewhere(*load_config(cfg_path, ["data.val_path=mine.jsonl"]))
        recipe.warn_if_validation_elsewhere(*load_config(cfg_path, ["data.val_path=null"]))
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1
    assert "demo/heldout.jsonl" in warnings[0] and f"file {cfg_path}" in warnings[0] and "mine.jsonl" in warnings[0]


def test_format_and_cpu_lines_are_logged_once(tiny_llama: Path, tmp_path: Path,
                                              caplog: pytest.LogCaptureFixture) -> None:
    from transformers import AutoTokenizer

    from qlora_kit.core.config import DataConfig
    from qlora_kit.data.build import build_data
    from qlora_kit.model.base import resolve_compute_dtype

    train = write_jsonl(tmp_path / "train.jsonl", arithmetic_rows(20))
    val = write_jsonl(tmp_path / "val.jsonl", arithmetic_rows(5, seed=1))
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    with caplog.at_level(logging.INFO, logger="qlora_kit"):
        build_data(DataConfig(path=str(train), val_path=str(val), format="messages"), tokenizer, 64, 0)
        build_data(DataConfig(path=str(train), val_path=str(val)), tokenizer, 64, 0)
        for _ in range(2):
            resolve_compute_dtype("auto", torch.device("cpu"))
    lines = [r.getMessage() for r in caplog.records]
    assert sum(line.startswith("data format:") for line in lines) == 2  # one per build, not one per file
    assert sum(line.startswith("CPU run:") for line in lines) <= 1
