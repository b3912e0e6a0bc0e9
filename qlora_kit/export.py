"""`qlora-kit export`: merge a trained adapter into a plain 16-bit checkpoint, streaming, and prove it.

Data path, one source tensor at a time::

    base safetensors (manifest base.source_dir) ──► quantised linear?  NF4 quantise → dequantise exactly as the
                                                     training loader did (bitsandbytes, manifest quant spec: quant
                                                     type, blocksize, double quant, from quant.load_dtype, on the
                                                     training device type when there is one)
                                                 ──► + scale · B @ A in float32 (scale = alpha/r, alpha/sqrt(r)
                                                     with rsLoRA; DoRA: rows rescaled to magnitude / ||W + sBA||)
                                                 ──► export dtype ──► streamed into safetensors shards

Merge bases: ``dequantized`` (default) merges onto the weights the adapter was trained
against, so the export reproduces the trained model up to rounding to the export dtype.
``original`` merges onto the source 16-bit weights; that is a different model from the one
trained (the adapter never saw those weights), and the report measures by how much.

Memory: the source is read tensor by tensor (``safe_open``), each output shard is written
tensor by tensor behind a header computed up front, so peak memory is a few float32 copies
of the largest tensor, whatever the model or shard size.  Everything is written into a
hidden staging directory beside ``--out`` and renamed at the end; an interrupted export
leaves no ``--out`` behind (a killed one leaves only ``.<name>.partial-<pid>``, removed by
the next export to the same place).

The export is a complete model directory: weights + index, ``config.json`` (no
quantisation config, export dtype), ``generation_config.json`` (EOS = tokenizer EOS ∪ chat
template end-of-turn ∪ base EOS), the run's tokenizer with its chat template, a README
model card and ``export_report.json`` (see ``qlora_kit.verify`` for the tolerances).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch

from qlora_kit import diskspace, rundir, runlock
from qlora_kit.errors import EXIT_VERIFY_FAILED, ModelError, OutputError, Preempted, QloraKitError

log = logging.getLogger("qlora_kit")

EXPORT_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}
MERGE_BASES = ("dequantized", "original")
DEFAULT_SHARD_BYTES = 2 * 1024**3
REPORT = "export_report.json"
# adapter_config.json options that change the math in ways this exporter does not merge.
_UNSUPPORTED_ADAPTER_OPTIONS = ("lora_bias", "modules_to_save", "trainable_token_indices", "target_parameters",
                                "layer_replication", "use_qalora", "use_bdlora", "alora_invocation_tokens",
                                "fan_in_fan_out", "arrow_config", "kasa_config", "monteclora_config")
_ST_DTYPES = {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32", torch.float64: "F64",
              torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
              torch.bool: "BOOL"}
_FROM_ST = {v: k for k, v in _ST_DTYPES.items()}


# --------------------------------------------------------------------------- the run


@dataclass
class RunInfo:
    """What the exporter needs from a finished run directory."""

    run_dir: Path
    manifest: dict[str, Any]
    config: Any  # qlora_kit.config.Config
    source_dir: Path
    quant: dict[str, Any]


def read_run(run_dir: str | Path) -> RunInfo:
    """Read manifest, config and base source of a finished run.

    Raises:
        ModelError: the directory is not a finished qlora-kit run, or its base cannot be found.
    """
    from qlora_kit.config import load_config
    from qlora_kit.model import resolve_source

    run = Path(run_dir)
    manifest = rundir.require_finished_run(run)
    if manifest.get("status") not in (None, "completed"):
        log.warning("run status is %r, not 'completed': exporting the adapter it saved last",
                    manifest.get("status"))
    cfg, _ = load_config(run / rundir.CONFIG)
    source = Path(str((manifest.get("base") or {}).get("source_dir") or ""))
    if not (source / "config.json").is_file():
        source = resolve_source(cfg.model)
    quant = manifest.get("quant") or {}
    for key in ("quant_type", "double_quant", "blocksize", "load_dtype"):
        if key not in quant:
            raise ModelError(f"{run / rundir.MANIFEST} has no quant.{key}: cannot reproduce the NF4 base",
                             "the run was written by an older qlora-kit; add the quant section from its training log")
    return RunInfo(run, manifest, cfg, source, quant)


# --------------------------------------------------------------------------- source checkpoint


def source_files(source: Path) -> list[Path]:
    """Safetensors files of the base checkpoint, in index order.

    Raises:
        ModelError: no safetensors weights (pickle ``.bin`` checkpoints are refused).
    """
    index = source / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [source / name for name in dict.fromkeys(weight_map.values())]
    if (source / "model.safetensors").is_file():
        return [source / "model.safetensors"]
    found = sorted(source.glob("*.safetensors"))
    if found:
        return found
    if list(source.glob("*.bin")):
        raise ModelError(f"{source} holds only pickle .bin weights, which the streaming exporter does not unpickle",
                         "convert the base to safetensors once (load it and save_pretrained(safe_serialization=True))")
    raise ModelError(f"no safetensors weights found in {source}")


@dataclass
class SourceTensor:
    """One tensor of the base checkpoint, known from its file header only."""

    name: str
    file: Path
    dtype: torch.dtype
    shape: list[int]

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


def read_source_index(files: list[Path]) -> list[SourceTensor]:
    """Names, dtypes and shapes of every source tensor, from the safetensors headers (no data read).

    Raises:
        ModelError: an unreadable header or an unsupported dtype.
    """
    tensors = []
    for path in files:
        header = _read_header(path)
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            if entry["dtype"] not in _FROM_ST:
                raise ModelError(f"{path.name}: tensor {name} has unsupported dtype {entry['dtype']}")
            tensors.append(SourceTensor(name, path, _FROM_ST[entry["dtype"]], list(entry["shape"])))
    return tensors


def _read_header(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as fh:
            size = int.from_bytes(fh.read(8), "little")
            return json.loads(fh.read(size))
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot read the safetensors header of {path}: {exc}") from exc


@dataclass
class Layout:
    """Which modules the training loader quantised, which weights are tied, which stay float32."""

    quantised: set[str]
    tied: set[str]
    keep_fp32: set[str]


def model_layout(source: Path, quant: dict[str, Any], trust_remote_code: bool = False) -> Layout:
    """Replay transformers' bitsandbytes module selection on a weightless (meta) model.

    Raises:
        ModelError: the config cannot be read or the architecture cannot be built.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, BitsAndBytesConfig
    from transformers.integrations import replace_with_bnb_linear
    from transformers.quantizers.base import HfQuantizer

    import bitsandbytes as bnb

    try:
        config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelError(f"cannot build the architecture of {source}: {exc}") from exc
    keep = set(getattr(model, "_keep_in_fp32_modules", None) or [])
    tied = dict(getattr(model, "all_tied_weights_keys", None) or {})
    skip = HfQuantizer.get_modules_to_not_convert(model, None, list(keep))
    bnb_cfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant["quant_type"],
                                 bnb_4bit_use_double_quant=bool(quant["double_quant"]))
    model = replace_with_bnb_linear(model, modules_to_not_convert=skip, quantization_config=bnb_cfg)
    quantised = {name for name, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    return Layout(quantised, set(tied) | set(tied.values()), keep)


# --------------------------------------------------------------------------- the adapter


@dataclass
class ModuleAdapter:
    """Adapter factors of one target module (tensors are read lazily from the adapter file)."""

    module: str
    keys: dict[str, str] = field(default_factory=dict)  # part (A/B/M/E/lambda_b/...) -> adapter tensor key
    scale: float = 0.0
    kind: str = "LORA"  # peft type: LORA, ADALORA, VERA (qlora_kit.variants.merge)


@dataclass
class Adapter:
    """The trained adapter: per-module factors, scaling and the file they live in."""

    path: Path
    config: dict[str, Any]
    modules: dict[str, ModuleAdapter]

    @property
    def use_dora(self) -> bool:
        return bool(self.config.get("use_dora"))


def read_adapter(adapter_dir: Path) -> Adapter:
    """Index ``adapter_model.safetensors`` by target module and compute each module's scale.

    LoRA (rsLoRA, DoRA), AdaLoRA and VeRA adapters are understood (``qlora_kit.variants.merge``).

    Raises:
        ModelError: missing weights, an adapter type or option this exporter cannot merge, or a
            tensor it does not understand.
    """
    from safetensors import safe_open

    from qlora_kit.variants import merge

    try:
        config = json.loads((adapter_dir / "adapter_config.json").read_text())
    except (OSError, ValueError) as exc:
        raise ModelError(f"{adapter_dir / 'adapter_config.json'} is not readable JSON",
                         "restore the adapter, or resume the training to rewrite it") from exc
    if not isinstance(config, dict):
        raise ModelError(f"{adapter_dir / 'adapter_config.json'} is not a JSON object", "restore the adapter")
    weights = adapter_dir / "adapter_model.safetensors"
    if not weights.is_file():
        raise ModelError(f"{weights} is missing (pickle adapter_model.bin is not read)",
                         "re-save the adapter with safe_serialization=True")
    kind = merge.peft_type(config)
    _check_adapter_config(config)
    with safe_open(str(weights), framework="pt") as fh:
        shapes = {k: fh.get_slice(k).get_shape() for k in fh.keys()}
    modules: dict[str, ModuleAdapter] = {}
    for module, (keys, scale) in merge.index_adapter(config, shapes).items():
        if config.get("use_dora") and "M" not in keys:
            raise ModelError(f"DoRA adapter module {module} has no magnitude vector")
        modules[module] = ModuleAdapter(module, keys, scale, kind)
    return Adapter(weights, config, modules)


def _check_adapter_config(config: dict[str, Any]) -> None:
    used = [k for k in _UNSUPPORTED_ADAPTER_OPTIONS if config.get(k) not in (None, False, [], {}, "")]
    if used:
        raise ModelError(f"adapter uses {', '.join(used)}, which the exporter does not merge",
                         "train without these options, or load the adapter with peft instead of exporting")


# --------------------------------------------------------------------------- plan


@dataclass
class Job:
    """One output tensor: how to make it and which shard it goes to."""

    src: SourceTensor
    out_dtype: torch.dtype
    quantised: bool
    adapter: ModuleAdapter | None
    keep_fp32: bool
    shard: int = 0

    @property
    def out_bytes(self) -> int:
        return self.src.numel * self.out_dtype.itemsize


@dataclass
class Plan:
    """Every output tensor in source order, grouped into output shards."""

    jobs: list[Job]
    shard_names: list[str]
    adapter: Adapter

    def shard_jobs(self, index: int) -> list[Job]:
        return [j for j in self.jobs if j.shard == index]

    @property
    def total_bytes(self) -> int:
        return sum(j.out_bytes for j in self.jobs)


def plan_export(run: RunInfo, dtype: torch.dtype, max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> Plan:
    """Decide, for every source tensor, whether it is dequantised, merged or copied, and its shard.

    Raises:
        ModelError: an adapter module with no source weight, an adapter on a tied weight, or a
            quantised module missing from the checkpoint (renamed/fused layouts are not supported).
    """
    _refuse_prequantised(run.source_dir)
    files = source_files(run.source_dir)
    tensors = read_source_index(files)
    layout = model_layout(run.source_dir, run.quant, run.config.model.trust_remote_code)
    adapter = read_adapter(run.run_dir / rundir.ADAPTER)
    by_name = {t.name: t for t in tensors}
    _check_coverage(layout, adapter, by_name)
    jobs = [_make_job(t, dtype, layout, adapter) for t in tensors]
    names = _assign_shards(jobs, max_shard_bytes)
    return Plan(jobs, names, adapter)


def _refuse_prequantised(source: Path) -> None:
    config = json.loads((source / "config.json").read_text())
    if config.get("quantization_config"):
        method = config["quantization_config"].get("quant_method", "?")
        raise ModelError(f"the base {source} is already quantised ({method}): there are no 16-bit weights to "
                         "merge into",
                         "train from the 16-bit release of this model to get an exportable run")


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


def _assign_shards(jobs: list[Job], max_bytes: int) -> list[str]:
    shard, used = 0, 0
    for job in jobs:
        if used and used + job.out_bytes > max_bytes:
            shard, used = shard + 1, 0
        job.shard = shard
        used += job.out_bytes
    count = shard + 1
    if count == 1:
        return ["model.safetensors"]
    return [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


# --------------------------------------------------------------------------- merging


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
        from qlora_kit.variants.residual import residual_weight

        return residual_weight(ctx.residual, module, ctx.quant_device).to(ctx.compute_device)
    if job.quantised:
        return reproduce_nf4(weight, ctx).to(ctx.compute_device, torch.float32)
    if not job.keep_fp32:
        weight = _as_loaded(weight, ctx.load_dtype)
    return weight.to(ctx.compute_device, torch.float32)


def apply_adapter(w: torch.Tensor, mod: ModuleAdapter, factors: dict[str, torch.Tensor], dora: bool) -> torch.Tensor:
    """W + scale·left@right in float32 (LoRA: B@A; AdaLoRA, VeRA: see variants.merge); DoRA rescales each
    output row to magnitude / ||W + scale·B@A||."""
    from qlora_kit.variants.merge import low_rank_pair

    try:
        left, right = low_rank_pair(mod.kind, factors, w.shape, w.device)
    except ModelError as exc:
        raise ModelError(f"adapter for {mod.module}: {exc.message}") from exc
    w = w.addmm_(left, right, alpha=mod.scale)
    if dora:
        magnitude = factors["M"].to(w.device, torch.float32).reshape(-1)
        w.mul_((magnitude / torch.linalg.norm(w, dim=1)).unsqueeze(1))
    return w


def make_tensor(job: Job, weight: torch.Tensor, ctx: MergeContext, adapter: Adapter, adapter_file: Any,
                consumed: set[str]) -> torch.Tensor:
    """The output tensor for one job, on CPU in the export dtype.

    Raises:
        ModelError: the merged tensor is not finite in the export dtype (fp16 overflow).
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
            w = apply_adapter(w, job.adapter, factors, adapter.use_dora)
        out = w.to(job.out_dtype).cpu()
    if not _all_finite(out):
        hint = "export with --dtype bfloat16" if job.out_dtype == torch.float16 else None
        raise ModelError(f"{job.src.name} has non-finite values in {str(job.out_dtype)[6:]} after merging", hint)
    return out


def _all_finite(t: torch.Tensor, chunk: int = 1 << 22) -> bool:
    """``isfinite(t).all()`` in slices: on a whole 16-bit tensor it allocates 2.5x the tensor in temporaries."""
    flat = t.reshape(-1)
    return all(bool(torch.isfinite(part).all()) for part in flat.split(chunk))


def _as_loaded(weight: torch.Tensor, load_dtype: torch.dtype) -> torch.Tensor:
    """The value training held for an unquantised tensor (cast to the load dtype; float32 changes nothing)."""
    if load_dtype == torch.float32 or weight.dtype == load_dtype:
        return weight
    return weight.to(load_dtype)


# --------------------------------------------------------------------------- writing


class ShardWriter:
    """Write one safetensors file tensor by tensor: the header (from the plan) first, then the data in order."""

    def __init__(self, path: Path, jobs: list[Job]):
        self.path = path
        self.expected = [(j.src.name, j.out_dtype, j.src.shape, j.out_bytes) for j in jobs]
        self.position = 0
        header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for name, dtype, shape, nbytes in self.expected:
            header[name] = {"dtype": _ST_DTYPES[dtype], "shape": shape, "data_offsets": [offset, offset + nbytes]}
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


@dataclass
class WeightStats:
    """What writing the weights did, for the report."""

    merged: int = 0
    dequantised: int = 0
    copied: int = 0
    bytes_written: int = 0
    largest_tensor_bytes: int = 0
    largest_shard_bytes: int = 0
    wall_s: float = 0.0
    peak_rss_bytes: int = 0
    rss_before_bytes: int = 0


def write_weights(plan: Plan, staging: Path, ctx: MergeContext, show_progress: bool = True) -> WeightStats:
    """Stream every source tensor through ``make_tensor`` into the planned shards, plus the index.

    Raises:
        ModelError: an adapter tensor was never used, or a merged tensor is not finite.
    """
    from safetensors import safe_open

    stats = WeightStats(rss_before_bytes=_current_rss())
    started = time.perf_counter()
    consumed: set[str] = set()
    with _RssSampler() as sampler, _progress(plan.total_bytes, show_progress) as advance, \
            safe_open(str(plan.adapter.path), framework="pt") as adapter_file:
        for index, name in enumerate(plan.shard_names):
            jobs = plan.shard_jobs(index)
            writer = ShardWriter(staging / name, jobs)
            try:
                for job in jobs:
                    tensor = _read_tensor(job.src)
                    out = make_tensor(job, tensor, ctx, plan.adapter, adapter_file, consumed)
                    del tensor
                    writer.write(job.src.name, out)
                    _count(stats, job, out, ctx.merge_base)
                    del out
                    _trim_heap()
                    advance(job.out_bytes)
                writer.close()
            except BaseException:
                writer.abort()
                raise
            stats.largest_shard_bytes = max(stats.largest_shard_bytes, sum(j.out_bytes for j in jobs))
    _check_consumed(plan.adapter, consumed)
    if len(plan.shard_names) > 1:
        _write_index(plan, staging)
    stats.wall_s = time.perf_counter() - started
    stats.peak_rss_bytes = sampler.peak
    return stats


_MALLOC_TRIM: Any = None


def _trim_heap() -> None:
    """Hand freed heap memory back to the OS (glibc keeps freed mid-sized tensors otherwise; RSS creeps)."""
    global _MALLOC_TRIM
    if _MALLOC_TRIM is None:
        try:
            import ctypes

            _MALLOC_TRIM = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _MALLOC_TRIM = False
    if _MALLOC_TRIM:
        _MALLOC_TRIM(0)


def _read_tensor(src: SourceTensor) -> torch.Tensor:
    """One tensor from its file, mapped only while the tensor lives, so other tensors' pages never pile up in RSS."""
    from safetensors import safe_open

    with safe_open(str(src.file), framework="pt") as fh:
        return fh.get_tensor(src.name)


def _count(stats: WeightStats, job: Job, out: torch.Tensor, merge_base: str) -> None:
    if job.adapter is not None:
        stats.merged += 1
    elif job.quantised and merge_base == "dequantized":
        stats.dequantised += 1
    else:
        stats.copied += 1
    stats.bytes_written += out.numel() * out.element_size()
    stats.largest_tensor_bytes = max(stats.largest_tensor_bytes, job.src.numel * 4)


def _check_consumed(adapter: Adapter, consumed: set[str]) -> None:
    every = {key for mod in adapter.modules.values() for key in mod.keys.values()}
    unused = sorted(every - consumed)
    if unused:
        raise ModelError(f"{len(unused)} adapter tensor(s) were not merged (e.g. {unused[0]}): "
                         "the adapter does not match the base checkpoint")


def _write_index(plan: Plan, staging: Path) -> None:
    index = {"metadata": {"total_size": plan.total_bytes},
             "weight_map": {j.src.name: plan.shard_names[j.shard] for j in plan.jobs}}
    (staging / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


@contextmanager
def _progress(total: int, enabled: bool) -> Iterator[Any]:
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

    from qlora_kit.logs import console as shared_console

    console = shared_console()  # the log handler's: log lines are printed above the bar, not through it
    if not enabled or not console.is_terminal:
        yield lambda n: None
        return
    columns = (TextColumn("merging"), BarColumn(), DownloadColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task("merge", total=total)
        yield lambda n: progress.advance(task, n)


def _current_rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


class _RssSampler:
    """Peak resident memory while a block runs (sampled every 5 ms)."""

    def __init__(self, interval: float = 0.005):
        self.interval = interval
        self.peak = _current_rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, _current_rss())

    def __enter__(self) -> "_RssSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _current_rss())


# --------------------------------------------------------------------------- model files


def write_model_files(run: RunInfo, staging: Path, dtype_name: str) -> list[int]:
    """config.json (no quantisation, export dtype), generation_config.json, tokenizer; return the EOS ids."""
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    from qlora_kit.generate import eos_token_ids

    trust = run.config.model.trust_remote_code
    config = AutoConfig.from_pretrained(run.source_dir, trust_remote_code=trust)
    if getattr(config, "quantization_config", None) is not None:
        del config.quantization_config
    config.dtype = dtype_name
    config.use_cache = True
    config.save_pretrained(staging)
    _copy_tokenizer(run.run_dir / rundir.TOKENIZER, staging)
    for code in run.source_dir.glob("*.py"):  # remote-code architectures need their modelling files
        shutil.copy2(code, staging / code.name)
    tokenizer = AutoTokenizer.from_pretrained(run.run_dir / rundir.TOKENIZER, trust_remote_code=trust)
    try:
        gen = GenerationConfig.from_pretrained(run.source_dir)
    except OSError:
        gen = GenerationConfig.from_model_config(config)
    eos = eos_token_ids(tokenizer, gen.eos_token_id)
    gen.eos_token_id = eos[0] if len(eos) == 1 else eos
    gen._from_model_config = False  # else transformers may rebuild it from config.json and drop the EOS list
    if tokenizer.pad_token_id is not None:
        gen.pad_token_id = tokenizer.pad_token_id
    if tokenizer.bos_token_id is not None:
        gen.bos_token_id = tokenizer.bos_token_id
    gen.save_pretrained(staging)
    return eos


def _copy_tokenizer(src: Path, staging: Path) -> None:
    for path in src.iterdir():
        if path.is_file():
            shutil.copy2(path, staging / path.name)


# --------------------------------------------------------------------------- target directory


def check_target(out: Path, run: RunInfo, overwrite: bool) -> Path:
    """Resolve ``--out`` and refuse targets that would clobber the run, the base or a non-empty directory.

    Raises:
        OutputError: ``out`` is the run directory (or one of its files), contains it or the base,
            or is non-empty without ``--overwrite``.
    """
    target = out.expanduser().resolve()
    run_dir = run.run_dir.resolve()
    protected = [run_dir, run.source_dir.resolve()]
    for p in protected:
        if target == p or p.is_relative_to(target):
            raise OutputError(f"--out {out} would replace {p}", "choose a new directory for the export")
    if target.is_relative_to(run_dir) and target != run_dir:
        first = target.relative_to(run_dir).parts[0]
        own = {rundir.CONFIG, rundir.MANIFEST, rundir.DATA_SUMMARY, rundir.HELDOUT, rundir.TOKENIZER,
               rundir.ADAPTER, rundir.METRICS, rundir.LOSS_PLOT}
        if first in own or first.startswith(rundir.CHECKPOINT_PREFIX):
            raise OutputError(f"--out {out} is inside the run's own {first}", "choose a new directory for the export")
    if target.exists() and not target.is_dir():
        if not overwrite:
            raise OutputError(f"--out {out} exists and is a file", "pass --overwrite to replace it, or pick a new path")
    elif target.exists() and any(target.iterdir()) and not overwrite:
        raise OutputError(f"--out {out} exists and is not empty", "pass --overwrite to replace it, or pick a new path")
    return target


def _partial_name(target: Path, pid: int) -> Path:
    return target.with_name(f".{target.name}.partial-{pid}")


def remove_stale_partials(target: Path) -> None:
    """Delete staging directories of earlier exports to ``target`` whose process is gone."""
    import psutil

    for path in target.parent.glob(f".{target.name}.partial-*"):
        pid = path.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not psutil.pid_exists(int(pid)):
            log.info("removing %s left by an interrupted export", path)
            shutil.rmtree(path, ignore_errors=True)


class _Terminated(KeyboardInterrupt):
    """SIGTERM during an export: unwinds like Ctrl-C so the staging directory is removed."""


def _raise_terminated(signum: int, frame: Any) -> None:
    raise _Terminated()


@contextmanager
def _sigterm_unwinds() -> Iterator[None]:
    """SIGTERM raises ``_Terminated`` (like Ctrl-C) for the whole export, so every phase stops within seconds."""
    in_main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _raise_terminated) if in_main else None
    try:
        yield
    finally:
        if in_main:
            signal.signal(signal.SIGTERM, previous)


@contextmanager
def staging_dir(target: Path) -> Iterator[Path]:
    """A fresh hidden directory beside ``target``; removed on any error, Ctrl-C or SIGTERM."""
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(target)
    staging = _partial_name(target, os.getpid())
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    in_main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _raise_terminated) if in_main else None
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        if in_main:
            signal.signal(signal.SIGTERM, previous)


def commit(staging: Path, target: Path) -> None:
    """Move the finished staging directory to ``target`` (replacing an old one only after it is complete)."""
    old = None
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.replace(target, old)
    elif target.exists():
        target.rmdir()
    os.replace(staging, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink()


# --------------------------------------------------------------------------- report


def base_report(run: RunInfo, target: Path, dtype_name: str, ctx: MergeContext, plan: Plan,
                stats: WeightStats, eos: list[int]) -> dict[str, Any]:
    """The export facts for ``export_report.json`` (verification is added by ``verify``)."""
    cfg = plan.adapter.config
    return {
        "qlora_kit_version": _version(),
        "run_dir": str(run.run_dir.resolve()),
        "export_dir": str(target),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "dtype": dtype_name,
        "merge_base": ctx.merge_base,
        "base": {"name_or_path": run.manifest.get("base", {}).get("name_or_path"), "source_dir": str(run.source_dir)},
        "quant": {**run.quant, "reproduced_on": ctx.quant_device.type,
                  "trained_on": run.manifest.get("device", {}).get("type")},
        "adapter": {"type": str(cfg.get("peft_type", "LORA")).lower(), "r": cfg.get("r"),
                    "lora_alpha": cfg.get("lora_alpha"), "use_rslora": bool(cfg.get("use_rslora")),
                    "use_dora": bool(cfg.get("use_dora")), "modules": len(plan.adapter.modules),
                    "scales": sorted({round(m.scale, 6) for m in plan.adapter.modules.values()}),
                    "variant": run.manifest.get("lora", {}).get("variant"),
                    "residual_base_modules": len(ctx.residual_modules)},
        "tensors": {"merged": stats.merged, "dequantised_unmerged": stats.dequantised, "copied": stats.copied},
        "shards": plan.shard_names,
        "bytes_written": stats.bytes_written,
        "largest_shard_bytes": stats.largest_shard_bytes,
        "largest_tensor_fp32_bytes": stats.largest_tensor_bytes,
        "weights_wall_s": round(stats.wall_s, 3),
        "weights_peak_rss_bytes": stats.peak_rss_bytes,
        "rss_before_weights_bytes": stats.rss_before_bytes,
        "compute_device": str(ctx.compute_device),
        "eos_token_ids": eos,
    }


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("qlora-kit")
    except PackageNotFoundError:
        return "unknown"


def write_readme(run: RunInfo, staging: Path, report: dict[str, Any]) -> None:
    """A model card: base, data, hyperparameters, final metrics, export and verification, how to load."""
    cfg = run.config
    man = run.manifest
    data = man.get("data", {})
    metrics = man.get("final_metrics") or {}
    ver = report.get("verification", {})
    summary = _data_summary(run.run_dir)
    from qlora_kit.model import base_model_id

    base_name = man.get("base", {}).get("name_or_path", cfg.model.name_or_path)
    lines = [
        "---", f"base_model: {base_model_id(base_name)}",
        "library_name: transformers", "tags: [qlora, lora, qlora-kit]", "---", "",
        f"# {Path(report['export_dir']).name}", "",
        f"Fine-tuned from `{base_model_id(base_name)}` (model.name_or_path `{base_name}`, loaded from "
        f"`{man.get('base', {}).get('source_dir', run.source_dir)}` on the training machine) with QLoRA "
        f"(4-bit {run.quant.get('quant_type')} base, double quant {run.quant.get('double_quant')}, "
        f"blocksize {run.quant.get('blocksize')}) and merged by qlora-kit {report['qlora_kit_version']} into a "
        f"plain `{report['dtype']}` checkpoint.", "",
        "## Merge", "",
        f"- merge base: **{report['merge_base']}**" + (
            " (the dequantised NF4 weights the adapter was trained against)" if report["merge_base"] == "dequantized"
            else " (the original 16-bit weights; not the exact model that was trained, see the verification)"),
        f"- adapter: r={cfg.lora.r}, alpha={cfg.lora.alpha}, rsLoRA={cfg.lora.use_rslora}, DoRA={cfg.lora.use_dora}, "
        f"targets={man.get('lora', {}).get('target_modules', cfg.lora.target_modules)}",
        f"- variant: {variant_line(man.get('lora', {}), report['adapter']['residual_base_modules'])}",
        f"- end-of-sequence token ids (generation_config.json): {report['eos_token_ids']}", "",
        "## Data", "",
        f"- file: `{data.get('path', cfg.data.path)}` (sha256 `{data.get('sha256')}`), format {data.get('format')}",
    ]
    if summary:
        lines.append(f"- rows: {summary.get('rows')}, tokens: {summary.get('tokens')}, "
                     f"truncated: {summary.get('truncated')}")
    lines += ["", "## Hyperparameters", "", "| setting | value |", "| --- | --- |"]
    train = cfg.train
    for key in ("learning_rate", "lr_scheduler", "max_steps", "num_epochs", "micro_batch_size",
                "gradient_accumulation_steps", "max_length", "optimizer", "weight_decay", "loraplus_lr_ratio", "seed"):
        lines.append(f"| train.{key} | {getattr(train, key)} |")
    for key in ("type", "init", "dropout"):
        lines.append(f"| lora.{key} | {getattr(cfg.lora, key)} |")
    lines += ["", "## Final metrics", ""]
    lines += [f"- {k}: {v}" for k, v in metrics.items()] or ["- (none recorded)"]
    lines += ["", "## Verification", ""]
    lines += _verification_lines(ver)
    lines += ["", "## Loading", "", "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
              'path = "<this directory>"', "tokenizer = AutoTokenizer.from_pretrained(path)",
              'model = AutoModelForCausalLM.from_pretrained(path, dtype="auto", device_map="auto")',
              'messages = [{"role": "user", "content": "Hello!"}]',
              "ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors=\"pt\","
              " return_dict=True).to(model.device)",
              "out = model.generate(**ids, max_new_tokens=256)  # stops on generation_config.eos_token_id",
              "print(tokenizer.decode(out[0, ids['input_ids'].shape[1]:], skip_special_tokens=True))", "```", "",
              "Or: `qlora-kit generate <this directory> \"Hello!\"`.", ""]
    (staging / "README.md").write_text("\n".join(lines))


def variant_line(lora: dict[str, Any], residual_modules: int) -> str:
    """The model card's line on the LoRA variant and, for base-changing inits, which base was merged."""
    from qlora_kit.variants import summary_line

    line = summary_line(lora.get("variant") or {"type": "lora", "init": "default"})
    if residual_modules:
        line += (f"; merged onto the stored residual NF4 base of {residual_modules} modules (what the adapter was "
                 "trained against), not onto NF4 of the original weights")
    return line


def _data_summary(run_dir: Path) -> dict[str, Any]:
    try:
        return json.loads((run_dir / rundir.DATA_SUMMARY).read_text())
    except (OSError, ValueError):
        return {}


def _verification_lines(ver: dict[str, Any]) -> list[str]:
    if not ver or ver.get("status") == "skipped":
        return ["Not verified (`--no-verify`)."]
    lines = [f"Status: **{ver['status']}** on {ver.get('prompts')} held-out prompts (see export_report.json)."]
    for label, key in (("vs the trained model (NF4 + adapter)", "vs_trained"),
                       ("vs original base + adapter", "vs_original_adapter")):
        m = ver.get(key)
        if m:
            lines.append(f"- {label}: max |Δlogit| {m['max_abs']:.3g} ({m['rel_max']:.3g} of the logit std), "
                         f"mean {m['mean_abs']:.3g}, greedy identical on {m['greedy_exact']}/{m['greedy_total']} "
                         "prompts")
    if ver.get("cost_of_original"):
        lines.append(f"- cost of merging onto the original weights: {ver['cost_of_original']}")
    if ver.get("failures"):
        lines.append(f"- **outside tolerance**: {'; '.join(ver['failures'])}")
    return lines


def print_summary(report: dict[str, Any]) -> None:
    """Terminal summary of an export (rich table)."""
    from rich.table import Table

    from qlora_kit.logs import console

    table = Table(title=f"export → {report['export_dir']}", show_header=False)
    table.add_row("merge base / dtype", f"{report['merge_base']} / {report['dtype']}")
    t = report["tensors"]
    table.add_row("tensors", f"{t['merged']} merged, {t['dequantised_unmerged']} dequantised, {t['copied']} copied")
    table.add_row("written", f"{report['bytes_written'] / 1e9:.3f} GB in {len(report['shards'])} shard(s), "
                             f"{report['weights_wall_s']:.1f} s")
    table.add_row("peak RSS (weights)", f"{report['weights_peak_rss_bytes'] / 2**20:.0f} MiB "
                                        f"(before: {report['rss_before_weights_bytes'] / 2**20:.0f} MiB)")
    table.add_row("EOS ids", str(report["eos_token_ids"]))
    ver = report.get("verification", {})
    for key, label in (("vs_trained", "vs trained"), ("vs_original_adapter", "vs original+adapter")):
        m = ver.get(key)
        if m:
            tol = m["tolerance"]
            table.add_row(f"{label}: max/mean |Δlogit|",
                          f"{m['max_abs']:.3g} / {m['mean_abs']:.3g} = {m['rel_max']:.3g} / {m['rel_mean']:.3g} of "
                          f"logit std (limits {tol['rel_max']:.3g} / {tol['rel_mean']:.3g})")
            table.add_row(f"{label}: greedy identical", f"{m['greedy_exact']}/{m['greedy_total']} prompts, "
                                                        f"decisive tokens {m['decisive_agreement']:.3f}")
    if ver.get("cost_of_original"):
        table.add_row("cost of --merge-base original", ver["cost_of_original"])
    table.add_row("verification", ver.get("status", "skipped") + (": " + "; ".join(ver["failures"])
                                                                  if ver.get("failures") else ""))
    console().print(table)


# --------------------------------------------------------------------------- command


def resolve_devices(device: str | None, run: RunInfo) -> tuple[torch.device, torch.device]:
    """(compute device, quantisation device); quantise on the training device type when possible.

    Raises:
        ModelError: ``--device cuda`` without a GPU, or an unknown device.
    """
    if device not in (None, "cpu", "cuda"):
        raise ModelError(f"--device {device!r} is not cpu or cuda")
    if device == "cuda" and not torch.cuda.is_available():
        raise ModelError("--device cuda requested but no CUDA GPU is available", "drop --device or use --device cpu")
    compute = torch.device("cuda", 0) if (device or ("cuda" if torch.cuda.is_available() else "cpu")) == "cuda" \
        else torch.device("cpu")
    trained = run.manifest.get("device", {}).get("type", "cpu")
    if trained == "cuda" and torch.cuda.is_available():
        return compute, torch.device("cuda", 0)
    if trained == "cuda":
        log.warning("training quantised the base on CUDA; reproducing it on CPU (bitsandbytes' CPU and CUDA kernels "
                    "may round a few weights differently; verification measures the effect)")
    return compute, torch.device("cpu")


def _check_args(dtype: str, merge_base: str) -> torch.dtype:
    if dtype not in EXPORT_DTYPES:
        raise QloraKitError(f"--dtype {dtype!r} is not supported", f"use one of {', '.join(EXPORT_DTYPES)}")
    if merge_base not in MERGE_BASES:
        raise QloraKitError(f"--merge-base {merge_base!r} is not supported", f"use one of {', '.join(MERGE_BASES)}")
    return EXPORT_DTYPES[dtype]


def export_run(run_dir: str | Path, out: str | Path, dtype: str = "float16", merge_base: str = "dequantized",
               overwrite: bool = False, verify: bool = True, device: str | None = None, *,
               max_shard_bytes: int = DEFAULT_SHARD_BYTES, verify_prompts: int = 8,
               show_progress: bool = True) -> int:
    """Merge a run's adapter into a complete 16-bit model directory at ``out``; return the exit code.

    Returns 0, or ``EXIT_VERIFY_FAILED`` when verification is outside tolerance (the export is
    kept, with the failure in its report and README).

    Raises:
        QloraKitError: bad arguments; ModelError: unusable run/base/adapter; OutputError: bad ``out``;
        RunInUseError: the run is being written (or ``out`` exported to) by another process;
        DiskFullError: not enough space for the export; Preempted: SIGTERM (nothing left at ``out``).
    """
    torch_dtype = _check_args(dtype, merge_base)
    try:
        with _sigterm_unwinds(), runlock.shared(Path(run_dir), "export"):  # nobody writes the run meanwhile
            run = read_run(run_dir)
            target = check_target(Path(out), run, overwrite)
            with runlock.exclusive(target, "export"):
                return _export_locked(run, target, dtype, torch_dtype, merge_base, verify, device, max_shard_bytes,
                                      verify_prompts, show_progress)
    except _Terminated:
        raise Preempted(f"export stopped by SIGTERM; nothing was written to {out}",
                        "run the same export command again") from None


def _export_locked(run: RunInfo, target: Path, dtype: str, torch_dtype: torch.dtype, merge_base: str, verify: bool,
                   device: str | None, max_shard_bytes: int, verify_prompts: int, show_progress: bool) -> int:

    compute, quant_device = resolve_devices(device, run)
    ctx = merge_context(run, merge_base, compute, quant_device)
    plan = plan_export(run, torch_dtype, max_shard_bytes)
    fix = "free space on that disk, or choose --out on another one"
    needed = plan.total_bytes + diskspace.tree_bytes(run.run_dir / rundir.TOKENIZER)
    diskspace.require_free(target.parent, needed, "the export", fix)
    with staging_dir(target) as staging, diskspace.no_space_as_error(target.parent, "the export", fix):
        stats = write_weights(plan, staging, ctx, show_progress)
        eos = write_model_files(run, staging, dtype)
        report = base_report(run, target, dtype, ctx, plan, stats, eos)
        report["verification"] = _verify(run, staging, report, compute, verify, verify_prompts)
        write_readme(run, staging, report)
        (staging / REPORT).write_text(json.dumps(report, indent=2) + "\n")
        commit(staging, target)
    print_summary(report)
    if report["verification"].get("status") == "failed":
        log.error("verification failed: %s", "; ".join(report["verification"]["failures"]))
        return EXIT_VERIFY_FAILED
    return 0


def merge_context(run: RunInfo, merge_base: str, compute: torch.device, quant_device: torch.device) -> MergeContext:
    """How every tensor is made: merge base, quantisation spec, devices, and a base-changing init's residual base.

    Raises:
        ModelError: ``--merge-base original`` for an init fitted to the NF4 weights, or a missing/changed
            residual base file.
    """
    from qlora_kit.model import DTYPES
    from qlora_kit.variants.merge import check_merge_base
    from qlora_kit.variants.residual import check_residual, residual_modules

    lora = run.manifest.get("lora") or {}
    check_merge_base(lora, merge_base)
    residual = check_residual(run.run_dir, lora.get("residual_base")) if merge_base == "dequantized" else None
    modules = frozenset(residual_modules(residual)) if residual else frozenset()
    return MergeContext(merge_base, run.quant, DTYPES[run.quant["load_dtype"]], compute, quant_device, residual,
                        modules)


def _verify(run: RunInfo, staging: Path, report: dict[str, Any], device: torch.device, enabled: bool,
            prompts: int) -> dict[str, Any]:
    if not enabled:
        return {"status": "skipped"}
    from qlora_kit.verify import verify_export

    return verify_export(run.run_dir, staging, merge_base=report["merge_base"], dtype=report["dtype"],
                         device=device, max_prompts=prompts)
