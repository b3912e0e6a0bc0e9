"""train.method dpo / orpo end to end on a tiny model: metrics, exact resume after SIGTERM, the NaN guard,
export / GGUF / generate, DPO from an SFT run's adapter, and two processes equal to one."""

from __future__ import annotations

import json
import math
import random
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import (
    assert_same_result,
    metrics_of,
    run_cli,
    train_until_sigterm,
    write_config,
    write_jsonl,
)
from safetensors.torch import load_file

from qlora_kit.core.errors import NonFiniteLossError
from qlora_kit.rundir.checkpoint import list_checkpoints
from qlora_kit.train import loop, recipe

pytestmark = pytest.mark.e2e

DPO = {"method": "dpo", "max_steps": 8, "save_steps": 4, "logging_steps": 1, "save_total_limit": 10,
       "gradient_accumulation_steps": 2, "micro_batch_size": 3, "learning_rate": 5e-3, "optimizer": "adamw_torch"}
TRL_METRICS = {"rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
               "logps/rejected"}


def pair_rows(n: int, seed: int = 0) -> list[dict]:
    """Arithmetic preference pairs: the right sum chosen, a wrong one rejected (trl's conversational layout)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        rows.append({"prompt": [{"role": "user", "content": f"{a} + {b} ?"}],
                     "chosen": [{"role": "assistant", "content": f"{a} + {b} = {a + b}"}],
                     "rejected": [{"role": "assistant", "content": f"{a} + {b} = {a + b + rng.randint(1, 3)}"}]})
    return rows


@pytest.fixture(scope="module")
def pairs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("pairs") / "pairs.jsonl", pair_rows(40))


@pytest.fixture(scope="module")
def dpo_run(tmp_path_factory: pytest.TempPathFactory, tiny_llama: Path, pairs: Path) -> dict:
    """An uninterrupted DPO run (lora dropout 0.1: the random numbers must resume too)."""
    root = tmp_path_factory.mktemp("dpo")
    cfg = write_config(root / "cfg.yaml", tiny_llama, pairs, root / "run", train=DPO, lora={"dropout": 0.1})
    proc = run_cli("train", str(cfg))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {"run": root / "run", "stderr": proc.stderr}


def test_dpo_logs_trls_metrics_and_records_its_method(dpo_run: dict) -> None:
    run = dpo_run["run"]
    records = metrics_of(run)
    train = [r for r in records if "loss" in r]
    assert [r["step"] for r in train] == list(range(1, 9))
    assert TRL_METRICS <= set(train[0]) and train[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert train[0]["rewards/margins"] == 0.0, "the first step's policy is the reference"
    evals = [r for r in records if "eval_loss" in r]
    assert [r["step"] for r in evals] == [4, 8] and {f"eval_{k}" for k in TRL_METRICS} <= set(evals[0])
    assert "reward acc" in dpo_run["stderr"] and "reward accuracy" in dpo_run["stderr"]
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["method"] == {"name": "dpo", "beta": 0.1, "loss_type": "sigmoid", "start_adapter": None,
                                  "reference": "the base model (the adapter switched off)"}
    summary = json.loads((run / "data_summary.json").read_text())
    assert summary["format"] == "preference" and summary["train_rows"] + summary["val_rows"] == 40
    assert summary["pairs"]["chosen_trained"] > 0 and summary["pairs"]["rejected_trained"] > 0
    assert all("rejected" in json.loads(line) for line in (run / "heldout.jsonl").read_text().splitlines())


def test_dpo_sigterm_then_resume_is_exact(dpo_run: dict, tmp_path: Path, tiny_llama: Path, pairs: Path) -> None:
    cfg = write_config(tmp_path / "cfg.yaml", tiny_llama, pairs, tmp_path / "run", train=DPO, lora={"dropout": 0.1})
    train_until_sigterm(cfg, tmp_path / "run")
    saved = list_checkpoints(tmp_path / "run")[-1][0]
    assert 5 <= saved < 8
    resumed = run_cli("train", str(cfg), "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from checkpoint-{saved}" in resumed.stderr
    assert_same_result(tmp_path / "run", dpo_run["run"])  # adapter and every logged value, rewards included


def test_export_gguf_and_generate_work_unchanged_on_a_dpo_run(dpo_run: dict, tmp_path: Path) -> None:
    run = dpo_run["run"]
    exported = run_cli("export", str(run), "--out", str(tmp_path / "merged"), "--device", "cpu")
    assert exported.returncode == 0, exported.stderr[-3000:]
    report = json.loads((tmp_path / "merged/export_report.json").read_text())
    assert report["verification"]["status"] == "passed", report["verification"]["failures"]
    assert report["method"]["name"] == "dpo"
    assert "DPO (loss sigmoid, beta 0.1" in (tmp_path / "merged/README.md").read_text()
    gguf = run_cli("export", str(run), "--out", str(tmp_path / "gguf"), "--format", "gguf", "--quant", "f16",
                   "--device", "cpu")
    assert gguf.returncode == 0, gguf.stderr[-3000:]
    assert json.loads((tmp_path / "gguf/export_report.json").read_text())["verification"]["status"] == "passed"
    answer = run_cli("generate", str(run), "2 + 3 ?", "--max-new-tokens", "4")
    assert answer.returncode == 0, answer.stderr[-3000:]


@pytest.mark.slow  # an SFT run, then a DPO run from its adapter (~26 s)
def test_dpo_from_an_sft_runs_adapter(tmp_path: Path, tiny_llama: Path, data_file: Path, pairs: Path) -> None:
    sft_cfg = write_config(tmp_path / "sft.yaml", tiny_llama, data_file, tmp_path / "sft", lora={"r": 4, "alpha": 8},
                           train={"max_steps": 3})
    assert run_cli("train", str(sft_cfg)).returncode == 0
    dpo = {"method": "dpo", "max_steps": 3, "save_steps": 3}
    cfg = write_config(tmp_path / "dpo.yaml", tiny_llama, pairs, tmp_path / "dpo", train=dpo,
                       lora={"r": 4, "alpha": 8, "dropout": 0.0})  # equal to the start run's: allowed
    raw = yaml.safe_load(cfg.read_text())
    raw["model"]["adapter"] = str(tmp_path / "sft")
    cfg.write_text(yaml.safe_dump(raw))
    proc = run_cli("train", str(cfg))
    assert proc.returncode == 0, proc.stderr[-3000:]
    first = metrics_of(tmp_path / "dpo")[0]
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-5) and first["rewards/margins"] == 0.0, \
        "the reference is the SFT adapter, which the policy starts from"
    method = json.loads((tmp_path / "dpo/manifest.json").read_text())["method"]
    assert method["start_adapter"]["run"] == str((tmp_path / "sft").resolve())
    assert method["start_adapter"]["method"] == "sft" and method["reference"].startswith("the start adapter")
    adapter = tmp_path / "dpo/adapter"
    assert json.loads((adapter / "adapter_config.json").read_text())["r"] == 4, "the SFT run's LoRA shape"
    assert not (adapter / "reference").exists(), "the frozen reference is not part of the trained adapter"
    sft_keys = load_file(tmp_path / "sft/adapter/adapter_model.safetensors").keys()
    assert load_file(adapter / "adapter_model.safetensors").keys() == sft_keys
    exported = run_cli("export", str(tmp_path / "dpo"), "--out", str(tmp_path / "merged"), "--device", "cpu")
    assert exported.returncode == 0, exported.stderr[-3000:]
    assert "started from the adapter of the run" in (tmp_path / "merged/README.md").read_text()

    conflict = run_cli("train", str(cfg), "--set", "lora.r=8", "--set", f"output_dir={tmp_path / 'other'}")
    assert conflict.returncode != 0 and "lora.r: 8 here, 4 in the start run" in conflict.stderr
    weights = tmp_path / "sft/adapter/adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8] + b"\0" * 8)  # the start run's adapter changed on disk
    again = run_cli("train", str(cfg), "--resume")
    assert again.returncode != 0 and "model.adapter" in again.stderr and "Traceback" not in again.stderr


def test_orpo_trains_and_logs_its_terms(tmp_path: Path, tiny_llama: Path, pairs: Path) -> None:
    cfg = write_config(tmp_path / "cfg.yaml", tiny_llama, pairs, tmp_path / "run",
                       train={"method": "orpo", "max_steps": 4, "save_steps": 4})
    proc = run_cli("train", str(cfg))
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = metrics_of(tmp_path / "run")
    assert {"nll_loss", "log_odds_ratio", "log_odds_chosen"} | TRL_METRICS <= set(records[0])
    assert records[0]["loss"] > records[0]["nll_loss"] > 0  # NLL minus beta * log sigmoid(log odds) (< 0)
    assert json.loads((tmp_path / "run/manifest.json").read_text())["method"]["name"] == "orpo"


def test_sft_rows_with_dpo_and_pairs_with_sft_are_refused(tmp_path: Path, tiny_llama: Path, data_file: Path,
                                                          pairs: Path) -> None:
    cfg = write_config(tmp_path / "a.yaml", tiny_llama, data_file, tmp_path / "a", train={"method": "dpo"})
    proc = run_cli("train", str(cfg))
    assert proc.returncode != 0 and "train.method=dpo trains on preference rows" in proc.stderr
    cfg = write_config(tmp_path / "b.yaml", tiny_llama, pairs, tmp_path / "b")
    proc = run_cli("train", str(cfg))
    assert proc.returncode != 0 and "set train.method to dpo or orpo" in proc.stderr
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_dpo_nonfinite_loss_stops_without_saving_it(tmp_path: Path, tiny_llama: Path, pairs: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    real = loop.forward_loss

    def poisoned(run, *args):
        loss = real(run, *args)
        return loss + float("nan") if run.step + 1 == 3 else loss

    monkeypatch.setattr(loop, "forward_loss", poisoned)
    cfg = write_config(tmp_path / "cfg.yaml", tiny_llama, pairs, tmp_path / "run",
                       train={"method": "dpo", "max_steps": 4, "save_steps": 2})
    with pytest.raises(NonFiniteLossError, match="at step 3"):
        recipe.run_training(cfg, [])
    assert [step for step, _ in list_checkpoints(tmp_path / "run")] == [2]
    assert json.loads((tmp_path / "run/manifest.json").read_text())["status"] == "failed"


@pytest.mark.slow
def test_two_processes_equal_one_process_with_twice_the_micro_batch(tmp_path: Path, tiny_llama: Path) -> None:
    """DDP over gloo: 2 processes x 2 pairs = 1 process x 4 pairs (45 pairs: the last micro-batch masks a rank)."""
    data = write_jsonl(tmp_path / "pairs.jsonl", pair_rows(50, seed=1))
    train = {"method": "dpo", "max_steps": None, "num_epochs": 1, "save_steps": 4, "logging_steps": 1,
             "gradient_accumulation_steps": 2, "micro_batch_size": 2, "optimizer": "adamw_torch"}
    one = write_config(tmp_path / "one.yaml", tiny_llama, data, tmp_path / "one", data={"packing": False},
                       train={**train, "micro_batch_size": 4})
    two = write_config(tmp_path / "two.yaml", tiny_llama, data, tmp_path / "two", data={"packing": False}, train=train)
    assert run_cli("train", str(one)).returncode == 0
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
           "-m", "qlora_kit", "train", str(two)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900,
                          env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = load_file(tmp_path / "one/adapter/adapter_model.safetensors"), load_file(
        tmp_path / "two/adapter/adapter_model.safetensors")
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5
    for ra, rb in zip(metrics_of(tmp_path / "one"), metrics_of(tmp_path / "two"), strict=True):
        assert ra.keys() == rb.keys()
        for key in ("loss", "eval_loss", "rewards/accuracies", "rewards/margins", "eval_rewards/margins"):
            if key in ra:
                assert ra[key] == pytest.approx(rb[key], abs=2e-5), (key, ra, rb)
