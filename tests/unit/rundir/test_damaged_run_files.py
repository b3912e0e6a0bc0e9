"""Damaged manifest.json and metrics.jsonl (issue 20, item 11): readers never raise a Python error on them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qlora_kit.core.errors import ModelError
from qlora_kit.rundir.finished import read_manifest
from qlora_kit.rundir.manifest import manifest_damage, read_previous_manifest
from qlora_kit.rundir.metrics import MetricsLog


@pytest.mark.parametrize("manifest, problem", [
    ([1, 2], "a JSON list, not an object"),
    ({"base": "x"}, "its base is a JSON str"),
    ({"base": {"fingerprint": [1]}}, "its base.fingerprint is a JSON list"),
    ({"lora": {"variant": 3}}, "its lora.variant is a JSON int"),
    ({"quant": [1]}, "its quant is a JSON list"),
    ({"resumed": "x"}, "its resumed is not a list"),
])
def test_manifest_shapes_readers_cannot_use(manifest, problem: str) -> None:
    assert problem in manifest_damage(manifest)


def test_a_good_manifest_shape_passes() -> None:
    assert manifest_damage({"base": {"fingerprint": {}}, "quant": {}, "lora": {"variant": {}}, "resumed": [],
                            "final_metrics": None}) is None


@pytest.mark.parametrize("content", [b"\xff\xfe{}", b"[1, 2]", b'{"base": "x"}'])
def test_export_and_generate_read_a_damaged_manifest_as_one_error(tmp_path: Path, content: bytes) -> None:
    (tmp_path / "manifest.json").write_bytes(content)
    with pytest.raises(ModelError) as info:
        read_manifest(tmp_path)
    assert "manifest.json is damaged" in info.value.message and info.value.hint


@pytest.mark.parametrize("content", [b"\xff\xfe{}", b"[1, 2]", b'{"lora": "x"}'])
def test_a_resume_reads_a_damaged_manifest_as_empty_with_a_warning(tmp_path: Path, content: bytes,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "manifest.json").write_bytes(content)
    assert read_previous_manifest(tmp_path / "manifest.json") == {}
    assert "manifest.json is damaged" in caplog.text


def test_broken_metrics_lines_are_skipped_and_dropped_on_resume(tmp_path: Path,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "metrics.jsonl"
    good = [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}, {"step": 3, "loss": 1.0}]
    path.write_bytes(b"\n".join([json.dumps(good[0]).encode(), b"[3]", b"\xff\xfe", json.dumps(good[1]).encode(),
                                 b'"x"', b'{"step": "2"}', json.dumps(good[2]).encode(), b'{"step": 4, "lo']) + b"\n")
    metrics = MetricsLog(path)
    assert metrics.read() == good
    assert "skipping 4 line(s)" in caplog.text and "line 2" in caplog.text
    metrics.truncate_after(2)
    assert path.read_text(encoding="utf-8").splitlines() == [json.dumps(r) for r in good[:2]]
