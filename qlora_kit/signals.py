"""Graceful preemption: SIGTERM/SIGINT ask the run to checkpoint at the next step boundary.

The first signal only sets a flag that the training loop polls between optimizer steps
(and between evaluation batches); the loop then saves a checkpoint and exits with
``EXIT_PREEMPTED`` (75).  A second SIGINT aborts at once (KeyboardInterrupt, exit 130).

Under a launcher (``accelerate launch``, ``torchrun``) a Ctrl-C reaches every rank twice:
from the terminal and forwarded by the launcher.  ``echo_window`` seconds after the first
SIGINT another one counts as that same request, not as the second Ctrl-C.
"""

from __future__ import annotations

import logging
import signal
import time
from types import FrameType

log = logging.getLogger("qlora_kit")


class StopRequest:
    """Installs the handlers for the duration of a ``with`` block."""

    def __init__(self, echo_window: float = 0.0) -> None:
        self.signal_name: str | None = None
        self.echo_window = echo_window
        self._first_at = 0.0
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self.requested and signum == signal.SIGINT:
            if time.monotonic() - self._first_at < self.echo_window:
                return  # the launcher forwarding the same Ctrl-C
            raise KeyboardInterrupt
        if not self.requested:
            self.signal_name = name
            self._first_at = time.monotonic()
            log.warning("%s received: saving a checkpoint at the next step boundary (Ctrl-C again aborts)", name)

    def __enter__(self) -> "StopRequest":
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]
