"""`qlora-kit train` on a hostile data path: one error line and one fix line, exit 2, nothing written (issue 20, item 16)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from conftest import run_cli, write_config

from qlora_kit.core.errors import EXIT_USER_ERROR

pytestmark = pytest.mark.e2e


def test_a_fifo_as_data_path_is_refused_with_one_error_and_one_fix(tmp_path: Path, tiny_llama: Path) -> None:
    fifo = tmp_path / "rows.jsonl"
    os.mkfifo(fifo)  # nobody ever writes to it: reading it would block forever
    cfg = write_config(tmp_path / "cfg.yaml", tiny_llama, fifo, tmp_path / "run")
    done = run_cli("train", str(cfg), timeout=300)
    assert done.returncode == EXIT_USER_ERROR, done.stderr[-3000:]
    lines = [line for line in done.stderr.splitlines() if line.startswith(("error:", "fix:"))]
    assert len(lines) == 2 and "is a FIFO (named pipe), not a regular file" in lines[0], done.stderr[-3000:]
    assert lines[1].startswith("fix: point data.path at a .jsonl") and "Traceback" not in done.stderr
    assert not (tmp_path / "run").exists()
