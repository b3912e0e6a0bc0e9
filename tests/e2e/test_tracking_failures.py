"""Trackers never cost a run: refused before anything is written, dropped with a warning mid-run,
and a tracker added on --resume gets the earlier sessions' records first."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest
from conftest import interrupted_copy, metrics_of, write_config

from qlora_kit.core.errors import ConfigError
from qlora_kit.train import tracking
from qlora_kit.train.recipe import run_training

pytestmark = pytest.mark.e2e


class Flaky:
    """Starts, then fails on its third log call (a backend that went away mid-run)."""

    def __init__(self) -> None:
        self.steps: list[int] = []

    def log(self, values: dict[str, Any], step: int | None = None) -> None:
        if len(self.steps) == 2:
            raise ConnectionError("server closed the connection")
        self.steps.append(step)

    def store_init_configuration(self, values: dict[str, Any]) -> None:
        self.config = values

    def finish(self) -> None:
        pass


def test_a_tracker_that_is_not_installed_stops_the_run_before_anything_is_written(
        tmp_path: Path, tiny_llama: Path, data_file: Path) -> None:
    cfg = write_config(tmp_path / "cfg.yaml", tiny_llama, data_file, tmp_path / "run", train={"report_to": ["aim"]})
    with pytest.raises(ConfigError) as err:
        run_training(cfg, [], skip_memory_check=True)
    assert err.value.message == "train.report_to: aim is not installed"
    assert err.value.hint.startswith("pip install aim") and str(cfg) in err.value.hint  # where it was set
    assert not (tmp_path / "run").exists()


def test_a_tracker_that_fails_to_start_undoes_the_fresh_run(tmp_path: Path, tiny_llama: Path, data_file: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(name: str, *args: Any) -> Any:
        raise RuntimeError("api_key not configured (no-tty)")

    monkeypatch.setattr(tracking, "_start_one", refuse)
    cfg = write_config(tmp_path / "cfg.yaml", tiny_llama, data_file, tmp_path / "run",
                       train={"report_to": ["tensorboard"], "max_steps": 2})
    with pytest.raises(ConfigError) as err:
        run_training(cfg, [], skip_memory_check=True)
    assert err.value.message == "train.report_to: tensorboard did not start: api_key not configured (no-tty)"
    assert "drop it from train.report_to" in err.value.hint
    assert not (tmp_path / "run").exists(), "a refused start leaves nothing behind"


def test_a_tracker_failing_mid_run_is_a_warning_never_a_lost_run(tmp_path: Path, tiny_llama: Path, data_file: Path,
                                                                 monkeypatch: pytest.MonkeyPatch,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    flaky = Flaky()
    monkeypatch.setattr(tracking, "_start_one", lambda name, *a: (flaky, {"run_name": "x"}))
    cfg = write_config(tmp_path / "cfg.yaml", tiny_llama, data_file, tmp_path / "run",
                       train={"report_to": ["tensorboard"], "max_steps": 4})
    with caplog.at_level(logging.WARNING, logger="qlora_kit"):
        assert run_training(cfg, [], skip_memory_check=True) == 0
    assert flaky.steps == [1, 2] and "train.learning_rate" in flaky.config and "memory.optimizer" in flaky.config
    manifest = json.loads((tmp_path / "run/manifest.json").read_text())
    assert manifest["status"] == "completed" and manifest["tracking"] == {"tensorboard": {"run_name": "x"}}
    assert [r["step"] for r in metrics_of(tmp_path / "run") if "loss" in r] == [1, 2, 3, 4]
    assert any("report_to tensorboard failed at step 3 (server closed the connection)" in r.getMessage()
               for r in caplog.records)


def test_a_tracker_added_on_resume_gets_the_whole_run_once(tmp_path: Path, reference_run: Path) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = interrupted_copy(reference_run, tmp_path / "run", last_step=8)
    config = run / "config.yaml"
    overrides = [f"output_dir={json.dumps(str(run))}", "train.report_to=[tensorboard]", "train.run_name=late"]
    assert run_training(config, overrides, resume=True, skip_memory_check=True) == 0
    acc = EventAccumulator(str(run / "tracking" / "late"), size_guidance={"scalars": 0})
    acc.Reload()
    logged = [e.step for e in acc.Scalars("loss")]
    assert logged == [r["step"] for r in metrics_of(run) if "loss" in r] == list(range(1, 17))
    values = [e.value for e in acc.Scalars("loss")]
    assert values == pytest.approx([r["loss"] for r in metrics_of(run) if "loss" in r], rel=1e-6)
