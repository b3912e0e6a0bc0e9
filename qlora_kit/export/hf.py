"""The HF writer: merged tensors → safetensors shards (+ index), config, generation config, tokenizer.

Each output shard is written tensor by tensor behind a header computed up front from the
plan, so the shard size costs no memory.  The directory it fills is the staging directory
of ``publish``; the result loads with plain ``transformers`` (no qlora-kit, no peft).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from qlora_kit.core.safetensors import safetensors_dtype
from qlora_kit.export.merge import Job, MergeContext, Plan, WeightStats, stream_weights
from qlora_kit.inference.chat import eos_token_ids
from qlora_kit.model.base import load_saved_tokenizer
from qlora_kit.rundir import finished
from qlora_kit.rundir import layout as rundir

DEFAULT_SHARD_BYTES = 2 * 1024**3


class ShardWriter:
    """Write one safetensors file tensor by tensor: the header (from the plan) first, then the data in order."""

    def __init__(self, path: Path, jobs: list[Job]):
        self.path = path
        self.expected = [(j.src.name, j.out_dtype, j.src.shape, j.out_bytes) for j in jobs]
        self.position = 0
        header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for name, dtype, shape, nbytes in self.expected:
            header[name] = {"dtype": safetensors_dtype(dtype), "shape": shape,
                            "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self.fh = open(path, "wb")
        self.fh.write(len(raw).to_bytes(8, "little"))
        self.fh.write(raw)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Append the next tensor (must be the next one of the plan, same dtype and shape)."""
        want_name, want_dtype, want_shape, want_bytes = self.expected[self.position]
        if name != want_name or tensor.dtype != want_dtype or list(tensor.shape) != want_shape:
            raise RuntimeError(f"shard writer expected {want_name} {want_dtype} {want_shape}, "
                               f"got {name} {tensor.dtype} {list(tensor.shape)}")
        data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
        assert data.nbytes == want_bytes
        self.fh.write(memoryview(data))
        self.position += 1

    def close(self) -> None:
        """Flush to disk; raise when tensors are missing."""
        if self.position != len(self.expected):
            raise RuntimeError(f"{self.path.name}: wrote {self.position} of {len(self.expected)} tensors")
        self.fh.flush()
        os.fsync(self.fh.fileno())
        self.fh.close()

    def abort(self) -> None:
        self.fh.close()


def assign_shards(jobs: list[Job], max_bytes: int) -> list[list[Job]]:
    """Split the jobs, in order, into groups of at most ``max_bytes`` (a larger tensor gets its own shard)."""
    groups: list[list[Job]] = [[]]
    used = 0
    for job in jobs:
        if used and used + job.out_bytes > max_bytes:
            groups.append([])
            used = 0
        groups[-1].append(job)
        used += job.out_bytes
    return groups


def shard_names(count: int) -> list[str]:
    """``model.safetensors``, or ``model-0000i-of-0000n.safetensors`` for several shards."""
    if count == 1:
        return ["model.safetensors"]
    return [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


class _Shards:
    """Route each merged tensor to its shard, opening the next file when a shard is full."""

    def __init__(self, staging: Path, groups: list[list[Job]], names: list[str]):
        self.staging, self.groups, self.names = staging, groups, names
        self.shard_of = {id(job): i for i, group in enumerate(groups) for job in group}
        self.index = -1
        self.writer: ShardWriter | None = None

    def write(self, job: Job, tensor: torch.Tensor) -> int:
        shard = self.shard_of[id(job)]
        if shard != self.index:
            self.close()
            self.index = shard
            self.writer = ShardWriter(self.staging / self.names[shard], self.groups[shard])
        assert self.writer is not None
        self.writer.write(job.src.name, tensor)
        return tensor.numel() * tensor.element_size()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    def abort(self) -> None:
        if self.writer is not None:
            self.writer.abort()


def write_weights(plan: Plan, staging: Path, ctx: MergeContext, show_progress: bool = True,
                  max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> tuple[WeightStats, list[str]]:
    """Stream every merged tensor into safetensors shards (plus the index); return (stats, shard names).

    Raises:
        ModelError: an adapter tensor was never used, or a merged tensor is not finite.
    """
    groups = assign_shards(plan.jobs, max_shard_bytes)
    names = shard_names(len(groups))
    shards = _Shards(staging, groups, names)
    try:
        stats = stream_weights(plan, ctx, shards.write, show_progress, f"merging into {len(names)} safetensors file(s)")
        shards.close()
    except BaseException:
        shards.abort()
        raise
    stats.largest_shard_bytes = max(sum(j.out_bytes for j in group) for group in groups)
    if len(names) > 1:
        index = {"metadata": {"total_size": plan.total_bytes},
                 "weight_map": {j.src.name: names[i] for i, group in enumerate(groups) for j in group}}
        (staging / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return stats, names


def write_model_files(run: finished.RunInfo, staging: Path, dtype_name: str) -> list[int]:
    """config.json (no quantisation, export dtype), generation_config.json, tokenizer; return the EOS ids."""
    from transformers import AutoConfig

    trust = run.config.model.trust_remote_code
    config = AutoConfig.from_pretrained(run.source_dir, trust_remote_code=trust)
    if getattr(config, "quantization_config", None) is not None:
        del config.quantization_config
    config.dtype = dtype_name
    config.use_cache = True
    config.save_pretrained(staging)
    for path in (run.run_dir / rundir.TOKENIZER).iterdir():
        if path.is_file():
            shutil.copy2(path, staging / path.name)
    for code in run.source_dir.glob("*.py"):  # remote-code architectures need their modelling files
        shutil.copy2(code, staging / code.name)
    tokenizer = load_saved_tokenizer(run.run_dir / rundir.TOKENIZER, trust)
    gen, eos = export_generation_config(run, tokenizer)
    gen.save_pretrained(staging)
    return eos


def export_generation_config(run: finished.RunInfo, tokenizer: Any) -> tuple[Any, list[int]]:
    """The base's generation config with EOS = tokenizer EOS ∪ template end-of-turn ∪ base EOS (and pad/bos)."""
    from transformers import AutoConfig, GenerationConfig

    try:
        gen = GenerationConfig.from_pretrained(run.source_dir)
    except OSError:
        config = AutoConfig.from_pretrained(run.source_dir, trust_remote_code=run.config.model.trust_remote_code)
        gen = GenerationConfig.from_model_config(config)
    eos = eos_token_ids(tokenizer, gen.eos_token_id)
    gen.eos_token_id = eos[0] if len(eos) == 1 else eos
    gen._from_model_config = False  # else transformers may rebuild it from config.json and drop the EOS list
    if tokenizer.pad_token_id is not None:
        gen.pad_token_id = tokenizer.pad_token_id
    if tokenizer.bos_token_id is not None:
        gen.bos_token_id = tokenizer.bos_token_id
    return gen, eos
