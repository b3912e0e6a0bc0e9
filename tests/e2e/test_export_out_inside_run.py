"""`export --out RUN/<file> --overwrite` used to replace the run's own files with an export directory."""

from __future__ import annotations

from pathlib import Path

import pytest
from run_fixture import make_run
from typer.testing import CliRunner

from qlora_kit.cli import app
from qlora_kit.core.errors import EXIT_USER_ERROR

pytestmark = pytest.mark.e2e


@pytest.mark.parametrize("inside", ["train.log", "base_residual.safetensors", "merged"])
def test_export_into_the_run_is_refused_and_changes_nothing(tmp_path: Path, inside: str) -> None:
    run = make_run(tmp_path)
    (run / "train.log").write_text("the run's log\n")
    (run / "base_residual.safetensors").write_bytes(b"residual")
    before = {str(p.relative_to(run)): p.read_bytes() for p in run.rglob("*") if p.is_file()}
    result = CliRunner().invoke(app, ["export", str(run), "--out", str(run / inside), "--overwrite", "--no-verify"])
    assert result.exit_code == EXIT_USER_ERROR, result.output
    assert f"error: --out {run / inside} is inside the run directory {run}" in result.output
    assert "fix: choose a new directory for the export" in result.output
    assert {str(p.relative_to(run)): p.read_bytes() for p in run.rglob("*") if p.is_file()} == before
    assert not [p for p in run.iterdir() if p.name.startswith(".")], "no staging directory or lock file left"
