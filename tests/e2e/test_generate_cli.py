"""`qlora-kit generate` on a run and its export."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import run_cli

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.e2e]


def test_cli_generate(run_and_export: tuple[Path, Path], tmp_path: Path) -> None:
    _, out = run_and_export
    env = {"OMP_NUM_THREADS": "1"}
    done = run_cli("generate", str(out), "hello", "--max-new-tokens", "4", env=env)
    assert done.returncode == 0, done.stderr
    missing = run_cli("generate", str(tmp_path), "hello", env=env)
    assert missing.returncode == 2 and "error:" in missing.stderr
