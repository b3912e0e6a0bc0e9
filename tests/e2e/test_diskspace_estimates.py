"""Free-space pre-checks of train and export ask for what they will write: a tiny run starts with 20 MB free,
a tiny export does not ask for 17 MB, and a disk that is too small is still refused before anything is written."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import write_config
from run_fixture import make_run

from qlora_kit.core import diskspace
from qlora_kit.core.errors import DiskFullError
from qlora_kit.export.command import export_run
from qlora_kit.train.recipe import run_training

pytestmark = pytest.mark.e2e

SHORT = {"max_steps": 2, "save_steps": 2, "logging_steps": 1}


def _bytes_below(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


@pytest.fixture
def asked(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int]]:
    """Every free-space check made: (what, bytes asked for without the margin)."""
    calls: list[tuple[str, int]] = []
    real = diskspace.require_free

    def recording(path: Path, needed: int, what: str, fix: str) -> None:
        calls.append((what, needed))
        real(path, needed, what, fix)

    monkeypatch.setattr(diskspace, "require_free", recording)
    return calls


def test_a_tiny_run_trains_with_20_mb_free(tmp_path: Path, tiny_llama: Path, data_file: Path,
                                           monkeypatch: pytest.MonkeyPatch, asked: list[tuple[str, int]]) -> None:
    monkeypatch.setattr(diskspace, "free_bytes", lambda path: 20_000_000)
    run = tmp_path / "run"
    assert run_training(write_config(tmp_path / "cfg.yaml", tiny_llama, data_file, run, train=SHORT), []) == 0
    start = asked[0][1]
    written = _bytes_below(run)  # setup files, checkpoint-2, the adapter, metrics, the loss plot, train.log
    assert written <= start + diskspace.margin(start), (written, asked)
    assert start < 4 * written, f"the start asked {start} bytes for a run that wrote {written}"


def test_a_disk_too_small_for_a_tiny_run_is_refused_before_writing(tmp_path: Path, tiny_llama: Path,
                                                                   data_file: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(diskspace, "free_bytes", lambda path: 100_000)
    run = tmp_path / "run"
    with pytest.raises(DiskFullError, match=r"not enough disk space for the run's files, a checkpoint and the "
                                            r"adapter in .*: needs about \d\.\d\d MB, 100\.00 kB free"):
        run_training(write_config(tmp_path / "cfg.yaml", tiny_llama, data_file, run, train=SHORT), [])
    assert not run.exists()


def test_a_tiny_export_asks_for_about_its_size(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                              asked: list[tuple[str, int]]) -> None:
    run = make_run(tmp_path)
    monkeypatch.setattr(diskspace, "free_bytes", lambda path: 100_000)
    with pytest.raises(DiskFullError, match=r"not enough disk space for the export in .*: needs about \d\.\d\d MB, "
                                            r"100\.00 kB free"):
        export_run(run, tmp_path / "merged", verify=False, show_progress=False)
    assert not (tmp_path / "merged").exists() and not list(tmp_path.glob(".merged*"))
    monkeypatch.setattr(diskspace, "free_bytes", lambda path: 3_000_000)
    assert export_run(run, tmp_path / "merged", verify=False, show_progress=False) == 0
    needed = asked[-1][1]
    written = _bytes_below(tmp_path / "merged")
    assert written <= needed + diskspace.margin(needed) < 3_000_000, (written, needed)


_ON_TMPFS = """
set -u
mount -t tmpfs -o size=20m tmpfs "$MNT" || exit 99
"$PY" -m qlora_kit.cli train "$CFG" ; echo "rc=$?"
echo "listing: $(ls -A "$MNT/run" | tr '\\n' ' ')"
"""


@pytest.mark.skipif(shutil.which("unshare") is None, reason="needs `unshare -rm` to mount a private tmpfs")
def test_a_tiny_run_on_a_real_20_mib_disk(tmp_path: Path, tiny_llama: Path, data_file: Path) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    cfg = write_config(tmp_path / "cfg.yaml", tiny_llama, data_file, mnt / "run", train=SHORT)
    env = {**os.environ, "MNT": str(mnt), "PY": sys.executable, "CFG": str(cfg)}
    proc = subprocess.run(["unshare", "-rm", "sh", "-c", _ON_TMPFS], capture_output=True, text=True, env=env,
                          timeout=600)
    if "rc=" not in proc.stdout and proc.returncode == 99:
        pytest.skip("cannot mount a private tmpfs here")
    assert "rc=0" in proc.stdout, (proc.stdout + proc.stderr)[-3000:]
    assert "adapter" in proc.stdout and "checkpoint-2" in proc.stdout, proc.stdout
