"""Stop signals: a second Ctrl-C aborts."""

from __future__ import annotations

import os
import signal

import pytest

from qlora_kit.core.signals import StopRequest


def test_second_sigint_aborts() -> None:
    before = signal.getsignal(signal.SIGINT)  # SIG_IGN when the suite was started in the background
    with StopRequest() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.requested and stop.signal_name == "SIGINT"
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is before  # the handler it replaced is back


def test_a_handler_set_outside_python_is_replaced_by_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    """``signal.signal`` returns None for a handler installed from C; restoring None would raise TypeError."""
    from qlora_kit.core.signals import restore

    before = signal.getsignal(signal.SIGTERM)
    try:
        signal.signal(signal.SIGTERM, lambda *a: None)
        restore(signal.SIGTERM, None)
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    finally:
        signal.signal(signal.SIGTERM, before)


def test_outside_the_main_thread_nothing_is_installed() -> None:
    import threading

    before = signal.getsignal(signal.SIGINT)
    seen: list[object] = []

    def work() -> None:
        with StopRequest(immediate=True) as stop:
            seen.append(signal.getsignal(signal.SIGINT))
            seen.append(stop.requested)

    worker = threading.Thread(target=work)
    worker.start()
    worker.join()
    assert seen == [before, False] and signal.getsignal(signal.SIGINT) is before
