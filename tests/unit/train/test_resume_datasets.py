"""Resuming a run with data.datasets: what may change (a moved file) and what may not (issue 21)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from qlora_kit.core.config import dump_config, validate
from qlora_kit.core.errors import ConfigError
from qlora_kit.train import resume
from qlora_kit.train.resume import DATA_LOCATION, check_resume_compatible


def config(datasets: list[dict[str, Any]], **data: Any) -> Any:
    return validate({"model": {"name_or_path": "m"}, "data": {"datasets": datasets, **data}, "output_dir": "o"})


@pytest.fixture
def saved(tmp_path: Path) -> Path:
    cfg = config([{"path": "a.jsonl", "weight": 2}, {"path": "org/set", "subset": "en", "val_path": "v.jsonl"}])
    (tmp_path / "config.yaml").write_text(dump_config(cfg))
    return tmp_path


def test_moved_files_resume_when_the_data_was_recorded_by_content(saved: Path) -> None:
    moved = config([{"path": "/new/a.jsonl", "weight": 2},
                    {"path": "org/set", "subset": "en", "val_path": "/new/v.jsonl"}])
    check_resume_compatible(saved, moved, relocatable=DATA_LOCATION)
    with pytest.raises(ConfigError, match=r"data.datasets\[1\].path: 'a.jsonl' -> '/new/a.jsonl'"):
        check_resume_compatible(saved, moved)  # a checkpoint without the data's sha256: paths must stay


@pytest.mark.parametrize(("changed", "named"), [
    (config([{"path": "a.jsonl", "weight": 3}, {"path": "org/set", "subset": "en", "val_path": "v.jsonl"}]),
     r"data.datasets\[1\].weight: 2.0 -> 3.0"),
    (config([{"path": "a.jsonl", "weight": 2}, {"path": "org/set", "subset": "de", "val_path": "v.jsonl"}]),
     r"data.datasets\[2\].subset: 'en' -> 'de'"),
    (config([{"path": "a.jsonl", "weight": 2}]), r"data.datasets: '2 entries' -> '1 entries'"),
    (config([{"path": "a.jsonl", "weight": 2}, {"path": "org/set", "subset": "en", "val_path": "v.jsonl"}],
            default_system_prompt="drop"), r"data.default_system_prompt: 'keep' -> 'drop'"),
])
def test_changes_to_the_mix_are_refused(saved: Path, changed: Any, named: str) -> None:
    with pytest.raises(ConfigError, match=named):
        check_resume_compatible(saved, changed, relocatable=DATA_LOCATION)


def test_a_changed_source_is_named() -> None:
    old = {"sha256": "x", "sources": [{"key": "data.datasets[1]", "path": "/d/a.jsonl", "sha256": "1"},
                                      {"key": "data.datasets[2]", "path": "/d/b.jsonl", "sha256": "2"}]}
    new = {"sha256": "y", "sources": [old["sources"][0], {**old["sources"][1], "sha256": "3"}]}
    assert resume._changed_sources(old, new) == "data.datasets[2] (/d/b.jsonl)"
    assert resume._changed_sources({"sha256": "x"}, {"sha256": "y"}) == "the data file"
