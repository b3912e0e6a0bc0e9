"""Atomic publishing of an export: refuse dangerous targets, write into a hidden staging directory, rename.

An interrupted export leaves no ``--out`` behind: Ctrl-C, SIGTERM or any error removes the
staging directory (a stop after the final rename leaves the complete export); a killed process leaves only ``.<name>.partial-<pid>``, removed by the
next export to the same place.  A non-empty ``--out`` is replaced only with ``--overwrite``
and only after the new export is complete.
"""

from __future__ import annotations

import logging
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from qlora_kit.core.errors import OutputError
from qlora_kit.core.files import restore_moved_aside
from qlora_kit.rundir import finished, layout

log = logging.getLogger("qlora_kit")


def check_target(out: Path, run: finished.RunInfo, overwrite: bool) -> Path:
    """Resolve ``--out`` and refuse targets that would clobber a run, the base, the data or a non-empty directory.

    Raises:
        OutputError: ``out`` is a run directory or inside one (this run or another), inside the base
            model's directory, is a data file or contains one of them, or is non-empty without ``--overwrite``.
    """
    target = out.expanduser().resolve()
    restore_moved_aside(target)  # an --overwrite killed between its two renames: the previous export comes back
    fix = "choose a new directory for the export, outside the run, the base model and the data"
    for p in _protected(run):
        if target == p or p.is_relative_to(target):
            raise OutputError(f"--out {out} would replace {p}", fix)
    for where in (target, *target.parents):
        if where.is_dir() and layout.is_run_dir(where):
            what = "is the run directory" if where == target else "is inside the run directory"
            raise OutputError(f"--out {out} {what} {where}: the export would replace or mix with its files", fix)
    source = run.source_dir.resolve()
    if target.is_relative_to(source):
        raise OutputError(f"--out {out} is inside the base model's directory {source}", fix)
    blocking = next((p for p in target.parents if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        raise OutputError(f"--out {out} is inside {blocking}, which is a file", fix)
    if target.exists() and not target.is_dir():
        if not overwrite:
            raise OutputError(f"--out {out} exists and is a file", "pass --overwrite to replace it, or pick a new path")
    elif target.exists() and any(target.iterdir()) and not overwrite:
        raise OutputError(f"--out {out} exists and is not empty", "pass --overwrite to replace it, or pick a new path")
    return target


def _protected(run: finished.RunInfo) -> list[Path]:
    """The run, its base and its data files (local ones): ``--out`` may neither be nor contain them."""
    paths = [run.run_dir.resolve(), run.source_dir.resolve()]
    data = getattr(run.config, "data", None)
    for value in (getattr(data, "path", None), getattr(data, "val_path", None)):
        if value and Path(value).expanduser().is_file():
            paths.append(Path(value).expanduser().resolve())
    return paths


def _partial_name(target: Path, pid: int) -> Path:
    return target.with_name(f".{target.name}.partial-{pid}")


def remove_stale_partials(target: Path) -> None:
    """Delete staging directories of earlier exports to ``target`` whose process is gone."""
    import psutil

    for path in target.parent.glob(f".{target.name}.partial-*"):
        pid = path.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not psutil.pid_exists(int(pid)):
            log.info("removing %s left by an interrupted export", path)
            shutil.rmtree(path, ignore_errors=True)


@contextmanager
def staging_dir(target: Path) -> Iterator[Path]:
    """A fresh hidden directory beside ``target``; removed on any error, Ctrl-C or SIGTERM (the caller's
    :class:`~qlora_kit.core.signals.StopRequest` turns them into exceptions)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(target)
    staging = _partial_name(target, os.getpid())
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
