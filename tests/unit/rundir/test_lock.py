"""One writer per run directory: the lock (rundir.lock)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from qlora_kit.core.errors import (
    RunInUseError,
)
from qlora_kit.rundir import lock as runlock


def test_lock_excludes_writers_and_readers(tmp_path: Path) -> None:
    run = tmp_path / "run"
    with runlock.exclusive(run, "train"):
        with pytest.raises(RunInUseError, match=rf"in use by another qlora-kit process \(PID {os.getpid()}: train"):
            runlock.exclusive(run, "train").acquire()
        with pytest.raises(RunInUseError, match=rf"is being written by another process \(PID {os.getpid()}"):
            runlock.shared(run, "export").acquire()
    assert not runlock.lock_path(run).exists(), "the writer removes its lock file"
    with runlock.shared(run, "export"), runlock.shared(run, "generate"):  # readers share
        with pytest.raises(RunInUseError, match="generate|export"):
            runlock.exclusive(run, "train").acquire()
    assert not runlock.lock_path(run).exists(), "the last reader removes the lock file"
