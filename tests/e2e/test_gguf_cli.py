"""`qlora-kit export --format gguf` option mix-ups."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import run_cli
from run_fixture import ENV_1_THREAD

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.e2e]


def test_option_mixups_are_one_line_errors(runs, tmp_path: Path) -> None:
    run = str(runs("llama"))
    for args, needle in ((["--format", "gguf", "--dtype", "bfloat16"], "--dtype applies to --format hf"),
                         (["--quant", "q8_0"], "--quant applies to --format gguf"),
                         (["--format", "gguf", "--quant", "q3_k"], "--quant 'q3_k' is not supported"),
                         (["--format", "onnx"], "--format 'onnx' is not supported")):
        done = run_cli("export", run, "--out", str(tmp_path / "x"), *args, env=ENV_1_THREAD)
        assert done.returncode == 2 and needle in done.stderr and "fix:" in done.stderr, done.stderr
    assert not (tmp_path / "x").exists()
