"""Run manifest: package versions, device, base source, quantisation, data hashes, times.

Written at the start of a run (status ``running``) and updated at the end
(``completed``/``preempted``/``failed``), so every run directory says what produced it.
"""

from __future__ import annotations

import json
import logging
import platform
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from qlora_kit.core.errors import QloraKitError
from qlora_kit.core.files import write_json_atomic
from qlora_kit.rundir import lock as runlock
from qlora_kit.rundir.layout import MANIFEST

log = logging.getLogger("qlora_kit")


PACKAGES = ("qlora-kit", "torch", "transformers", "peft", "bitsandbytes", "accelerate", "datasets", "trl",
            "safetensors", "tokenizers", "gguf")


def now_iso() -> str:
    """UTC time, ISO-8601, second precision."""
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat()


def package_versions() -> dict[str, str | None]:
    """Installed versions of the stack (None where a package is absent)."""
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    versions["cuda"] = torch.version.cuda
    return versions


def device_info(device: torch.device) -> dict[str, Any]:
    """What the run ran on."""
    info: dict[str, Any] = {"type": device.type, "platform": platform.platform(), "cpu_count": torch.get_num_threads()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(name=props.name, total_memory_bytes=props.total_memory,
                    capability=f"{props.major}.{props.minor}", bf16=torch.cuda.is_bf16_supported())
    else:
        info["name"] = platform.processor() or platform.machine()
    return info


def write_manifest(path: Path, manifest: dict[str, Any]) -> None:
    """Atomically (re)write manifest.json."""
    write_json_atomic(path, manifest)


def append_record(run_dir: Path, key: str, entry: dict[str, Any], command: str) -> bool:
    """Append ``entry`` to the list ``key`` of a finished run's manifest (e.g. where it was exported).

    Best effort under the run's exclusive lock, taken for this one write: a run another process is
    reading or writing, or a directory that cannot be written, is left as it is (a warning;
    returns False).  What was made is complete either way.
    """
    path = run_dir / MANIFEST
    try:
        with runlock.exclusive(run_dir, command):
            manifest = json.loads(path.read_text(encoding="utf-8"))
            manifest[key] = [*(manifest.get(key) or []), entry]
            write_manifest(path, manifest)
        return True
    except (OSError, ValueError, QloraKitError) as exc:
        log.warning("%s not recorded in %s: %s", key, path, exc)
        return False


# Sections a reader takes as JSON objects (``section.key`` for nested ones); anything else there is damage.
OBJECT_SECTIONS = ("base", "quant", "lora", "data", "memory", "distributed", "final_metrics", "adapter_files", "device",
                   "base.fingerprint", "lora.variant")


def manifest_damage(manifest: Any) -> str | None:
    """What is wrong with a parsed manifest's shape ("a JSON list, not an object", ...), or None when readers can use it."""
    if not isinstance(manifest, dict):
        return f"a JSON {type(manifest).__name__}, not an object"
    for dotted in OBJECT_SECTIONS:
        outer, _, inner = dotted.partition(".")
        value = manifest.get(outer)
        if inner and isinstance(value, dict):
            value = value.get(inner)
        elif inner:
            continue
        if value is not None and not isinstance(value, dict):
            return f"its {dotted} is a JSON {type(value).__name__}, not an object"
    if not isinstance(manifest.get("resumed") or [], list):
        return "its resumed is not a list"
    return None


def read_previous_manifest(path: Path) -> dict[str, Any]:
    """The manifest of a run being resumed, or {} when it is missing or damaged (said in a warning).

    A resume writes the manifest again from the run's settings and checkpoint; what the damaged one held
    (start time, resume history) is lost, nothing the training needs (the base fingerprint is in each checkpoint).
    """
    if not path.exists():
        return {}
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as exc:
        problem: str | None = f"not readable JSON: {type(exc).__name__}"
    else:
        problem = manifest_damage(manifest)
    if problem is None:
        return manifest
    if path not in _WARNED:
        _WARNED.add(path)
        log.warning("%s is damaged (%s): it is written again from this run's settings", path, problem)
    return {}


_WARNED: set[Path] = set()
