"""Progress that works without a terminal: durations, ETAs, a heartbeat, and a bar-or-lines meter.

On a terminal long work draws a rich progress bar (on ``logs.console()``, below the log lines).
When stderr is a pipe or a file (``| tee``, ``nohup``, Slurm) a bar cannot be drawn, so the same
work writes log lines instead: one when it starts, then one at least every ``interval()`` seconds
(``QLORA_KIT_PROGRESS_SECONDS``, default 30) while it runs, each with how far it is, the elapsed
time and an ETA.  A heartbeat thread writes the line when a single unit of work (a model load, one
long step) outlasts the interval.  Nothing here reads a device tensor: only counts and wall time.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from contextlib import contextmanager
from typing import Any, Callable, Iterator

from qlora_kit.core import logs

log = logging.getLogger("qlora_kit")

ENV_INTERVAL = "QLORA_KIT_PROGRESS_SECONDS"
DEFAULT_INTERVAL = 30.0
MIN_HEARTBEAT = 1.0  # the heartbeat thread never wakes more often than this, whatever the interval
_WARNED: set[str] = set()


def interval() -> float:
    """Seconds between progress lines in a pipe: ``$QLORA_KIT_PROGRESS_SECONDS`` (0 = every update), else 30."""
    raw = os.environ.get(ENV_INTERVAL, "").strip()
    if not raw:
        return DEFAULT_INTERVAL
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value >= 0.0 or value == float("inf"):
        if raw not in _WARNED:
            _WARNED.add(raw)
            log.warning("%s=%r is not a number of seconds >= 0; using %g", ENV_INTERVAL, raw, DEFAULT_INTERVAL)
        return DEFAULT_INTERVAL
    return value


def duration(seconds: float) -> str:
    """A compact duration: ``42s``, ``3m07s``, ``2h05m``, ``3d04h``."""
    s = max(0, int(round(seconds)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def eta(done: float, total: float, elapsed: float) -> str:
    """Time left at the average pace so far; ``-`` before anything is done."""
    if done <= 0 or elapsed <= 0:
        return "-"
    return duration(elapsed / done * max(0.0, total - done))


def timing(done: float, total: float, elapsed: float) -> str:
    """``elapsed 1m02s  eta 9m18s``: what every progress line ends with."""
    return f"elapsed {duration(elapsed)}  eta {eta(done, total, elapsed)}"


def terminal() -> bool:
    """Whether progress is drawn as a bar (stderr is a terminal) rather than written as lines."""
    return bool(logs.console().is_terminal)


class Heartbeat:
    """Calls ``say()`` from a daemon thread whenever ``every`` seconds pass without a ``beat()``.

    ``say`` must read host state only (counters, clocks), never a device tensor: it runs beside
    the work.  A failing ``say`` is ignored (progress never costs the work).
    """

    def __init__(self, say: Callable[[], None], every: float, clock: Callable[[], float] = time.monotonic):
        self.say, self.every, self.clock = say, max(every, MIN_HEARTBEAT), clock
        self.last = clock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="qlora-kit-heartbeat", daemon=True)

    def start(self) -> "Heartbeat":
        self._thread.start()
        return self

    def beat(self) -> None:
        """Something was just written: the next heartbeat is due ``every`` seconds from now."""
        self.last = self.clock()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.wait(max(0.05, self.last + self.every - self.clock())):
            if self.clock() - self.last >= self.every:
                self.last = self.clock()
                try:
                    self.say()
                except Exception:  # noqa: BLE001 (a progress line must never end the work)
                    pass


@contextmanager
def working(label: str, enabled: bool = True) -> Iterator[None]:
    """A sign of life for work without countable units (a model load, a conversion).

    In a pipe or file, ``LABEL: still working, elapsed 1m00s`` every ``interval()`` seconds (the
    caller says what starts and what came out); nothing on a terminal.
    """
    if not enabled or terminal():
        yield
        return
    started = time.monotonic()

    def say() -> None:
        log.info("%s: still working, elapsed %s", label, duration(time.monotonic() - started))

    heartbeat = Heartbeat(say, interval()).start()
    try:
        yield
    finally:
        heartbeat.stop()


def counted(unit: str) -> Callable[[float, float], str]:
    """``prompt 3/8``: how a meter counting ``unit``s says how far it is."""
    return lambda done, total: f"{unit} {int(done)}/{int(total)}"


def in_bytes(done: float, total: float) -> str:
    """``1.2/13.5 GB (9%)`` (MB below a GB): how a meter counting bytes says how far it is."""
    scale, unit = (1e9, "GB") if total >= 1e9 else (1e6, "MB")
    return f"{done / scale:.1f}/{total / scale:.1f} {unit} ({done / max(total, 1):.0%})"


class Meter:
    """Progress of one piece of work of ``total`` units: a rich bar on a terminal, paced log lines elsewhere.

    Use as a context manager and call :meth:`advance`.  In a pipe or file it writes
    ``LABEL: <where>  elapsed ..  eta ..`` when it starts, when it ends, and in between at most
    every ``interval()`` seconds (from a heartbeat while a unit is slow).  ``where(done, total)``
    words how far it is (:func:`counted`, :func:`in_bytes`).
    """

    def __init__(self, label: str, total: float, where: Callable[[float, float], str] = counted("item"),
                 enabled: bool = True, every: float | None = None, clock: Callable[[], float] = time.monotonic):
        self.label, self.total, self.where, self.clock = label, total, where, clock
        self.every = interval() if every is None else every
        self.enabled = enabled and total > 0
        self.done = 0.0
        self.started = self.last = clock()
        self.bar: Any = None
        self.heartbeat: Heartbeat | None = None

    def __enter__(self) -> "Meter":
        if not self.enabled:
            return self
        if terminal():
            self._start_bar()
        else:
            self.line()
            self.heartbeat = Heartbeat(self.line, self.every, self.clock).start()
        return self

    def _start_bar(self) -> None:
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        self.bar = Progress(TextColumn(self.label), BarColumn(), TextColumn("{task.fields[where]}"),
                            TimeElapsedColumn(), TimeRemainingColumn(), console=logs.console(), transient=True)
        self.task = self.bar.add_task(self.label, total=self.total, where=self.where(0, self.total))
        self.bar.start()

    def advance(self, n: float = 1) -> None:
        """``n`` more units are done."""
        finished = self.done < self.total <= self.done + n
        self.done = min(self.total, self.done + n)
        if self.bar is not None:
            self.bar.update(self.task, completed=self.done, where=self.where(self.done, self.total))
        elif self.heartbeat is not None and (finished or self.clock() - self.last >= self.every):
            self.line()

    def line(self) -> None:
        """Write where the work is (pipe mode)."""
        now = self.clock()
        self.last = now
        if self.heartbeat is not None:
            self.heartbeat.beat()
        log.info("%s: %s  %s", self.label, self.where(self.done, self.total),
                 timing(self.done, self.total, now - self.started))

    def __exit__(self, *exc: object) -> None:
        if self.heartbeat is not None:
            self.heartbeat.stop()
        if self.bar is not None:
            self.bar.stop()
