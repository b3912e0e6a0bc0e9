"""`qlora-kit plan`: JSON and table output."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import SHIPPED_24GB, run_cli

from qlora_kit.core.errors import EXIT_OOM

pytestmark = pytest.mark.e2e


def test_cli_json_and_table(tmp_path: Path):
    cfg = SHIPPED_24GB[0]
    res = run_cli("plan", str(cfg), "--gpu-memory", "24", "--json", timeout=120)
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout)
    for key in ("weights_bytes", "total_bytes", "fits", "max_length_that_fits", "micro_batch_size_that_fits",
                "breakdown"):
        assert key in report
    assert report["fits"] is True and report["total_bytes"] == sum(report["breakdown"].values())
    for key in ("memory_settings", "auto_settings", "max_length_that_fits_without_offload",
                "max_length_that_fits_with_offload", "host_memory_bytes", "peak_stage", "fragmentation_fraction"):
        assert key in report
    assert "auto" not in report["memory_settings"].values()
    assert report["max_length_that_fits_with_offload"] >= report["max_length_that_fits_without_offload"]
    table = run_cli("plan", str(cfg), "--gpu-memory", "24", timeout=120)
    assert "longest max_length that fits:" in table.stdout and "with it" in table.stdout
    # Not even offload makes it fit: exit 4, the verdict, and the longest length that does fit.
    too_long = run_cli("plan", str(cfg), "--gpu-memory", "24", "--set", "train.max_length=1000000", "--json",
                       timeout=120)
    assert too_long.returncode == EXIT_OOM
    longest = json.loads(too_long.stdout)
    assert f"--set train.max_length={longest['max_length_that_fits']} (the longest that fits)" in longest["suggestion"]
    small = run_cli("plan", str(cfg), "--gpu-memory", "8", "--set", "train.max_length=8192", timeout=120)
    assert small.returncode == EXIT_OOM
    assert "does NOT fit" in small.stdout and "fix:" in small.stdout
    bad = run_cli("plan", str(cfg), "--set", "model.name_or_path=" + str(tmp_path / "nope"), timeout=120)
    assert bad.returncode == 2 and "error:" in bad.stderr
