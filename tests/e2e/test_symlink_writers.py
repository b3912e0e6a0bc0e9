"""A run reached through a symlink is the same run: train, --resume, export and generate take the real directory's lock."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import write_config

from qlora_kit.core.errors import RunInUseError
from qlora_kit.export.command import export_run
from qlora_kit.inference.load import load_for_generation
from qlora_kit.rundir import lock as runlock
from qlora_kit.train.recipe import run_training

pytestmark = pytest.mark.e2e


@pytest.fixture
def linked_run(tmp_path: Path) -> tuple[Path, Path]:
    run = tmp_path / "runs" / "S"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text("output_dir: runs/S\n")  # enough to be recognised as a run
    link = tmp_path / "runs" / "Slink"
    link.symlink_to(run)
    return run, link


def test_a_second_writer_through_the_link_is_refused(tmp_path: Path, linked_run: tuple[Path, Path], tiny_llama: Path,
                                                     data_file: Path) -> None:
    run, link = linked_run
    cfg = write_config(tmp_path / "cfg.yaml", tiny_llama, data_file, link)
    with runlock.exclusive(run, "qlora-kit train runs/S"):  # a training run writing runs/S
        with pytest.raises(RunInUseError, match=r"in use by another qlora-kit process .*qlora-kit train runs/S"):
            run_training(cfg, [], resume=True)
        with pytest.raises(RunInUseError, match=r"in use by another qlora-kit process"):
            run_training(cfg, [], overwrite=True)
    assert sorted(p.name for p in run.iterdir()) == ["config.yaml"], "nothing was written"


def test_export_and_generate_through_the_link_are_refused_during_training(tmp_path: Path,
                                                                          linked_run: tuple[Path, Path]) -> None:
    run, link = linked_run
    with runlock.exclusive(run, "qlora-kit train runs/S"):
        with pytest.raises(RunInUseError, match=r"is being written by another process .*qlora-kit train runs/S"):
            export_run(link, tmp_path / "merged", verify=False)
        with pytest.raises(RunInUseError, match=r"is being written by another process"):
            load_for_generation(link)
    assert not (tmp_path / "merged").exists()
