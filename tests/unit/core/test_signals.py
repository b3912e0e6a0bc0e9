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
