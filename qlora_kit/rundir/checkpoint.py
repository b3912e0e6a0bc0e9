"""Atomic, pickle-free training checkpoints: ``output_dir/checkpoint-<step>/``.

A checkpoint holds everything an exact resume needs — adapter weights, optimizer and
scheduler state, RNG states (python, numpy, torch, CUDA), the data position and the
resolved config — as safetensors + JSON only (no pickle, so loading runs no code).

It is written into a temporary sibling directory, every file fsync'ed, then renamed into
place in one step; ``state.json`` is written last.  A directory is a complete checkpoint
only when its name is ``checkpoint-<step>`` and ``state.json`` exists, so a process killed
mid-write leaves at most a ``.tmp-checkpoint-*`` directory that is never mistaken for one
and is cleaned up on the next start.  Pruning renames a checkpoint to ``.old-checkpoint-*``
before deleting it, so a kill during pruning never leaves a half-deleted ``checkpoint-<step>``.

Integrity: ``state.json`` lists every other file with its size and sha256, and carries the
sha256 of its own content (``state_sha256``).  :func:`verify_checkpoint` checks all of it,
:func:`load_checkpoint` then parses and validates every part in memory before applying any
of it; whatever does not verify or parse raises :class:`CorruptCheckpoint`, and the
recipe (``train.resume``) falls back to the checkpoint before.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from qlora_kit.core.files import publish_dir
from qlora_kit.rundir.integrity import CorruptCheckpoint, file_hashes, verify_files
from qlora_kit.rundir.layout import CHECKPOINT_PREFIX

ADAPTER_FILE = "adapter_model.safetensors"
OPTIMIZER_TENSORS = "optimizer.safetensors"
OPTIMIZER_JSON = "optimizer.json"
RNG_TENSORS = "rng.safetensors"
VARIANT_TENSORS = "variant.safetensors"  # adapter-variant state beyond weights (AdaLoRA importance averages)
STATE_JSON = "state.json"  # written last: its presence marks a complete checkpoint
RANK_PREFIX = "rank"  # rank<r>.safetensors/.json: RNG (and FSDP optimizer shard) of rank r > 0
_TMP_PREFIX = ".tmp-" + CHECKPOINT_PREFIX
_OLD_PREFIX = ".old-" + CHECKPOINT_PREFIX
_CKPT = re.compile(rf"^{re.escape(CHECKPOINT_PREFIX)}(\d+)$")
CORRUPT_SUFFIX = ".corrupt"


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


def save_adapter(model: torch.nn.Module, directory: Path, state_dict: dict[str, torch.Tensor] | None = None) -> None:
    """Save the peft adapter (safetensors + adapter_config.json) into ``directory``.

    ``state_dict``: the adapter weights when ``model`` does not hold them whole (FSDP shards).
    Only the trained adapter ("default"): a frozen reference adapter (DPO from ``model.adapter``) is not saved.
    """
    if state_dict is None:
        model.save_pretrained(directory, safe_serialization=True, selected_adapters=["default"])
    else:
        model.save_pretrained(directory, safe_serialization=True, state_dict=state_dict,
                              selected_adapters=["default"])


def save_checkpoint(
    output_dir: Path,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    state: dict[str, Any],
    config_text: str,
    rank_states: list[dict[str, Any]] | None = None,
    adapter_state: dict[str, torch.Tensor] | None = None,
    variant_tensors: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write ``checkpoint-<step>`` atomically and return its path; on any failure nothing is left behind.

    Multi-process runs (written by rank 0): ``rank_states`` holds every rank's contribution
    (``rng``, and under FSDP its ``optimizer`` shard); ranks above 0 get ``rank<r>.safetensors``
    + ``rank<r>.json``, listed and hashed in ``state.json`` like every other file.
    ``adapter_state``: the gathered adapter (see :func:`save_adapter`).  ``variant_tensors``:
    a LoRA variant's own state (AdaLoRA's importance scores), in ``variant.safetensors``.
    """
    final = output_dir / f"{CHECKPOINT_PREFIX}{step}"
    tmp = output_dir / f"{_TMP_PREFIX}{step}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        save_adapter(model, tmp, adapter_state)
        own = rank_states[0] if rank_states else {}
        opt_tensors, opt_skeleton = flatten_state(own.get("optimizer") or optimizer.state_dict(), "opt")
        save_file(opt_tensors, str(tmp / OPTIMIZER_TENSORS))
        rng_tensors, rng_skeleton = flatten_state(own.get("rng") or rng_state(), "rng")
        save_file(rng_tensors, str(tmp / RNG_TENSORS))
        if variant_tensors:
            save_file({k: v.detach().cpu().contiguous() for k, v in variant_tensors.items()},
                      str(tmp / VARIANT_TENSORS))
        (tmp / OPTIMIZER_JSON).write_text(json.dumps(opt_skeleton))
        for rank, extra in enumerate(rank_states or []):
            if rank:
                tensors, skeleton = flatten_state(extra, f"rank{rank}")
                save_file(tensors, str(tmp / f"{RANK_PREFIX}{rank}.safetensors"))
                (tmp / f"{RANK_PREFIX}{rank}.json").write_text(json.dumps(skeleton))
        (tmp / "config.yaml").write_text(config_text)
        full_state = {
            **state,
            "step": step,
            "scheduler": scheduler.state_dict(),
            "rng": rng_skeleton,
            "files": file_hashes(tmp),
        }
        full_state["state_sha256"] = _state_digest(full_state)
        (tmp / STATE_JSON).write_text(json.dumps(full_state, indent=2))
        publish_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _state_digest(state: dict[str, Any]) -> str:
    body = {k: v for k, v in state.items() if k != "state_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def checkpoint_bytes(path: Path) -> int:
    """Bytes a checkpoint occupies (used to predict the next one)."""
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


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
    """Delete leftovers of interrupted checkpoint writes or prunes; return what was removed.

    That is ``.tmp-checkpoint-*`` and ``.old-checkpoint-*`` directories, and ``checkpoint-<step>``
    directories without ``state.json`` (never complete, e.g. from older versions killed while pruning).
    """
    removed = []
    if output_dir.is_dir():
        for child in output_dir.iterdir():
            leftover = child.name.startswith((_TMP_PREFIX, _OLD_PREFIX))
            unfinished = bool(_CKPT.match(child.name)) and not (child / STATE_JSON).is_file()
            if (leftover or unfinished) and child.is_dir() and not child.is_symlink():
                shutil.rmtree(child, ignore_errors=True)
                removed.append(child)
    return removed


def prune_checkpoints(output_dir: Path, keep: int) -> None:
    """Keep the newest ``keep`` complete checkpoints; each is renamed away before it is deleted."""
    for _step, path in list_checkpoints(output_dir)[:-keep]:
        doomed = path.with_name(f"{_OLD_PREFIX}{path.name.removeprefix(CHECKPOINT_PREFIX)}-{os.getpid()}")
        os.rename(path, doomed)
        shutil.rmtree(doomed, ignore_errors=True)


def set_aside(path: Path) -> Path:
    """Rename a checkpoint that does not verify to ``checkpoint-<step>.corrupt[-n]`` (kept for inspection)."""
    target = path.with_name(path.name + CORRUPT_SUFFIX)
    n = 1
    while target.exists():
        n += 1
        target = path.with_name(f"{path.name}{CORRUPT_SUFFIX}-{n}")
    os.rename(path, target)
    return target


def checkpoint_step(path: Path) -> int:
    """The step in a ``checkpoint-<step>`` name."""
    m = _CKPT.match(path.name)
    if m is None:
        raise ValueError(f"{path} is not a checkpoint directory")
    return int(m.group(1))


def read_checkpoint_state(path: Path) -> dict[str, Any]:
    """The JSON state of a checkpoint (step, data position, scheduler, rng skeleton, file list, ...).

    Raises:
        CorruptCheckpoint: state.json is missing, not UTF-8 JSON, or not an object.
    """
    try:
        state = json.loads((path / STATE_JSON).read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise CorruptCheckpoint(f"{STATE_JSON} is missing") from exc
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise CorruptCheckpoint(f"{STATE_JSON} is not readable JSON") from exc
    if not isinstance(state, dict):
        raise CorruptCheckpoint(f"{STATE_JSON} holds a {type(state).__name__}, not an object")
    return state


def verify_checkpoint(path: Path) -> dict[str, Any]:
    """Check ``state.json``'s own digest and the size and sha256 of every file it lists; return the state.

    Checkpoints written before file lists existed are accepted unverified (their parts are still
    validated when loaded).

    Raises:
        CorruptCheckpoint: naming the first file that is missing, of the wrong size or content.
    """
    state = read_checkpoint_state(path)
    files = state.get("files")
    if files is None and "state_sha256" not in state:
        return state  # written by an older qlora-kit
    if state.get("state_sha256") != _state_digest(state):
        raise CorruptCheckpoint(f"{STATE_JSON} was modified after it was written (its digest does not match)")
    if not isinstance(files, dict) or not files:
        raise CorruptCheckpoint(f"{STATE_JSON} has no list of files")
    verify_files(path, files)
    return state


@dataclass
class _Parts:
    """A checkpoint read into memory and validated, not yet applied."""

    state: dict[str, Any]
    adapter: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    rng: dict[str, Any]


def read_checkpoint(path: Path, scheduler: Any) -> _Parts:
    """Verify, then read and validate every part of a checkpoint (nothing is applied yet).

    Raises:
        CorruptCheckpoint: a file does not verify, does not parse, or has the wrong structure.
    """
    state = verify_checkpoint(path)
    for key in ("step", "micro_index"):
        if not isinstance(state.get(key), int) or isinstance(state.get(key), bool) or state[key] < 0:
            raise CorruptCheckpoint(f"{STATE_JSON} has no valid {key!r}")
    _check_scheduler_state(state.get("scheduler"), scheduler.state_dict())
    adapter = _load_tensors(path / ADAPTER_FILE)
    optimizer = _parse_skeleton(path, OPTIMIZER_JSON, _load_tensors(path / OPTIMIZER_TENSORS))
    if not isinstance(optimizer, dict) or not isinstance(optimizer.get("state"), dict) \
            or not isinstance(optimizer.get("param_groups"), list):
        raise CorruptCheckpoint(f"{OPTIMIZER_JSON} is not an optimizer state (state, param_groups)")
    try:
        rng = unflatten_state(state["rng"], _load_tensors(path / RNG_TENSORS))
    except (KeyError, TypeError, ValueError, RecursionError) as exc:
        raise CorruptCheckpoint("the RNG state in state.json does not match rng.safetensors") from exc
    if not isinstance(rng, dict) or not {"python", "numpy", "torch"} <= set(rng):
        raise CorruptCheckpoint(f"{STATE_JSON} has no complete RNG state")
    return _Parts(state, adapter, optimizer, rng)


def _check_scheduler_state(saved: Any, fresh: dict[str, Any]) -> None:
    if not isinstance(saved, dict):
        raise CorruptCheckpoint(f"the scheduler state in {STATE_JSON} is a {type(saved).__name__}, not an object")
    if set(saved) != set(fresh):
        raise CorruptCheckpoint(f"the scheduler state in {STATE_JSON} has keys {sorted(saved)[:6]}, "
                                f"expected {sorted(fresh)[:6]}")
    for key, value in fresh.items():
        if type(saved[key]) is not type(value) and not (isinstance(value, float) and isinstance(saved[key], int)):
            raise CorruptCheckpoint(f"the scheduler state in {STATE_JSON} has a {type(saved[key]).__name__} "
                                    f"for {key!r}")


def _load_tensors(file: Path) -> dict[str, torch.Tensor]:
    if not file.is_file():
        raise CorruptCheckpoint(f"{file.name} is missing")
    try:
        return load_file(str(file))
    except Exception as exc:  # safetensors raises its own error types for truncated/garbled files
        raise CorruptCheckpoint(f"{file.name} is not a readable safetensors file") from exc


def _parse_skeleton(path: Path, name: str, tensors: dict[str, torch.Tensor]) -> Any:
    try:
        skeleton = json.loads((path / name).read_text(encoding="utf-8"))
        return unflatten_state(skeleton, tensors)
    except FileNotFoundError as exc:
        raise CorruptCheckpoint(f"{name} is missing") from exc
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, RecursionError) as exc:
        raise CorruptCheckpoint(f"{name} is not a valid state description") from exc


def load_adapter_weights(path: Path, model: torch.nn.Module, adapter: dict[str, torch.Tensor] | None = None) -> None:
    """Load a checkpoint's adapter into the adapters already attached to ``model`` (never a second set).

    ``adapter``: tensors already read and verified (:func:`read_checkpoint`); else the checkpoint
    is verified and its adapter read here.

    Raises:
        CorruptCheckpoint: the checkpoint does not verify, or its adapter does not match the model's.
    """
    from peft import set_peft_model_state_dict

    if adapter is None:
        verify_checkpoint(path)
        adapter = _load_tensors(path / ADAPTER_FILE)
    expected = {k for k, p in model.named_parameters() if p.requires_grad}
    device = next(p.device for p in model.parameters() if p.requires_grad)
    try:
        result = set_peft_model_state_dict(model, {k: v.to(device) for k, v in adapter.items()})
    except (ValueError, KeyError, TypeError, IndexError, RuntimeError) as exc:
        raise CorruptCheckpoint(f"its adapter does not fit this model ({str(exc).splitlines()[0][:150]})") from exc
    unexpected = getattr(result, "unexpected_keys", [])
    missing = [k for k in getattr(result, "missing_keys", []) if k in expected]
    if unexpected or missing:
        raise CorruptCheckpoint(f"{ADAPTER_FILE} does not match this model's adapters "
                                f"(unexpected {unexpected[:3]}, missing {missing[:3]})")


def load_checkpoint(path: Path, model: torch.nn.Module | None, optimizer: torch.optim.Optimizer, scheduler: Any,
                    rank: int = 0) -> dict:
    """Restore adapter weights, optimizer, scheduler and RNGs in place; return the JSON state.

    Everything is verified and parsed before anything is applied.  ``model`` None: the adapter
    was loaded already (:func:`load_adapter_weights`; FSDP loads it before sharding).
    ``rank`` > 0 restores that rank's own RNG states (and optimizer shard, when the checkpoint
    holds one per rank).

    Raises:
        CorruptCheckpoint: the checkpoint does not verify, parse, or fit this model/optimizer.
    """
    parts = read_checkpoint(path, scheduler)
    own: dict[str, Any] = {}
    if rank:
        own = _parse_skeleton(path, f"{RANK_PREFIX}{rank}.json", _load_tensors(path / f"{RANK_PREFIX}{rank}.safetensors"))
        if not isinstance(own, dict) or "rng" not in own:
            raise CorruptCheckpoint(f"{RANK_PREFIX}{rank}.json holds no RNG state for rank {rank}")
    if model is not None:
        load_adapter_weights(path, model, parts.adapter)
    try:
        optimizer.load_state_dict(own.get("optimizer") or parts.optimizer)
        scheduler.load_state_dict(parts.state["scheduler"])
        set_rng_state(own["rng"] if rank else parts.rng)
    except (ValueError, KeyError, TypeError, IndexError, RuntimeError) as exc:
        raise CorruptCheckpoint(f"it does not fit this model or optimizer ({str(exc).splitlines()[0][:150]})") from exc
    return parts.state


def read_variant_tensors(path: Path) -> dict[str, torch.Tensor]:
    """The adapter-variant tensors of a checkpoint ({} when it has none; verified with the checkpoint).

    Raises:
        CorruptCheckpoint: the file is not a readable safetensors file.
    """
    file = path / VARIANT_TENSORS
    return _load_tensors(file) if file.is_file() else {}
