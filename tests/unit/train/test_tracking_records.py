"""train/tracking.py without a backend: tracker names, records sent once, a failing tracker dropped."""

from __future__ import annotations

import logging
from typing import Any

import pytest

from qlora_kit.core.config import TRACKERS, TrainConfig
from qlora_kit.core.errors import ConfigError
from qlora_kit.train import tracking


class Recorder:
    """A tracker that keeps what it is given; ``fail_at``: the call number that raises."""

    def __init__(self, fail_at: int | None = None):
        self.calls: list[tuple[int, dict[str, Any]]] = []
        self.fail_at = fail_at
        self.finished = False

    def log(self, values: dict[str, Any], step: int | None = None) -> None:
        if self.fail_at is not None and len(self.calls) + 1 == self.fail_at:
            raise RuntimeError("backend went away")
        self.calls.append((step, values))

    def finish(self) -> None:
        self.finished = True


def test_config_names_are_accelerates_tracker_names() -> None:
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS

    assert set(TRACKERS) - {"none"} == set(LOGGER_TYPE_TO_CLASS)
    assert set(tracking.PACKAGES) == set(LOGGER_TYPE_TO_CLASS)


@pytest.mark.parametrize("given, expected", [(None, []), ("none", []), ([], []), ("tensorboard", ["tensorboard"]),
                                             (["wandb", "mlflow", "wandb"], ["wandb", "mlflow"])])
def test_report_to_accepts_a_name_a_list_or_none(given: Any, expected: list[str]) -> None:
    assert TrainConfig(report_to=given).report_to == expected


def test_report_to_names_the_closest_tracker_for_a_typo() -> None:
    from qlora_kit.core.config import validate

    with pytest.raises(ConfigError) as err:
        validate({"model": {"name_or_path": "m"}, "data": {"path": "d.jsonl"}, "output_dir": "o",
                  "train": {"report_to": ["tensorbord"]}})
    assert "unknown tracker 'tensorbord' (did you mean 'tensorboard'?)" in err.value.message


def test_a_missing_package_is_one_error_naming_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    import accelerate.tracking

    monkeypatch.setattr(accelerate.tracking, "get_available_trackers", lambda: ["tensorboard"])
    tracking.check_installed(["tensorboard"])
    with pytest.raises(ConfigError) as err:
        tracking.check_installed(["tensorboard", "wandb"])
    assert err.value.message == "train.report_to: wandb is not installed"
    assert 'pip install "qlora-kit[wandb]"' in err.value.hint and err.value.key == "train.report_to"
    with pytest.raises(ConfigError) as err:
        tracking.check_installed(["comet_ml"])
    assert err.value.hint == "pip install comet-ml"


def test_every_record_goes_to_every_tracker_once_with_its_step() -> None:
    a, b = Recorder(), Recorder()
    t = tracking.Tracking({"a": a, "b": b}, {"b": {(1, frozenset({"loss", "learning_rate"}))}})
    t.log({"step": 1, "loss": 2.0, "learning_rate": 1e-3})
    t.log({"step": 2, "loss": 1.5, "learning_rate": 1e-3, "rewards/chosen": 0.25})  # any key a recipe adds
    t.log({"step": 2, "eval_loss": 1.7})
    assert a.calls == [(1, {"loss": 2.0, "learning_rate": 1e-3}),
                       (2, {"loss": 1.5, "learning_rate": 1e-3, "rewards/chosen": 0.25}), (2, {"eval_loss": 1.7})]
    assert b.calls == a.calls[1:], "b already had step 1 (an earlier session of the run)"
    t.log({"step": 3, "loss": 1.0}, only="a")
    assert len(a.calls) == 4 and len(b.calls) == 2


def test_a_tracker_failing_mid_run_is_a_warning_and_is_dropped(caplog: pytest.LogCaptureFixture) -> None:
    bad, good = Recorder(fail_at=2), Recorder()
    t = tracking.Tracking({"bad": bad, "good": good}, {})
    with caplog.at_level(logging.WARNING, logger="qlora_kit"):
        for step in range(1, 5):
            t.log({"step": step, "loss": 1.0 / step})
    assert [s for s, _ in good.calls] == [1, 2, 3, 4]
    assert [s for s, _ in bad.calls] == [1] and bad.finished and "bad" not in t.trackers
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "report_to bad failed at step 2 (backend went away)" in warnings[0]
    assert "metrics.jsonl has every value" in warnings[0]
    t.close()
    assert good.finished and not t.trackers


def test_config_is_flattened_to_values_every_tracker_accepts() -> None:
    from qlora_kit.core.config import validate

    cfg = validate({"model": {"name_or_path": "m"}, "data": {"path": "d.jsonl"}, "output_dir": "o",
                    "lora": {"target_modules": ["q_proj", "v_proj"]}})
    flat = tracking.flat_config(cfg)
    assert flat["lora.target_modules"] == '["q_proj", "v_proj"]' and flat["train.max_steps"] == "null"
    assert flat["output_dir"] == "o" and flat["train.learning_rate"] == 2e-4
    assert all(isinstance(v, (bool, int, float, str)) for v in flat.values())
