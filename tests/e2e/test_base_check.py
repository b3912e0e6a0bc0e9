"""basecheck: a run is resumed, generated from and exported only on the base weights it was trained on."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from conftest import RESUME_LORA, RESUME_TRAIN, assert_same_result, interrupted_copy, run_cli, snapshot, write_config
from run_fixture import other_weights

from qlora_kit.core.errors import EXIT_USER_ERROR

pytestmark = pytest.mark.e2e




def _error(proc) -> list[str]:
    return [line for line in proc.stderr.splitlines() if line.startswith(("error: ", "fix: "))]


def test_resume_refuses_other_weights_and_follows_a_moved_base(tmp_path: Path, tiny_llama: Path, data_file: Path,
                                                               reference_run: Path) -> None:
    assert json.loads((reference_run / "manifest.json").read_text())["base"]["fingerprint"]
    run = interrupted_copy(reference_run, tmp_path / "run", last_step=8)
    other = other_weights(tiny_llama, tmp_path / "other")
    before = snapshot(run)
    cfg = write_config(tmp_path / "other.yaml", other, data_file, run, train=RESUME_TRAIN, lora=RESUME_LORA)
    proc = run_cli("train", str(cfg), "--resume")
    assert proc.returncode == EXIT_USER_ERROR
    error, fix = _error(proc)
    assert f"the base model at {other} is not the one {run} was trained on" in error
    assert fix.startswith("fix: point model.name_or_path at the base the run was trained on")
    assert snapshot(run) == before

    moved = shutil.copytree(tiny_llama, tmp_path / "moved-base")  # the same weights under another path
    cfg = write_config(tmp_path / "moved.yaml", moved, data_file, run, train=RESUME_TRAIN, lora=RESUME_LORA)
    proc = run_cli("train", str(cfg), "--resume")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert_same_result(run, reference_run)


def test_export_and_generate_refuse_other_weights_and_follow_the_run_config(tmp_path: Path, tiny_llama: Path,
                                                                            reference_run: Path) -> None:
    run = shutil.copytree(reference_run, tmp_path / "run")
    manifest = json.loads((run / "manifest.json").read_text())
    other = other_weights(tiny_llama, tmp_path / "other")
    manifest["base"]["source_dir"] = str(other)  # as if another model had been put where the base was
    (run / "manifest.json").write_text(json.dumps(manifest))
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["model"]["name_or_path"] = str(other)
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    for args in (["export", str(run), "--out", str(tmp_path / "exp")], ["generate", str(run), "1 + 1 ="]):
        proc = run_cli(*args)
        assert proc.returncode == EXIT_USER_ERROR, proc.stderr[-2000:]
        error, fix = _error(proc)
        assert f"the base model at {other} is not the one {run} was trained on" in error, args
        assert f"point model.name_or_path in {run}/config.yaml at a copy" in fix
    assert not (tmp_path / "exp").exists()

    manifest["base"]["source_dir"] = str(tmp_path / "gone")  # the base moved away from where it was trained
    (run / "manifest.json").write_text(json.dumps(manifest))
    config["model"]["name_or_path"] = str(tmp_path / "gone")
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    proc = run_cli("export", str(run), "--out", str(tmp_path / "exp"))
    assert proc.returncode == EXIT_USER_ERROR
    assert "is not where it was" in _error(proc)[0] and f"{run}/config.yaml at a copy" in _error(proc)[1]
    config["model"]["name_or_path"] = str(shutil.copytree(tiny_llama, tmp_path / "moved-base"))  # where it is now
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    proc = run_cli("export", str(run), "--out", str(tmp_path / "exp"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads((tmp_path / "exp/export_report.json").read_text())["verification"]["status"] == "passed"
