"""output_dir may never be a parent of the home or current directory, nor one of the system's own directories.

Every case is built inside tmp_path with a monkeypatched $HOME and working directory; the
system directories are only passed to the read-only check, never written or moved.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import write_config

from qlora_kit.core.errors import OutputError
from qlora_kit.rundir import target
from qlora_kit.train.recipe import run_training


@pytest.fixture
def fake_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """$HOME is tmp_path/users/alice/home (with a file in it), the working directory tmp_path/work/project/src."""
    home = tmp_path / "users" / "alice" / "home"
    home.mkdir(parents=True)
    (home / "notes.txt").write_text("keep me\n")
    work = tmp_path / "work" / "project" / "src"
    work.mkdir(parents=True)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work)
    return home


@pytest.mark.parametrize("overwrite", [False, True])
@pytest.mark.parametrize("levels", [1, 2, 3])
def test_a_parent_of_home_is_refused(fake_home: Path, overwrite: bool, levels: int) -> None:
    parent = fake_home.parents[levels - 1]
    with pytest.raises(OutputError, match="holds your home directory"):
        target.check_target(parent, overwrite, {})


def test_a_parent_of_home_reached_through_a_symlink_is_refused(fake_home: Path, tmp_path: Path) -> None:
    (tmp_path / "link").symlink_to(fake_home.parent)
    with pytest.raises(OutputError, match="holds your home directory"):
        target.check_target(tmp_path / "link", True, {})


@pytest.mark.parametrize("levels", [0, 1, 2])
def test_overwrite_of_the_working_directory_or_a_parent_is_refused(fake_home: Path, levels: int) -> None:
    here = Path.cwd()
    with pytest.raises(OutputError, match="holds the current directory"):
        target.check_target(here.parents[levels - 1] if levels else here, True, {})


def test_a_sibling_of_home_and_a_new_directory_are_fine(fake_home: Path, tmp_path: Path) -> None:
    target.check_target(fake_home.parent / "runs", True, {})
    target.check_target(fake_home / "runs" / "r1", True, {})
    target.check_target(tmp_path / "work" / "other", True, {})


@pytest.mark.parametrize("system_dir", ["/usr", "/etc", "/home", "/var", "/opt", "/boot", "/tmp", "/srv", "/root"])
@pytest.mark.parametrize("overwrite", [False, True])
def test_the_systems_own_directories_are_refused(system_dir: str, overwrite: bool) -> None:
    """Only the read-only check runs: nothing is created, written or moved."""
    with pytest.raises(OutputError, match=r"is a system directory|your home directory"):
        target.check_target(Path(system_dir), overwrite, {})


def test_train_overwrite_of_a_parent_of_home_moves_nothing(fake_home: Path, tmp_path: Path, tiny_llama: Path,
                                                           data_file: Path) -> None:
    parent = fake_home.parent  # users/alice
    cfg = write_config(tmp_path / "cfg.yaml", tiny_llama, data_file, parent)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    with pytest.raises(OutputError, match="holds your home directory"):
        run_training(cfg, [], overwrite=True)
    assert (fake_home / "notes.txt").read_text() == "keep me\n"
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before, "nothing moved or created"
