"""doctor --gpu: the table, JSON, exit codes and the no-CUDA line; and the checks themselves, run for real where
their kernels exist on a CPU (a CUDA card runs all of them: tests/test_doctor_gpu.py is marked gpu)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import gpu

from qlora_kit.commands import doctor_gpu, gpu_checks
from qlora_kit.commands.gpu_checks import FAILED, NOT_APPLICABLE, PASSED, NotApplicable, Rig, Row

CPU = torch.device("cpu")


def _fake_checks():
    def fine(rig):
        return [gpu_checks.measured("kernel a", 1e-6, 1e-3, "close")]

    def off(rig):
        return [gpu_checks.measured("kernel b", 0.5, 1e-3, "far off")]

    def crashes(rig):
        raise RuntimeError("CUDA error: no kernel image is available for execution on the device\nmore")

    def elsewhere(rig):
        raise NotApplicable("needs a card without bf16")

    return [("a", fine, "fix a"), ("b", off, "fix b"), ("c", crashes, "fix c"), ("d", elsewhere, "fix d")]


def test_without_cuda_one_line_nothing_checked_exit_0(tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "sub" / "doctor.json"
    assert doctor_gpu.run_gpu_doctor(str(out)) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    assert printed == [doctor_gpu.NO_CUDA]
    document = json.loads(out.read_text())
    assert document["cuda"] is False and document["checks"] == [] and document["checked"] == 0
    assert document["failed"] == 0 and document["message"] == doctor_gpu.NO_CUDA
    assert document["versions"]["torch"] == torch.__version__


def test_table_fixes_json_and_exit_status(tmp_path: Path, capsys) -> None:
    out = tmp_path / "gpu.json"
    code = doctor_gpu.run_gpu_doctor(str(out), device=CPU, checks=_fake_checks())
    assert code == 1
    text = capsys.readouterr().out
    for word in ("path", "result", "difference", "time", "kernel a", "passed", "kernel b", "failed",
                 "not applicable"):
        assert word in text, word
    assert "fix: fix b" in text and "fix: fix c" in text and "fix a" not in text and "fix d" not in text
    assert "RuntimeError: CUDA error: no kernel image" in text and "more" not in text.split("no kernel image")[1][:10]
    document = json.loads(out.read_text())
    rows = {r["path"]: r for r in document["checks"]}
    assert rows["kernel a"] == {"path": "kernel a", "result": PASSED, "difference": 1e-6, "tolerance": 1e-3,
                                "seconds": rows["kernel a"]["seconds"], "detail": "close", "fix": ""}
    assert rows["kernel b"]["result"] == FAILED and rows["kernel b"]["fix"] == "fix b"
    assert rows["c"]["result"] == FAILED and rows["c"]["difference"] is None
    assert rows["d"]["result"] == NOT_APPLICABLE and rows["d"]["detail"] == "needs a card without bf16"
    assert document["checked"] == 3 and document["failed"] == 2 and document["failed_paths"] == ["kernel b", "c"]
    assert document["device"]["type"] == "cpu"


def test_json_to_stdout_only(capsys) -> None:
    ok = [("a", lambda rig: [gpu_checks.measured("kernel a", 0.0, 1e-3)], "")]
    assert doctor_gpu.run_gpu_doctor("-", device=CPU, checks=ok) == 0
    document = json.loads(capsys.readouterr().out)
    assert document["failed"] == 0 and document["message"] == "all 1 GPU checks passed"


def test_cli_doctor_gpu_without_cuda(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from qlora_kit.cli import app

    result = CliRunner().invoke(app, ["doctor", "--gpu", "--json", str(tmp_path / "d.json")])
    assert result.exit_code == 0, result.output
    assert result.output.strip() == doctor_gpu.NO_CUDA
    assert json.loads((tmp_path / "d.json").read_text())["cuda"] is False


@pytest.fixture(scope="module")
def cpu_rig(tmp_path_factory):
    rig = Rig.for_device(CPU)
    rig.workdir = tmp_path_factory.mktemp("doctor-rig")
    yield rig
    rig.close()


def _rows(check, rig) -> dict[str, Row]:
    return {r.path: r for r in check(rig)}


def test_nf4_kernels_on_cpu(cpu_rig: Rig, one_thread) -> None:
    rows = {**_rows(gpu_checks.check_nf4_roundtrip, cpu_rig), **_rows(gpu_checks.check_4bit_matmul, cpu_rig)}
    assert all(r.result == PASSED for r in rows.values()), rows
    assert 0.05 < rows["nf4 quantise/dequantise"].difference < gpu_checks.NF4_ROUNDTRIP_TOLERANCE


def test_optimizer_steps_match_the_reference_on_cpu(cpu_rig: Rig, one_thread) -> None:
    rows = _rows(gpu_checks.check_optimizers, cpu_rig)
    assert set(rows) == {f"optimizer {name}: one step" for name in gpu_checks.OPTIMIZER_TOLERANCE}
    assert all(r.result == PASSED for r in rows.values()), rows


def test_the_run_paths_of_the_small_model_on_cpu(cpu_rig: Rig, one_thread) -> None:
    rows = gpu_checks.check_model_paths(cpu_rig)
    by_path = {r.path.split()[0]: r for r in rows}
    assert {k: r.result for k, r in by_path.items()} == {
        "packed_attention": PASSED, "fused_loss": PASSED, "tiled_mlp": PASSED, "checkpoint_layout": PASSED,
        "activation_offload": NOT_APPLICABLE}  # nothing to offload on CPU
    assert by_path["tiled_mlp"].difference < 1e-3


def test_autocast_and_fp16_scaling_checks_run_on_cpu_in_16_bit(tmp_path: Path, one_thread) -> None:
    """The same layer check a bf16 / fp16 card runs, with CPU autocast (slow kernels, same code)."""
    for dtype, check, name in ((torch.bfloat16, gpu_checks.check_autocast_fp32_masters,
                                "bf16 autocast, fp32 adapter masters"),
                               (torch.float16, gpu_checks.check_fp16_loss_scaling, "fp16 autocast + GradScaler")):
        rig = Rig(CPU, dtype, dict(gpu_checks.CPU_SHAPE), workdir=tmp_path / str(dtype))
        try:
            (row,) = check(rig)
        finally:
            rig.close()
        assert row.path == name and row.result == PASSED, row
    with pytest.raises(NotApplicable):
        gpu_checks.check_fp16_loss_scaling(Rig(CPU, torch.bfloat16))
    with pytest.raises(NotApplicable):
        gpu_checks.check_varlen_kernel(Rig(CPU, torch.bfloat16))
    with pytest.raises(NotApplicable):
        gpu_checks.check_planner(Rig(CPU, torch.float32))


def test_plain_doctor_writes_json_too(tmp_path: Path, capsys) -> None:
    from qlora_kit.commands.doctor import run_doctor

    code = run_doctor(str(tmp_path / "doctor.json"))
    document = json.loads((tmp_path / "doctor.json").read_text())
    assert document["command"] == "qlora-kit doctor" and document["verdict"]
    assert {"name", "status", "detail", "fix"} <= set(document["checks"][0])
    assert code == (1 if any(c["status"] == "FAIL" for c in document["checks"]) else 0)


@gpu
def test_every_gpu_path_passes_on_this_card(tmp_path: Path) -> None:
    out = tmp_path / "doctor-gpu.json"
    code = doctor_gpu.run_gpu_doctor(str(out))
    document = json.loads(out.read_text())
    assert code == 0, [r for r in document["checks"] if r["result"] == FAILED]
    assert document["cuda"] and document["checked"] >= 10
