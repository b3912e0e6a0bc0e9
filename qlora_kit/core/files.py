"""Files written so that a crash never leaves half of one: write beside the target, fsync, rename, fsync the directory.

``atomic_file`` for a single file, ``publish_dir`` for a directory built in a staging
directory; a reader (or the next run) sees the old version or the new one, never a mix.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import shutil
import signal
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

log = logging.getLogger("qlora_kit")


def fsync_dir(path: Path) -> None:
    """Flush a directory entry (so a rename survives a power cut)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(path: Path) -> None:
    """fsync every file below ``path`` and the directories themselves."""
    for root, _dirs, files in os.walk(path):
        for name in files:
            with open(Path(root) / name, "rb") as fh:
                os.fsync(fh.fileno())
        fsync_dir(Path(root))


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object file's content, or {} when it is missing, unreadable, not UTF-8 JSON, or not an object."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):  # ValueError: UnicodeDecodeError and JSONDecodeError
        return {}
    return value if isinstance(value, dict) else {}


def file_sha256(path: Path) -> str:
    """sha256 of a file's bytes."""
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


@contextmanager
def atomic_file(path: Path) -> Iterator[Path]:
    """A temporary path beside ``path`` to write to; once the block finishes it is fsync'ed and renamed over ``path``.

    If the block raises, the temporary file is removed and ``path`` is untouched.
    """
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON atomically (:func:`atomic_file`), so readers never see half a file."""
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, default=str), encoding="utf-8")


def write_json_in_place(path: Path, data: Any) -> None:
    """Overwrite an existing JSON file in place: the fallback when a full disk has no room for an atomic rewrite."""
    text = json.dumps(data, indent=2, default=str).encode()
    with open(path, "r+b") as fh:
        fh.write(text)
        fh.truncate()
        fh.flush()
        os.fsync(fh.fileno())


@contextmanager
def _signals_held() -> Iterator[None]:
    """SIGINT/SIGTERM wait until the block is done (main thread): two renames are not separated by a stop."""
    held = {signal.SIGINT, signal.SIGTERM}
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True) if path.is_dir() and not path.is_symlink() else path.unlink()


def restore_moved_aside(final: Path) -> None:
    """Finish what a :func:`publish_dir` killed between its renames left (SIGKILL, a power cut).

    Killed after moving the old version aside but before renaming the new one in, ``final`` is
    missing: the ``.old-<name>-<pid>`` of a process that is gone is renamed back.  Killed after
    both renames, before the removal, the leftover old version is removed.
    """
    prefix = f".old-{final.name}-"
    for old in sorted(final.parent.glob(f"{glob.escape(prefix)}*")):
        pid = old.name[len(prefix):]  # digits only: `.old-out-2-<pid>` belongs to `out-2`, not to `out`
        if not pid.isdigit() or _pid_alive(int(pid)):
            continue
        if final.exists() or final.is_symlink():
            log.info("removing %s, left by an interrupted replacement of %s", old, final)
            _remove(old)
        else:
            log.warning("restoring %s: a replacement of it was interrupted between its two renames", final)
            os.replace(old, final)
            fsync_dir(final.parent)


def publish_dir(staging: Path, final: Path) -> None:
    """fsync the finished ``staging`` directory and rename it to ``final``.

    Whatever is at ``final`` (a directory or a file) is replaced only now: it is renamed aside
    to ``.old-<name>-<pid>``, the new one renamed in, and the old one removed; an empty
    directory is simply replaced.  Stop signals wait for both renames, and a failed second
    rename puts the old one back, so ``final`` is never missing; what a kill between the
    renames left is put right first (:func:`restore_moved_aside`).
    """
    restore_moved_aside(final)
    fsync_tree(staging)
    old = final.with_name(f".old-{final.name}-{os.getpid()}")
    with _signals_held():
        if final.is_dir() and not final.is_symlink() and not any(final.iterdir()):
            final.rmdir()
        moved = final.exists() or final.is_symlink()
        if moved:
            os.replace(final, old)
        try:
            os.replace(staging, final)
        except BaseException:
            if moved:
                os.replace(old, final)
            raise
    fsync_dir(final.parent)
    if moved:
        _remove(old)
