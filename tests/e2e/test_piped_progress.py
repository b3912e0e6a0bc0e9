"""Progress without a terminal: a piped training run and a piped export say where they are, with elapsed
time and an ETA, between their logged steps and through verification; on a terminal the bars show it."""

from __future__ import annotations

import io
import json
import logging
import re
from pathlib import Path

import pytest
import torch
from conftest import run_cli, write_config
from rich.console import Console
from run_fixture import make_run

from qlora_kit.core import logs, pacing
from qlora_kit.export.command import export_run

pytestmark = pytest.mark.e2e

TIMING = r"elapsed \d+(?:s|m\d\ds)  eta (?:-|\d+(?:s|m\d\ds))"


def test_piped_training_writes_progress_between_logged_steps(tmp_path: Path, tiny_llama: Path,
                                                             data_file: Path) -> None:
    """logging_steps far above max_steps: before, nothing until the last step; now a `progress:` line after
    every step (interval 0), each log line with elapsed and ETA; metrics.jsonl still has the last step only."""
    run = tmp_path / "run"
    cfg = write_config(tmp_path / "cfg.yaml", tiny_llama, data_file, run,
                       train={"max_steps": 5, "logging_steps": 1000, "save_steps": 1000,
                              "gradient_accumulation_steps": 2})
    done = run_cli("train", str(cfg), timeout=300, env={pacing.ENV_INTERVAL: "0", "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    text = done.stderr  # stderr was a pipe: whole lines, neither wrapped nor padded
    for step in range(1, 5):
        assert re.search(rf"^INFO +progress: step {step}/5  {TIMING}$", text, re.M), (step, text[-3000:])
    assert re.search(rf"^INFO +step 5  loss \S+  lr \S+  \d+ tok/s  5/5  {TIMING}$", text, re.M), text[-3000:]
    assert "━" not in done.stderr  # no bar drawn into the pipe
    losses = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in losses if "loss" in r] == [5]
    log_text = (run / "train.log").read_text()  # the run's own log has them too
    assert re.search(rf"INFO +progress: step 2/5  {TIMING}", log_text), log_text


@pytest.fixture(scope="module")
def small_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.set_num_threads(1)
    return make_run(tmp_path_factory.mktemp("piped"), "llama", n_heldout=3)


def _export_lines(run: Path, out: Path, caplog: pytest.LogCaptureFixture, **options) -> list[str]:
    with caplog.at_level(logging.INFO, logger="qlora_kit"):
        assert export_run(run, out, verify_prompts=3, **options) == 0
    return [r.getMessage() for r in caplog.records]


def test_piped_export_shows_each_check_row_by_row(small_run: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(logs._STDERR, "console", Console(file=io.StringIO(), force_terminal=False))
    monkeypatch.setenv(pacing.ENV_INTERVAL, "0")
    lines = _export_lines(small_run, tmp_path / "hf", caplog)
    assert any(re.fullmatch(rf"merging into 1 safetensors file\(s\): [\d.]+/[\d.]+ MB \(100%\)  {TIMING}", line)
               for line in lines), lines
    for check in ("the trained model (NF4 base + adapter)", "the export (float32 compute)"):
        rows = [line for line in lines if line.startswith(f"verifying {check}: ")]
        assert [re.match(r".*: prompt (\d)/3  " + TIMING, line).group(1) for line in rows] == ["0", "1", "2", "3"], lines
    gguf = _export_lines(small_run, tmp_path / "gguf", caplog, fmt="gguf", quant="f16")
    assert any(line.startswith("merging into ") and ".gguf: " in line and "(100%)" in line for line in gguf), gguf
    assert any(re.match(r"verifying the GGUF .*: prompt 3/3  " + TIMING, line) for line in gguf), gguf


def test_export_on_a_terminal_draws_the_checks_as_bars(small_run: Path, tmp_path: Path,
                                                       caplog: pytest.LogCaptureFixture,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    screen = io.StringIO()
    monkeypatch.setitem(logs._STDERR, "console", Console(file=screen, force_terminal=True, width=160,
                                                         color_system=None))
    lines = _export_lines(small_run, tmp_path / "hf", caplog)
    assert not any(line.startswith(("verifying", "merging")) for line in lines)  # bars, not lines
    shown = screen.getvalue()
    assert "verifying the trained model (NF4 base + adapter)" in shown and "prompt 0/3" in shown, shown[-2000:]
    assert "verifying the export (float32 compute)" in shown and "merging into 1 safetensors" in shown


def test_quiet_export_writes_no_progress(small_run: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(pacing.ENV_INTERVAL, "0")
    lines = _export_lines(small_run, tmp_path / "hf", caplog, show_progress=False)
    assert not any(line.startswith(("verifying", "merging")) for line in lines), lines
