"""The base fingerprint sees other weights of the same shape."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from run_fixture import other_weights

from qlora_kit.core.errors import ModelError
from qlora_kit.model import fingerprint as basecheck


def test_the_fingerprint_sees_other_weights_of_the_same_shape(tmp_path: Path, tiny_llama: Path) -> None:
    recorded = basecheck.fingerprint(tiny_llama)
    assert recorded and all(v["size"] > 0 for v in recorded.values())
    basecheck.check_base(tiny_llama, recorded, tmp_path)  # the same weights pass
    shutil.copytree(tiny_llama, tmp_path / "copy")
    assert basecheck.fingerprint(tmp_path / "copy") == recorded  # a copy elsewhere is the same base
    other = other_weights(tiny_llama, tmp_path / "other")
    with pytest.raises(ModelError, match="model.safetensors differs"):
        basecheck.check_base(other, recorded, tmp_path)
    basecheck.check_base(other, None, tmp_path)  # runs from before fingerprints: nothing to compare
