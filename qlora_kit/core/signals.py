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

A second SIGINT aborts at once (KeyboardInterrupt, exit 130).

Under a launcher (``accelerate launch``, ``torchrun``) a Ctrl-C reaches every rank twice:
from the terminal and forwarded by the launcher.  ``echo_window`` seconds after the first
SIGINT another one counts as that same request, not as the second Ctrl-C.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from types import FrameType

log = logging.getLogger("qlora_kit")


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

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    def defer(self) -> None:
        """From now on only record signals (files are being written); the loop polls ``requested``."""
        self.immediate = False

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
            log.warning("%s received: saving a checkpoint at the next step boundary (Ctrl-C again aborts)", name)

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
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
