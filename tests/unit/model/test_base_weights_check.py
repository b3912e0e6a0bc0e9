"""The base's weights checked before loading (issue 20, item 11): complete files, shapes its config.json builds,
an architecture transformers knows, remote code that works; each refused with one error and a fix."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from qlora_kit.core.errors import ModelError
from qlora_kit.model.weights import require_loadable_weights


@pytest.fixture
def base(tmp_path: Path, tiny_llama: Path) -> Path:
    return Path(shutil.copytree(tiny_llama, tmp_path / "base"))


def _edit_config(base: Path, **changes) -> None:
    config = json.loads((base / "config.json").read_text())
    config.update(changes)
    (base / "config.json").write_text(json.dumps(config))


def test_an_intact_base_passes(base: Path) -> None:
    require_loadable_weights(base)


def test_a_truncated_weight_file_is_named(base: Path) -> None:
    weights = base / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ModelError) as info:
        require_loadable_weights(base)
    assert "model.safetensors has" in info.value.message and "truncated" in info.value.message
    assert "download the model again" in info.value.hint


def test_a_config_that_does_not_match_the_weights_is_refused(base: Path) -> None:
    """With a 4-bit quantisation config transformers loads such weights without a word (a wrong model)."""
    config = json.loads((base / "config.json").read_text())
    _edit_config(base, intermediate_size=config["intermediate_size"] * 2)
    with pytest.raises(ModelError) as info:
        require_loadable_weights(base)
    assert "config.json does not match the base's weights" in info.value.message
    assert "mlp" in info.value.message and "the config makes it" in info.value.message
    assert info.value.hint


def test_an_unknown_model_type_says_what_to_do(base: Path) -> None:
    _edit_config(base, model_type="nosuchmodel")
    with pytest.raises(ModelError) as info:
        require_loadable_weights(base)
    assert "does not know model_type 'nosuchmodel'" in info.value.message
    assert "upgrade transformers" in info.value.hint and len(info.value.message) < 300


def test_failing_remote_code_is_one_line(base: Path) -> None:
    _edit_config(base, auto_map={"AutoConfig": "configuration_x.XConfig",
                                 "AutoModelForCausalLM": "modeling_x.XForCausalLM"})
    (base / "configuration_x.py").write_text("from transformers import LlamaConfig\n"
                                             "class XConfig(LlamaConfig):\n    pass\n")
    (base / "modeling_x.py").write_text(
        "from transformers import LlamaForCausalLM\nfrom .configuration_x import XConfig\n"
        "class XForCausalLM(LlamaForCausalLM):\n    config_class = XConfig\n"
        "    def __init__(self, config):\n        raise AttributeError('boom in remote code\\nsecond line')\n")
    with pytest.raises(ModelError) as info:
        require_loadable_weights(base, trust_remote_code=True)
    assert "the model's own code (model.trust_remote_code) failed" in info.value.message
    assert "AttributeError: boom in remote code" in info.value.message and "\n" not in info.value.message
    assert info.value.hint
