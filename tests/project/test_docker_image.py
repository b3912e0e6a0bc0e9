"""The Docker image, built and run for real (marker ``docker``; `.ci/run` runs it when an engine is available).

Builds the image with ``docker/build.sh`` ($QLORA_KIT_DOCKER_BUILD, default ``--debian-base``: a
CPU image on a Debian base, Python packages from a host wheelhouse, no network in the build), then
runs it as the calling user (``--user $(id -u):$(id -g)``; when the tests run as root, an
unprivileged stand-in uid plays that user, so ownership is really checked) with ``--network none``,
a tiny model and the data read-only under /data and the output under /out:

train straight through; train again, ``docker stop`` it mid-run (checkpoint, exit 75) and
``--resume`` in a new container (the same adapter as the straight run); export; generate from the
export; every file on the host belongs to the calling user.  Also: ``doctor`` says plainly that no
GPU is visible, and an unwritable /out is a one-line error naming ``--user $(id -u):$(id -g)``.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import time
import uuid
from pathlib import Path

import pytest
from conftest import ROOT, arithmetic_rows, write_jsonl
from safetensors.torch import load_file

pytestmark = pytest.mark.docker


TAG = os.environ.get("QLORA_KIT_DOCKER_TAG", "qlora-kit:test")


STAND_IN_UID = 4242  # the "calling user" when the tests run as root


TRAIN = {"max_steps": 24, "save_steps": 6, "logging_steps": 1, "save_total_limit": 10, "learning_rate": 5e-3,
         "micro_batch_size": 4, "gradient_accumulation_steps": 1, "max_length": 64, "warmup_steps": 0,
         "optimizer": "adamw_torch", "seed": 0}


def engine_problem() -> str | None:
    """Why the image cannot be built and run here, or None."""
    if shutil.which("docker") is None:
        return "no docker CLI"
    res = subprocess.run(["docker", "info"], capture_output=True, text=True, timeout=60)
    if res.returncode != 0:
        return f"no Docker engine answers ({(res.stderr.strip().splitlines() or ['docker info failed'])[-1]})"
    return None


def build_problem(args: list[str]) -> str | None:
    """Why ``docker/build.sh ARGS`` cannot work here (missing prerequisites), or None."""
    base = "qlora-kit-base:bookworm"
    if "--debian-base" not in args or docker("image", "inspect", base).returncode == 0:
        return None
    if os.getuid() != 0:
        return f"--debian-base must make {base} with debootstrap, which needs root (or set QLORA_KIT_DOCKER_BUILD)"
    if shutil.which("debootstrap") is None:
        return "--debian-base needs debootstrap (apt-get install -y debootstrap)"
    return None


def docker(*args: str, timeout: float = 600, check: bool = False) -> subprocess.CompletedProcess[str]:
    res = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout)
    if check:
        assert res.returncode == 0, f"docker {' '.join(args)} -> {res.returncode}\n{res.stdout[-3000:]}{res.stderr[-3000:]}"
    return res


@pytest.fixture(scope="module")
def image() -> str:
    problem = engine_problem()
    if problem:
        pytest.skip(problem)
    args = shlex.split(os.environ.get("QLORA_KIT_DOCKER_BUILD", "--debian-base"))
    problem = build_problem(args)
    if problem:
        pytest.skip(problem)
    start = time.perf_counter()
    res = subprocess.run(["bash", str(ROOT / "docker" / "build.sh"), *args, "--tag", TAG], cwd=ROOT,
                         capture_output=True, text=True, timeout=3600)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    print(f"docker/build.sh {' '.join(args)}: {time.perf_counter() - start:.0f} s; {res.stdout.splitlines()[-1]}")
    return TAG


@pytest.fixture(scope="module")
def user() -> tuple[int, int]:
    """The calling user's uid:gid (a stand-in unprivileged one when running as root)."""
    return (os.getuid(), os.getgid()) if os.getuid() != 0 else (STAND_IN_UID, STAND_IN_UID)


@pytest.fixture(scope="module")
def mounts(tmp_path_factory: pytest.TempPathFactory, tiny_llama: Path, user: tuple[int, int]) -> dict[str, Path]:
    """/data (tiny model, rows, config; read-only in the container) and /out (owned by the calling user)."""
    root = tmp_path_factory.mktemp("docker")
    data, out = root / "data", root / "out"
    shutil.copytree(tiny_llama, data / "model")
    write_jsonl(data / "train.jsonl", arithmetic_rows(64))
    config = {"model": {"name_or_path": "/data/model"}, "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
              "data": {"path": "/data/train.jsonl", "val_fraction": 0.1}, "train": TRAIN, "output_dir": "/out/run"}
    (data / "cfg.yaml").write_text(json.dumps(config))  # JSON is YAML
    out.mkdir()
    os.chown(out, *user)
    for path in (root, data, *data.rglob("*")):
        path.chmod(path.stat().st_mode | 0o555 if path.is_dir() else path.stat().st_mode | 0o444)
    return {"data": data, "out": out}


def run_options(user: tuple[int, int], mounts: dict[str, Path]) -> list[str]:
    """``docker run`` options: no network, the calling user, /data read-only, /out writable."""
    return ["--network", "none", "--user", f"{user[0]}:{user[1]}",
            "-v", f"{mounts['data']}:/data:ro", "-v", f"{mounts['out']}:/out"]


def logged_steps(run: Path) -> int:
    metrics = run / "metrics.jsonl"
    return sum('"loss"' in line for line in metrics.read_text().splitlines()) if metrics.exists() else 0


def test_train_stop_resume_export_generate_as_the_calling_user(image: str, user: tuple[int, int],
                                                                  mounts: dict[str, Path]) -> None:
    out, opts = mounts["out"], run_options(user, mounts)
    res = docker("run", "--rm", *opts, image, "train", "/data/cfg.yaml", "--set", "output_dir=/out/straight",
                 timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]

    name = f"qlora-kit-test-{uuid.uuid4().hex[:8]}"
    docker("run", "-d", "--name", name, *opts, image, "train", "/data/cfg.yaml", check=True)
    try:
        deadline = time.time() + 600
        while logged_steps(out / "run") < 4:
            state = docker("inspect", "--format", "{{.State.Running}}", name).stdout.strip()
            assert state == "true", docker("logs", name).stderr[-3000:]
            assert time.time() < deadline, "training did not start in the container"
            time.sleep(0.2)
        docker("stop", "--time", "60", name, timeout=120, check=True)  # SIGTERM, then SIGKILL after 60 s
        code = docker("wait", name, check=True).stdout.strip()
        logs = docker("logs", name).stderr
    finally:
        docker("rm", "-f", "-v", name)
    assert code == "75", logs[-3000:]
    assert "stopped by SIGTERM" in logs and "Traceback" not in logs
    stopped_at = max(int(p.name.split("-")[1]) for p in (out / "run").glob("checkpoint-*"))
    assert stopped_at < TRAIN["max_steps"] and not (out / "run" / "adapter").exists()

    res = docker("run", "--rm", *opts, image, "train", "/data/cfg.yaml", "--resume", timeout=900)
    assert res.returncode == 0 and f"resumed from checkpoint-{stopped_at}" in res.stderr, res.stderr[-3000:]
    a = load_file(out / "straight" / "adapter" / "adapter_model.safetensors")
    b = load_file(out / "run" / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst <= 1e-6, f"the resumed adapter differs from the straight run's by {worst}"
    assert "--resume" in (out / "run" / "train.log").read_text()

    res = docker("run", "--rm", *opts, image, "export", "/out/run", "--out", "/out/export", timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    assert json.loads((out / "export" / "export_report.json").read_text())["verification"]["status"] == "passed"
    replies = []
    for model in ("/out/export", "/out/run"):  # the export and NF4 + adapter answer alike (greedy)
        res = docker("run", "--rm", *opts, image, "generate", model, "what is 2 + 3 ?", "--max-new-tokens", "8",
                     timeout=600)
        assert res.returncode == 0 and res.stdout.strip("\n"), res.stderr[-3000:]
        replies.append(res.stdout)
    assert replies[0] == replies[1]

    foreign = [str(p) for p in [out, *out.rglob("*")] if (p.lstat().st_uid, p.lstat().st_gid) != user]
    assert not foreign, f"files not owned by {user[0]}:{user[1]}: {foreign[:5]}"


def test_doctor_says_no_gpu_is_visible(image: str, user: tuple[int, int]) -> None:
    res = docker("run", "--rm", "--network", "none", "--user", f"{user[0]}:{user[1]}", image, "doctor", timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    text = " ".join(res.stdout.split())
    assert "no GPU is visible in this container" in text and "--gpus all" in text


def test_unwritable_output_is_one_line_naming_docker_user(image: str, user: tuple[int, int],
                                                          mounts: dict[str, Path], tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)  # nobody but root may write: the uid in the container is not root
    res = docker("run", "--rm", "--network", "none", "--user", f"{user[0]}:{user[1]}",
                 "-v", f"{mounts['data']}:/data:ro", "-v", f"{locked}:/out", image, "train", "/data/cfg.yaml",
                 timeout=300)
    assert res.returncode == 2, res.stderr[-3000:]
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert lines[-2].startswith("error: output_dir /out/run is not writable") and "Traceback" not in res.stderr
    assert lines[-1].startswith("fix: ") and "--user $(id -u):$(id -g)" in lines[-1]
    assert not list(locked.iterdir())
