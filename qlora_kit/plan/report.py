"""`qlora-kit plan`: the memory report for a config on a card."""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

from qlora_kit.core.config import Config, attribute_origin, load_config
from qlora_kit.core.errors import EXIT_OOM, ConfigError, ModelError
from qlora_kit.model.base import check_attention
from qlora_kit.ops.checkpointing import checkpointed_layers
from qlora_kit.plan.estimate import estimate
from qlora_kit.plan.fit import (
    assumed_free,
    free_gpu_memory,
    max_length_that_fits,
    memory_settings,
    micro_batch_size_that_fits,
    resolve_auto,
    suggest,
)
from qlora_kit.plan.parallel import STRATEGIES, Parallel, planning_for
from qlora_kit.plan.shape import ModelShape, beyond_context, read_shape
from qlora_kit.plan.terms import GiB, MiB

log = logging.getLogger("qlora_kit")

DEFAULT_GPU_GIB = 24.0


def run_plan(config_path: str | Path, overrides: list[str], gpu_memory: float | None = None,
             as_json: bool = False, num_gpus: int = 1, strategy: str = "ddp",
             prepare: Callable[[Config, dict[str, str]], tuple[Config, dict[str, str]]] | None = None) -> int:
    """``qlora-kit plan``: print the prediction (per GPU with ``num_gpus`` > 1); exit 0 when it fits, EXIT_OOM when not.

    ``prepare`` completes the loaded config as ``train`` does (the CLI passes the adoption of
    ``model.adapter``'s LoRA shape, ``rundir.start_adapter``).

    Raises:
        ConfigError: invalid config, ``num_gpus`` below 1 or an unknown ``strategy``.
        ModelError: the model's shape cannot be found.
    """
    if num_gpus < 1:
        raise ConfigError(f"--num-gpus must be at least 1, got {num_gpus}",
                          "give the number of GPUs training together, e.g. --num-gpus 2 (1 when left out)")
    if strategy not in STRATEGIES:
        raise ConfigError(f"--strategy {strategy!r} is not one of {', '.join(STRATEGIES)}",
                          "ddp: the whole model on every GPU; fsdp: sharded; fsdp-offload: sharded in host memory")

    cfg, sources = load_config(config_path, overrides)
    if prepare is not None:
        cfg, sources = prepare(cfg, sources)
    try:
        shape = read_shape(cfg.model)
        check_attention(shape.model_type, cfg.model.attn_implementation, cfg.model.name_or_path)
    except ModelError as exc:
        exc.key = exc.key or "model.name_or_path"
        attribute_origin(exc, sources)
        raise
    budget, budget_source = gpu_budget(gpu_memory)
    with planning_for(Parallel(num_gpus, strategy)) as parallel:
        report = build_report(cfg, shape, budget, budget_source)
    for warning in report["warnings"]:
        log.warning("%s", warning)
    report["parallel"] = {"gpus": parallel.gpus, "strategy": parallel.strategy, "per_gpu": not parallel.single,
                          "global_micro_batch_size": parallel.gpus * report["micro_batch_size"],
                          "global_batch_size": parallel.gpus * report["micro_batch_size"]
                          * cfg.train.gradient_accumulation_steps}
    if as_json:
        print(json.dumps(report, indent=2))
    else:
        print_report(report)
    return 0 if report["fits"] else EXIT_OOM


def gpu_budget(gpu_memory: float | None) -> tuple[int, str]:
    """Bytes free to plan for, and where that figure comes from.

    This GPU: what ``train``'s pre-flight sees free (``fit.free_gpu_memory``).  A card that
    cannot be asked (``--gpu-memory`` GiB, else an assumed 24 GiB card without a GPU here): its
    memory less what a desktop and other processes hold (``fit.assumed_free``).
    """
    if gpu_memory is not None:
        if not math.isfinite(gpu_memory) or gpu_memory <= 0 or gpu_memory > 1e6:
            raise ConfigError(f"--gpu-memory must be a positive number of GiB, got {gpu_memory:g}",
                              "give the card's memory in GiB, e.g. --gpu-memory 24")
        return _assumed(int(gpu_memory * GiB), f"--gpu-memory {gpu_memory:g}: a {gpu_memory:g} GiB card")
    try:
        import torch

        if torch.cuda.is_available():
            free, total = free_gpu_memory(torch.device("cuda", 0))
            return free, (f"{free / GiB:.1f} GiB free on this GPU ({torch.cuda.get_device_name(0)}, "
                          f"{total / GiB:.1f} GiB), as train's pre-flight sees it")
    except Exception:  # a broken CUDA setup must not stop planning
        pass
    return _assumed(int(DEFAULT_GPU_GIB * GiB), f"no GPU here: an assumed {DEFAULT_GPU_GIB:g} GiB card (set "
                                                "--gpu-memory)")


def _assumed(card: int, what: str) -> tuple[int, str]:
    free = assumed_free(card)
    return free, (f"{what} with {free / GiB:.1f} GiB free ({(card - free) / GiB:.1f} GiB assumed held by a "
                  "desktop and other processes)")


def build_report(cfg: Config, shape: ModelShape, budget: int, budget_source: str = "") -> dict[str, Any]:
    """The JSON-able prediction for ``cfg`` with its ``"auto"`` settings resolved for ``budget``."""
    resolved = resolve_auto(cfg, shape, budget)
    plan = estimate(resolved, shape)
    checkpointing = cfg.train.gradient_checkpointing
    fits_now = plan.total_bytes <= budget
    return {
        "model": cfg.model.name_or_path,
        "method": cfg.train.method,
        "shape": {k: v for k, v in asdict(shape).items()},
        "micro_batch_size": plan.micro_batch_size,
        "max_length": plan.max_length,
        "compute_dtype": plan.compute_dtype,
        "adapter_dtype": cfg.lora.adapter_dtype,
        "gradient_checkpointing": checkpointing,
        "optimizer": resolved.train.optimizer,
        "double_quant": cfg.model.double_quant,
        "memory_settings": memory_settings(resolved),
        "checkpointed_layers": len(checkpointed_layers(shape.num_layers, resolved.train.checkpoint_every_n_layers))
        if checkpointing else 0,
        "auto_settings": [k for k, v in memory_settings(cfg).items() if v == "auto"],
        "lora_targets": plan.targets,
        "lora_type": cfg.lora.type,
        "lora_init": cfg.lora.init,
        "trainable_parameters": plan.trainable_parameters,
        "weights_bytes": plan.weights_bytes,
        "peak_phase": plan.peak_phase,
        "peak_stage": plan.stage if plan.peak_phase == "backward" else None,
        "peak_allocated_bytes": plan.allocated_peak,
        "torch_allocated_peak_bytes": plan.torch_allocated_peak,
        "torch_reserved_peak_bytes": plan.torch_reserved_peak,
        "host_memory_bytes": plan.host_bytes,
        "total_bytes": plan.total_bytes,
        "total_gib": round(plan.total_bytes / GiB, 2),
        "gpu_memory_bytes": budget,
        "gpu_memory_source": budget_source,
        "fits": fits_now,
        "headroom_bytes": budget - plan.total_bytes,
        "max_length_that_fits": max_length_that_fits(cfg, shape, budget),
        "max_length_that_fits_without_offload": max_length_that_fits(cfg, shape, budget, offload=False),
        "max_length_that_fits_with_offload": (max_length_that_fits(cfg, shape, budget, offload=True)
                                              if checkpointing else None),
        "micro_batch_size_that_fits": micro_batch_size_that_fits(cfg, shape, budget),
        "fragmentation_fraction": plan.fragmentation_fraction,
        "breakdown": plan.breakdown(),
        "phases": plan.phase_totals(),
        "suggestion": None if fits_now else suggest(resolved, shape, budget),
        "warnings": [w for w in [beyond_context(plan.max_length, shape.max_position_embeddings,
                                                f"train.max_length is {plan.max_length} tokens")] if w],
    }


_LABELS = {
    "nf4_weights": "4-bit linear weights (NF4{dq})",
    "weights_16bit": "16-bit embeddings, lm_head, norms",
    "lora_parameters": "LoRA parameters ({adapter})",
    "lora_gradients": "LoRA gradients ({adapter})",
    "optimizer_state": "optimizer state ({opt})",
    "autocast_adapter_copies": "16-bit adapter copies (autocast)",
    "step_inputs": "token ids, labels, positions, RoPE tables",
    "checkpoints": "checkpointed layer inputs{offload}",
    "layer_activations": "activations of layers not checkpointed",
    "attention_mask": "attention mask",
    "layer_recompute": "one layer recomputed for backward",
    "backward_working": "backward gradients and temporaries ({stage})",
    "dequant_buffer": "dequantised weight buffer",
    "final_norm": "final norm input (fp32)",
    "fused_loss": "fused loss (tiles, labelled hidden states)",
    "logits_and_loss": "logits + fp32 loss and its gradient",
    "quantisation_buffer": "16-bit matrix being quantised",
    "ddp_gradient_buckets": "DDP gradient buckets (adapter gradients)",
    "fsdp_gathered_layers": "FSDP: decoder layers gathered (2)",
    "fragmentation_margin": "allocator fragmentation margin ({frag:.0%})",
    "cuda_context": "CUDA context + kernels",
    "vera_projections": "VeRA shared frozen projections",
    "adalora_importance": "AdaLoRA importance scores",
    "loraga_gradients": "LoRA-GA fp32 gradients of the target weights",
    "loraga_inputs": "LoRA-GA target inputs kept for the gradient",
    "loraga_forward_backward": "LoRA-GA forward/backward pass",
    "init_working": "adapter init SVD/QR working set (1 matrix)",
    "reference_adapter": "DPO reference adapter (frozen copy of model.adapter)",
    "reference_forward": "DPO reference forward (no gradients)",
}


def _human(n: int) -> str:
    return f"{n / GiB:.2f} GiB" if abs(n) >= GiB else f"{n / MiB:.0f} MiB"


def _tokens(n: int | None) -> str:
    return "none" if n is None else f"{n:,}"


def print_report(report: dict[str, Any]) -> None:
    """Print the prediction as a rich table with a verdict and what fits."""
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    console = Console(markup=False)  # paths and module names are text, not rich markup
    settings = report["memory_settings"]
    parallel = report.get("parallel") or {}
    where = ""
    if parallel.get("per_gpu"):
        where = f", {Parallel(parallel['gpus'], parallel['strategy']).label()}"
    pairs = " pairs: 2 sequences each" if report.get("method", "sft") != "sft" else ""
    table = Table(title=f"Memory plan: {report['model']} (B={report['micro_batch_size']}{pairs}, "
                        f"T={report['max_length']}, {report['compute_dtype']}, peak in {report['peak_phase']} phase"
                        f"{where})")
    table.add_column("component")
    table.add_column("memory", justify="right")
    context = {"dq": " + double quant" if report["double_quant"] else "", "opt": report["optimizer"],
               "adapter": report["adapter_dtype"], "stage": report["peak_stage"] or "loss",
               "frag": report["fragmentation_fraction"],
               "offload": " (2 on the GPU, the rest on the host)" if settings["activation_offload"] else ""}
    for key, value in report["breakdown"].items():
        if value:
            table.add_row(_LABELS.get(key, key).format(**context), _human(value))
    table.add_row(Text("predicted peak" + (" per GPU" if where else ""), style="bold"),
                  Text(_human(report["total_bytes"]), style="bold"))
    table.add_row("GPU memory free", f"{_human(report['gpu_memory_bytes'])} ({report['gpu_memory_source']})")
    console.print(table)
    verdict = Text("fits", style="green") if report["fits"] else Text("does NOT fit", style="red")
    console.print(Text.assemble(verdict, f": headroom {_human(report['headroom_bytes'])}; "
                                f"{report['trainable_parameters']:,} trainable parameters on "
                                f"{', '.join(report['lora_targets'])}"))
    auto = set(report["auto_settings"])
    shown = ", ".join(f"{k}={v}{' (auto)' if k in auto else ''}" for k, v in settings.items())
    console.print(f"memory settings: {shown}")
    if report["checkpointed_layers"]:
        layers = report["shape"]["num_layers"]
        console.print(f"checkpointed layers: {report['checkpointed_layers']} of {layers} (recomputed in the backward; "
                      f"the other {layers - report['checkpointed_layers']} keep their activations)")
    if report["host_memory_bytes"]:
        console.print(f"host memory (offloaded checkpoints / FSDP shards) per process: "
                      f"{_human(report['host_memory_bytes'])}")
    if parallel.get("per_gpu"):
        phases = report["phases"]
        loading = ("the base is loaded on the CPU and sharded unit by unit" if parallel["strategy"] == "fsdp-offload"
                   else "every rank quantises the whole base on its GPU first")
        context = report["breakdown"]["cuda_context"]
        console.print(f"{parallel['gpus']} GPUs: global micro-batch {parallel['global_micro_batch_size']} rows, "
                      f"global batch {parallel['global_batch_size']} rows per optimizer step; per GPU: load phase "
                      f"{_human(phases['load'] + context)} ({loading}), training "
                      f"{_human(max(phases['loss'], phases['backward']) + context)} (allocator margin not included)")
    console.print(f"longest max_length that fits: {_tokens(report['max_length_that_fits_without_offload'])} "
                  f"without activation offload, {_tokens(report['max_length_that_fits_with_offload'])} with it; "
                  f"largest micro_batch_size that fits: {_tokens(report['micro_batch_size_that_fits'])}")
    if report["suggestion"]:
        console.print(f"fix: {report['suggestion']}")
