"""benchmarks/gpu_check.sh on a machine without CUDA: its arguments, the install from a local wheel folder, and the
JSON it writes when CUDA is absent (the GPU steps recorded as skipped)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_check.sh"


def _run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=600,
                          env={**os.environ, **(env or {})})


def _fake_wheel(folder: Path, module: str, dist: str, version: str = "1.0") -> Path:
    """A minimal pure-Python wheel that pip installs (module with one constant)."""
    folder.mkdir(parents=True, exist_ok=True)
    name = dist.replace("-", "_")
    wheel = folder / f"{name}-{version}-py3-none-any.whl"
    info = f"{name}-{version}.dist-info"
    files = {f"{module}/__init__.py": "VALUE = 42\n",
             f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n",
             f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    files[f"{info}/RECORD"] = "".join(f"{path},,\n" for path in files) + f"{info}/RECORD,,\n"
    with zipfile.ZipFile(wheel, "w") as zf:
        for path, text in files.items():
            zf.writestr(path, text)
    return wheel


@pytest.mark.parametrize("args, words", [
    (["--bogus"], "unknown argument '--bogus'"),
    (["--only", "install,gpu"], "--only: unknown step 'gpu'"),
    (["--bench-steps", "1"], "--bench-steps must be a whole number >= 3"),
    (["--budget", "ten"], "--budget must be a whole number"),
    (["--require", "no colon"], "--require wants MODULE:DISTRIBUTION"),
    (["--out"], "--out needs a value"),
    (["--python", "no-such-python-3"], "--python: 'no-such-python-3' not found"),
])
def test_bad_arguments_exit_2_with_one_line(args: list[str], words: str, tmp_path: Path) -> None:
    proc = _run(*args, "--out", str(tmp_path / "o")) if args != ["--out"] else _run(*args)
    assert proc.returncode == 2
    assert proc.stderr.splitlines()[0] == f"gpu_check.sh: {words}" or words in proc.stderr.splitlines()[0]
    assert proc.stderr.splitlines()[1].startswith("usage: bash benchmarks/gpu_check.sh")


def test_help_lists_every_step() -> None:
    proc = _run("--help")
    assert proc.returncode == 0
    for step in ("install", "env", "doctor", "pytest", "bench", "summary", "$OUT"):
        assert step in proc.stdout


@pytest.mark.slow  # imports every heavy dependency twice in a subprocess (~1 min on 2 shared cores)
def test_install_takes_missing_packages_from_the_wheel_folder(tmp_path: Path) -> None:
    wheels, site, out = tmp_path / "whl", tmp_path / "site", tmp_path / "out"
    _fake_wheel(wheels, "qkfake_mod", "qkfake-dist")
    _fake_wheel(wheels, "qkfake_other", "qkfake-dist-other")  # a longer name sharing the prefix: not taken
    proc = _run("--only", "install", "--wheels", str(wheels), "--site", str(site), "--out", str(out),
                "--python", sys.executable, "--require", "qkfake_mod:qkfake-dist", "--require", "qknope:qknope")
    assert proc.returncode == 1, proc.stderr  # qknope has no wheel
    install = json.loads((out / "install.json").read_text())
    assert install["installed"] == ["qkfake-dist"] and install["missing"] == ["qknope"]
    assert "torch" in install["already_present"] and "trl" in install["already_present"]
    assert install["fix"].startswith("on a connected machine, in the repository: ../shared/tools/gpu-wheels.sh qknope")
    assert (site / "qkfake_mod" / "__init__.py").is_file() and not (site / "qkfake_other").exists()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["ok"] is False and summary["failed"] == ["install"]
    assert summary["steps"]["install"]["why"].startswith("missing: qknope")
    assert list(summary["steps"]) == ["install"]


def test_without_cuda_every_step_writes_its_json(tmp_path: Path) -> None:
    out = tmp_path / "gpu-check"
    proc = _run("--only", "env,doctor,pytest,bench", "--python", sys.executable, env={"OUT": str(out)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == {"cuda": False, "seconds": pytest.approx(0, abs=600),
                                                                 "ok": True, "failed": []}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["cuda"] is False and summary["ok"] is True
    steps = summary["steps"]
    assert steps["env"]["status"] == "ok" and steps["doctor"]["status"] == "ok"
    assert steps["pytest"] == {"status": "skipped", "exit_code": None, "seconds": 0, "result": "pytest-gpu.json",
                               "why": "no CUDA GPU"}
    assert steps["bench"]["status"] == "skipped" and steps["bench"]["result"] is None
    env = json.loads((out / "environment.json").read_text())
    assert env["cuda_available"] is False and env["torch"]
    doctor = json.loads((out / "doctor-gpu.json").read_text())
    assert doctor["cuda"] is False and doctor["checks"] == [] and doctor["failed"] == 0
    assert json.loads((out / "pytest-gpu.json").read_text()) == {"ran": False, "reason": "no CUDA GPU"}
    assert not (out / ".steps.tsv").exists()
