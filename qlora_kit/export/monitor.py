"""What a long export shows and measures: a progress bar, peak resident memory, and heap trimming."""

from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Any, Callable, Iterator

from qlora_kit.core.logs import console as shared_console

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
    """A byte-count progress bar on stderr (only on a terminal); yields ``advance(n)``."""
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

    console = shared_console()  # the log handler's: log lines are printed above the bar, not through it
    if not enabled or not console.is_terminal:
        yield lambda n: None
        return
    columns = (TextColumn(label), BarColumn(), DownloadColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=True) as bar:
        task = bar.add_task(label, total=total)
        yield lambda n: bar.advance(task, n)
