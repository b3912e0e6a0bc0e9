"""Stop signals: a second Ctrl-C aborts."""

from __future__ import annotations

import os
import signal

import pytest

from qlora_kit.core.signals import StopNow, StopRequest


@pytest.fixture
def sigint_as(request: pytest.FixtureRequest):
    """SIGINT's handler set for the test (SIG_IGN when the suite was started in the background), then restored."""
    saved = signal.signal(signal.SIGINT, request.param)
    yield request.param
    signal.signal(signal.SIGINT, saved)


@pytest.mark.parametrize("sigint_as", [signal.default_int_handler], indirect=True)
def test_second_sigint_aborts(sigint_as) -> None:
    with StopRequest() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.requested and stop.signal_name == "SIGINT"
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is sigint_as  # the handler it replaced is back


@pytest.mark.parametrize("sigint_as", [signal.SIG_IGN], indirect=True)
def test_an_ignored_sigint_stays_ignored_and_sigterm_still_stops(sigint_as) -> None:
    """`qlora-kit train cfg.yaml &` in a script: the shell ignores Ctrl-C for it; SIGTERM still stops it."""
    with StopRequest(immediate=True):
        os.kill(os.getpid(), signal.SIGINT)
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
        with pytest.raises(StopNow, match="SIGTERM"):
            os.kill(os.getpid(), signal.SIGTERM)
    assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN


@pytest.mark.parametrize("sigint_as", [signal.default_int_handler], indirect=True)
def test_the_startup_request_stops_at_once_until_a_command_installs_its_own(sigint_as) -> None:
    from qlora_kit.core import signals

    before = signal.getsignal(signal.SIGTERM)
    try:
        signals.install_startup_stop()
        with pytest.raises(StopNow, match="SIGTERM"):  # the imports: nothing written yet
            os.kill(os.getpid(), signal.SIGTERM)
        with StopRequest() as own:  # the command's own request retires it ...
            os.kill(os.getpid(), signal.SIGTERM)
            assert own.signal_name == "SIGTERM"
        assert signal.getsignal(signal.SIGTERM) is before  # ... and the handlers from before come back
        assert signal.getsignal(signal.SIGINT) is sigint_as and not signals._STARTUP
    finally:
        while signals._STARTUP:
            signals._retire_startup_stop()
        signal.signal(signal.SIGTERM, before)


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
