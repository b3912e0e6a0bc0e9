"""torchrun: a rank killed without a word (kill -9, the out-of-memory killer) is named by one survivor's error: line
(issue 20, item 15)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import write_config
from test_distributed import _wait_for_step, free_port  # same directory: the multi-process helpers

pytestmark = pytest.mark.e2e


def _rank_pids(launcher: subprocess.Popen, n: int, timeout: float = 120) -> dict[int, int]:
    import psutil

    deadline = time.time() + timeout
    while time.time() < deadline:
        kids = [k for k in psutil.Process(launcher.pid).children(recursive=True)
                if "qlora_kit" in " ".join(k.cmdline())]
        ranks = {int(k.environ()["RANK"]): k.pid for k in kids if "RANK" in k.environ()}
        if len(ranks) >= n:
            return ranks
        assert launcher.poll() is None, launcher.communicate()[1][-3000:]
        time.sleep(0.1)
    raise AssertionError("ranks not found")


@pytest.mark.parametrize("victim", [1, 0])
def test_a_killed_rank_is_named_once_by_a_survivor(tmp_path: Path, tiny_llama: Path, fifty_rows: Path,
                                                   victim: int) -> None:
    cfg = write_config(tmp_path / "cfg.yaml", tiny_llama, fifty_rows, tmp_path / "run",
                       train={"max_steps": 40, "save_steps": 4, "micro_batch_size": 2, "gradient_accumulation_steps": 2})
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           "-m", "qlora_kit", "train", str(cfg)]
    env = {**os.environ, "QLORA_KIT_COLLECTIVE_TIMEOUT": "120", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    ranks = _rank_pids(proc, 2)
    _wait_for_step(tmp_path / "run", 3, proc)
    os.kill(ranks[victim], signal.SIGKILL)
    out, err = proc.communicate(timeout=300)
    lines = (out + err).splitlines()
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1, "\n".join(lines[-40:])
    assert f"rank {victim} (PID {ranks[victim]}) died" in errors[0], errors[0]
    assert any(line.startswith("fix: ") and "--resume" in line for line in lines)
