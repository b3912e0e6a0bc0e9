"""The merge both export formats are written from: NF4-exact base + adapter delta, one tensor at a time.

Data path, one source tensor at a time::

    base safetensors ──► quantised linear?  NF4 quantise → dequantise exactly as the training loader
                                             did (bitsandbytes, the manifest's quant spec: quant type,
                                             blocksize, double quant, from quant.load_dtype, on the
                                             training device type when there is one)
                     ──► + adapter_delta (scale · B @ A in float32; scale = alpha/r, alpha/sqrt(r)
                         with rsLoRA; DoRA then rescales rows to magnitude / ||W + ΔW||)
                     ──► the output dtype the writer asked for

Merge bases: ``dequantized`` (default) merges onto the weights the adapter was trained
against, so the export reproduces the trained model up to rounding to the export dtype.
``original`` merges onto the source 16-bit weights; that is a different model from the one
trained (the adapter never saw those weights), and verification measures by how much.

``merged_tensors`` yields the output tensors in source order and holds only the one being
made (plus that module's adapter factors), so memory stays a few float32 copies of the
largest tensor whatever the model size.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from qlora_kit.core.errors import ModelError
from qlora_kit.core.safetensors import SourceTensor, read_source_index, read_tensor, source_files
from qlora_kit.export.adapter import Adapter, ModuleAdapter, read_adapter
from qlora_kit.export.monitor import RssSampler, current_rss, progress, trim_heap
from qlora_kit.export.source import Layout, model_layout, refuse_prequantised
from qlora_kit.rundir import finished
from qlora_kit.rundir import layout as rundir
from qlora_kit.variants.merge import low_rank_pair
from qlora_kit.variants.residual import residual_weight

MERGE_BASES = ("dequantized", "original")


@dataclass
class Job:
    """One output tensor: its source, output dtype, and whether it is dequantised and/or merged."""

    src: SourceTensor
    out_dtype: torch.dtype
    quantised: bool
    adapter: ModuleAdapter | None
    keep_fp32: bool

    @property
    def out_bytes(self) -> int:
        return self.src.numel * self.out_dtype.itemsize

    @property
    def src_bytes(self) -> int:
        return self.src.numel * self.src.dtype.itemsize


@dataclass
class Plan:
    """Every output tensor in source order, with the adapter and the model layout."""

    jobs: list[Job]
    adapter: Adapter
    layout: Layout

    @property
    def total_bytes(self) -> int:
        return sum(j.out_bytes for j in self.jobs)

    @property
    def source_bytes(self) -> int:
        return sum(j.src_bytes for j in self.jobs)


def plan_export(run: finished.RunInfo, dtype: torch.dtype) -> Plan:
    """Decide, for every source tensor, whether it is dequantised, merged or copied, in ``dtype``.

    Raises:
        ModelError: an adapter module with no source weight, an adapter on a tied weight, or a
            quantised module missing from the checkpoint (renamed/fused layouts are not supported).
    """
    refuse_prequantised(run.source_dir)
    tensors = read_source_index(source_files(run.source_dir))
    layout = model_layout(run.source_dir, run.quant, run.config.model.trust_remote_code)
    adapter = read_adapter(run.run_dir / rundir.ADAPTER)
    by_name = {t.name: t for t in tensors}
    _check_coverage(layout, adapter, by_name)
    return Plan([_make_job(t, dtype, layout, adapter) for t in tensors], adapter, layout)


def _check_coverage(layout: Layout, adapter: Adapter, by_name: dict[str, SourceTensor]) -> None:
    missing = sorted(m for m in layout.quantised if f"{m}.weight" not in by_name)
    if missing:
        raise ModelError(f"the checkpoint has no weight for quantised module(s) {missing[:3]}: its tensor names "
                         "differ from the model's modules (renamed or fused weights are not supported)")
    for module in adapter.modules:
        key = f"{module}.weight"
        if key not in by_name:
            raise ModelError(f"adapter targets {module}, but the base checkpoint has no tensor {key}",
                             "was the adapter trained on this base? check manifest.json base.source_dir")
        if key in layout.tied:
            raise ModelError(f"adapter targets {module}, whose weight is tied to another: merging would untie them")
        if len(by_name[key].shape) != 2:
            raise ModelError(f"adapter targets {module}, whose weight is not a matrix")


def _make_job(t: SourceTensor, dtype: torch.dtype, layout: Layout, adapter: Adapter) -> Job:
    module = t.name.removesuffix(".weight")
    is_weight = t.name.endswith(".weight")
    quantised = is_weight and module in layout.quantised
    mod_adapter = adapter.modules.get(module) if is_weight else None
    keep = any(f".{k}." in f".{module}." for k in layout.keep_fp32)
    out_dtype = dtype if t.dtype.is_floating_point else t.dtype
    return Job(t, out_dtype, quantised, mod_adapter, keep)


@dataclass
class MergeContext:
    """Devices and quantisation spec used for every tensor."""

    merge_base: str
    quant: dict[str, Any]
    load_dtype: torch.dtype
    compute_device: torch.device
    quant_device: torch.device
    residual: Path | None = None  # residual NF4 base of a base-changing init (qlora_kit.variants.residual)
    residual_modules: frozenset[str] = frozenset()


def reproduce_nf4(weight: torch.Tensor, ctx: MergeContext) -> torch.Tensor:
    """The weight as the trained model saw it: 4-bit quantised and dequantised like the training loader."""
    import bitsandbytes.functional as bnbf

    w = weight.to(device=ctx.quant_device, dtype=ctx.load_dtype).contiguous()
    packed, state = bnbf.quantize_4bit(w, blocksize=int(ctx.quant["blocksize"]),
                                       compress_statistics=bool(ctx.quant["double_quant"]),
                                       quant_type=ctx.quant["quant_type"], quant_storage=torch.uint8)
    del w
    return bnbf.dequantize_4bit(packed, state)


def base_weight(job: Job, weight: torch.Tensor, ctx: MergeContext) -> torch.Tensor:
    """float32 merge base on the compute device: dequantised NF4, load-dtype cast, or the source as is."""
    if ctx.merge_base == "original":
        return weight.to(ctx.compute_device, torch.float32)
    module = job.src.name.removesuffix(".weight")
    if job.quantised and module in ctx.residual_modules:

        return residual_weight(ctx.residual, module, ctx.quant_device).to(ctx.compute_device)
    if job.quantised:
        return reproduce_nf4(weight, ctx).to(ctx.compute_device, torch.float32)
    if not job.keep_fp32:
        weight = _as_loaded(weight, ctx.load_dtype)
    return weight.to(ctx.compute_device, torch.float32)


def adapter_delta(mod: ModuleAdapter, factors: dict[str, torch.Tensor], shape: torch.Size,
                  device: torch.device) -> torch.Tensor:
    """ΔW of one module in float32: ``scale · left @ right`` (LoRA: B @ A; AdaLoRA, VeRA: see
    ``variants.merge.low_rank_pair``); the one place the adapter's update is computed.

    Raises:
        ModelError: the factors do not fit the base weight's shape.
    """

    try:
        left, right = low_rank_pair(mod.kind, factors, shape, device)
    except ModelError as exc:
        raise ModelError(f"adapter for {mod.module}: {exc.message}") from exc
    return torch.mm(left, right).mul_(mod.scale)


def apply_adapter(w: torch.Tensor, mod: ModuleAdapter, factors: dict[str, torch.Tensor], dora: bool) -> torch.Tensor:
    """W + ΔW in float32 (in place); DoRA rescales each output row to magnitude / ||W + ΔW||."""
    w = w.add_(adapter_delta(mod, factors, w.shape, w.device))
    if dora:
        magnitude = factors["M"].to(w.device, torch.float32).reshape(-1)
        w.mul_((magnitude / torch.linalg.norm(w, dim=1)).unsqueeze(1))
    return w


def make_tensor(job: Job, weight: torch.Tensor, ctx: MergeContext, adapter: Adapter | None, adapter_file: Any,
                consumed: set[str]) -> torch.Tensor:
    """The output tensor for one job, on CPU in ``job.out_dtype``.

    Raises:
        ModelError: the merged tensor is not finite in the output dtype (fp16 overflow).
    """
    if not weight.is_floating_point():
        return weight
    if job.adapter is None and not (job.quantised and ctx.merge_base == "dequantized"):
        keep_source = ctx.merge_base == "original" or job.keep_fp32
        out = (weight if keep_source else _as_loaded(weight, ctx.load_dtype)).to(job.out_dtype)
    else:
        w = base_weight(job, weight, ctx)
        if job.adapter is not None:
            factors = {part: adapter_file.get_tensor(key) for part, key in job.adapter.keys.items()}
            consumed.update(job.adapter.keys.values())
            w = apply_adapter(w, job.adapter, factors, bool(adapter and adapter.use_dora))
        out = w.to(job.out_dtype).cpu()
    check_finite(job.src.name, out)
    return out


def check_finite(name: str, t: torch.Tensor, chunk: int = 1 << 22) -> None:
    """Raise when ``t`` holds inf/NaN; checked in slices (``isfinite`` on a whole tensor costs 2.5x its size).

    Raises:
        ModelError: a non-finite value (for float16, with a hint to use bfloat16).
    """
    flat = t.reshape(-1)
    if all(bool(torch.isfinite(part).all()) for part in flat.split(chunk)):
        return
    hint = "export with --dtype bfloat16 (GGUF: --quant bf16)" if t.dtype == torch.float16 else None
    raise ModelError(f"{name} has non-finite values in {str(t.dtype)[6:]} after merging", hint)


def _as_loaded(weight: torch.Tensor, load_dtype: torch.dtype) -> torch.Tensor:
    """The value training held for an unquantised tensor (cast to the load dtype; float32 changes nothing)."""
    if load_dtype == torch.float32 or weight.dtype == load_dtype:
        return weight
    return weight.to(load_dtype)


def merged_tensors(plan: Plan, ctx: MergeContext, advance: Any = None) -> Iterator[tuple[Job, torch.Tensor]]:
    """Yield ``(job, output tensor)`` for every job in source order, holding one tensor at a time.

    ``advance(n)`` (optional) is called with each job's source bytes, for a progress bar.

    Raises:
        ModelError: a merged tensor is not finite, or an adapter tensor was never used.
    """
    from safetensors import safe_open

    consumed: set[str] = set()
    with safe_open(str(plan.adapter.path), framework="pt") as adapter_file:
        for job in plan.jobs:
            tensor = read_tensor(job.src)
            out = make_tensor(job, tensor, ctx, plan.adapter, adapter_file, consumed)
            del tensor
            yield job, out
            del out
            trim_heap()
            if advance is not None:
                advance(job.src_bytes)
    check_consumed(plan.adapter, consumed)


def check_consumed(adapter: Adapter, consumed: set[str]) -> None:
    """Raise when some adapter tensor was not merged into any base weight.

    Raises:
        ModelError: naming one unused tensor.
    """
    every = {key for mod in adapter.modules.values() for key in mod.keys.values()}
    unused = sorted(every - consumed)
    if unused:
        raise ModelError(f"{len(unused)} adapter tensor(s) were not merged (e.g. {unused[0]}): "
                         "the adapter does not match the base checkpoint")


@dataclass
class WeightStats:
    """What streaming the weights did, for the report."""

    merged: int = 0
    dequantised: int = 0
    copied: int = 0
    bytes_written: int = 0
    largest_tensor_bytes: int = 0
    largest_shard_bytes: int = 0
    wall_s: float = 0.0
    peak_rss_bytes: int = 0
    rss_before_bytes: int = 0

    def count(self, job: Job, merge_base: str, written: int) -> None:
        """Tally one written tensor."""
        if job.adapter is not None:
            self.merged += 1
        elif job.quantised and merge_base == "dequantized":
            self.dequantised += 1
        else:
            self.copied += 1
        self.bytes_written += written
        self.largest_tensor_bytes = max(self.largest_tensor_bytes, job.src.numel * 4)


def stream_weights(plan: Plan, ctx: MergeContext, write: Callable[[Job, torch.Tensor], int],
                   show_progress: bool = True, label: str = "merging") -> WeightStats:
    """Feed every merged tensor to ``write(job, tensor) -> bytes written``, measuring time and peak RSS.

    ``label`` names the phase in its progress (``monitor.progress``: source bytes done, elapsed, ETA).

    Raises:
        ModelError: from the merge (non-finite tensor, unused adapter tensor).
    """
    import time

    stats = WeightStats(rss_before_bytes=current_rss())
    started = time.perf_counter()
    with RssSampler() as sampler, progress(plan.source_bytes, show_progress, label) as advance:
        for job, tensor in merged_tensors(plan, ctx, advance):
            written = write(job, tensor)
            del tensor  # the merge frees its reference next; nothing may keep the last tensor alive
            stats.count(job, ctx.merge_base, written)
    stats.wall_s = time.perf_counter() - started
    stats.peak_rss_bytes = sampler.peak
    return stats
