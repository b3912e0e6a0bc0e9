"""Exact resume, preemption, kill -9 during a checkpoint write, non-finite guard, output-dir safety."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import RESUME_TRAIN as TRAIN
from conftest import (
    arithmetic_rows,
    assert_same_result,
    interrupted_copy,
    metrics_of,
    reseal_checkpoint,
    run_cli,
    snapshot,
    train_until_sigterm,
    write_config,
    write_jsonl,
)
from safetensors.torch import load_file

from qlora_kit.core.errors import NonFiniteLossError, Preempted
from qlora_kit.rundir.checkpoint import list_checkpoints
from qlora_kit.train import loop, recipe

pytestmark = pytest.mark.e2e


def test_sigterm_then_resume_is_exact(tmp_path: Path, tiny_llama: Path, data_file: Path, reference_run: Path) -> None:
    cfg = write_config(tmp_path / "cfg.yaml", tiny_llama, data_file, tmp_path / "run", train=TRAIN,
                       lora={"dropout": 0.1})
    err = train_until_sigterm(cfg, tmp_path / "run")
    assert "error: stopped by SIGTERM at step" in err and "--resume" in err and "Traceback" not in err
    manifest = json.loads((tmp_path / "run/manifest.json").read_text())
    assert manifest["status"] == "preempted"
    saved = list_checkpoints(tmp_path / "run")[-1][0]
    assert 5 <= saved < 16 and not (tmp_path / "run/adapter").exists()

    resumed = run_cli("train", str(cfg), "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from checkpoint-{saved}" in resumed.stderr
    assert_same_result(tmp_path / "run", reference_run)
    adapter_config = json.loads((tmp_path / "run/adapter/adapter_config.json").read_text())
    assert adapter_config["r"] == 8  # one adapter, not two stacked
    keys = load_file(tmp_path / "run/adapter/adapter_model.safetensors").keys()
    assert len(keys) == len(load_file(reference_run / "adapter/adapter_model.safetensors").keys())


KILL_DURING_WRITE = """
import os, signal, sys
from qlora_kit import cli
from qlora_kit.core import files as atomic
from qlora_kit.rundir import checkpoint
real = checkpoint.publish_dir
def publish(tmp, final):
    if final.name == "checkpoint-8":
        atomic.fsync_tree(tmp)
        os.kill(os.getpid(), signal.SIGKILL)  # dies with the checkpoint half-published
    real(tmp, final)
checkpoint.publish_dir = publish
sys.argv = ["qlora-kit", "train", sys.argv[1]]
cli.main()
"""


def test_kill9_during_checkpoint_write(tmp_path: Path, tiny_llama: Path, data_file: Path,
                                       reference_run: Path) -> None:
    cfg = write_config(tmp_path / "cfg.yaml", tiny_llama, data_file, tmp_path / "run", train=TRAIN,
                       lora={"dropout": 0.1})
    proc = subprocess.run([sys.executable, "-c", KILL_DURING_WRITE, str(cfg)], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == -signal.SIGKILL
    run = tmp_path / "run"
    assert [s for s, _ in list_checkpoints(run)] == [4], "the half-written checkpoint must not count"
    assert any(p.name.startswith(".tmp-checkpoint-8") for p in run.iterdir())

    resumed = run_cli("train", str(cfg), "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from checkpoint-4" in resumed.stderr and "removed incomplete checkpoint" in resumed.stderr
    assert not any(p.name.startswith(".tmp-") for p in run.iterdir())
    assert_same_result(run, reference_run)


def test_resume_refuses_changed_config_and_data(tmp_path: Path, tiny_llama: Path, reference_run: Path,
                                                data_file: Path) -> None:
    """A refused resume changes nothing in the run directory (not heldout.jsonl, data_summary.json, config.yaml)."""
    run = tmp_path / "run"
    subprocess.run(["cp", "-r", str(reference_run), str(run)], check=True)
    manifest = json.loads((run / "manifest.json").read_text())
    (run / "manifest.json").write_text(json.dumps({**manifest, "status": "preempted"}))
    shutil.rmtree(run / "adapter")
    before = snapshot(run)
    cfg = write_config(tmp_path / "cfg.yaml", tiny_llama, data_file, run, train=TRAIN, lora={"dropout": 0.1})
    proc = run_cli("train", str(cfg), "--resume", "--set", "lora.r=4", "--set", "train.seed=1")
    assert proc.returncode == 2
    assert "lora.r: 8 -> 4" in proc.stderr and "train.seed: 0 -> 1" in proc.stderr
    assert snapshot(run) == before

    other = write_jsonl(tmp_path / "other.jsonl", arithmetic_rows(48, seed=5))  # other rows at another path
    proc = run_cli("train", str(cfg), "--resume", "--set", f"data.path={other}")
    assert proc.returncode == 2 and "the data file changed" in proc.stderr, proc.stderr[-2000:]
    assert snapshot(run) == before

    changed = write_jsonl(tmp_path / "changed.jsonl", arithmetic_rows(48, seed=5))
    cfg2 = write_config(tmp_path / "cfg2.yaml", tiny_llama, changed, run, train=TRAIN, lora={"dropout": 0.1})
    for checkpoint in run.glob("checkpoint-*"):  # as if the run had been trained on changed.jsonl's path
        text = (checkpoint / "config.yaml").read_text().replace(str(data_file), str(changed))
        (checkpoint / "config.yaml").write_text(text)
        reseal_checkpoint(checkpoint)
    before = snapshot(run)
    proc = run_cli("train", str(cfg2), "--resume")
    assert proc.returncode == 2 and "data file changed" in proc.stderr, proc.stderr[-2000:]
    assert snapshot(run) == before, "a refused resume must not rewrite heldout.jsonl, data_summary.json, ..."


def test_resume_follows_moved_data(tmp_path: Path, tiny_llama: Path, reference_run: Path, data_file: Path) -> None:
    """The same rows under another path resume exactly (the checkpoint's sha256 says they are the same)."""
    run = interrupted_copy(reference_run, tmp_path / "run", last_step=8)
    moved = shutil.copy(data_file, tmp_path / "moved.jsonl")
    cfg = write_config(tmp_path / "cfg.yaml", tiny_llama, moved, run, train=TRAIN, lora={"dropout": 0.1})
    proc = run_cli("train", str(cfg), "--resume")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "resumed from checkpoint-8" in proc.stderr
    assert_same_result(run, reference_run)


def _poison(monkeypatch: pytest.MonkeyPatch, at_step: int, corrupt_weights: bool) -> None:
    """Step ``at_step`` reports a NaN loss (its gradients stay finite) and, optionally, leaves NaN weights."""
    real_forward, real_clip = loop.forward_loss, loop.clip_gradients

    def forward(run, *args):
        loss = real_forward(run, *args)
        return loss + float("nan") if run.step + 1 == at_step else loss  # NaN value, unchanged gradient

    def clip(run, model):
        norm = real_clip(run, model)
        if corrupt_weights and run.step + 1 == at_step:
            with torch.no_grad():
                run.params[0].fill_(float("nan"))
        return norm

    monkeypatch.setattr(loop, "forward_loss", forward)
    monkeypatch.setattr(loop, "clip_gradients", clip)


@pytest.mark.parametrize("logging_steps", [1, 10])
def test_nonfinite_stops_without_saving_nan(tmp_path: Path, tiny_llama: Path, data_file: Path,
                                            monkeypatch: pytest.MonkeyPatch, logging_steps: int) -> None:
    _poison(monkeypatch, at_step=3, corrupt_weights=True)
    cfg = write_config(tmp_path / "cfg.yaml", tiny_llama, data_file, tmp_path / "run",
                       train={**TRAIN, "save_steps": 2, "logging_steps": logging_steps})
    with pytest.raises(NonFiniteLossError, match="non-finite loss or gradient at step 3") as err:
        recipe.run_training(cfg, [])
    assert "checkpoint-2" in str(err.value)
    run = tmp_path / "run"
    assert [s for s, _ in list_checkpoints(run)] == [2]
    assert not (run / "adapter").exists()
    for path in run.rglob("*.safetensors"):
        assert all(torch.isfinite(t).all() for t in load_file(path).values() if t.is_floating_point()), path
    assert json.loads((run / "manifest.json").read_text())["status"] == "failed"


def test_nonfinite_skip_mode(tmp_path: Path, tiny_llama: Path, data_file: Path,
                             monkeypatch: pytest.MonkeyPatch) -> None:
    _poison(monkeypatch, at_step=3, corrupt_weights=False)
    cfg = write_config(tmp_path / "cfg.yaml", tiny_llama, data_file, tmp_path / "run",
                       train={**TRAIN, "max_steps": 5, "on_nonfinite": "skip"})
    assert recipe.run_training(cfg, []) == 0
    records = metrics_of(tmp_path / "run")
    assert records[-1].get("skipped_steps") == 1 or any(r.get("skipped_steps") == 1 for r in records)
    adapter = load_file(tmp_path / "run/adapter/adapter_model.safetensors")
    assert all(torch.isfinite(t).all() for t in adapter.values())


def test_stop_signal_during_evaluation(tmp_path: Path, tiny_llama: Path, data_file: Path,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = write_config(tmp_path / "cfg.yaml", tiny_llama, data_file, tmp_path / "run",
                       train={**TRAIN, "micro_batch_size": 2, "eval_steps": 2},
                       data={"val_fraction": 0.2})
    real_evaluate = loop.evaluate

    def evaluate(run, stop):
        def hook(module, args, kwargs):
            os.kill(os.getpid(), signal.SIGTERM)  # arrives while evaluating
        handle = run.model.register_forward_pre_hook(hook, with_kwargs=True)
        try:
            return real_evaluate(run, stop)
        finally:
            handle.remove()

    monkeypatch.setattr(loop, "evaluate", evaluate)
    with pytest.raises(Preempted, match="stopped by SIGTERM at step 2"):
        recipe.run_training(cfg, [])
    assert [s for s, _ in list_checkpoints(tmp_path / "run")] == [2]
    assert not any("eval_loss" in r for r in metrics_of(tmp_path / "run"))


def test_output_dir_is_never_clobbered(tmp_path: Path, tiny_llama: Path, data_file: Path,
                                       reference_run: Path) -> None:
    run = tmp_path / "run"
    subprocess.run(["cp", "-r", str(reference_run), str(run)], check=True)
    before = sorted(p.relative_to(run) for p in run.rglob("*"))
    cfg = write_config(tmp_path / "cfg.yaml", tiny_llama, data_file, run, train={**TRAIN, "max_steps": 2})
    proc = run_cli("train", str(cfg))
    assert proc.returncode == 2 and "already holds a qlora-kit run" in proc.stderr and "--resume" in proc.stderr
    assert sorted(p.relative_to(run) for p in run.rglob("*")) == before

    (tmp_path / "notes").mkdir()
    (tmp_path / "notes/mine.txt").write_text("keep me")
    cfg2 = write_config(tmp_path / "cfg2.yaml", tiny_llama, data_file, tmp_path / "notes", train=TRAIN)
    proc = run_cli("train", str(cfg2))
    assert proc.returncode == 2 and "not from qlora-kit" in proc.stderr
    assert (tmp_path / "notes/mine.txt").read_text() == "keep me"

    proc = run_cli("train", str(cfg), "--overwrite")
    assert proc.returncode == 0, proc.stderr[-2000:]
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("run.old-")]
    assert len(aside) == 1 and sorted(p.relative_to(aside[0]) for p in aside[0].rglob("*")) == before

    proc = run_cli("train", str(cfg), "--resume", "--overwrite")
    assert proc.returncode == 2 and "contradict" in proc.stderr
    fresh = write_config(tmp_path / "cfg3.yaml", tiny_llama, data_file, tmp_path / "nothing", train=TRAIN)
    proc = run_cli("train", str(fresh), "--resume")
    assert proc.returncode == 2 and "nothing to resume" in proc.stderr


def test_resume_of_a_completed_run_changes_nothing(tmp_path: Path, tiny_llama: Path, data_file: Path,
                                                   reference_run: Path) -> None:
    run = tmp_path / "run"
    subprocess.run(["cp", "-r", str(reference_run), str(run)], check=True)
    manifest = (run / "manifest.json").read_text()
    adapter = (run / "adapter/adapter_model.safetensors").read_bytes()
    cfg = write_config(tmp_path / "cfg.yaml", tiny_llama, data_file, run, train=TRAIN, lora={"dropout": 0.1})
    assert recipe.run_training(cfg, [], resume=True) == 0
    assert (run / "manifest.json").read_text() == manifest
    assert (run / "adapter/adapter_model.safetensors").read_bytes() == adapter
