"""A training run's output directory: what may be done to it, and undoing a failed start.

``train`` uses these steps, all but the first (read-only) while holding the directory's lock (rundir/lock.py):

1. :func:`check_target` refuses targets that must never be written or moved aside: a
   dangling symlink, a file, ``/``, the home directory or a parent of it, the system's own
   directories (``/usr``, ``/etc``, ...); with ``--overwrite`` also the
   current directory (or a parent of it) and any directory holding the data, the model or
   the config.
2. :func:`inspect` decides, without writing anything, how the run starts: ``fresh``,
   ``overwrite`` or ``resume`` — for a resume, from the newest checkpoint that verifies
   (newer ones that do not are reported and later set aside).
3. The recipe builds everything in memory (data, model, restored checkpoint); a refusal or
   a stop signal there leaves the directory exactly as it was.
4. :func:`begin` makes the changes: moves the old directory aside (``--overwrite``),
   creates the directory, sets corrupt checkpoints aside, removes leftovers of killed
   processes; :func:`write_files` then writes the run's files through a staging directory.
5. :func:`undo` reverts a fresh or ``--overwrite`` start that fails before its first
   checkpoint: it removes what this process created and puts the old directory back.
   It never touches a directory this process did not create or empty-start.
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Callable

from qlora_kit.core.errors import ConfigError, OutputError
from qlora_kit.core.files import fsync_dir, fsync_tree, publish_dir
from qlora_kit.rundir import checkpoint as ckpt
from qlora_kit.rundir import integrity
from qlora_kit.rundir import layout as rundir
from qlora_kit.rundir.lock import INSIDE_NAME, real_path

log = logging.getLogger("qlora_kit")

_LEFTOVER_PREFIXES = (".tmp-", ".old-")  # staging/replaced directories of killed processes
_STAGING_PREFIX = ".tmp-setup-"


@dataclass
class Start:
    """How a run starts in ``out``, and what :func:`begin` changed (for :func:`undo`)."""

    out: Path
    mode: str  # "fresh" | "overwrite" | "resume"
    resume_from: Path | None = None  # newest checkpoint that verifies (resume)
    corrupt: list[tuple[Path, str]] = field(default_factory=list)  # newer checkpoints that do not
    begun: bool = False  # begin() ran: the directory may have changed
    created: bool = False  # begin() created ``out``
    aside: Path | None = None  # where begin() moved the old directory (--overwrite)

    @property
    def fresh(self) -> bool:
        return self.mode != "resume"


def check_target(out: Path, overwrite: bool, protected: dict[str, Path]) -> None:
    """Refuse output directories that must never be written to or moved aside.

    ``protected`` maps a label ("the data file", ...) to a path that ``--overwrite`` must not move.

    Raises:
        OutputError: dangling symlink, a file, ``/``, home or a parent of it, one of the system's own
            directories (``/usr``, ``/etc``, ...); with ``--overwrite`` the current directory or a parent
            of it, or a directory holding a protected path.
    """
    if out.is_symlink() and not out.exists():
        raise OutputError(f"output_dir {out} is a symlink to {os.readlink(out)}, which does not exist",
                          "create the directory it points to, or set output_dir to another path")
    if out.exists() and not out.is_dir():
        raise OutputError(f"output_dir {out} exists and is a file", "choose another output_dir")
    target = out.resolve()
    own = "set output_dir to a directory of its own, e.g. --set output_dir=out/my-run"
    if target == Path(target.anchor) or target == Path.home().resolve():
        what = "the filesystem root" if target == Path(target.anchor) else "your home directory"
        raise OutputError(f"output_dir {out} is {what}: a run needs a directory of its own", own)
    if Path.home().resolve().is_relative_to(target):
        raise OutputError(f"output_dir {out} holds your home directory: a run needs a directory of its own", own)
    if _is_system_dir(out) or _is_system_dir(target):
        raise OutputError(f"output_dir {out} is a system directory: a run needs a directory of its own", own)
    if not overwrite:
        return
    cwd = Path.cwd().resolve()
    if cwd == target or cwd.is_relative_to(target):
        raise OutputError(f"--overwrite would move {out} aside, and it holds the current directory", own)
    for label, path in protected.items():
        held = Path(path).expanduser().resolve()
        if held == target or held.is_relative_to(target):
            raise OutputError(f"--overwrite would move {out} aside, and it holds {label} {path}", own)


# The system's own top-level directories (Linux and macOS): never a run, never moved aside.
SYSTEM_DIRS = frozenset({
    "/bin", "/boot", "/dev", "/etc", "/home", "/lib", "/lib32", "/lib64", "/libx32", "/lost+found", "/media",
    "/mnt", "/opt", "/proc", "/root", "/run", "/sbin", "/snap", "/srv", "/sys", "/tmp", "/usr", "/var",
    "/Applications", "/Library", "/System", "/Users", "/Volumes", "/private", "/cores",
    "/usr/local", "/var/tmp", "/private/tmp", "/private/var",
})


def _is_system_dir(path: Path) -> bool:
    """``path`` (as given, made absolute, or resolved) is one of :data:`SYSTEM_DIRS`."""
    return os.path.normpath(os.path.abspath(path.expanduser())) in SYSTEM_DIRS


def inspect(out: Path, resume: bool, overwrite: bool) -> Start:
    """Decide how the run starts in ``out``; nothing is written.

    Raises:
        ConfigError: --resume and --overwrite together.
        OutputError: an existing directory without --resume/--overwrite, nothing to resume,
            or checkpoints of which none verifies.
    """
    if resume and overwrite:
        raise ConfigError("--resume and --overwrite contradict each other", "pass only one of them")
    entries = [p for p in out.iterdir() if not _is_leftover(p) and p.name != INSIDE_NAME] if out.is_dir() else []
    if resume:
        return _inspect_resume(out, entries)
    if entries and not overwrite:
        what = "a qlora-kit run" if rundir.is_run_dir(out) else "files that are not from qlora-kit"
        raise OutputError(
            f"output_dir {out} already holds {what}",
            "--resume continues that run, --overwrite starts afresh (the old directory is moved aside), "
            "or set another output_dir",
        )
    return Start(out, "overwrite" if entries else "fresh")


def _inspect_resume(out: Path, entries: list[Path]) -> Start:
    if not entries:
        raise OutputError(f"nothing to resume: {out} does not exist or is empty", "drop --resume to start a run")
    if not rundir.is_run_dir(out):
        raise OutputError(f"nothing to resume: {out} holds files that are not from qlora-kit",
                          "drop --resume and set another output_dir")
    _check_run_files(out)
    start = Start(out, "resume")
    start.resume_from, start.corrupt = newest_valid(out)
    if start.resume_from is None and start.corrupt:
        names = ", ".join(f"{p.name} ({reason})" for p, reason in start.corrupt[:3])
        raise OutputError(f"no checkpoint in {out} verifies, so there is nothing to resume from: {names}",
                          "start afresh with --overwrite (the old directory is moved aside)")
    if start.resume_from is None and (out / rundir.ADAPTER).is_dir():
        raise OutputError(f"{out} holds a finished adapter but no checkpoint to continue from",
                          "start a new run with --overwrite (the old directory is moved aside) or another output_dir")
    if start.resume_from is None and not (out / rundir.CONFIG).is_file():
        raise OutputError(f"{out} has no complete checkpoint and no {rundir.CONFIG} to resume from",
                          "drop --resume and pass --overwrite to start afresh (the old directory is moved aside)")
    return start


def _check_run_files(out: Path) -> None:
    """Refuse a resume where one of the run's plain files (train.log, metrics.jsonl, ...) is a directory or other
    non-file: the resume would fail on it after loading everything, or write through it.

    Raises:
        OutputError: naming the path and what it is.
    """
    for name in rundir.RUN_FILES:
        path = out / name
        if (path.exists() or path.is_symlink()) and not (path.is_file() and not path.is_symlink()):
            what = ("a symlink" if path.is_symlink() else "a directory" if path.is_dir() else "not a regular file")
            raise OutputError(f"cannot resume {out}: its {name} is {what}, where the run keeps a file of its own",
                              f"move {path} out of the way (qlora-kit writes a new one), then resume again")


def newest_valid(out: Path, below: int | None = None) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The newest checkpoint (with a step under ``below``) that verifies, and (path, reason) for newer ones."""
    bad: list[tuple[Path, str]] = []
    for step, path in reversed(ckpt.list_checkpoints(out)):
        if below is not None and step >= below:
            continue
        try:
            ckpt.verify_checkpoint(path)
        except integrity.CorruptCheckpoint as exc:
            log.warning("%s does not verify (%s): skipping it", path.name, exc)
            bad.append((path, str(exc)))
            continue
        return path, bad
    return None, bad


def begin(start: Start) -> None:
    """Make the directory ready for writing: move aside, create, set corrupt checkpoints aside, clean up."""
    out = start.out
    real = real_path(out)  # through a symlink: the directory it points to (whose lock we hold) is the run
    start.begun = True
    if start.mode == "overwrite":
        start.aside = real.with_name(f"{real.name}.old-{datetime.now().strftime('%Y%m%d-%H%M%S')}")
        os.rename(real, start.aside)
        log.warning("--overwrite: moved the existing %s aside to %s (delete it when no longer needed)",
                    out, start.aside)
    if not out.exists():
        real.mkdir(parents=True)
        start.created = True
    for path, reason in start.corrupt:
        moved = ckpt.set_aside(path)
        log.warning("%s does not verify (%s): moved aside to %s", path.name, reason, moved.name)
    for path in ckpt.remove_incomplete(out):
        log.warning("removed incomplete checkpoint %s (interrupted write or prune)", path.name)
    for path in remove_leftovers(out):
        log.warning("removed %s (left by an interrupted run)", path.name)


def remove_leftovers(out: Path) -> list[Path]:
    """Delete staging/replaced files and directories (``.tmp-*``, ``.old-*``) that killed processes left."""
    removed = []
    for child in out.iterdir() if out.is_dir() else []:
        if _is_leftover(child):
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child, ignore_errors=True)
            else:
                child.unlink(missing_ok=True)
            removed.append(child)
    return removed


def _is_leftover(path: Path) -> bool:
    name = path.name
    return name.startswith(_LEFTOVER_PREFIXES) or (name.startswith(".") and ".tmp-" in name) \
        or name == rundir.METRICS + ".tmp"


def write_files(out: Path, writers: dict[str, Callable[[Path], None]]) -> None:
    """Write each named file or directory with ``writer(path)`` into a staging directory, then rename into place.

    A failure (a full disk) leaves the existing files untouched and no staging directory.
    """
    staging = out / f"{_STAGING_PREFIX}{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        staging.mkdir()
        for name, write in writers.items():
            write(staging / name)
        fsync_tree(staging)
        for name in writers:
            if (staging / name).is_dir():
                publish_dir(staging / name, out / name)
            else:
                os.replace(staging / name, out / name)
        fsync_dir(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def undo(start: Start) -> None:
    """Revert a fresh/--overwrite start that failed before its first checkpoint (never a resume).

    Removes the directory when this process created it (only its contents when it existed
    empty), then moves the directory that ``--overwrite`` set aside back into place.
    """
    if not start.fresh or not start.begun:
        return
    out = start.out
    real = real_path(out)
    try:
        if start.created:
            shutil.rmtree(real, ignore_errors=True)
        elif start.mode == "fresh" and out.is_dir():  # it existed empty: everything in it is ours
            for child in (c for c in out.iterdir() if c.name != INSIDE_NAME):
                shutil.rmtree(child, ignore_errors=True) if child.is_dir() and not child.is_symlink() \
                    else child.unlink(missing_ok=True)
        if start.aside is not None and not real.exists():
            os.rename(start.aside, real)
            log.warning("the new run did not start: moved %s back to %s", start.aside.name, out)
    except OSError as exc:  # never hide the original failure behind the clean-up
        log.warning("could not fully clean up %s: %s", out, exc)
