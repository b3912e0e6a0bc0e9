"""`qlora-kit doctor` on this machine."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import run_cli

from qlora_kit.commands import doctor

pytestmark = pytest.mark.e2e


def test_cli_doctor_on_this_machine(tmp_path: Path):
    res = run_cli("doctor", cwd=tmp_path, timeout=300)
    import torch

    assert "verdict:" in res.stdout, res.stderr
    for name in doctor.KEY_PACKAGES:
        assert name in res.stdout
    if not torch.cuda.is_available():
        assert res.returncode == 0, res.stdout  # no GPU is a warning here, not a failure
        assert "CPU only" in res.stdout and "bitsandbytes 4-bit" in res.stdout
