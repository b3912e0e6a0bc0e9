"""export --out may not land inside a run directory, the base model's directory, or on the data files."""

from __future__ import annotations

from pathlib import Path

import pytest

from qlora_kit.core.config import validate
from qlora_kit.core.errors import OutputError
from qlora_kit.export.publish import check_target
from qlora_kit.rundir.finished import RunInfo


@pytest.fixture
def run_info(tmp_path: Path) -> RunInfo:
    """A run directory with the files training writes (contents do not matter to the check), its base and data."""
    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text("{}")
    (base / "model.safetensors").write_bytes(b"weights")
    data = tmp_path / "data" / "train.jsonl"
    data.parent.mkdir()
    data.write_text("{}\n")
    val = tmp_path / "val.jsonl"
    val.write_text("{}\n")
    run = tmp_path / "runs" / "r1"
    (run / "checkpoint-4").mkdir(parents=True)
    for name in ("config.yaml", "manifest.json", "train.log", "base_residual.safetensors", "metrics.jsonl"):
        (run / name).write_text("x")
    cfg = validate({"model": {"name_or_path": str(base)}, "data": {"path": str(data), "val_path": str(val)},
                    "output_dir": str(run)})
    return RunInfo(run, {"base": {"source_dir": str(base)}}, cfg, base, {})


@pytest.mark.parametrize("inside", ["train.log", "base_residual.safetensors", "metrics.jsonl", "merged",
                                    "exports/merged", "checkpoint-4/x", ".hidden"])
@pytest.mark.parametrize("overwrite", [False, True])
def test_out_inside_the_run_is_refused(run_info: RunInfo, inside: str, overwrite: bool) -> None:
    before = sorted(p.name for p in run_info.run_dir.iterdir())
    with pytest.raises(OutputError, match="inside the run directory"):
        check_target(run_info.run_dir / inside, run_info, overwrite)
    assert sorted(p.name for p in run_info.run_dir.iterdir()) == before


def test_out_inside_or_onto_another_run_is_refused(run_info: RunInfo, tmp_path: Path) -> None:
    other = tmp_path / "runs" / "r2"
    other.mkdir()
    (other / "manifest.json").write_text("{}")
    with pytest.raises(OutputError, match=r"inside the run directory .*r2"):
        check_target(other / "merged", run_info, True)
    with pytest.raises(OutputError, match=r"is the run directory .*r2"):
        check_target(other, run_info, True)


@pytest.mark.parametrize("inside", ["merged", "config.json", "model.safetensors"])
def test_out_inside_the_base_model_is_refused(run_info: RunInfo, inside: str) -> None:
    with pytest.raises(OutputError, match="inside the base model's directory"):
        check_target(run_info.source_dir / inside, run_info, True)


def test_out_onto_the_data_is_refused(run_info: RunInfo, tmp_path: Path) -> None:
    for data in (tmp_path / "data" / "train.jsonl", tmp_path / "val.jsonl"):
        with pytest.raises(OutputError, match="would replace"):
            check_target(data, run_info, True)
    with pytest.raises(OutputError, match="would replace"):
        check_target(tmp_path / "data", run_info, True)
    with pytest.raises(OutputError, match="which is a file"):
        check_target(tmp_path / "data" / "train.jsonl" / "sub", run_info, True)


def test_a_new_directory_beside_the_run_and_the_data_is_fine(run_info: RunInfo, tmp_path: Path) -> None:
    assert check_target(tmp_path / "runs" / "r1-merged", run_info, False) == (tmp_path / "runs" / "r1-merged")
    assert check_target(tmp_path / "merged", run_info, False) == tmp_path / "merged"
