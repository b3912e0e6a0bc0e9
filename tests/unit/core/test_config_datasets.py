"""data.datasets, data.subset / max_rows and data.default_system_prompt in the config (issue 21)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from qlora_kit.core.config import attribute_origin, dump_config, load_config, validate
from qlora_kit.core.errors import ConfigError, DataError


def config(data: dict[str, Any]) -> dict[str, Any]:
    return {"model": {"name_or_path": "m"}, "data": data, "output_dir": "o"}


def problem(data: dict[str, Any]) -> str:
    with pytest.raises(ConfigError) as err:
        validate(config(data), origin="run.yaml")
    return err.value.message


def test_datasets_entries_default_to_the_data_section() -> None:
    cfg = validate(config({"datasets": [{"path": "a.jsonl"}, {"path": "org/set", "subset": "en", "weight": 2,
                                                              "max_rows": 500, "split": "dev", "format": "sharegpt"}],
                           "format": "messages"}))
    assert cfg.data.path is None and len(cfg.data.datasets) == 2
    first, second = cfg.data.datasets
    assert (first.format, first.split, first.weight) == (None, None, None)  # data.format / data.split / 1
    assert (second.subset, second.weight, second.max_rows, second.split) == ("en", 2.0, 500, "dev")
    assert cfg.data.default_system_prompt == "keep"


def test_path_and_datasets_together_is_one_line() -> None:
    message = problem({"path": "a.jsonl", "datasets": [{"path": "b.jsonl"}]})
    assert "data.path and data.datasets are both set" in message and "\n" not in message


@pytest.mark.parametrize(("data", "said"), [
    ({}, "data.path or data.datasets is required"),
    ({"datasets": []}, "data.datasets is an empty list"),
    ({"datasets": [{"path": "a"}, {"path": "a"}]}, "data.datasets[1] and data.datasets[2] are the same source"),
    ({"datasets": [{"path": "a"}], "subset": "en"}, "data.subset applies to data.path"),
    ({"datasets": [{"path": "a", "val_path": "v"}], "val_path": "w"}, "a per-entry val_path are both set"),
    ({"path": "a", "default_system_prompt": ""}, "use keep, drop, or the system prompt's text"),
])
def test_contradictions_are_refused(data: dict[str, Any], said: str) -> None:
    assert said in problem(data)


def test_every_problem_of_the_entries_at_once_with_its_place() -> None:
    message = problem({"datasets": [{"path": "a", "wieght": 2}, {"path": "b", "weight": 0, "max_rows": -1},
                                    {"format": "alpaca"}]})
    assert "run.yaml: 4 problems" in message
    assert "unknown key 'data.datasets[1].wieght' (did you mean 'weight'?)" in message
    assert "data.datasets[2].weight: Input should be greater than 0" in message
    assert "data.datasets[2].max_rows: Input should be greater than 0" in message
    assert "data.datasets[3].path: Field required" in message


def test_datasets_round_trip_through_the_saved_config(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config({"datasets": [{"path": "a.jsonl", "weight": 0.5},
                                                        {"path": "org/x", "subset": "en"}],
                                           "default_system_prompt": "You are terse."})))
    cfg, sources = load_config(path)
    text = dump_config(cfg, sources)
    assert validate(yaml.safe_load(text)) == cfg


def test_errors_about_an_entry_say_where_the_list_was_set(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config({"datasets": [{"path": "a.jsonl"}]})))
    _, sources = load_config(path)
    exc = DataError("data file a.jsonl does not exist", "check data.datasets[1].path", key="data.datasets[1].path")
    attribute_origin(exc, sources)
    assert f"it is set in {path}" in exc.hint
    _, sources = load_config(path, ['data.datasets=[{"path": "b.jsonl"}]'])
    attribute_origin(exc, sources)
    assert "it was given with --set" in exc.hint
