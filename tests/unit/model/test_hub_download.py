"""A base from the hub: only the weights its index names are downloaded (not consolidated.safetensors).

Offline: huggingface_hub's ``snapshot_download`` is replaced by a fake repository that filters
its listing with the hub's own pattern matching and records what it "downloads".
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qlora_kit.core.config import ModelConfig
from qlora_kit.core.errors import ModelError
from qlora_kit.model import sources

SHARDS = ["model-00001-of-00003.safetensors", "model-00002-of-00003.safetensors", "model-00003-of-00003.safetensors"]
SMALL = ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "tokenizer.model",
         "special_tokens_map.json", "params.json", "README.md", ".gitattributes"]


def _fake_hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, files: dict[str, str]) -> list[str]:
    from huggingface_hub.utils import filter_repo_objects

    fetched: list[str] = []
    snapshot = tmp_path / "snapshot"

    def snapshot_download(repo_id: str, *, revision=None, allow_patterns=None, ignore_patterns=None, **kw) -> str:
        for name in filter_repo_objects(sorted(files), allow_patterns=allow_patterns, ignore_patterns=ignore_patterns):
            (snapshot / name).parent.mkdir(parents=True, exist_ok=True)
            if not (snapshot / name).exists():
                (snapshot / name).write_text(files[name])
                fetched.append(name)
        return str(snapshot)

    monkeypatch.setattr("huggingface_hub.snapshot_download", snapshot_download)
    return fetched


def _mistral_like(index: bool = True) -> dict[str, str]:
    files = {name: "{}" for name in SMALL} | {"consolidated.safetensors": "14.5 GB"}
    if index:
        weight_map = {f"layer{i}.weight": SHARDS[i % 3] for i in range(6)}
        files |= {name: "shard" for name in SHARDS}
        files["model.safetensors.index.json"] = json.dumps({"metadata": {}, "weight_map": weight_map})
    else:
        files["model.safetensors"] = "weights"
    return files


def test_sharded_repo_downloads_the_index_shards_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fetched = _fake_hub(monkeypatch, tmp_path, _mistral_like(index=True))
    path = sources.resolve_source(ModelConfig(name_or_path="mistralai/Mistral-7B-Instruct-v0.3"))
    assert "consolidated.safetensors" not in fetched
    assert set(SHARDS) <= set(fetched) and (path / "config.json").is_file() and (path / "tokenizer.json").is_file()


def test_single_file_repo_downloads_model_safetensors_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fetched = _fake_hub(monkeypatch, tmp_path, _mistral_like(index=False))
    sources.resolve_source(ModelConfig(name_or_path="org/model"))
    assert "model.safetensors" in fetched and "consolidated.safetensors" not in fetched


def test_a_shard_name_is_not_a_pattern(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A weight_map naming "*.safetensors" fetches that name only, not every weight file."""
    files = _mistral_like(index=True)
    files["model.safetensors.index.json"] = json.dumps({"weight_map": {"w": "*.safetensors"}})
    fetched = _fake_hub(monkeypatch, tmp_path, files)
    with pytest.raises(ModelError):  # the named file does not exist
        sources.resolve_source(ModelConfig(name_or_path="org/model"))
    assert not [name for name in fetched if name.endswith(".safetensors")]


def test_repo_without_safetensors_weights_is_one_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    files = {name: "{}" for name in SMALL} | {"pytorch_model.bin": "pickle"}
    _fake_hub(monkeypatch, tmp_path, files)
    with pytest.raises(ModelError, match="safetensors") as err:
        sources.resolve_source(ModelConfig(name_or_path="org/model"))
    assert err.value.hint
