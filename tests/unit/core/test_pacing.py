"""Progress without a terminal: durations and ETAs, paced lines, the heartbeat, and training's progress lines."""

from __future__ import annotations

import io
import logging
import re
import time

import pytest
from rich.console import Console

from qlora_kit.core import logs, pacing
from qlora_kit.train import progress as qtrain_progress


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def piped(monkeypatch: pytest.MonkeyPatch) -> io.StringIO:
    """stderr as a pipe: a console that is not a terminal."""
    out = io.StringIO()
    monkeypatch.setitem(logs._STDERR, "console", Console(file=out, force_terminal=False, width=200))
    return out


def test_durations_and_eta_read_like_a_clock() -> None:
    assert [pacing.duration(s) for s in (0, 42.4, 187, 7500, 3 * 86400 + 4 * 3600)] == \
        ["0s", "42s", "3m07s", "2h05m", "3d04h"]
    assert pacing.eta(0, 10, 5) == "-"
    assert pacing.eta(2, 10, 60) == "4m00s"  # 30 s a unit, 8 left
    assert pacing.timing(5, 10, 30) == "elapsed 30s  eta 30s"


@pytest.mark.parametrize("raw, expected", [("", 30.0), ("5", 5.0), ("0", 0.0), ("abc", 30.0), ("-2", 30.0),
                                           ("nan", 30.0)])
def test_interval_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch, raw: str, expected: float) -> None:
    monkeypatch.setenv(pacing.ENV_INTERVAL, raw)
    assert pacing.interval() == expected


def test_meter_in_a_pipe_writes_paced_lines_with_elapsed_and_eta(piped: io.StringIO,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    with caplog.at_level(logging.INFO, logger="qlora_kit"):
        with pacing.Meter("verifying x", 8, pacing.counted("prompt"), every=30, clock=clock) as meter:
            for _ in range(8):
                clock.now += 10  # 10 s a prompt: a line every third prompt, and at the end
                meter.advance()
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["verifying x: prompt 0/8  elapsed 0s  eta -",
                     "verifying x: prompt 3/8  elapsed 30s  eta 50s",
                     "verifying x: prompt 6/8  elapsed 1m00s  eta 20s",
                     "verifying x: prompt 8/8  elapsed 1m20s  eta 0s"]


def test_meter_on_a_terminal_draws_a_bar_and_writes_no_lines(monkeypatch: pytest.MonkeyPatch,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    out = io.StringIO()
    monkeypatch.setitem(logs._STDERR, "console", Console(file=out, force_terminal=True, width=150,
                                                         color_system=None))
    with caplog.at_level(logging.INFO, logger="qlora_kit"):
        with pacing.Meter("verifying x", 4, pacing.counted("prompt")) as meter:
            meter.advance()
            meter.bar.refresh()
            shown = out.getvalue()
    assert not caplog.records
    assert "verifying x" in shown and "prompt 1/4" in shown


def test_heartbeat_writes_while_one_unit_outlasts_the_interval(piped: io.StringIO, monkeypatch: pytest.MonkeyPatch,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(pacing, "MIN_HEARTBEAT", 0.05)
    with caplog.at_level(logging.INFO, logger="qlora_kit"):
        with pacing.Meter("loading", 1, pacing.counted("model"), every=0.05):
            time.sleep(0.5)  # a model load: no advance() for a while
    assert sum("loading: model 0/1  elapsed" in r.getMessage() for r in caplog.records) >= 3


def test_training_progress_in_a_pipe(piped: io.StringIO, monkeypatch: pytest.MonkeyPatch,
                                     caplog: pytest.LogCaptureFixture) -> None:
    """Step lines carry n/total, elapsed and ETA; a `progress:` line comes between them once the interval
    passed, and says what runs during a long evaluation (from the heartbeat thread)."""
    monkeypatch.setenv(pacing.ENV_INTERVAL, "30")
    clock = FakeClock()
    with caplog.at_level(logging.INFO, logger="qlora_kit"):
        progress = qtrain_progress.Progress(total=100, done=0, micro_per_step=4, clock=clock)
        try:
            assert progress.bar is None and progress.heartbeat is not None
            for step in range(1, 11):
                clock.now += 12
                progress.advance(step)  # due at steps 3, 6, 9 (36 s each), not between
            progress.update(10, {"loss": 1.5, "learning_rate": 1e-4, "tokens_per_second": 99.0})
            clock.now += 31
            progress.advance(10)  # the step's own line said it all: no progress line, even though one is due
            progress.micro_batch(2)
            progress.beat_line()
            with progress.doing("evaluating"):
                clock.now += 45
                progress.beat_line()
        finally:
            progress.close()
    lines = [r.getMessage() for r in caplog.records]
    assert lines[:3] == ["progress: step 3/100  elapsed 36s  eta 19m24s",
                         "progress: step 6/100  elapsed 1m12s  eta 18m48s",
                         "progress: step 9/100  elapsed 1m48s  eta 18m12s"]
    assert lines[3] == "step 10  loss 1.5000  lr 1.00e-04  99 tok/s  10/100  elapsed 2m00s  eta 18m00s"
    assert re.fullmatch(r"progress: step 10/100  elapsed 2m31s  eta \S+  \(step 11: micro-batch 2/4\)", lines[4])
    assert re.fullmatch(r"progress: step 10/100  elapsed 3m16s  eta \S+  \(evaluating for 45s\)", lines[5])
    assert len(lines) == 6


def test_training_heartbeat_thread_speaks_during_a_long_step(piped: io.StringIO, monkeypatch: pytest.MonkeyPatch,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv(pacing.ENV_INTERVAL, "0.05")
    monkeypatch.setattr(pacing, "MIN_HEARTBEAT", 0.05)
    with caplog.at_level(logging.INFO, logger="qlora_kit"):
        progress = qtrain_progress.Progress(total=10, done=0, micro_per_step=2)
        try:
            progress.micro_batch(1)
            time.sleep(0.4)  # the second micro-batch of step 1 runs long
        finally:
            progress.close()
    beats = [r.getMessage() for r in caplog.records]
    assert len(beats) >= 2 and all(b.startswith("progress: step 0/10  elapsed") for b in beats), beats
    assert "(step 1: micro-batch 1/2)" in beats[0]


def test_log_lines_in_a_pipe_are_whole_lines(piped: io.StringIO) -> None:
    """Not wrapped at the console's width nor padded to it: `grep` and `tail` see one record per line."""
    handler = logs.ConsoleHandler(console=logs.console(), show_path=False, show_time=False, markup=False)
    message = "progress: step 3/100  elapsed 36s  eta 19m24s  " + "x" * 250
    handler.handle(logging.LogRecord("qlora_kit", logging.INFO, __file__, 0, message, None, None))
    assert piped.getvalue() == f"INFO     {message}\n"


def test_a_bad_interval_is_warned_about_once(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
                                             ) -> None:
    monkeypatch.setenv(pacing.ENV_INTERVAL, "half a minute")
    with caplog.at_level(logging.INFO, logger="qlora_kit"):
        assert pacing.interval() == pacing.interval() == 30.0
    assert [r.getMessage() for r in caplog.records] == \
        ["QLORA_KIT_PROGRESS_SECONDS='half a minute' is not a number of seconds >= 0; using 30"]


def test_work_without_units_says_it_is_still_working_in_a_pipe_only(piped: io.StringIO,
                                                                      monkeypatch: pytest.MonkeyPatch,
                                                                      caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv(pacing.ENV_INTERVAL, "0.05")
    monkeypatch.setattr(pacing, "MIN_HEARTBEAT", 0.05)
    with caplog.at_level(logging.INFO, logger="qlora_kit"):
        with pacing.working("loading the model"):
            time.sleep(0.4)
        said = len(caplog.records)
        time.sleep(0.2)  # stopped with the block
    assert said >= 2 and len(caplog.records) == said
    assert all(re.fullmatch(r"loading the model: still working, elapsed \d+s", r.getMessage()) for r in caplog.records)
    caplog.clear()
    monkeypatch.setitem(logs._STDERR, "console", Console(file=io.StringIO(), force_terminal=True))
    with caplog.at_level(logging.INFO, logger="qlora_kit"), pacing.working("loading the model"):
        time.sleep(0.3)
    assert not caplog.records  # a terminal: the caller's own lines and bars suffice
