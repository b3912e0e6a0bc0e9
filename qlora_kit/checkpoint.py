"""Atomic, pickle-free training checkpoints: ``output_dir/checkpoint-<step>/``.

A checkpoint holds everything an exact resume needs — adapter weights, optimizer and
scheduler state, RNG states (python, numpy, torch, CUDA), the data position and the
resolved config — as safetensors + JSON only (no pickle, so loading runs no code).

It is written into a temporary sibling directory, every file fsync'ed, then renamed into
place in one step; ``state.json`` is written last.  A directory is a complete checkpoint
only when its name is ``checkpoint-<step>`` and ``state.json`` exists, so a process killed
mid-write leaves at most a ``.tmp-checkpoint-*`` directory that is never mistaken for one
and is cleaned up on the next start.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from qlora_kit.rundir import CHECKPOINT_PREFIX

ADAPTER_FILE = "adapter_model.safetensors"
OPTIMIZER_TENSORS = "optimizer.safetensors"
OPTIMIZER_JSON = "optimizer.json"
RNG_TENSORS = "rng.safetensors"
VARIANT_TENSORS = "variant.safetensors"  # adapter-variant state beyond weights (AdaLoRA importance averages)
STATE_JSON = "state.json"  # written last: its presence marks a complete checkpoint
_TMP_PREFIX = ".tmp-" + CHECKPOINT_PREFIX
_CKPT = re.compile(rf"^{re.escape(CHECKPOINT_PREFIX)}(\d+)$")


# --------------------------------------------------------------------------- pickle-free state


def flatten_state(obj: Any, prefix: str = "s") -> tuple[dict[str, torch.Tensor], Any]:
    """Split a nested state (dicts, lists, tuples, tensors, scalars) into tensors + a JSON skeleton."""
    tensors: dict[str, torch.Tensor] = {}

    def walk(node: Any, path: str) -> Any:
        if isinstance(node, torch.Tensor):
            tensors[path] = node.detach().to("cpu").contiguous().clone()
            return {"__tensor__": path}
        if isinstance(node, dict):
            return {"__dict__": [[k, walk(v, f"{path}.{k}")] for k, v in node.items()]}
        if isinstance(node, tuple):
            return {"__tuple__": [walk(v, f"{path}.{i}") for i, v in enumerate(node)]}
        if isinstance(node, list):
            return [walk(v, f"{path}.{i}") for i, v in enumerate(node)]
        if isinstance(node, np.ndarray):
            return {"__ndarray__": node.tolist(), "dtype": str(node.dtype)}
        if isinstance(node, (np.integer, np.floating)):
            return node.item()
        if node is None or isinstance(node, (bool, int, float, str)):
            return node
        raise TypeError(f"cannot store {type(node).__name__} at {path} in a checkpoint")

    return tensors, walk(obj, prefix)


def unflatten_state(skeleton: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of :func:`flatten_state`."""
    if isinstance(skeleton, list):
        return [unflatten_state(v, tensors) for v in skeleton]
    if isinstance(skeleton, dict):
        if "__tensor__" in skeleton:
            return tensors[skeleton["__tensor__"]]
        if "__dict__" in skeleton:
            return {k: unflatten_state(v, tensors) for k, v in skeleton["__dict__"]}
        if "__tuple__" in skeleton:
            return tuple(unflatten_state(v, tensors) for v in skeleton["__tuple__"])
        if "__ndarray__" in skeleton:
            return np.array(skeleton["__ndarray__"], dtype=skeleton["dtype"])
    return skeleton


def rng_state() -> dict[str, Any]:
    """Every RNG a training step touches."""
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()  # the training device only (cuda:0)
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore the RNGs saved by :func:`rng_state`."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np.random.set_state(tuple(state["numpy"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# --------------------------------------------------------------------------- atomic writing


def fsync_dir(path: Path) -> None:
    """Flush a directory entry (so a rename survives a power cut)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(path: Path) -> None:
    """fsync every file below ``path`` and the directories themselves."""
    for root, _dirs, files in os.walk(path):
        for name in files:
            with open(Path(root) / name, "rb") as fh:
                os.fsync(fh.fileno())
        fsync_dir(Path(root))


def read_json(path: Path) -> dict[str, Any]:
    """A JSON file's content, or {} when it is missing or unreadable."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON via a temporary file + rename, so readers never see half a file."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(data, fh, indent=2, default=str)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def publish_dir(tmp: Path, final: Path) -> None:
    """fsync ``tmp`` and rename it to ``final`` (replacing an older ``final`` safely)."""
    fsync_tree(tmp)
    old = None
    if final.exists():
        old = final.with_name(f".old-{final.name}-{os.getpid()}")
        os.rename(final, old)
    os.rename(tmp, final)
    fsync_dir(final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# --------------------------------------------------------------------------- checkpoints


def save_adapter(model: torch.nn.Module, directory: Path) -> None:
    """Save the peft adapter (safetensors + adapter_config.json) into ``directory``."""
    model.save_pretrained(directory, safe_serialization=True)


def save_checkpoint(
    output_dir: Path,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    state: dict[str, Any],
    config_text: str,
    variant_tensors: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write ``checkpoint-<step>`` atomically and return its path."""
    final = output_dir / f"{CHECKPOINT_PREFIX}{step}"
    tmp = output_dir / f"{_TMP_PREFIX}{step}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_adapter(model, tmp)
    opt_tensors, opt_skeleton = flatten_state(optimizer.state_dict(), "opt")
    save_file(opt_tensors, str(tmp / OPTIMIZER_TENSORS))
    rng_tensors, rng_skeleton = flatten_state(rng_state(), "rng")
    save_file(rng_tensors, str(tmp / RNG_TENSORS))
    if variant_tensors:
        save_file({k: v.detach().cpu().contiguous() for k, v in variant_tensors.items()}, str(tmp / VARIANT_TENSORS))
    (tmp / OPTIMIZER_JSON).write_text(json.dumps(opt_skeleton))
    (tmp / "config.yaml").write_text(config_text)
    full_state = {
        **state,
        "step": step,
        "scheduler": scheduler.state_dict(),
        "rng": rng_skeleton,
    }
    (tmp / STATE_JSON).write_text(json.dumps(full_state, indent=2))
    publish_dir(tmp, final)
    return final


def list_checkpoints(output_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints, oldest first."""
    found = []
    if output_dir.is_dir():
        for child in output_dir.iterdir():
            m = _CKPT.match(child.name)
            if m and child.is_dir() and (child / STATE_JSON).is_file():
                found.append((int(m.group(1)), child))
    return sorted(found)


def latest_checkpoint(output_dir: Path) -> Path | None:
    """The newest complete checkpoint, or None."""
    found = list_checkpoints(output_dir)
    return found[-1][1] if found else None


def remove_incomplete(output_dir: Path) -> list[Path]:
    """Delete leftovers of interrupted checkpoint writes; return what was removed."""
    removed = []
    if output_dir.is_dir():
        for child in output_dir.iterdir():
            if child.name.startswith((_TMP_PREFIX, ".old-" + CHECKPOINT_PREFIX)) and child.is_dir():
                shutil.rmtree(child, ignore_errors=True)
                removed.append(child)
    return removed


def prune_checkpoints(output_dir: Path, keep: int) -> None:
    """Keep the newest ``keep`` complete checkpoints."""
    for _step, path in list_checkpoints(output_dir)[:-keep]:
        shutil.rmtree(path, ignore_errors=True)


def read_checkpoint_state(path: Path) -> dict[str, Any]:
    """The JSON state of a checkpoint (step, data position, scheduler, rng skeleton, ...)."""
    return json.loads((path / STATE_JSON).read_text())


def load_checkpoint(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any) -> dict:
    """Restore adapter weights, optimizer, scheduler and RNGs in place; return the JSON state.

    The adapter weights are loaded into the adapters already attached to ``model`` (never a
    second set of adapters).
    """
    from peft import set_peft_model_state_dict

    state = read_checkpoint_state(path)
    device = next(p.device for p in model.parameters() if p.requires_grad)
    adapter = load_file(str(path / ADAPTER_FILE), device=str(device))
    result = set_peft_model_state_dict(model, adapter)
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise RuntimeError(f"checkpoint {path} has adapter tensors this model lacks: {unexpected[:5]}")
    opt_tensors = load_file(str(path / OPTIMIZER_TENSORS))
    opt_state = unflatten_state(json.loads((path / OPTIMIZER_JSON).read_text()), opt_tensors)
    optimizer.load_state_dict(opt_state)
    scheduler.load_state_dict(state["scheduler"])
    set_rng_state(unflatten_state(state["rng"], load_file(str(path / RNG_TENSORS))))
    return state


def read_variant_tensors(path: Path) -> dict[str, torch.Tensor]:
    """The adapter-variant tensors of a checkpoint ({} when it has none)."""
    file = path / VARIANT_TENSORS
    return load_file(str(file)) if file.is_file() else {}
