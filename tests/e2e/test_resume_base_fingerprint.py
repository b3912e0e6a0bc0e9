"""The base check on --resume cannot be skipped by deleting manifest.json: every checkpoint records the fingerprint."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from conftest import (
    RESUME_TRAIN,
    assert_same_result,
    interrupted_copy,
    reseal_checkpoint,
    run_cli,
    snapshot,
    write_config,
)
from safetensors.torch import load_file, save_file

from qlora_kit.core.errors import EXIT_USER_ERROR
from qlora_kit.rundir import checkpoint as ckpt
from qlora_kit.train.resume import recorded_base

pytestmark = pytest.mark.e2e

LORA = {"dropout": 0.1}  # the reference run's


def _point_run_at(run: Path, base: Path) -> None:
    """Rewrite the run's (and every checkpoint's) model.name_or_path, as if it had been trained from ``base``."""
    for path in [run / "config.yaml"] + [p / "config.yaml" for _, p in ckpt.list_checkpoints(run)]:
        config = yaml.safe_load(path.read_text())
        config["model"]["name_or_path"] = str(base)
        path.write_text(yaml.safe_dump(config, sort_keys=False))
    for _, path in ckpt.list_checkpoints(run):
        reseal_checkpoint(path)


def _perturb_weights(base: Path) -> None:
    """Other weights of the same names, shapes and file sizes (another revision put where the base was)."""
    for file in base.glob("*.safetensors"):
        tensors = load_file(file)
        generator = torch.Generator().manual_seed(7)
        save_file({k: v + 0.01 * torch.randn(v.shape, generator=generator, dtype=v.dtype) for k, v in tensors.items()},
                  str(file), metadata={"format": "pt"})


def test_every_checkpoint_records_the_base_fingerprint(reference_run: Path) -> None:
    manifest = json.loads((reference_run / "manifest.json").read_text())
    for _, path in ckpt.list_checkpoints(reference_run):
        assert ckpt.verify_checkpoint(path)["base_fingerprint"] == manifest["base"]["fingerprint"]


def test_resume_without_manifest_refuses_other_weights(tmp_path: Path, tiny_llama: Path, data_file: Path,
                                                       reference_run: Path) -> None:
    base = shutil.copytree(tiny_llama, tmp_path / "base")
    run = interrupted_copy(reference_run, tmp_path / "run", last_step=8)
    _point_run_at(run, base)
    _perturb_weights(base)  # the base changed under the run ...
    (run / "manifest.json").unlink()  # ... and the run's record of it was deleted
    before = snapshot(run)
    cfg = write_config(tmp_path / "cfg.yaml", base, data_file, run, train=RESUME_TRAIN, lora=LORA)
    proc = run_cli("train", str(cfg), "--resume")
    assert proc.returncode == EXIT_USER_ERROR, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith(("error: ", "fix: "))]
    assert errors[0].startswith(f"error: the base model at {base} is not the one {run} was trained on"), errors
    assert errors[1].startswith("fix: point model.name_or_path at the base the run was trained on"), errors
    assert snapshot(run) == before, "a refused resume changes nothing"


def test_resume_without_manifest_follows_a_moved_base_exactly(tmp_path: Path, tiny_llama: Path, data_file: Path,
                                                              reference_run: Path) -> None:
    """The checkpoint's fingerprint says the base at the new path is the same: the run continues, bit-exact."""
    run = interrupted_copy(reference_run, tmp_path / "run", last_step=8)
    (run / "manifest.json").unlink()
    moved = shutil.copytree(tiny_llama, tmp_path / "moved-base")
    cfg = write_config(tmp_path / "cfg.yaml", moved, data_file, run, train=RESUME_TRAIN, lora=LORA)
    proc = run_cli("train", str(cfg), "--resume")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_result(run, reference_run)


def test_checkpoints_without_a_fingerprint_fall_back_to_the_manifest(tmp_path: Path, reference_run: Path) -> None:
    run = interrupted_copy(reference_run, tmp_path / "run", last_step=8)
    manifest = json.loads((run / "manifest.json").read_text())
    newest = ckpt.latest_checkpoint(run)
    assert recorded_base(run, newest) == manifest["base"]["fingerprint"]
    state = json.loads((newest / "state.json").read_text())
    state.pop("base_fingerprint", None)  # a checkpoint written by an older qlora-kit
    (newest / "state.json").write_text(json.dumps(state))
    reseal_checkpoint(newest)
    assert recorded_base(run, newest) == manifest["base"]["fingerprint"]
    (run / "manifest.json").unlink()
    assert recorded_base(run, newest) is None  # nothing recorded anywhere: nothing to compare (as before)
