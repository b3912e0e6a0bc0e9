"""`qlora-kit demo` end to end on the real SmolLM2 model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import require_demo_gguf, run_cli

from qlora_kit.commands import demo

pytestmark = pytest.mark.e2e


@pytest.mark.slow
def test_demo_end_to_end_with_smollm2(tmp_path: Path) -> None:
    require_demo_gguf()
    pytest.importorskip("gguf")
    work = tmp_path / "demo"
    proc = run_cli("demo", "--workdir", str(work), timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((work / "run" / demo.RESULT_FILE).read_text())
    assert result["exact_match_before"] <= 0.1
    assert result["exact_match_after"] >= 0.75
    assert (work / "run" / "adapter" / "adapter_config.json").is_file()
    assert "Held-out exact match" in proc.stdout
