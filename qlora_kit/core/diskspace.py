"""Free-space checks before large writes, and a full disk turned into one line.

Checkpoints, the final adapter, the run's setup files and exports estimate the bytes they
are about to write and call :func:`require_free` first, so a full disk fails early with the
numbers instead of half-way through.  Whatever still runs out of space (another process
filled the disk meanwhile) raises ``OSError(ENOSPC)``; :func:`no_space_as_error` turns that
into a :class:`DiskFullError` after the caller's cleanup has run.
"""

from __future__ import annotations

import errno
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from qlora_kit.core.errors import DiskFullError

MARGIN_BYTES = 1024**2  # filesystem metadata, block rounding, small files written beside the estimated ones
MARGIN_FRACTION = 0.01  # plus 1 % of the estimate: shard headers, JSON grown since it was estimated
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


def format_bytes(n: float) -> str:
    """``1.23 GB`` style (decimal units, as ``df -H`` prints them)."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n:.2f} TB"


def free_bytes(path: Path) -> int:
    """Bytes available to us on the filesystem holding ``path`` (or its nearest existing parent)."""
    p = Path(os.path.abspath(path))
    while not p.exists() and p != p.parent:
        p = p.parent
    return shutil.disk_usage(p).free


def tree_bytes(path: Path) -> int:
    """Total size of the files below ``path`` (0 when it does not exist)."""
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())


def margin(needed: int) -> int:
    """What :func:`require_free` asks for beyond an estimate of ``needed`` bytes: 1 MiB + 1 %."""
    return MARGIN_BYTES + int(needed * MARGIN_FRACTION)


def require_free(path: Path, needed: int, what: str, fix: str) -> None:
    """Refuse to start writing ``what`` when the disk holding ``path`` lacks ``needed`` bytes plus a small margin.

    ``needed`` is the caller's estimate of the bytes it is about to write, from their real sizes.

    Raises:
        DiskFullError: with the needed and free numbers.
    """
    free = free_bytes(path)
    total = needed + margin(needed)
    if free < total:
        raise DiskFullError(
            f"not enough disk space for {what} in {path}: needs about {format_bytes(total)}, "
            f"{format_bytes(free)} free", fix)


def is_no_space(exc: BaseException) -> bool:
    """True for ENOSPC / EDQUOT, also when wrapped by a library (e.g. safetensors' IoError)."""
    if isinstance(exc, OSError) and exc.errno in _NO_SPACE:
        return True
    text = str(exc)
    return "No space left on device" in text or "Disk quota exceeded" in text


@contextmanager
def no_space_as_error(path: Path, what: str, fix: str) -> Iterator[None]:
    """Re-raise a full disk while writing ``what`` as a one-line :class:`DiskFullError`.

    Raises:
        DiskFullError: the write ran out of space (the original error is chained).
    """
    try:
        yield
    except DiskFullError:
        raise
    except Exception as exc:
        if not is_no_space(exc):
            raise
        raise DiskFullError(f"the disk holding {path} filled up while writing {what} "
                            f"({format_bytes(free_bytes(path))} free now)", fix) from exc
