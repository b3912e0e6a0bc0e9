"""Atomic publishing of an export: refuse dangerous targets, write into a hidden staging directory, rename.

An interrupted export leaves no ``--out`` behind: Ctrl-C, SIGTERM or any error removes the
staging directory; a killed process leaves only ``.<name>.partial-<pid>``, removed by the
next export to the same place.  A non-empty ``--out`` is replaced only with ``--overwrite``
and only after the new export is complete.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from qlora_kit.core.errors import OutputError
from qlora_kit.core.signals import restore
from qlora_kit.rundir import finished, layout

log = logging.getLogger("qlora_kit")


def check_target(out: Path, run: finished.RunInfo, overwrite: bool) -> Path:
    """Resolve ``--out`` and refuse targets that would clobber the run, the base or a non-empty directory.

    Raises:
        OutputError: ``out`` is the run directory (or one of its files), contains it or the base,
            or is non-empty without ``--overwrite``.
    """
    target = out.expanduser().resolve()
    run_dir = run.run_dir.resolve()
    protected = [run_dir, run.source_dir.resolve()]
    for p in protected:
        if target == p or p.is_relative_to(target):
            raise OutputError(f"--out {out} would replace {p}", "choose a new directory for the export")
    if target.is_relative_to(run_dir) and target != run_dir:
        first = target.relative_to(run_dir).parts[0]
        own = {layout.CONFIG, layout.MANIFEST, layout.DATA_SUMMARY, layout.HELDOUT, layout.TOKENIZER,
               layout.ADAPTER, layout.METRICS, layout.LOSS_PLOT}
        if first in own or first.startswith(layout.CHECKPOINT_PREFIX):
            raise OutputError(f"--out {out} is inside the run's own {first}", "choose a new directory for the export")
    if target.exists() and not target.is_dir():
        if not overwrite:
            raise OutputError(f"--out {out} exists and is a file", "pass --overwrite to replace it, or pick a new path")
    elif target.exists() and any(target.iterdir()) and not overwrite:
        raise OutputError(f"--out {out} exists and is not empty", "pass --overwrite to replace it, or pick a new path")
    return target


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


class Terminated(KeyboardInterrupt):
    """SIGTERM during an export: unwinds like Ctrl-C so the staging directory is removed."""


def _raise_terminated(signum: int, frame: Any) -> None:
    raise Terminated()


@contextmanager
def sigterm_unwinds() -> Iterator[None]:
    """SIGTERM raises ``Terminated`` (like Ctrl-C) for the whole export, so every phase stops within seconds."""
    in_main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _raise_terminated) if in_main else None
    try:
        yield
    finally:
        if in_main:
            restore(signal.SIGTERM, previous)


@contextmanager
def staging_dir(target: Path) -> Iterator[Path]:
    """A fresh hidden directory beside ``target``; removed on any error, Ctrl-C or SIGTERM."""
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(target)
    staging = _partial_name(target, os.getpid())
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    in_main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _raise_terminated) if in_main else None
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        if in_main:
            restore(signal.SIGTERM, previous)
