"""What a long export shows and measures: progress (a bar, or lines in a pipe), peak resident memory, and heap
trimming."""

from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Any, Callable, Iterator

from qlora_kit.core.pacing import Meter, in_bytes

_MALLOC_TRIM: Any = None


def trim_heap() -> None:
    """Hand freed heap memory back to the OS (glibc keeps freed mid-sized tensors otherwise; RSS creeps)."""
    global _MALLOC_TRIM
    if _MALLOC_TRIM is None:
        try:
            import ctypes

            _MALLOC_TRIM = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _MALLOC_TRIM = False
    if _MALLOC_TRIM:
        _MALLOC_TRIM(0)


def current_rss() -> int:
    """Resident memory of this process, bytes."""
    import psutil

    return psutil.Process().memory_info().rss


class RssSampler:
    """Peak resident memory while a block runs (sampled every 5 ms)."""

    def __init__(self, interval: float = 0.005):
        self.interval = interval
        self.peak = current_rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, current_rss())

    def __enter__(self) -> "RssSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, current_rss())


@contextmanager
def progress(total: int, enabled: bool, label: str = "merging") -> Iterator[Callable[[int], None]]:
    """Byte-count progress on stderr, yielding ``advance(n)``: a bar on a terminal, paced lines in a pipe
    (``merging: 1.2/13.5 GB (9%)  elapsed ..  eta ..``)."""
    with Meter(label, total, in_bytes, enabled=enabled) as meter:
        yield meter.advance
