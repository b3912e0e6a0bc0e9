"""Exports of trained runs, through the CLI and a killed process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import run_cli
from run_fixture import read_report, staging_leftovers

from qlora_kit.export.command import export_run

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.e2e]


ENV_1_THREAD = {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def test_run_written_by_the_trainer_exports_and_verifies(tiny_llama: Path, tmp_path: Path) -> None:
    from conftest import arithmetic_rows, write_config, write_jsonl

    from qlora_kit.train.recipe import run_training

    data = write_jsonl(tmp_path / "data.jsonl", arithmetic_rows(48))
    config = write_config(tmp_path / "cfg.yaml", tiny_llama, data, tmp_path / "run", train={"max_steps": 4})
    assert run_training(config, [], resume=False, overwrite=False, skip_memory_check=True) == 0
    out = tmp_path / "export"
    assert export_run(tmp_path / "run", out, show_progress=False) == 0
    ver = read_report(out)["verification"]
    assert ver["status"] == "passed" and ver["prompt_source"] == "heldout.jsonl"
    assert ver["vs_trained"]["greedy_exact"] == ver["vs_trained"]["greedy_total"]


_SLOW_EXPORT = """
import sys, time
from qlora_kit.export import hf
from qlora_kit.export.command import export_run
write = hf.ShardWriter.write
def slow(self, name, tensor):
    time.sleep(0.1)
    return write(self, name, tensor)
hf.ShardWriter.write = slow
sys.exit(export_run(sys.argv[1], sys.argv[2], verify=False, show_progress=False))
"""


def _start_and_signal(run: Path, target: Path, sig: int) -> int:
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_EXPORT, str(run), str(target)],
                            env={**os.environ, **ENV_1_THREAD}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        partial = staging_leftovers(target)
        if partial and (partial[0] / "model.safetensors").exists():
            break
        time.sleep(0.01)
    assert proc.poll() is None, "export finished before it could be interrupted"
    proc.send_signal(sig)
    proc.communicate(timeout=60)
    return proc.returncode


def test_killed_export_leaves_no_half_written_target(llama_run: Path, tmp_path: Path) -> None:
    target = tmp_path / "out"
    assert _start_and_signal(llama_run, target, signal.SIGTERM) != 0
    assert not target.exists() and not staging_leftovers(target)  # SIGTERM: staging removed
    assert _start_and_signal(llama_run, target, signal.SIGKILL) == -signal.SIGKILL
    assert not target.exists()
    leftovers = staging_leftovers(target)
    assert len(leftovers) == 1 and leftovers[0].name.startswith(".")  # hidden, never named like the target
    assert export_run(llama_run, target, verify=False, show_progress=False) == 0
    assert not staging_leftovers(target)  # the next export cleans up after the killed one


def test_cli_export_and_refusal(llama_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "cli"
    done = run_cli("export", str(llama_run), "--out", str(out), "--no-verify", env=ENV_1_THREAD)
    assert done.returncode == 0, done.stderr
    assert "verification" in done.stderr and (out / "model.safetensors").exists()
    again = run_cli("export", str(llama_run), "--out", str(out), "--no-verify", env=ENV_1_THREAD)
    assert again.returncode == 0 and "already holds this export" in " ".join(again.stderr.split())
    other = run_cli("export", str(llama_run), "--out", str(out), "--dtype", "bfloat16", env=ENV_1_THREAD)
    assert other.returncode == 2 and "error:" in other.stderr and "--overwrite" in other.stderr
    bad = run_cli("export", str(llama_run), "--out", str(tmp_path / "x"), "--dtype", "int8", env=ENV_1_THREAD)
    assert bad.returncode == 2 and "--dtype" in bad.stderr
