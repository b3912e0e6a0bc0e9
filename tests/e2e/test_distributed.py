"""Several processes through accelerate (DDP over gloo on CPU): same result as one process, one writer,
SIGTERM to a rank or the launcher, exact resume, one error line, FSDP checks and the per-GPU planner.

CPU runs use ``accelerate launch --multi_gpu --num_processes 2`` (two processes over gloo); the
FSDP path needs GPUs: ``gpu``-marked tests at the end.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT, default_sigint, gpu, metrics_of, run_cli, write_config
from safetensors.torch import load_file

from qlora_kit.core.errors import EXIT_PREEMPTED, ConfigError

pytestmark = pytest.mark.e2e


ACCELERATE_CONFIGS = ROOT / "configs" / "accelerate"


# 45 training rows, 4 rows per global micro-batch (2 per process): the last micro-batch has one row,
# so rank 1 runs the masked stand-in; 5 validation rows split the same way.
EQUAL = {"max_steps": None, "num_epochs": 1, "save_steps": 3, "logging_steps": 1, "gradient_accumulation_steps": 2,
         "micro_batch_size": 2, "optimizer": "adamw_torch", "learning_rate": 5e-3}


RESUME = {"max_steps": 12, "save_steps": 4, "logging_steps": 1, "save_total_limit": 10, "gradient_accumulation_steps": 2,
          "micro_batch_size": 2, "optimizer": "paged_adamw_8bit", "learning_rate": 5e-3}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch_cmd(*args: str, nproc: int = 2, config_file: Path | None = None, module: bool = True) -> list[str]:
    """``accelerate launch`` with two CPU processes (a free rendezvous port: other test runs share the host)."""
    cmd = [sys.executable, "-m", "accelerate.commands.accelerate_cli", "launch", "--main_process_port",
           str(free_port())]
    cmd += ["--config_file", str(config_file)] if config_file else ["--multi_gpu"]
    cmd += ["--num_processes", str(nproc), "--num_machines", "1", "--mixed_precision", "no",
            "--dynamo_backend", "no"]
    return cmd + (["-m", "qlora_kit", *args] if module else list(args))


def launch_env() -> dict[str, str]:
    return {**os.environ, "QLORA_KIT_COLLECTIVE_TIMEOUT": "120", "OMP_NUM_THREADS": "1"}


def launch(*args: str, timeout: int = 600, **kw) -> subprocess.CompletedProcess[str]:
    return subprocess.run(launch_cmd(*args, **kw), capture_output=True, text=True, timeout=timeout, env=launch_env())


def error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("error:")]


def rank_exit_codes(text: str) -> list[int]:
    """Exit statuses of the ranks, from the launcher's failure report."""
    return [int(code) for code in re.findall(r"^\s*exitcode\s+:\s*(-?\d+)", text, flags=re.MULTILINE)]


def adapter_diff(a: Path, b: Path) -> float:
    x, y = load_file(a / "adapter/adapter_model.safetensors"), load_file(b / "adapter/adapter_model.safetensors")
    assert x.keys() == y.keys() and x
    return max((x[k] - y[k]).abs().max().item() for k in x)


@pytest.fixture(scope="module")
def equal_runs(tmp_path_factory: pytest.TempPathFactory, tiny_llama: Path, fifty_rows: Path) -> dict:
    """One process with micro_batch_size 4 and two processes with 2 each (same seed, unpacked rows)."""
    root = tmp_path_factory.mktemp("equal")
    one = write_config(root / "one.yaml", tiny_llama, fifty_rows, root / "one", train={**EQUAL, "micro_batch_size": 4},
                       data={"packing": False})
    two = write_config(root / "two.yaml", tiny_llama, fifty_rows, root / "two", train=EQUAL, data={"packing": False})
    single = run_cli("train", str(one))
    assert single.returncode == 0, single.stderr[-3000:]
    double = launch("train", str(two))
    assert double.returncode == 0, double.stdout[-2000:] + double.stderr[-3000:]
    return {"one": root / "one", "two": root / "two", "out": double.stdout + double.stderr}


def test_two_processes_equal_one_process_with_twice_the_micro_batch(equal_runs: dict) -> None:
    one, two = equal_runs["one"], equal_runs["two"]
    assert adapter_diff(one, two) < 1e-5
    a, b = metrics_of(one), metrics_of(two)
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b):
        assert ra.keys() == rb.keys()
        for key in ("loss", "eval_loss", "grad_norm", "learning_rate", "epoch"):
            if key in ra:
                assert ra[key] == pytest.approx(rb[key], abs=2e-5), (key, ra, rb)
    manifest = json.loads((two / "manifest.json").read_text())
    assert manifest["status"] == "completed"
    assert manifest["distributed"] == {"world_size": 2, "strategy": "ddp", "backend": "gloo", "fsdp_offload": False}
    assert "distributed" not in json.loads((one / "manifest.json").read_text())


@pytest.mark.slow
def test_torchrun_trains_the_same_adapter(equal_runs: dict, tmp_path: Path, tiny_llama: Path,
                                          fifty_rows: Path) -> None:
    """``torchrun --nproc_per_node 2 -m qlora_kit train``: same processes, same result, no accelerate launcher."""
    cfg = write_config(tmp_path / "cfg.yaml", tiny_llama, fifty_rows, tmp_path / "run", train=EQUAL,
                       data={"packing": False})
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           "-m", "qlora_kit", "train", str(cfg)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=launch_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert adapter_diff(equal_runs["one"], tmp_path / "run") < 1e-5
    assert json.loads((tmp_path / "run/manifest.json").read_text())["distributed"]["world_size"] == 2


def test_rank_zero_alone_writes(equal_runs: dict) -> None:
    two, out = equal_runs["two"], equal_runs["out"]
    records = metrics_of(two)
    steps = [r["step"] for r in records if "loss" in r]
    assert steps == list(range(1, 7)), "one metrics line per optimizer step"
    assert [r["step"] for r in records if "eval_loss" in r] == [3, 6]
    assert out.count("training: ") == 1 and out.count("saved checkpoint-6") == 1, "rank 0 alone logs"
    assert not error_lines(out)
    checkpoint = two / "checkpoint-6"
    assert (checkpoint / "rank1.safetensors").is_file() and not (checkpoint / "rank0.safetensors").exists()
    state = json.loads((checkpoint / "state.json").read_text())
    assert state["distributed"]["world_size"] == 2
    assert not list(two.glob("**/*.tmp*")) and not list(two.glob(".tmp-*"))


def test_export_and_generate_on_a_two_process_run(equal_runs: dict, tmp_path: Path) -> None:
    two = equal_runs["two"]
    exported = run_cli("export", str(two), "--out", str(tmp_path / "merged"), "--device", "cpu")
    assert exported.returncode == 0, exported.stderr[-3000:]
    verification = json.loads((tmp_path / "merged" / "export_report.json").read_text())["verification"]
    assert verification["status"] == "passed", verification["failures"]
    assert verification["vs_trained"]["greedy_exact"] == verification["vs_trained"]["greedy_total"] > 0
    answer = run_cli("generate", str(two), "2 + 3 ?", "--max-new-tokens", "4")
    assert answer.returncode == 0, answer.stderr[-3000:]


def test_export_refuses_a_launcher(equal_runs: dict, tmp_path: Path) -> None:
    proc = launch("export", str(equal_runs["two"]), "--out", str(tmp_path / "m"), timeout=300)
    assert proc.returncode != 0
    lines = error_lines(proc.stderr)
    assert len(lines) == 1 and "runs in one process" in lines[0]
    assert not (tmp_path / "m").exists()


def _wait_for_step(run: Path, step: int, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        path = run / "metrics.jsonl"
        if path.exists() and sum('"loss"' in line for line in path.read_text().splitlines()) >= step:
            return
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        time.sleep(0.05)
    raise AssertionError("training did not reach the step in time")


def _ranks(launcher: subprocess.Popen, n: int = 2, timeout: float = 60) -> list[int]:
    """PIDs of the launcher's worker processes (its children)."""
    import psutil

    deadline = time.time() + timeout
    while time.time() < deadline:
        kids = psutil.Process(launcher.pid).children(recursive=True)
        ranks = [k.pid for k in kids if "qlora_kit" in " ".join(k.cmdline())]
        if len(ranks) >= n:
            return ranks
        time.sleep(0.1)
    raise AssertionError("ranks not found")


@pytest.fixture(scope="module")
def resume_reference(tmp_path_factory: pytest.TempPathFactory, tiny_llama: Path, fifty_rows: Path) -> Path:
    """An uninterrupted two-process run (dropout: every rank's RNG matters) the resumed one must reproduce."""
    root = tmp_path_factory.mktemp("ref")
    cfg = write_config(root / "cfg.yaml", tiny_llama, fifty_rows, root / "run", train=RESUME, lora={"dropout": 0.1})
    proc = launch("train", str(cfg))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root / "run"


@pytest.mark.slow  # two processes twice plus their reference run (~35 s)
def test_sigterm_to_one_rank_then_resume_is_exact(tmp_path: Path, tiny_llama: Path, fifty_rows: Path,
                                                   resume_reference: Path) -> None:
    cfg = write_config(tmp_path / "cfg.yaml", tiny_llama, fifty_rows, tmp_path / "run", train=RESUME,
                       lora={"dropout": 0.1})
    proc = subprocess.Popen(launch_cmd("train", str(cfg)), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=launch_env())
    ranks = _ranks(proc)
    _wait_for_step(tmp_path / "run", 5, proc)
    os.kill(max(ranks), signal.SIGTERM)  # one rank only
    out, err = proc.communicate(timeout=300)
    text = out + err
    assert rank_exit_codes(text) == [EXIT_PREEMPTED, EXIT_PREEMPTED], text[-3000:]
    lines = error_lines(text)
    assert len(lines) == 1 and lines[0].startswith("error: stopped by ") and "--resume" in text
    manifest = json.loads((tmp_path / "run/manifest.json").read_text())
    assert manifest["status"] == "preempted"
    saved = sorted(int(p.name.split("-")[1]) for p in (tmp_path / "run").glob("checkpoint-*"))[-1]
    assert 5 <= saved < 12 and not (tmp_path / "run/adapter").exists()

    other = run_cli("train", str(cfg), "--resume")  # one process: refused, nothing changed
    assert other.returncode == ConfigError.exit_code
    assert error_lines(other.stderr) == [
        f"error: cannot resume checkpoint-{saved}: it was trained with 2 processes (DDP), this run has 1 process "
        "(the global batch, per-rank RNG and optimizer state depend on it)"]
    assert json.loads((tmp_path / "run/manifest.json").read_text())["status"] == "preempted"

    resumed = launch("train", str(cfg), "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from checkpoint-{saved}" in resumed.stderr + resumed.stdout
    assert adapter_diff(tmp_path / "run", resume_reference) <= 1e-6
    assert metrics_of(tmp_path / "run") == metrics_of(resume_reference)


def test_sigterm_to_the_launcher_checkpoints_once_and_every_rank_exits_75(tmp_path: Path, tiny_llama: Path,
                                                                           fifty_rows: Path) -> None:
    cfg = write_config(tmp_path / "cfg.yaml", tiny_llama, fifty_rows, tmp_path / "run",
                       train={**RESUME, "save_steps": 100})
    proc = subprocess.Popen(launch_cmd("train", str(cfg), config_file=ACCELERATE_CONFIGS / "ddp_2gpu.yaml"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=launch_env())
    ranks = _ranks(proc)
    _wait_for_step(tmp_path / "run", 2, proc)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    import psutil

    assert not any(psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE for pid in ranks)
    lines = error_lines(out + err)
    assert len(lines) == 1 and lines[0].startswith("error: stopped by SIGTERM at step "), (out + err)[-3000:]
    checkpoints = list((tmp_path / "run").glob("checkpoint-*"))
    assert len(checkpoints) == 1 and (checkpoints[0] / "rank1.safetensors").is_file()
    assert json.loads((tmp_path / "run/manifest.json").read_text())["status"] == "preempted"


@pytest.mark.slow
def test_ctrl_c_in_the_terminal_checkpoints_once(tmp_path: Path, tiny_llama: Path, fifty_rows: Path) -> None:
    """Ctrl-C reaches the launcher and every rank (one process group), and the launcher forwards it again:
    that is still one stop request, not the second Ctrl-C that aborts."""
    cfg = write_config(tmp_path / "cfg.yaml", tiny_llama, fifty_rows, tmp_path / "run",
                       train={**RESUME, "save_steps": 100})
    proc = subprocess.Popen(launch_cmd("train", str(cfg)), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=launch_env(), start_new_session=True, preexec_fn=default_sigint)
    _ranks(proc)
    _wait_for_step(tmp_path / "run", 2, proc)
    os.killpg(proc.pid, signal.SIGINT)
    out, err = proc.communicate(timeout=300)
    text = out + err
    lines = error_lines(text)
    assert len(lines) == 1 and lines[0].startswith("error: stopped by SIGINT at step "), text[-3000:]
    assert len(list((tmp_path / "run").glob("checkpoint-*"))) == 1
    assert json.loads((tmp_path / "run/manifest.json").read_text())["status"] == "preempted"


FAIL_ON_RANK_1 = """
import sys, torch
from qlora_kit import cli
from qlora_kit.train import loop
real = loop.forward_loss
def forward(run, *args):
    if run.dist.rank == 1 and run.step == 5:  # as if GPU 1 ran out of memory (after checkpoint-4)
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    return real(run, *args)
loop.forward_loss = forward
sys.argv = ["qlora-kit", *sys.argv[1:]]
cli.main()
"""


def test_failure_on_one_rank_ends_every_rank_with_one_error_line(tmp_path: Path, tiny_llama: Path,
                                                                 fifty_rows: Path) -> None:
    script = tmp_path / "fail_on_rank_1.py"
    script.write_text(FAIL_ON_RANK_1)
    cfg = write_config(tmp_path / "cfg.yaml", tiny_llama, fifty_rows, tmp_path / "run", train=RESUME)
    start = time.time()
    # The FSDP config on CPU: trains with DDP over gloo and says so (once).
    proc = launch(str(script), "train", str(cfg), module=False, config_file=ACCELERATE_CONFIGS / "fsdp_qlora_2gpu.yaml",
                  timeout=300)
    text = proc.stdout + proc.stderr
    assert time.time() - start < 200
    assert proc.returncode != 0
    assert text.count("FSDP needs CUDA GPUs") == 1
    lines = error_lines(text)
    assert len(lines) == 1 and lines[0].startswith("error: [rank 1] CUDA out of memory at step 6"), text[-3000:]
    codes = rank_exit_codes(text)
    assert len(codes) == 2
    if -6 in codes:  # known race: gloo sometimes aborts rank 0 inside the collective its peer left (SIGABRT)
        pytest.xfail("rank 0 died by SIGABRT inside gloo before it could record the failure (known race)")
    assert 4 in codes  # rank 1: out of memory; rank 0: its peer failed (quiet)
    manifest = json.loads((tmp_path / "run/manifest.json").read_text())
    assert manifest["status"] == "failed" and "another process of this run failed" in manifest["error"]


def test_a_bad_config_is_reported_once(tmp_path: Path, tiny_llama: Path, fifty_rows: Path) -> None:
    cfg = write_config(tmp_path / "cfg.yaml", tiny_llama, fifty_rows, tmp_path / "run", train={"max_stepz": 3})
    proc = launch("train", str(cfg), timeout=300)
    lines = error_lines(proc.stdout + proc.stderr)
    assert len(lines) == 1 and "max_stepz" in lines[0]
    assert not (tmp_path / "run").exists()


def test_missing_data_is_reported_once_and_leaves_nothing(tmp_path: Path, tiny_llama: Path) -> None:
    cfg = write_config(tmp_path / "cfg.yaml", tiny_llama, tmp_path / "missing.jsonl", tmp_path / "run")
    proc = launch("train", str(cfg), timeout=300)
    lines = error_lines(proc.stdout + proc.stderr)
    assert len(lines) == 1 and "missing.jsonl" in lines[0], (proc.stdout + proc.stderr)[-2000:]
    assert not (tmp_path / "run").exists()


def test_plan_cli_num_gpus(tmp_path: Path) -> None:
    cfg = ROOT / "configs" / "llama-3.1-70b-instruct_qlora_2x24gb.yaml"
    reports = {}
    for strategy in ("ddp", "fsdp", "fsdp-offload"):
        proc = run_cli("plan", str(cfg), "--num-gpus", "2", "--strategy", strategy, "--gpu-memory", "24", "--json")
        assert proc.returncode in (0, 4), proc.stderr
        reports[strategy] = json.loads(proc.stdout)
    assert reports["fsdp"]["parallel"] == {"gpus": 2, "strategy": "fsdp", "per_gpu": True,
                                           "global_micro_batch_size": 2, "global_batch_size": 16}
    assert reports["fsdp-offload"]["fits"], "70B FSDP-QLoRA with offload fits 2 x 24 GB"
    assert not reports["ddp"]["fits"] and not reports["fsdp"]["fits"]
    bad = run_cli("plan", str(cfg), "--num-gpus", "2", "--strategy", "zero3")
    assert bad.returncode == 2 and error_lines(bad.stderr)[0].startswith("error: --strategy 'zero3'")


def _gpu_config(tmp_path: Path, tiny_llama: Path, fifty_rows: Path, name: str, data: dict | None = None,
                **train) -> Path:
    return write_config(tmp_path / f"{name}.yaml", tiny_llama, fifty_rows, tmp_path / name,
                        model={"name_or_path": str(tiny_llama), "compute_dtype": "bfloat16"},
                        data=data or {}, train={**EQUAL, "optimizer": "adamw_torch", **train})


@gpu
@pytest.mark.parametrize("accelerate_config", ["fsdp_qlora_2gpu.yaml", "fsdp_qlora_70b_2x24gb.yaml"])
def test_fsdp_one_process_on_one_gpu(tmp_path: Path, tiny_llama: Path, fifty_rows: Path, accelerate_config: str) -> None:
    """The FSDP path end to end on one GPU: bf16 storage, adapter gathered, resume, export."""
    plain = _gpu_config(tmp_path, tiny_llama, fifty_rows, "plain")
    fsdp = _gpu_config(tmp_path, tiny_llama, fifty_rows, "fsdp", max_steps=6, num_epochs=1)
    assert run_cli("train", str(plain), "--set", "train.max_steps=6").returncode == 0
    proc = launch("train", str(fsdp), nproc=1, config_file=ACCELERATE_CONFIGS / accelerate_config)
    assert proc.returncode == 0, proc.stderr[-4000:]
    manifest = json.loads((tmp_path / "fsdp/manifest.json").read_text())
    assert manifest["quant"]["quant_storage"] == "bfloat16" and manifest["distributed"]["strategy"] == "fsdp"
    assert adapter_diff(tmp_path / "plain", tmp_path / "fsdp") < 2e-2  # bf16 compute, other reduction order
    exported = run_cli("export", str(tmp_path / "fsdp"), "--out", str(tmp_path / "merged"))
    assert exported.returncode == 0, exported.stderr[-3000:]


@gpu
def test_fsdp_checkpoint_holds_only_the_adapter_and_resumes(tmp_path: Path, tiny_llama: Path, fifty_rows: Path) -> None:
    cfg = _gpu_config(tmp_path, tiny_llama, fifty_rows, "run", max_steps=6, num_epochs=1)
    first = launch("train", str(cfg), "--set", "train.max_steps=3", nproc=1,
                   config_file=ACCELERATE_CONFIGS / "fsdp_qlora_2gpu.yaml")
    assert first.returncode == 0, first.stderr[-4000:]
    tensors = load_file(tmp_path / "run/checkpoint-3/adapter_model.safetensors")
    assert tensors and all("lora_" in k for k in tensors)
    resumed = launch("train", str(cfg), "--resume", nproc=1, config_file=ACCELERATE_CONFIGS / "fsdp_qlora_2gpu.yaml")
    assert resumed.returncode == 0, resumed.stderr[-4000:]


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
@pytest.mark.parametrize("accelerate_config", ["ddp_2gpu.yaml", "fsdp_qlora_2gpu.yaml"])
def test_two_gpus_equal_one_gpu(tmp_path: Path, tiny_llama: Path, fifty_rows: Path, accelerate_config: str) -> None:
    one = _gpu_config(tmp_path, tiny_llama, fifty_rows, "one", micro_batch_size=4, data={"packing": False})
    two = _gpu_config(tmp_path, tiny_llama, fifty_rows, "two", data={"packing": False})
    assert run_cli("train", str(one)).returncode == 0
    proc = launch("train", str(two), config_file=ACCELERATE_CONFIGS / accelerate_config)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert adapter_diff(tmp_path / "one", tmp_path / "two") < 2e-2  # bf16 compute
