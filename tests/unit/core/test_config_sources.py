"""A config given as a dict (the Python API) and overrides given as a dict: the file's and ``--set``'s rules."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest
import yaml

from qlora_kit.core.config import CONFIG_DICT, load_config
from qlora_kit.core.errors import ConfigError, DiskFullError, OutputError, as_known_error

TREE = {"model": {"name_or_path": "m"}, "data": {"path": "rows.jsonl"}, "train": {"max_steps": 5},
        "output_dir": "out/run"}


def test_a_dict_config_equals_the_same_yaml_file(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(TREE))
    from_file, _ = load_config(path, ["train.max_steps=7", "lora.r=4"])
    given = {**TREE, "data": {"path": Path("rows.jsonl")}}  # Path values, as a script writes them
    from_dict, sources = load_config(given, {"train.max_steps": 7, "lora.r": 4})
    assert from_dict == from_file
    assert sources["train.max_steps"] == "override --set" and sources["data.path"] == CONFIG_DICT
    assert given["data"]["path"] == Path("rows.jsonl") and given["train"]["max_steps"] == 5  # caller's dict untouched


def test_dict_overrides_are_taken_as_they_are() -> None:
    cfg, _ = load_config(TREE, {"data.val_path": None, "output_dir": "x"})
    assert cfg.data.val_path is None and cfg.output_dir == "x"


def test_problems_in_a_dict_name_their_origin() -> None:
    with pytest.raises(ConfigError) as info:
        load_config({**TREE, "train": {"max_step": 5}})
    assert info.value.message.startswith(f"{CONFIG_DICT}: ") and "did you mean 'max_steps'" in info.value.message
    with pytest.raises(ConfigError) as info:
        load_config(TREE, {"train.max_step": 3})
    assert info.value.message.startswith("--set train.max_step=3: unknown key")
    with pytest.raises(ConfigError, match="empty key"):
        load_config(TREE, {"": 3})


def test_environment_failures_become_the_clis_errors() -> None:
    full = as_known_error(OSError(errno.ENOSPC, "No space left on device", "/data/run"))
    assert isinstance(full, DiskFullError) and full.exit_code == 6
    assert full.message == "No space left on device: /data/run" and full.hint.startswith("free space on that disk")
    denied = as_known_error(PermissionError(errno.EACCES, "Permission denied", "/data"))
    assert isinstance(denied, OutputError) and denied.exit_code == 2
    oom = as_known_error(RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert oom is not None and oom.exit_code == 4 and "micro_batch_size" in oom.hint
    assert as_known_error(ValueError("a bug")) is None and as_known_error(OSError(errno.EIO, "I/O error")) is None
