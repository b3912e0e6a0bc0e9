"""A wall-clock limit for a block of pure-Python work on the main thread (a chat template's rendering).

SIGALRM interrupts the block between two bytecodes and raises :class:`TimeLimitExceeded`, a
``BaseException`` so that library ``except Exception`` blocks (jinja, transformers) cannot
swallow it.  The previous SIGALRM handler is restored afterwards.  Off the main thread, where
no itimer is available (Windows), or inside another running limit, the block runs unlimited.
"""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from types import FrameType
from typing import Iterator


class TimeLimitExceeded(BaseException):
    """The block ran longer than its limit."""

    def __init__(self, seconds: float):
        super().__init__(f"ran for more than {seconds:g} s")
        self.seconds = seconds


def _usable() -> bool:
    return (hasattr(signal, "setitimer") and threading.current_thread() is threading.main_thread()
            and signal.getitimer(signal.ITIMER_REAL)[0] == 0)


@contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Raise :class:`TimeLimitExceeded` inside the block once it has run ``seconds`` of wall-clock time."""
    if not _usable():
        yield
        return

    def _expired(_signum: int, _frame: FrameType | None) -> None:
        raise TimeLimitExceeded(seconds)

    previous = signal.signal(signal.SIGALRM, _expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
