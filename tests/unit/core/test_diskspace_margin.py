"""The free-space check asks for what will be written plus a small margin, not a fixed 16 MiB on top."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from qlora_kit.core import diskspace
from qlora_kit.core.errors import DiskFullError


def _asked(tmp_path: Path, needed: int, monkeypatch: pytest.MonkeyPatch) -> float:
    """The MB the check says it needs for ``needed`` bytes (read from its message on an empty disk)."""
    monkeypatch.setattr(diskspace, "free_bytes", lambda path: 0)
    with pytest.raises(DiskFullError) as err:
        diskspace.require_free(tmp_path, needed, "the export", "free space")
    value, unit = re.search(r"needs about ([\d.]+) (kB|MB|GB)", err.value.message).groups()
    return float(value) * {"kB": 1e-3, "MB": 1.0, "GB": 1e3}[unit]


def test_a_small_write_asks_for_about_its_size(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert _asked(tmp_path, 250_000, monkeypatch) < 1.5  # a 0.25 MB export: about 1.3 MB, not 17 MB


def test_the_margin_grows_with_the_write(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    asked = _asked(tmp_path, 14_000_000_000, monkeypatch)  # a 7B fp16 export
    assert 14_000 < asked < 14_000 * 1.02


def test_enough_free_space_passes_and_too_little_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(diskspace, "free_bytes", lambda path: 2_000_000)
    diskspace.require_free(tmp_path, 250_000, "the export", "free space")
    monkeypatch.setattr(diskspace, "free_bytes", lambda path: 1_000_000)
    with pytest.raises(DiskFullError, match=r"needs about 1\.\d\d MB, 1\.00 MB free"):
        diskspace.require_free(tmp_path, 250_000, "the export", "free space")
