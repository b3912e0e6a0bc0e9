"""Graceful preemption: SIGTERM/SIGINT stop a run within seconds, in every phase, leaving a rerunnable state.

Two modes, switched by the recipe:

- *immediate* (setup: reading data, loading the model, restoring a checkpoint — all in
  memory, nothing written yet): the signal raises :class:`StopNow` at once, wherever the
  main thread is; the run directory is untouched, so the same command can simply be rerun.
  ``StopNow`` is a ``BaseException`` so that library ``except Exception`` blocks cannot
  swallow it.
- *deferred* (writing the run's files, training, evaluation, saving): the signal only sets
  a flag that the loop polls between micro-batches and evaluation batches; the loop then
  saves a checkpoint of the last finished step and exits with ``EXIT_PREEMPTED`` (75).

A second SIGINT aborts at once (KeyboardInterrupt, exit 130).  A SIGINT that was ignored when
the process started (a background job of a shell) stays ignored; SIGTERM still stops it.

The command line installs one immediate request for the whole process before its heavy
imports (:func:`install_startup_stop`), so a signal during the first seconds also ends as
exit 75 with nothing written.  The first request a command installs retires it: the handlers
from before come back when that request ends, as they were without one.

Under a launcher (``accelerate launch``, ``torchrun``) a Ctrl-C reaches every rank twice:
from the terminal and forwarded by the launcher.  ``echo_window`` seconds after the first
SIGINT another one counts as that same request, not as the second Ctrl-C.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from types import FrameType

log = logging.getLogger("qlora_kit")

CHECKPOINT_NOTE = "saving a checkpoint at the next step boundary (Ctrl-C again aborts)"


class StopNow(BaseException):
    """A stop signal arrived while nothing was being written: unwind at once."""

    def __init__(self, signal_name: str):
        super().__init__(signal_name)
        self.signal_name = signal_name


class StopRequest:
    """Installs the handlers for the duration of a ``with`` block, then restores the previous ones.

    Only in the main thread (Python delivers signals there alone): called from another thread
    (a script's worker, a notebook's background job) it installs nothing and the run is
    stopped only by its own end or the process's.
    """

    def __init__(self, immediate: bool = False, echo_window: float = 0.0) -> None:
        self.signal_name: str | None = None
        self.immediate = immediate
        self.echo_window = echo_window
        self._first_at = 0.0
        self._previous: dict[int, object] = {}
        self._note: str | None = CHECKPOINT_NOTE

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    def defer(self, note: str | None = CHECKPOINT_NOTE) -> None:
        """From now on only record signals (files are being written); the loop polls ``requested``.

        ``note``: what the warning logged when a signal arrives says will happen (None: no warning).
        """
        self.immediate = False
        self._note = note

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self.requested and signum == signal.SIGINT:
            if time.monotonic() - self._first_at < self.echo_window:
                return  # the launcher forwarding the same Ctrl-C
            raise KeyboardInterrupt
        if self.immediate:
            self.signal_name = name
            self._first_at = time.monotonic()
            raise StopNow(name)
        if not self.requested:
            self.signal_name = name
            self._first_at = time.monotonic()
            if self._note:
                log.warning("%s received: %s", name, self._note)

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            if _STARTUP and _STARTUP[0] is not self:
                _retire_startup_stop()  # the command's own request from now on; afterwards the defaults are back
            for sig in (signal.SIGTERM, signal.SIGINT):
                if sig == signal.SIGINT and signal.getsignal(sig) == signal.SIG_IGN:
                    continue  # ignored by whoever started us (nohup, `cmd &` in a script): keep it so
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            restore(sig, handler)
        self._previous.clear()


def restore(sig: int, previous: object) -> None:
    """Put back the handler ``signal.signal`` returned (None: one set outside Python; Python's default then).

    Called in the main thread only, like ``signal.signal`` itself: a notebook's or host program's own
    handlers are in place again after every command.
    """
    if previous is None:
        previous = signal.default_int_handler if sig == signal.SIGINT else signal.SIG_DFL
    signal.signal(sig, previous)  # type: ignore[arg-type]


_STARTUP: list[StopRequest] = []


def install_startup_stop() -> StopRequest:
    """An immediate stop request for the whole process, installed once before the heavy imports.

    Until a command installs its own, SIGTERM (or a first SIGINT) raises :class:`StopNow`, which
    the command line reports as exit 75 with nothing written, instead of dying with 143.
    """
    if not _STARTUP:
        launched = os.environ.get("WORLD_SIZE", "1") not in ("", "1")  # a launcher echoes Ctrl-C to every rank
        _STARTUP.append(StopRequest(immediate=True, echo_window=2.0 if launched else 0.0).__enter__())
    return _STARTUP[0]


def _retire_startup_stop() -> None:
    """Put back the handlers the startup request replaced (a command installs its own request now)."""
    startup = _STARTUP.pop()
    startup.__exit__()


def settle_startup_stop() -> None:
    """The command's work is done: a signal arriving now is only recorded and changes nothing.

    (A command that installed its own request has already retired the startup one.)
    """
    if _STARTUP:
        _STARTUP[0].defer(note=None)


def startup_stop_lines(signal_name: str, command: str) -> tuple[str, str]:
    """The ``error:``/``fix:`` texts for a stop by the startup request (nothing was written yet)."""
    return f"{command} stopped by {signal_name}; nothing was written", "run the same command again"
