"""torchrun: a rank killed without a word (kill -9, the out-of-memory killer) is named by one survivor's error: line
(issue 20, item 15)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import write_config

pytestmark = pytest.mark.e2e


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


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


def _wait_for_logged_steps(run: Path, steps: int, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        path = run / "metrics.jsonl"
        if path.exists() and sum('"loss"' in line for line in path.read_text().splitlines()) >= steps:
            return
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        time.sleep(0.05)
    raise AssertionError("training did not reach the step in time")


@pytest.mark.parametrize("victim", [1, 0])
def test_a_killed_rank_is_named_once_by_a_survivor(tmp_path: Path, tiny_llama: Path, fifty_rows: Path,
                                                   victim: int) -> None:
    cfg = write_config(tmp_path / "cfg.yaml", tiny_llama, fifty_rows, tmp_path / "run",
                       train={"max_steps": 40, "save_steps": 4, "micro_batch_size": 2, "gradient_accumulation_steps": 2})
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
           "-m", "qlora_kit", "train", str(cfg)]
    env = {**os.environ, "QLORA_KIT_COLLECTIVE_TIMEOUT": "120", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    ranks = _rank_pids(proc, 2)
    _wait_for_logged_steps(tmp_path / "run", 3, proc)
    os.kill(ranks[victim], signal.SIGKILL)
    out, err = proc.communicate(timeout=300)
    lines = (out + err).splitlines()
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1, "\n".join(lines[-40:])
    assert f"rank {victim} (PID {ranks[victim]}) died" in errors[0], errors[0]
    assert any(line.startswith("fix: ") and "--resume" in line for line in lines)
