"""``qlora-kit doctor``: check the stack, with a verdict and a fix for every problem.

Checks: Python and package versions against the minimums qlora-kit declares, the torch
build (CUDA or CPU-only), the NVIDIA driver and GPUs (``nvidia-smi`` when present), bf16
support, the bitsandbytes backend (a tiny 4-bit matmul is run on the device and compared
with a dequantised reference), free GPU memory, and free disk where models, caches and
runs are written.  Each line is OK, WARN or FAIL; the exit status is 1 when anything
FAILs.  A machine without a GPU is a WARN, not a FAIL: planning, export, tests and tiny
models work on CPU.

Facts are gathered by ``gather_*`` functions and judged by pure ``judge_*`` functions, so
every verdict can be tested without the hardware it describes.
"""

from __future__ import annotations

import importlib.metadata as md
import json
import os
import platform
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qlora_kit.core.files import write_json_atomic

OK, WARN, FAIL = "OK", "WARN", "FAIL"
GiB = 1024**3
KEY_PACKAGES = ("torch", "transformers", "peft", "bitsandbytes", "trl", "accelerate", "datasets")


# Used only when qlora-kit's own metadata is unavailable (running from a source tree).
FALLBACK_MINIMUMS = {
    "torch": ">=2.4", "transformers": ">=5.0", "peft": ">=0.17", "bitsandbytes": ">=0.46", "trl": ">=0.20",
    "accelerate": ">=1.0", "datasets": ">=3.0",
}
MIN_PYTHON = (3, 10)
DISK_FAIL_BYTES = 2 * GiB  # cannot even save checkpoints
DISK_WARN_BYTES = 40 * GiB  # a 7B download (~15 GB) plus a merged fp16 export (~15 GB)
GPU_WARN_BYTES = 16 * GiB  # the configs/ recipes are sized for 24 GB cards
BUSY_FRACTION = 0.9  # warn when less than this fraction of the card is free
TORCH_CUDA_INDEX = "https://download.pytorch.org/whl/cu128"


@dataclass
class Check:
    """One line of the report."""

    name: str
    status: str
    detail: str
    fix: str = ""


def judge_python(version: tuple[int, int, int]) -> Check:
    """Python must be at least 3.10."""
    text = ".".join(map(str, version))
    if version[:2] >= MIN_PYTHON:
        return Check("python", OK, text)
    return Check("python", FAIL, f"{text} is too old", "use Python 3.10 or newer (3.11/3.12 recommended)")


def judge_package(name: str, installed: str | None, spec: str) -> Check:
    """An installed version inside the declared range is OK; missing or outside is FAIL."""
    from packaging.specifiers import SpecifierSet
    from packaging.version import InvalidVersion, Version

    wanted = f"{name}{spec}" if spec else name
    if installed is None:
        return Check(name, FAIL, f"not installed (need {spec or 'any version'})", f"pip install '{wanted}'")
    try:
        ok = not spec or SpecifierSet(spec).contains(Version(installed), prereleases=True)
    except InvalidVersion:
        return Check(name, WARN, f"{installed} (unparseable version; need {spec})", f"pip install '{wanted}'")
    if ok:
        return Check(name, OK, f"{installed} (need {spec})" if spec else installed)
    return Check(name, FAIL, f"{installed} does not satisfy {spec}", f"pip install '{wanted}'")


def judge_cuda(torch_cuda: str | None, available: bool, smi_gpus: list[dict[str, str]],
               device_count: int, in_container: bool = False) -> Check:
    """Is the GPU usable by torch, and if not, whose fault is it (build, driver, container)?"""
    driver = smi_gpus[0].get("driver_version", "?") if smi_gpus else None
    if available:
        return Check("cuda", OK, f"torch CUDA {torch_cuda}, driver {driver or 'unknown'}, {device_count} GPU(s)")
    rebuild = "rebuild the image on the CUDA base (docker/build.sh)"
    if torch_cuda is None and smi_gpus:
        return Check("cuda", FAIL, f"torch is a CPU-only build but {len(smi_gpus)} NVIDIA GPU(s) are present",
                     rebuild if in_container else f"pip install --force-reinstall torch --index-url {TORCH_CUDA_INDEX}")
    if smi_gpus:
        return Check("cuda", FAIL,
                     f"driver {driver} with torch CUDA {torch_cuda}: torch cannot use the GPU",
                     f"update the NVIDIA driver to one that supports CUDA {torch_cuda}, or install a torch build "
                     "for an older CUDA; in docker pass --gpus all; check CUDA_VISIBLE_DEVICES")
    if in_container:
        cpu_build = "" if torch_cuda else "; this image's torch is a CPU-only build"
        return Check("cuda", WARN, f"no GPU is visible in this container: CPU only (tiny models, plan, export){cpu_build}",
                     "start the container with `docker run --gpus all ...` (the host needs the NVIDIA driver and the "
                     "NVIDIA Container Toolkit)" + ("" if torch_cuda else f"; {rebuild}"))
    return Check("cuda", WARN, "no NVIDIA GPU found: CPU only (tiny models, plan, export, tests)",
                 "7B/8B training needs a CUDA GPU (24 GB): run on such a machine, or `docker run --gpus all`")


def in_container() -> bool:
    """True inside a Docker (/.dockerenv) or Podman (/run/.containerenv) container."""
    return Path("/.dockerenv").exists() or Path("/run/.containerenv").exists()


def judge_gpu(index: int, name: str, total: int, capability: tuple[int, int]) -> Check:
    """A card smaller than 16 GiB gets a warning; the shipped recipes assume 24 GB."""
    detail = f"{name}, {total / GiB:.1f} GiB, compute capability {capability[0]}.{capability[1]}"
    if total < GPU_WARN_BYTES:
        return Check(f"gpu {index}", WARN, detail + ": small for 7B/8B QLoRA",
                     f"check a config first: qlora-kit plan CONFIG --gpu-memory {total / GiB:.0f}")
    return Check(f"gpu {index}", OK, detail)


def judge_bf16(supported: bool) -> Check:
    """bf16 avoids the fp16 overflow that turns losses into NaN."""
    if supported:
        return Check("bf16", OK, "supported: compute in bfloat16")
    return Check("bf16", WARN, "not supported by this GPU (pre-Ampere): float16 compute is used, NaN losses possible",
                 "lower train.learning_rate and keep train.on_nonfinite=stop; an Ampere or newer GPU avoids this")


def judge_free_memory(index: int, free: int, total: int) -> Check:
    """Memory held by other processes shrinks what training can use."""
    detail = f"{free / GiB:.1f} of {total / GiB:.1f} GiB free"
    if free < BUSY_FRACTION * total:
        return Check(f"gpu {index} memory", WARN, detail + f" ({(total - free) / GiB:.1f} GiB used by others)",
                     "stop other GPU processes (see nvidia-smi); `qlora-kit plan CONFIG` here plans for what is free")
    return Check(f"gpu {index} memory", OK, detail)


def judge_bitsandbytes(version: str | None, backend: str, device: str, error: str | None, max_err: float | None,
                       on_gpu: bool) -> Check:
    """The 4-bit matmul must run on the training device; a CPU failure only matters for CPU runs."""
    name = "bitsandbytes 4-bit"
    if version is None:
        return Check(name, FAIL, "not importable", "pip install 'bitsandbytes>=0.46'")
    label = f"{version} ({backend} backend)"
    if error is None and max_err is not None and max_err < 1e-2:
        return Check(name, OK, f"{label}: 4-bit matmul works on {device}")
    problem = error or f"4-bit matmul differs from the dequantised reference by {max_err}"
    fix = "pip install --force-reinstall 'bitsandbytes>=0.46'; `python -m bitsandbytes` shows what failed to load"
    return Check(name, FAIL if on_gpu else WARN, f"{label}: {problem}", fix)


def judge_disk(label: str, path: Path, free: int) -> Check:
    """Free space where models, caches and runs are written."""
    detail = f"{free / GiB:.1f} GiB free at {path}"
    if free < DISK_FAIL_BYTES:
        return Check(f"disk: {label}", FAIL, detail, f"free space on {path}'s filesystem or move {label} elsewhere")
    if free < DISK_WARN_BYTES:
        return Check(f"disk: {label}", WARN, detail + " (a 7B download + merged export needs ~30 GB)",
                     f"free space, or point {_DISK_ENV.get(label, 'output_dir')} at a bigger disk")
    return Check(f"disk: {label}", OK, detail)


_DISK_ENV = {"HF cache": "HF_HOME", "qlora-kit cache": "QLORA_KIT_CACHE"}


def declared_requirements() -> dict[str, str]:
    """Package name -> version specifier, from qlora-kit's metadata (no extras)."""
    from packaging.requirements import Requirement

    try:
        raw = md.requires("qlora-kit") or []
    except md.PackageNotFoundError:
        return dict(FALLBACK_MINIMUMS)
    reqs = {}
    for line in raw:
        req = Requirement(line)
        if req.marker is not None and "extra" in str(req.marker):
            continue
        reqs[req.name.lower()] = str(req.specifier)
    return reqs


def installed_version(name: str) -> str | None:
    """Installed distribution version, or None."""
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return None


def gather_nvidia_smi() -> list[dict[str, str]]:
    """GPUs as nvidia-smi reports them; empty without nvidia-smi or on error."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return []
    fields = ["name", "driver_version", "memory.total", "memory.used"]
    try:
        out = subprocess.run([exe, f"--query-gpu={','.join(fields)}", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=15, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [dict(zip(fields, (p.strip() for p in line.split(",")))) for line in out.splitlines() if line.strip()]


def probe_bitsandbytes(device: str) -> dict[str, Any]:
    """Quantise a small matrix to NF4 and multiply with it on ``device``; report the error."""
    facts: dict[str, Any] = {"version": None, "backend": "?", "error": None, "max_err": None}
    try:
        import bitsandbytes as bnb
        import bitsandbytes.functional as bnbf
        import torch
    except Exception as exc:  # broken native libraries raise many types
        facts["error"] = f"{type(exc).__name__}: {exc}"
        return facts
    facts["version"] = bnb.__version__
    facts["backend"] = _bnb_backend()
    try:
        dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
        gen = torch.Generator().manual_seed(0)
        weight = torch.randn(128, 256, generator=gen).to(device=device, dtype=dtype)
        x = torch.randn(4, 256, generator=gen).to(device=device, dtype=dtype)
        packed, state = bnbf.quantize_4bit(weight, quant_type="nf4", compress_statistics=True)
        y = bnb.matmul_4bit(x, packed.t(), quant_state=state)
        ref = x @ bnbf.dequantize_4bit(packed, state).to(dtype).t()
        facts["max_err"] = float(((y.float() - ref.float()).abs().max() / ref.float().abs().max()).item())
    except Exception as exc:
        facts["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    return facts


def _bnb_backend() -> str:
    try:
        from bitsandbytes.cextension import BNB_BACKEND

        return str(BNB_BACKEND)
    except ImportError:
        return "unknown"


def disk_locations() -> dict[str, Path]:
    """Where qlora-kit writes: HF hub cache, its own cache (GGUF conversions), the current directory."""
    try:
        from huggingface_hub import constants

        hf = Path(constants.HF_HUB_CACHE)
    except ImportError:
        hf = Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface")) / "hub"
    own = os.environ.get("QLORA_KIT_CACHE")
    own_path = Path(own) if own else Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "qlora-kit"
    return {"HF cache": hf, "qlora-kit cache": own_path, "output (current dir)": Path.cwd()}


def existing_parent(path: Path) -> Path:
    """The path itself or its nearest existing ancestor (caches may not exist yet)."""
    p = path.expanduser().absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def collect_checks() -> list[Check]:
    """Run every check; never raises."""
    checks = [judge_python(sys.version_info[:3])]
    checks += package_checks()
    checks += gpu_checks()
    checks += disk_checks()
    return checks


def package_checks() -> list[Check]:
    """Key packages one line each; other declared dependencies only when they fail."""
    reqs = declared_requirements()
    checks = [judge_package(name, installed_version(name), reqs.get(name, "")) for name in KEY_PACKAGES]
    others = [judge_package(n, installed_version(n), spec) for n, spec in sorted(reqs.items()) if n not in KEY_PACKAGES]
    bad = [c for c in others if c.status != OK]
    if bad:
        return checks + bad
    return checks + [Check("other dependencies", OK, f"{len(others)} declared dependencies satisfied")]


def gpu_checks() -> list[Check]:
    """CUDA/driver, each GPU, bf16, free memory and the bitsandbytes 4-bit probe."""
    try:
        import torch
    except Exception as exc:
        return [Check("cuda", FAIL, f"torch cannot be imported: {exc}", "pip install 'torch>=2.4'")]
    smi = gather_nvidia_smi()
    available = bool(torch.cuda.is_available())
    count = torch.cuda.device_count() if available else 0
    checks = [judge_cuda(torch.version.cuda, available, smi, count, in_container())]
    for i in range(count):
        props = torch.cuda.get_device_properties(i)
        checks.append(judge_gpu(i, props.name, int(props.total_memory), (props.major, props.minor)))
        free, total = torch.cuda.mem_get_info(i)
        checks.append(judge_free_memory(i, int(free), int(total)))
    if available:
        checks.append(judge_bf16(bool(torch.cuda.is_bf16_supported())))
    device = "cuda:0" if available else "cpu"
    facts = probe_bitsandbytes(device)
    checks.append(judge_bitsandbytes(facts["version"], facts["backend"], device, facts["error"], facts["max_err"],
                                     on_gpu=available))
    return checks


def disk_checks() -> list[Check]:
    """Free space for each write location (one line per location)."""
    checks = []
    for label, path in disk_locations().items():
        where = existing_parent(path)
        try:
            free = shutil.disk_usage(where).free
        except OSError as exc:
            checks.append(Check(f"disk: {label}", WARN, f"cannot stat {where}: {exc}", "check the path's permissions"))
            continue
        checks.append(judge_disk(label, path, free))
    return checks


def verdict(checks: list[Check]) -> str:
    """One sentence summarising the checks."""
    fails = [c for c in checks if c.status == FAIL]
    warns = [c for c in checks if c.status == WARN]
    if fails:
        return f"{len(fails)} problem(s) must be fixed before training: " + ", ".join(c.name for c in fails)
    gpu = next((c for c in checks if c.name == "cuda"), None)
    if gpu is not None and gpu.status != OK:
        return "usable on CPU only (plan, export, tiny models); 7B/8B training needs a CUDA GPU"
    if warns:
        return "ready to train, with warnings: " + ", ".join(c.name for c in warns)
    return "ready to train"


def print_checks(checks: list[Check]) -> None:
    """Rich table of the checks, then the fixes and the verdict."""
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    colours = {OK: "green", WARN: "yellow", FAIL: "red"}
    console = Console(markup=False)  # details and fixes are text: `pip install ".[gguf]"` keeps its brackets
    table = Table(title=f"qlora-kit doctor ({platform.system()} {platform.machine()})")
    for col in ("check", "status", "detail"):
        table.add_column(col)
    for c in checks:
        table.add_row(c.name, Text(c.status, style=colours[c.status]), c.detail)
    console.print(table)
    for c in checks:
        if c.status != OK and c.fix:
            console.print(Text.assemble((c.status, colours[c.status]), f" {c.name}: fix: {c.fix}"))
    console.print(f"verdict: {verdict(checks)}")


def run_doctor(json_path: str | None = None) -> int:
    """``qlora-kit doctor``: print the report (and write it as JSON to ``json_path``, ``-``: stdout only);
    1 when any check FAILs, else 0."""
    checks = collect_checks()
    if json_path != "-":
        print_checks(checks)
    if json_path:
        document = {"command": "qlora-kit doctor", "verdict": verdict(checks),
                    "checks": [{"name": c.name, "status": c.status, "detail": c.detail, "fix": c.fix} for c in checks]}
        if json_path == "-":
            print(json.dumps(document, indent=2))
        else:
            Path(json_path).expanduser().parent.mkdir(parents=True, exist_ok=True)
            write_json_atomic(Path(json_path).expanduser(), document)
    return 1 if any(c.status == FAIL for c in checks) else 0
