"""The start-up check in real runs: a path made wrong, or made to raise, is switched off with one warning line,
and the run then trains exactly like a run configured without that path (LoRA dropout on: the check must not
move the random stream either)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import arithmetic_rows, assert_same_result, gpu, write_config, write_jsonl

from qlora_kit.ops import packing, tiled_mlp
from qlora_kit.train.recipe import run_training

pytestmark = pytest.mark.e2e

TRAIN = {"max_steps": 2, "save_steps": 2, "startup_checks": True}
LORA = {"dropout": 0.1, "target_modules": "all-linear"}


def _warnings(run: Path) -> list[str]:
    return [line for line in (run / "train.log").read_text().splitlines() if "WARNING" in line and "start-up" in line]


def _checks(run: Path) -> dict:
    return json.loads((run / "manifest.json").read_text())["startup_checks"]


def _slightly_wrong_tiles(monkeypatch: pytest.MonkeyPatch) -> None:
    forward = tiled_mlp.TiledMLPFunction.forward
    monkeypatch.setattr(tiled_mlp.TiledMLPFunction, "forward", staticmethod(lambda *a: forward(*a) * 1.05))


def _raising_attention(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(packing, "sdpa_per_sample", broken)


CASES = {  # path: (how it is broken, the config that has it, the config without it)
    "tiled_mlp": (_slightly_wrong_tiles, {"train": {"tiled_mlp": True}}, {"train": {"tiled_mlp": False}}),
    "packed_attention": (_raising_attention, {}, {"model": {"attn_implementation": "eager"}}),
}


@pytest.mark.parametrize("path", sorted(CASES))
def test_a_broken_path_is_switched_off_and_the_run_trains_like_one_without_it(
        tmp_path: Path, tiny_llama: Path, monkeypatch: pytest.MonkeyPatch, path: str) -> None:
    breaks, with_path, without_path = CASES[path]
    data = write_jsonl(tmp_path / "d.jsonl", arithmetic_rows(40))

    def config(name: str, sections: dict, **train) -> Path:
        path = write_config(tmp_path / f"{name}.yaml", tiny_llama, data, tmp_path / name, lora=LORA,
                            train={**TRAIN, **sections.get("train", {}), **train})
        raw = yaml.safe_load(path.read_text())
        raw["model"].update(sections.get("model", {}))
        path.write_text(yaml.safe_dump(raw))
        return path

    plain = config("plain", without_path, startup_checks=False)
    assert run_training(plain, []) == 0
    assert _checks(tmp_path / "plain") == {"ran": False, "reason": "train.startup_checks=false"}
    assert "start-up check: skipped" in (tmp_path / "plain/train.log").read_text()

    breaks(monkeypatch)
    checked = config("checked", with_path)
    assert run_training(checked, []) == 0
    run = tmp_path / "checked"
    lines = _warnings(run)
    assert len(lines) == 1 and f"start-up check: {path} switched off for this run: it " in lines[0], lines
    record = _checks(run)
    assert record["ran"] and record["tokens"] > 0 and record["seconds"] > 0
    found = record["paths"][path]
    assert found["status"] == "switched_off"
    if path == "packed_attention":
        assert "an illegal memory access" in found["error"] and "it raised RuntimeError" in lines[0]
    else:
        assert found["grad_diff"] > record["tolerance"]["gradients"] and "in the gradients" in lines[0]
    assert record["paths"]["fused_loss"]["status"] == "passed"
    info = [line for line in (run / "train.log").read_text().splitlines() if "start-up check of" in line]
    assert len(info) == 1 and " s: " in info[0]  # the time it took, logged
    assert_same_result(run, tmp_path / "plain")  # same adapter, same losses: as if configured without it


@pytest.mark.slow
def test_a_path_wrong_on_one_rank_is_switched_off_on_every_rank(tmp_path: Path, tiny_llama: Path) -> None:
    """Two CPU processes (gloo): only rank 1's tiled MLP is wrong; rank 0's manifest says why it switched it off."""
    data = write_jsonl(tmp_path / "d.jsonl", arithmetic_rows(40))
    cfg = write_config(tmp_path / "cfg.yaml", tiny_llama, data, tmp_path / "run", lora=LORA,
                       train={**TRAIN, "tiled_mlp": True, "micro_batch_size": 2})
    script = tmp_path / "rank1_wrong.py"
    script.write_text(
        "import os, sys\n"
        "from qlora_kit.ops import tiled_mlp\n"
        "if os.environ.get('RANK') == '1':\n"
        "    forward = tiled_mlp.TiledMLPFunction.forward\n"
        "    tiled_mlp.TiledMLPFunction.forward = staticmethod(lambda *a: forward(*a) * 1.05)\n"
        "from qlora_kit.cli import main\n"
        "sys.argv = ['qlora-kit', *sys.argv[1:]]\n"
        "main()\n")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "accelerate.commands.accelerate_cli", "launch", "--main_process_port", str(port),
           "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
           "--dynamo_backend", "no", str(script), "train", str(cfg)]
    env = {**os.environ, "QLORA_KIT_COLLECTIVE_TIMEOUT": "120", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    found = _checks(tmp_path / "run")["paths"]["tiled_mlp"]
    assert found["status"] == "switched_off" and "another process" in found["reason"]
    assert json.loads((tmp_path / "run/manifest.json").read_text())["memory"]["tiled_mlp"] is False



@gpu
def test_every_path_passes_its_check_on_this_card(tmp_path: Path, tiny_llama: Path) -> None:
    """On CUDA: the varlen flash kernel, the Triton loss, tiles, offload on its side stream, a sparse layout."""
    data = write_jsonl(tmp_path / "d.jsonl", arithmetic_rows(40))
    cfg = write_config(tmp_path / "cfg.yaml", tiny_llama, data, tmp_path / "run", lora=LORA,
                       train={**TRAIN, "tiled_mlp": True, "activation_offload": True, "checkpoint_every_n_layers": 2})
    assert run_training(cfg, []) == 0
    record = _checks(tmp_path / "run")
    assert record["compute_dtype"] == "bfloat16" and record["paths"]["packed_attention"]["reference"] == "per-sample SDPA"
    assert {name: p["status"] for name, p in record["paths"].items()} == dict.fromkeys(record["paths"], "passed")
