"""One writer per run through a symlink too: the lock belongs to the real directory, not to the path given."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from qlora_kit.core.errors import RunInUseError
from qlora_kit.rundir import lock as runlock
from qlora_kit.rundir import target


def _run_and_link(tmp_path: Path) -> tuple[Path, Path]:
    run = tmp_path / "runs" / "S"
    run.mkdir(parents=True)
    link = tmp_path / "runs" / "Slink"
    link.symlink_to(run)
    return run, link


def test_a_link_and_its_directory_have_one_lock(tmp_path: Path) -> None:
    run, link = _run_and_link(tmp_path)
    assert runlock.lock_path(link) == runlock.lock_path(run)
    with runlock.exclusive(run, "train"):
        with pytest.raises(RunInUseError, match=rf"PID {os.getpid()}: train"):
            runlock.exclusive(link, "train --resume").acquire()
        with pytest.raises(RunInUseError, match="is being written"):
            runlock.shared(link, "export").acquire()
    with runlock.exclusive(link, "train"):
        with pytest.raises(RunInUseError):
            runlock.exclusive(run, "train --resume").acquire()
        with pytest.raises(RunInUseError, match="is being written"):
            runlock.shared(run, "generate").acquire()


def test_a_link_in_a_linked_parent_has_the_same_lock(tmp_path: Path) -> None:
    run, _ = _run_and_link(tmp_path)
    (tmp_path / "elsewhere").symlink_to(tmp_path / "runs")
    assert runlock.lock_path(tmp_path / "elsewhere" / "Slink") == runlock.lock_path(run)


def test_overwrite_through_a_link_starts_afresh_in_the_real_directory(tmp_path: Path) -> None:
    """--overwrite moves the real directory aside and recreates it, so the link (and the lock) stay valid."""
    run, link = _run_and_link(tmp_path)
    (run / "config.yaml").write_text("old run\n")
    start = target.Start(link, "overwrite")
    target.begin(start)
    assert link.is_symlink() and link.resolve() == run.resolve()
    assert run.is_dir() and not any(run.iterdir())
    assert start.aside is not None and (start.aside / "config.yaml").read_text() == "old run\n"
    assert start.aside.parent == run.parent
    target.undo(start)  # a failed start: the old directory comes back, the link still points at it
    assert link.is_symlink() and (run / "config.yaml").read_text() == "old run\n"
    assert sorted(p.name for p in run.parent.iterdir()) == ["S", "Slink"]
