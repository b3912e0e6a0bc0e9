"""What a run prints and records: dead output pipes never cost the checkpoint, train.log, metrics across a
resume inside a logging window, log lines next to the progress bar, no duplicated lines, --version."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from importlib.metadata import version
from pathlib import Path

import pytest
import torch
from conftest import default_sigint, metrics_of, run_cli, write_config
from safetensors.torch import load_file

from qlora_kit.core.errors import EXIT_PREEMPTED, Preempted
from qlora_kit.core.signals import StopRequest
from qlora_kit.rundir.checkpoint import list_checkpoints
from qlora_kit.train import loop, recipe
from qlora_kit.train import state as qtrain_state

pytestmark = pytest.mark.e2e


TRAIN = {"max_steps": 400, "save_steps": 100, "logging_steps": 1, "learning_rate": 5e-3, "optimizer": "adamw_torch"}


def _logged_steps(run: Path) -> int:
    metrics = run / "metrics.jsonl"
    return sum('"loss"' in line for line in metrics.read_text().splitlines()) if metrics.exists() else 0


def _wait_for_steps(run: Path, steps: int, proc: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while _logged_steps(run) < steps:
        assert proc.poll() is None, f"training ended early with status {proc.returncode}"
        assert time.time() < deadline, "training did not reach the step in time"
        time.sleep(0.05)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_stop_signal_checkpoints_when_the_output_pipe_is_dead(tmp_path: Path, tiny_llama: Path, data_file: Path,
                                                               sig: signal.Signals) -> None:
    """`qlora-kit train ... 2>&1 | tee log`, then tee dies and Ctrl-C/SIGTERM arrives: the run must still
    checkpoint, exit 75, and say so in OUTPUT_DIR/train.log; --resume appends to that log."""
    run = tmp_path / "run"
    cfg = write_config(tmp_path / "cfg.yaml", tiny_llama, data_file, run, train=TRAIN)
    trainer = subprocess.Popen([sys.executable, "-m", "qlora_kit.cli", "train", str(cfg)], stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, preexec_fn=default_sigint)
    reader = subprocess.Popen(["cat"], stdin=trainer.stdout, stdout=subprocess.DEVNULL)
    trainer.stdout.close()  # only the reader holds the pipe's read end now
    try:
        _wait_for_steps(run, 2, trainer)
        reader.kill()
        reader.wait()
        steps = _logged_steps(run)
        _wait_for_steps(run, steps + 2, trainer)  # it logged into the dead pipe and went on
        trainer.send_signal(sig)
        assert trainer.wait(timeout=180) == EXIT_PREEMPTED
    finally:
        trainer.kill()
        reader.kill()
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["status"] == "preempted", manifest.get("error")
    saved = list_checkpoints(run)[-1][0]
    assert saved >= steps + 2
    log_text = (run / "train.log").read_text()
    assert f"{sig.name} received" in log_text and f"saved checkpoint-{saved}" in log_text
    assert f"error: stopped by {sig.name} at step {saved}" in log_text

    resumed = run_cli("train", str(cfg), "--resume", "--set", f"train.max_steps={saved + 2}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    log_text = (run / "train.log").read_text()
    assert log_text.count("qlora-kit train") == 2 and "--resume" in log_text
    assert f"resumed from checkpoint-{saved}" in log_text and "done: adapter in" in log_text
    assert re.search(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ INFO +step \d+ +loss", log_text, flags=re.M)


@pytest.mark.usefixtures("one_thread")
def test_metrics_after_a_resume_inside_a_logging_window_equal_the_uninterrupted_run(
        tmp_path: Path, tiny_llama: Path, data_file: Path) -> None:
    """Checkpoint at step 6, log every 4 steps: the loss logged at step 8 averages steps 5-8 either way."""
    train = {"max_steps": 12, "logging_steps": 4, "save_steps": 6, "save_total_limit": 5, "learning_rate": 5e-3,
             "optimizer": "adamw_torch", "gradient_accumulation_steps": 2}
    reference = tmp_path / "reference"
    cfg = write_config(tmp_path / "ref.yaml", tiny_llama, data_file, reference, train=train)
    assert recipe.run_training(cfg, []) == 0
    state = json.loads((reference / "checkpoint-6" / "state.json").read_text())
    assert state["log_window"]["steps"] == 2 and state["log_window"]["loss_sum"] > 0

    resumed = tmp_path / "resumed"
    subprocess.run(["cp", "-r", str(reference), str(resumed)], check=True)
    for name in ("checkpoint-12", "adapter"):
        subprocess.run(["rm", "-r", str(resumed / name)], check=True)
    cfg = write_config(tmp_path / "resumed.yaml", tiny_llama, data_file, resumed, train=train)
    assert recipe.run_training(cfg, [], resume=True) == 0
    assert [r["step"] for r in metrics_of(resumed) if "loss" in r] == [4, 8, 12]
    assert metrics_of(resumed) == metrics_of(reference)
    a = load_file(reference / "adapter/adapter_model.safetensors")
    b = load_file(resumed / "adapter/adapter_model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


EVAL_TRAIN = {"max_steps": 8, "logging_steps": 2, "eval_steps": 4, "save_steps": 4, "save_total_limit": 5,
              "learning_rate": 5e-3, "optimizer": "adamw_torch"}


@pytest.fixture(scope="module")
def eval_reference(tmp_path_factory: pytest.TempPathFactory, tiny_llama: Path, data_file: Path) -> Path:
    """An uninterrupted run with evaluations at steps 4 and 8 (one thread, as the tests that compare with it)."""
    root = tmp_path_factory.mktemp("eval-ref")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert recipe.run_training(write_config(root / "cfg.yaml", tiny_llama, data_file, root / "run",
                                                train=EVAL_TRAIN), []) == 0
    finally:
        torch.set_num_threads(threads)
    return root / "run"


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("cut_at", [4, 8], ids=["mid-run", "last-step"])
def test_a_signal_during_evaluation_is_resumed_with_that_evaluation(
        tmp_path: Path, tiny_llama: Path, data_file: Path, eval_reference: Path, monkeypatch: pytest.MonkeyPatch,
        cut_at: int) -> None:
    """SIGTERM while step N is being evaluated: checkpoint N, exit 75; --resume evaluates step N first."""
    real_evaluate = loop.evaluate

    def signal_during(run: qtrain_state.Run, stop: StopRequest) -> float | None:
        if run.step == cut_at:
            stop.signal_name = "SIGTERM"  # what StopRequest's handler does when the signal arrives
        return real_evaluate(run, stop)

    run = tmp_path / "run"
    cfg = write_config(tmp_path / "cfg.yaml", tiny_llama, data_file, run, train=EVAL_TRAIN)
    monkeypatch.setattr(loop, "evaluate", signal_during)
    with pytest.raises(Preempted):
        recipe.run_training(cfg, [])
    monkeypatch.setattr(loop, "evaluate", real_evaluate)
    assert list_checkpoints(run)[-1][0] == cut_at and not (run / "adapter").exists()
    assert not any("eval_loss" in r for r in metrics_of(run) if r["step"] == cut_at)

    assert recipe.run_training(cfg, [], resume=True) == 0
    assert metrics_of(run) == metrics_of(eval_reference)
    assert json.loads((run / "manifest.json").read_text())["final_metrics"]["eval_loss"] == \
        json.loads((eval_reference / "manifest.json").read_text())["final_metrics"]["eval_loss"]


def test_dead_stderr_is_silenced_not_raised(tmp_path: Path) -> None:
    """rich's default on a broken pipe is SystemExit(1); ours drops the output and goes on."""
    code = ("import logging, os, sys\n"
            "from qlora_kit.core import logs\n"
            "logs.setup_logging(False)\n"
            "r, w = os.pipe(); os.dup2(w, 2); os.close(r)\n"
            "for i in range(3): logging.getLogger('qlora_kit').info('line %d', i)\n"
            "logs.echo('error: x'); logs.flush_streams(); print('still here')\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "still here", proc.stderr


def test_version_flag() -> None:
    proc = run_cli("--version")
    assert proc.returncode == 0 and proc.stdout.strip() == f"qlora-kit {version('qlora-kit')}"
