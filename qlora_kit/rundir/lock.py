"""One writer per run directory: an OS-level lock on a file beside it.

``qlora-kit train`` holds an *exclusive* lock for ``output_dir`` from before it looks at the
directory until it exits; ``export`` and ``generate`` hold a *shared* lock while they read a
run (``export`` also an exclusive one on its ``--out``).  So a second ``train``/``--resume``
on a directory in use is refused with the holder's PID, two started at the same instant
cannot both run, and a run is never read while it is being written.

The lock is ``flock(2)`` on an open file: the kernel drops it when the process exits in any
way, ``kill -9`` included, so a stale lock file never blocks anyone.

Where the lock file lives: ``<parent>/.<name>.lock``, *beside* the directory, so that a
fresh run can create the directory, a failed fresh run can remove it, and ``--overwrite``
can move it aside, all while holding the lock (a lock file inside would move or vanish with
the directory).  Only when the parent is not writable (e.g. a bind mount used directly as
``output_dir``) is it ``<dir>/.qlora-kit.lock``; such a directory cannot be created, moved
or removed by us anyway.  An exclusive holder removes the lock file on release; a process
that opened the old file meanwhile notices (inode check) and retries with the new one.
The last reader out removes it too (when it can take the lock exclusively for a moment).

The lock belongs to the real directory: ``runs/S`` and a symlink ``runs/Slink`` to it take the
same lock (``.S.lock`` beside ``runs/S``), for ``train``, ``--resume``, ``export`` and ``generate``.

Multi-process training: only the process that writes the run (rank 0) takes the lock;
pass ``enabled=False`` on the others.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
from pathlib import Path
from types import TracebackType

from qlora_kit.core.errors import OutputError, RunInUseError

_RECORD_BYTES = 256  # the holder's record is written with one pwrite of this fixed size
INSIDE_NAME = ".qlora-kit.lock"


def lock_path(directory: Path) -> Path:
    """The lock file for ``directory`` (which need not exist yet).

    Named after the real directory (symlinks resolved, in the path and in its last part), so that
    every path to one run directory takes the same lock.
    """
    target = real_path(directory)
    parent = target.parent
    if parent.is_dir() and not os.access(parent, os.W_OK) and target.is_dir():
        return target / INSIDE_NAME
    return parent / f".{target.name}.lock"


def real_path(directory: Path) -> Path:
    """``directory`` absolute with every symlink resolved (also where the path does not exist yet)."""
    return Path(os.path.realpath(Path(directory).expanduser()))


class RunLock:
    """An exclusive (writer) or shared (reader) lock on a run directory.

    Raises (on ``acquire``):
        RunInUseError: another process holds a conflicting lock (its PID and command named).
        OutputError: the lock file cannot be created (exclusive only; readers go on unlocked).
    """

    def __init__(self, directory: Path, command: str, shared: bool = False, enabled: bool = True,
                 option: str = "output_dir"):
        self.directory = Path(directory)
        self.option = option  # how the user named the directory (output_dir, --out): errors say which to change
        self.command = command
        self.shared = shared
        self.enabled = enabled
        self.path = lock_path(self.directory)
        self._fd: int | None = None

    def acquire(self) -> "RunLock":
        if not self.enabled or self._fd is not None:
            return self
        for _ in range(50):  # retries only when a holder removed the file between our open and flock
            fd = self._open()
            if fd is None:
                return self
            try:
                fcntl.flock(fd, (fcntl.LOCK_SH if self.shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_holder(fd)
                os.close(fd)
                raise self._in_use(holder) from None
            if _same_file(fd, self.path):
                self._fd = fd
                _write_holder(fd, self.command)
                return self
            os.close(fd)
        raise OutputError(f"could not lock {self.path}: it keeps being replaced", "try again")

    def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            if self.shared:  # the last reader out removes the file: only when nobody else holds it
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.unlink(self.path)  # we hold it exclusively: nobody else holds any lock on this file
        except OSError:
            pass
        finally:
            os.close(fd)

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.release()

    def _open(self) -> int | None:
        if not self.shared:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise OutputError(f"cannot create {self.path.parent}: {exc.strerror}",
                                  f"choose an {self.option} in a directory you can write to") from exc
        try:
            return os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            if self.shared and exc.errno in (errno.EACCES, errno.EROFS, errno.EPERM, errno.ENOENT):
                return None  # a reader where no lock file can exist: nobody can be writing here with us
            raise OutputError(f"cannot create the lock file {self.path}: {exc.strerror}",
                              f"choose an {self.option} in a directory you can write to") from exc

    def _in_use(self, holder: dict) -> RunInUseError:
        pid = holder.get("pid", "unknown")
        what = holder.get("command") or "qlora-kit"
        since = f", since {holder['since']}" if holder.get("since") else ""
        host = holder.get("host")
        where = f" on host {host}" if host and host != socket.gethostname() else ""
        if self.shared:
            message = f"{self.directory} is being written by another process (PID {pid}{where}: {what}{since})"
            hint = f"wait until it finishes (or stop it: kill -TERM {pid}), then run this again"
        else:
            named = "" if self.option == "output_dir" else f"{self.option} "
            message = (f"{named}{self.directory} is in use by another qlora-kit process "
                       f"(PID {pid}{where}: {what}{since})")
            hint = (f"wait until it finishes or stop it (kill -TERM {pid}; a training run saves a checkpoint), "
                    f"or choose another {self.option}")
        return RunInUseError(message, hint)


def exclusive(directory: Path, command: str, enabled: bool = True, option: str = "output_dir") -> RunLock:
    """A writer's lock on ``directory`` (use as a context manager, or ``.acquire()``); ``option``: how the user
    named it (``--out`` for an export), for the messages."""
    return RunLock(directory, command, shared=False, enabled=enabled, option=option)


def shared(directory: Path, command: str) -> RunLock:
    """A reader's lock on ``directory``: refused while a writer holds it."""
    return RunLock(directory, command, shared=True)


def _same_file(fd: int, path: Path) -> bool:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    own = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (own.st_dev, own.st_ino)


def _write_holder(fd: int, command: str) -> None:
    record = json.dumps({"pid": os.getpid(), "command": command, "host": socket.gethostname(),
                         "since": time.strftime("%Y-%m-%d %H:%M:%S")})
    data = record.encode()[: _RECORD_BYTES - 1].ljust(_RECORD_BYTES - 1) + b"\n"
    try:
        os.pwrite(fd, data, 0)  # one write of a fixed size: readers never see half of it
    except OSError:
        pass  # the record is informative only (a full disk must not stop a reader)


def _read_holder(fd: int, wait: float = 1.0) -> dict:
    """The holder's record; it may be a moment late when both processes started together."""
    deadline = time.monotonic() + wait
    while True:
        try:
            holder = json.loads(os.pread(fd, _RECORD_BYTES, 0).decode(errors="replace").strip() or "null")
        except ValueError:
            holder = None
        if isinstance(holder, dict) or time.monotonic() >= deadline:
            return holder if isinstance(holder, dict) else {}
        time.sleep(0.05)
