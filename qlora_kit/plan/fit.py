"""What fits a memory budget: the largest length or batch, the suggestion, and the "auto" settings."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

from qlora_kit.core.config import Config
from qlora_kit.core.errors import OutOfMemoryError
from qlora_kit.ops.checkpointing import every_n_for
from qlora_kit.plan.estimate import estimate
from qlora_kit.plan.parallel import PARALLEL, Parallel, planning_for
from qlora_kit.plan.shape import ModelShape, load_shape_file
from qlora_kit.plan.techniques import fill_auto
from qlora_kit.plan.terms import CUDA_CONTEXT_BYTES, GiB, optimizer_bytes, variant_tensors

log = logging.getLogger("qlora_kit")


AUTO_HEADROOM = 0.10  # checkpoint_every_n_layers=auto keeps this fraction of the budget spare
# A card never has all of its memory free: a desktop session (display server, compositor, browser) and
# other processes hold some.  Planning for a card that cannot be asked (no GPU here, or --gpu-memory),
# this much of it is taken as in use, at most a tenth of the card.
ASSUMED_IN_USE = 1 * GiB
MORE_GPUS = (2, 4, 8)  # GPU counts tried with FSDP + CPU offload when a run fits no single card


LENGTH_STEP = 64  # max_length_that_fits is a multiple of this
MAX_SEARCH_LENGTH = 1 << 20
MAX_SEARCH_BATCH = 4096


def memory_minimal(cfg: Config, offload: bool | None = None) -> Config:
    """``cfg`` with every ``"auto"`` memory setting at its lowest-memory choice.

    Tiled MLP on, every layer checkpointed, 8-bit AdamW, offload on; ``offload`` (when
    given) sets activation offload whatever the config says (off without checkpointing).
    Values the user set are kept.
    """
    copy = fill_auto(cfg, tiled_mlp=True, checkpoint_every_n_layers=1, optimizer="adamw_8bit",
                      activation_offload=cfg.train.gradient_checkpointing)
    if offload is not None:
        copy.train.activation_offload = offload and copy.train.gradient_checkpointing
    return copy


def fits(cfg: Config, shape: ModelShape, budget: int, micro_batch_size: int | None = None,
         max_length: int | None = None, offload: bool | None = None) -> bool:
    """True when some choice allowed by ``cfg``'s ``"auto"`` settings fits ``budget`` bytes."""
    plan = estimate(memory_minimal(cfg, offload), shape, micro_batch_size, max_length)
    return plan.total_bytes <= budget


def max_length_that_fits(cfg: Config, shape: ModelShape, budget: int, offload: bool | None = None) -> int | None:
    """Largest max_length (a multiple of 64, up to the model's context) that fits; None if none does.

    ``offload`` forces activation offload on or off; by default the config's own setting
    (``auto`` allows it).
    """
    limit = min(shape.max_position_embeddings or MAX_SEARCH_LENGTH, MAX_SEARCH_LENGTH)
    return _largest(lambda k: fits(cfg, shape, budget, max_length=k * LENGTH_STEP, offload=offload), 1,
                    limit // LENGTH_STEP, scale=LENGTH_STEP)


def micro_batch_size_that_fits(cfg: Config, shape: ModelShape, budget: int) -> int | None:
    """Largest micro_batch_size at the configured max_length that fits; None if 1 does not."""
    return _largest(lambda b: fits(cfg, shape, budget, micro_batch_size=b), 1, MAX_SEARCH_BATCH)


def _largest(ok: Any, lo: int, hi: int, scale: int = 1) -> int | None:
    """Bisection for the largest k in [lo, hi] with ok(k), assuming ok is monotone decreasing."""
    if hi < lo or not ok(lo):
        return None
    if ok(hi):
        return hi * scale
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if ok(mid) else (lo, mid)
    return lo * scale


def suggest(cfg: Config, shape: ModelShape, budget: int) -> str:
    """The knob(s) to turn so that the run fits ``budget``; every option offered is checked to fit."""
    t, b, accum = cfg.train, cfg.train.micro_batch_size, cfg.train.gradient_accumulation_steps
    options = []
    length = max_length_that_fits(cfg, shape, budget)
    if length is not None and length < t.max_length:
        options.append(f"--set train.max_length={length} (the longest that fits)")
    if t.activation_offload is False and t.gradient_checkpointing:
        offloaded = max_length_that_fits(cfg, shape, budget, offload=True)
        if offloaded is not None and offloaded > (length or 0):
            options.append("--set train.activation_offload=true"
                           + (f" --set train.max_length={offloaded}" if offloaded < t.max_length else ""))
    batch = micro_batch_size_that_fits(cfg, shape, budget)
    if batch is not None and batch < b:
        options.append(f"--set train.micro_batch_size={batch} "
                       f"--set train.gradient_accumulation_steps={accum * math.ceil(b / batch)}")
    knobs = [
        ("train", {"gradient_checkpointing": True}, "--set train.gradient_checkpointing=true"),
        ("train", {"checkpoint_every_n_layers": 1}, "--set train.checkpoint_every_n_layers=1"),
        ("train", {"tiled_mlp": True}, "--set train.tiled_mlp=true"),
        ("train", {"fused_loss": True}, "--set train.fused_loss=true"),
        ("lora", {"dropout": 0.0}, "--set lora.dropout=0 (no per-adapter dropout copies)"),
    ]
    if cfg.lora.init == "lora_ga":  # its fp32 gradient of every target weight, not the activations, is the peak
        passes = _largest(lambda k: not fits(_variant(cfg, "lora", loraga_passes=k), shape, budget), 1, 64)
        if passes is not None and passes < 64 and passes + 1 > cfg.lora.loraga_passes:
            options.append(f"--set lora.loraga_passes={passes + 1} (LoRA-GA's gradients estimated in "
                           f"{passes + 1} groups, the samples re-run for each)")
        knobs += [("lora", {"target_modules": "attention"},
                   "--set lora.target_modules=attention (LoRA-GA keeps a float32 gradient of every target weight)"),
                  ("lora", {"init": "default"}, "--set lora.init=default")]
    for section, change, text in knobs:
        key, value = next(iter(change.items()))
        current = getattr(getattr(cfg, section), key)
        if current != value and current != "auto" and fits(_variant(cfg, section, **change), shape, budget):
            options.append(text)
    if not options:
        smallest = estimate(memory_minimal(_variant(cfg, "train", micro_batch_size=1, max_length=256)),
                            shape).total_bytes
        where = "one GPU" if PARALLEL.get().single else "each GPU"
        gpus = _more_gpus(cfg, shape, budget)
        if gpus is not None:
            return (f"even micro_batch_size=1 at max_length=256 needs {smallest / GiB:.1f} GiB on {where}: train on "
                    f"{gpus} GPUs with FSDP and CPU offload (`qlora-kit plan CONFIG --num-gpus {gpus} --strategy "
                    "fsdp-offload` shows the plan per GPU; README: Several GPUs), or use a card with more memory")
        return (f"even micro_batch_size=1 at max_length=256 needs {smallest / GiB:.1f} GiB on {where}: "
                "use a card with more memory, or a smaller model")
    return "; or ".join(options)


def _more_gpus(cfg: Config, shape: ModelShape, budget: int) -> int | None:
    """The fewest GPUs (of :data:`MORE_GPUS`) across which ``cfg`` fits ``budget`` per GPU with FSDP + CPU offload."""
    now = PARALLEL.get()
    for gpus in MORE_GPUS:
        if gpus < now.gpus or (gpus == now.gpus and now.strategy == "fsdp-offload"):
            continue
        with planning_for(Parallel(gpus, "fsdp-offload")):
            if fits(cfg, shape, budget):
                return gpus
    return None


def assumed_free(card_bytes: int) -> int:
    """What a card of ``card_bytes`` has free for training when it cannot be asked (:data:`ASSUMED_IN_USE`)."""
    return card_bytes - min(ASSUMED_IN_USE, card_bytes // 10)


def free_gpu_memory(device: Any) -> tuple[int, int]:
    """(bytes a run may plan for, the card's total) on a CUDA ``device``: the pre-flight's figure.

    What is free now (other processes and a desktop already hold some), plus what our allocator
    holds and the CUDA context the planner counts (it already exists and is not "free"), at most
    the card's total.
    """
    import torch

    free, total = torch.cuda.mem_get_info(device)
    return min(total, free + torch.cuda.memory_reserved(device) + CUDA_CONTEXT_BYTES), total


def _variant(cfg: Config, section: str, **values: Any) -> Config:
    """A copy of ``cfg`` with some values of one section changed."""
    copy = cfg.model_copy(deep=True)
    for key, value in values.items():
        setattr(getattr(copy, section), key, value)
    return copy


def resolve_auto(cfg: Config, shape: ModelShape, budget_bytes: int) -> Config:
    """A copy of ``cfg`` with every ``"auto"`` memory setting made concrete by the plan.

    - ``activation_offload``: on only when the run does not fit ``budget_bytes`` without it
      (after the tiled MLP was tried);
    - ``tiled_mlp``: on only when the untiled MLP does not fit (and the row is longer than a tile);
    - ``checkpoint_every_n_layers``: the fewest checkpointed layers that fit with :data:`AUTO_HEADROOM`
      to spare (fewer recomputed layers: faster; n may be fractional, see :func:`checkpointed_layers`),
      1 when even that is too much;
    - ``optimizer``: ``adamw_torch`` (fused on CUDA: fp32 states, no host sync in its step) when its
      states fit in what the rest of the plan leaves spare (with :data:`AUTO_HEADROOM`), so it never
      costs context length or recomputed layers; else ``adamw_8bit`` (bitsandbytes 0.50 synchronises
      the GPU once per parameter in its step); ``paged_adamw_8bit`` only when the run fits just
      because a paged state may leave the GPU under memory pressure.

    A run that fits in no arrangement gets the lowest-memory one (``check_fits`` then refuses it).
    """
    t = cfg.train
    offloads = [False, True] if t.activation_offload == "auto" else [bool(t.activation_offload)]
    tilings = [False, True] if t.tiled_mlp == "auto" else [t.tiled_mlp]
    every_n = 1 if t.checkpoint_every_n_layers == "auto" else t.checkpoint_every_n_layers
    candidates = [(o, m) for o in offloads for m in tilings if t.gradient_checkpointing or not o]
    chosen = None
    for offload, tiled in candidates:
        candidate = _concrete(cfg, offload, tiled, every_n)
        if estimate(candidate, shape).total_bytes <= budget_bytes:
            chosen = candidate
            break
    if chosen is None:
        chosen = _concrete(cfg, *candidates[-1], every_n)
    elif t.checkpoint_every_n_layers == "auto" and t.gradient_checkpointing:
        chosen.train.checkpoint_every_n_layers = _sparsest_checkpointing(chosen, shape,
                                                                         int(budget_bytes * (1 - AUTO_HEADROOM)))
    if t.optimizer == "auto":
        chosen.train.optimizer = _pick_optimizer(chosen, shape, budget_bytes)
    _log_resolution(cfg, chosen)
    return chosen


def _sparsest_checkpointing(cfg: Config, shape: ModelShape, roomy: int) -> float:
    """The every-n with the fewest checkpointed layers (the least recomputation) whose plan fits ``roomy`` bytes;
    1 when only checkpointing every layer does (or nothing does)."""
    L = shape.num_layers

    def fits(count: int) -> bool:
        every_n = every_n_for(L, count)
        return estimate(_variant(cfg, "train", checkpoint_every_n_layers=every_n), shape).total_bytes <= roomy

    lo, hi = 1, L  # bisection for the smallest count that fits (memory falls as the count grows)
    if fits(lo):
        return every_n_for(L, lo)
    if not fits(hi):
        return 1
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if fits(mid) else (mid, hi)
    return every_n_for(L, hi)


def _concrete(cfg: Config, offload: bool, tiled: bool, every_n: float) -> Config:
    copy = cfg.model_copy(deep=True)
    t = copy.train
    t.activation_offload, t.tiled_mlp, t.checkpoint_every_n_layers = offload, tiled, every_n
    if t.optimizer == "auto":
        t.optimizer = "adamw_8bit"
    return copy


def _pick_optimizer(cfg: Config, shape: ModelShape, budget: int) -> str:
    """The optimizer ``auto`` resolves to for ``cfg`` (planned with 8-bit AdamW) within ``budget`` bytes.

    ``adamw_torch`` when the run with its fp32 states stays within the budget less
    :data:`AUTO_HEADROOM` (no host sync per step: bitsandbytes 0.50's step synchronises the GPU once
    per parameter); ``paged_adamw_8bit`` when the run fits only if its pageable state may leave the
    GPU; else ``adamw_8bit``.
    """
    if estimate(_variant(cfg, "train", optimizer="adamw_torch"), shape).total_bytes <= budget * (1 - AUTO_HEADROOM):
        return "adamw_torch"
    plan = estimate(_variant(cfg, "train", optimizer="adamw_8bit"), shape)
    numels, _ = variant_tensors(shape, plan.targets, cfg.lora)
    _, pageable = optimizer_bytes(numels, "paged_adamw_8bit", 4)
    if plan.total_bytes > budget >= plan.total_bytes - pageable and pageable > 0:
        return "paged_adamw_8bit"
    return "adamw_8bit"


def _log_resolution(cfg: Config, resolved: Config) -> None:
    keys = ("activation_offload", "tiled_mlp", "checkpoint_every_n_layers", "optimizer")
    made = [f"{k}={getattr(resolved.train, k)}" for k in keys if getattr(cfg.train, k) == "auto"]
    if made:
        log.debug("memory plan: auto settings resolved to %s", ", ".join(made))


MEMORY_KEYS = ("packing", "fused_loss", "gradient_checkpointing", "checkpoint_every_n_layers", "tiled_mlp",
               "activation_offload", "optimizer")


def memory_settings(cfg: Config) -> dict[str, Any]:
    """The memory-relevant settings of ``cfg`` (data.packing and the train keys), as a flat mapping."""
    return {k: cfg.data.packing if k == "packing" else getattr(cfg.train, k) for k in MEMORY_KEYS}


def check_fits(cfg: Config, source_dir: Path, device: Any) -> None:
    """Refuse a run predicted not to fit in the free memory of ``device`` (CUDA only).

    ``cfg`` is the run's resolved config (no ``"auto"`` left: see :func:`resolve_auto`).

    Raises:
        OutOfMemoryError: predicted peak above the free memory, with the knob to turn.
        ModelError: ``source_dir`` has no readable config.json.
    """
    import torch

    dev = torch.device(device)
    if dev.type != "cuda":
        return
    shape = load_shape_file(Path(source_dir) / "config.json")
    plan = estimate(cfg, shape)
    budget, total = free_gpu_memory(dev)
    available = budget - CUDA_CONTEXT_BYTES
    need = plan.total_bytes - plan.cuda_context
    name = torch.cuda.get_device_name(dev)
    if need <= available:
        log.info("memory plan: ~%.1f GiB predicted peak, %.1f GiB free on %s", need / GiB, available / GiB, name)
        return
    raise OutOfMemoryError(
        f"this run is predicted to need {need / GiB:.1f} GiB of GPU memory at its peak "
        f"({plan.peak_phase} phase, micro_batch_size={plan.micro_batch_size}, max_length={plan.max_length}) "
        f"but only {available / GiB:.1f} GiB is free on {name} ({total / GiB:.1f} GiB card)",
        suggest(cfg, shape, budget)
        + "; `qlora-kit plan CONFIG` shows the breakdown; --skip-memory-check trains anyway",
    )


def predicted_need(cfg: Config, shape: ModelShape, device: Any) -> tuple[int, int]:
    """(predicted peak bytes of ``cfg`` beyond the CUDA context, bytes free for it on CUDA ``device`` now).

    The same figures as the pre-flight (:func:`check_fits`): free is :func:`free_gpu_memory`'s budget
    less the CUDA context, which already exists.
    """
    plan = estimate(cfg, shape)
    budget, _ = free_gpu_memory(device)
    return plan.total_bytes - plan.cuda_context, budget - CUDA_CONTEXT_BYTES
