"""doctor: every verdict from its facts (no hardware needed), and the real run on this machine."""

from __future__ import annotations

from pathlib import Path

import pytest

from qlora_kit.commands import doctor
from qlora_kit.commands.doctor import FAIL, OK, WARN

GiB = 1024**3


def test_python_and_package_versions():
    assert doctor.judge_python((3, 11, 7)).status == OK
    old = doctor.judge_python((3, 9, 18))
    assert old.status == FAIL and "3.10" in old.fix
    assert doctor.judge_package("peft", "0.21.2", ">=0.17").status == OK
    too_old = doctor.judge_package("peft", "0.10.0", ">=0.17")
    assert too_old.status == FAIL and too_old.fix == "pip install 'peft>=0.17'"
    missing = doctor.judge_package("trl", None, ">=0.20")
    assert missing.status == FAIL and "not installed" in missing.detail
    assert doctor.judge_package("torch", "2.13.0+cpu", ">=2.4,<2.15").status == OK  # local version label
    assert doctor.judge_package("torch", "2.16.0", ">=2.4,<2.15").status == FAIL


def test_declared_requirements_come_from_the_package_metadata():
    reqs = doctor.declared_requirements()
    for name in doctor.KEY_PACKAGES:
        assert name in reqs and reqs[name], name
    assert "pytest" not in reqs  # extras are not requirements of the stack


@pytest.mark.parametrize("torch_cuda, available, smi, expected, words", [
    ("12.8", True, [{"driver_version": "570.86"}], OK, "driver 570.86"),
    (None, False, [], WARN, "CPU only"),
    (None, False, [{"driver_version": "570.86"}], FAIL, "CPU-only build"),
    ("12.8", False, [{"driver_version": "470.57"}], FAIL, "cannot use the GPU"),
])
def test_cuda_verdicts(torch_cuda, available, smi, expected, words):
    check = doctor.judge_cuda(torch_cuda, available, smi, 1 if available else 0)
    assert check.status == expected and words in check.detail
    assert check.status == OK or check.fix  # every problem comes with a fix


def test_no_gpu_in_a_container_says_so_plainly():
    check = doctor.judge_cuda(None, False, [], 0, in_container=True)
    assert check.status == WARN and "no GPU is visible in this container" in check.detail
    assert "CPU-only build" in check.detail and "--gpus all" in check.fix and "docker/build.sh" in check.fix
    cuda_build = doctor.judge_cuda("12.8", False, [], 0, in_container=True)
    assert "--gpus all" in cuda_build.fix and "CPU-only" not in cuda_build.detail
    assert "docker/build.sh" in doctor.judge_cuda(None, False, [{"driver_version": "570.86"}], 0, True).fix


def test_gpu_bf16_memory_and_disk_verdicts(tmp_path: Path):
    assert doctor.judge_gpu(0, "NVIDIA GeForce RTX 4090", 24 * GiB, (8, 9)).status == OK
    small = doctor.judge_gpu(0, "Tesla T4", 15 * GiB, (7, 5))
    assert small.status == WARN and "qlora-kit plan" in small.fix
    assert doctor.judge_bf16(True).status == OK
    assert doctor.judge_bf16(False).status == WARN and "NaN" in doctor.judge_bf16(False).detail
    assert doctor.judge_free_memory(0, 23 * GiB, 24 * GiB).status == OK
    busy = doctor.judge_free_memory(0, 10 * GiB, 24 * GiB)
    assert busy.status == WARN and "14.0 GiB used by others" in busy.detail
    assert doctor.judge_disk("HF cache", tmp_path, 100 * GiB).status == OK
    assert doctor.judge_disk("HF cache", tmp_path, 20 * GiB).status == WARN
    assert "HF_HOME" in doctor.judge_disk("HF cache", tmp_path, 20 * GiB).fix
    assert doctor.judge_disk("output", tmp_path, GiB).status == FAIL


def test_bitsandbytes_verdicts():
    assert doctor.judge_bitsandbytes("0.50.2", "CUDA", "cuda:0", None, 0.0, on_gpu=True).status == OK
    broken = doctor.judge_bitsandbytes("0.50.2", "CUDA", "cuda:0", "RuntimeError: no kernel", None, on_gpu=True)
    assert broken.status == FAIL and "python -m bitsandbytes" in broken.fix
    assert doctor.judge_bitsandbytes("0.50.2", "CPU", "cpu", "RuntimeError: x", None, on_gpu=False).status == WARN
    assert doctor.judge_bitsandbytes(None, "?", "cpu", "ImportError", None, on_gpu=False).status == FAIL


def test_bitsandbytes_probe_runs_a_real_4bit_matmul_on_cpu():
    facts = doctor.probe_bitsandbytes("cpu")
    assert facts["error"] is None and facts["max_err"] < 1e-2 and facts["version"]


def test_existing_parent_and_verdict(tmp_path: Path):
    assert doctor.existing_parent(tmp_path / "a" / "b") == tmp_path
    checks = [doctor.Check("python", OK, ""), doctor.Check("cuda", WARN, "", "x")]
    assert "CPU only" in doctor.verdict(checks)
    assert doctor.verdict([doctor.Check("python", OK, ""), doctor.Check("cuda", OK, "")]) == "ready to train"
    assert doctor.verdict(checks + [doctor.Check("peft", FAIL, "", "y")]).startswith("1 problem(s)")


def test_run_doctor_exit_status_follows_fails(monkeypatch, capsys):
    monkeypatch.setattr(doctor, "gpu_checks", lambda: [doctor.Check("cuda", OK, "fake GPU")])
    monkeypatch.setattr(doctor, "disk_checks", lambda: [])
    assert doctor.run_doctor() == 0
    monkeypatch.setattr(doctor, "installed_version", lambda name: "0.0.1" if name == "peft" else "99.0")
    assert doctor.run_doctor() == 1
    out = capsys.readouterr().out
    assert "FAIL" in out and "pip install 'peft" in out and "verdict:" in out
