"""The QLoRA SFT recipe: ``setup`` → ``train`` → ``finish``.

One readable loop instead of a trainer class hierarchy, because the guarantees users
need here are easier to keep in plain code:

- exact resume: the data order is a pure function of (seed, epoch), the LR of the step,
  and checkpoints carry optimizer, scheduler and every RNG state (see checkpoint.py);
- loss normalised over all trainable tokens of the accumulated batch (not per micro-batch);
- non-finite loss/gradient detection with no extra host sync in ``stop`` mode: a device
  flag is read together with the logged loss (and before every save);
- SIGTERM/SIGINT checkpoint at the next step boundary (signals.py);
- nothing is written that holds NaN/inf, and checkpoints/adapters appear atomically.

Memory and speed techniques live in ``qlora_kit/ops`` (one module each) and are switched
on in :func:`setup`: fused loss (no full logits), padding-free packing with packed
attention, tiled MLP, activation offload, fp32 adapters under autocast (fp16 loss
scaling on cards without native bf16).  ``"auto"`` settings are made concrete by the
planner (``plan.resolve_auto``) before anything is built.

Building blocks are the field's own: transformers models and schedulers, bitsandbytes
4-bit layers and 8-bit optimizers, peft adapters, trl's fused LM-head loss.
"""

from __future__ import annotations

import logging
import math
import random
import shutil
import sys
import time
import warnings
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from qlora_kit import checkpoint as ckpt
from qlora_kit import rundir
from qlora_kit.config import Config, dump_config, load_config, read_yaml, validate
from qlora_kit.errors import ConfigError, NonFiniteLossError, OutOfMemoryError, OutputError, Preempted
from qlora_kit.manifest import device_info, now_iso, package_versions, write_manifest
from qlora_kit.metrics import MetricsLog, plot_loss
from qlora_kit.signals import StopRequest

log = logging.getLogger("qlora_kit")

# Settings that change the model, the data or their order: resuming across a change is refused.
RESUME_BREAKING = (
    "model.name_or_path", "model.revision", "model.quant_type", "model.double_quant", "model.chat_template",
    "lora.r", "lora.alpha", "lora.dropout", "lora.target_modules", "lora.use_rslora", "lora.use_dora",
    "lora.adapter_dtype",
    "data.path", "data.val_path", "data.format", "data.split", "data.val_fraction", "data.val_max_rows",
    "data.train_on_inputs", "data.packing", "data.shuffle",
    "train.seed", "train.micro_batch_size", "train.gradient_accumulation_steps", "train.max_length",
    "train.optimizer",
)
MAX_CONSECUTIVE_SKIPS = 10
MIN_LOSS_SCALE = 1.0  # fp16 loss scaling: below this the run is not recovering


@dataclass
class Run:
    """Everything the loop needs, built by :func:`setup`."""

    cfg: Config
    config_text: str
    out: Path
    device: torch.device
    model: Any
    tokenizer: Any
    data: Any
    optimizer: torch.optim.Optimizer
    scheduler: Any
    total_steps: int
    micro_per_epoch: int
    manifest: dict[str, Any]
    metrics: MetricsLog
    step: int = 0
    micro_index: int = 0
    skipped_steps: int = 0
    skipped_consecutive: int = 0
    last_eval_step: int = -1
    last_save_step: int = -1
    last_train_loss: float | None = None
    last_eval_loss: float | None = None
    nonfinite: torch.Tensor | None = None  # device flag: any non-finite step so far (stop mode)
    first_bad_step: torch.Tensor | None = None
    params: list[torch.nn.Parameter] = field(default_factory=list)
    precision: Any = None  # ops.precision.Precision
    scaler: torch.amp.GradScaler | None = None  # fp16 compute only


# --------------------------------------------------------------------------- entry point


def run_training(
    config_path: str | Path,
    overrides: list[str],
    resume: bool = False,
    overwrite: bool = False,
    skip_memory_check: bool = False,
) -> int:
    """``qlora-kit train``: returns 0, or raises a QloraKitError with a documented exit code."""
    from qlora_kit.ops.allocator import configure_cuda_allocator

    configure_cuda_allocator()  # before anything touches CUDA
    cfg, sources = load_config(config_path, overrides)
    out = Path(cfg.output_dir).expanduser()
    resume_from = prepare_output_dir(out, resume=resume, overwrite=overwrite)
    if resume_from is not None:
        check_resume_compatible(resume_from, cfg)
    previous = ckpt.read_json(out / rundir.MANIFEST) if resume_from is not None else {}
    try:
        run = setup(cfg, dump_config(cfg, sources), out, resume_from, skip_memory_check)
    except BaseException:
        if resume_from is None:  # a fresh run that never started leaves nothing behind
            shutil.rmtree(out, ignore_errors=True)
        raise
    if run.step >= run.total_steps and previous.get("status") == "completed" and (out / rundir.ADAPTER).is_dir():
        write_manifest(out / rundir.MANIFEST, previous)  # nothing to do: keep the finished run as it was
        log.info("%s is already complete (%d of %d steps); raise train.max_steps with --set to train further",
                 out, run.step, run.total_steps)
        return 0
    with StopRequest() as stop:
        try:
            train(run, stop)
        except Preempted:
            _set_status(run, "preempted")
            raise
        except torch.cuda.OutOfMemoryError as exc:
            _set_status(run, "failed", "CUDA out of memory")
            raise _oom_error(run, exc) from exc
        except BaseException as exc:
            _set_status(run, "failed", f"{type(exc).__name__}: {exc}")
            raise
    finish(run)
    return 0


# --------------------------------------------------------------------------- output dir / resume


def prepare_output_dir(out: Path, resume: bool, overwrite: bool) -> Path | None:
    """Make ``out`` ready; return the checkpoint to resume from (or None).

    Raises:
        ConfigError: --resume and --overwrite together.
        OutputError: an existing run would be overwritten, or there is nothing to resume.
    """
    if resume and overwrite:
        raise ConfigError("--resume and --overwrite contradict each other", "pass only one of them")
    if out.exists() and not out.is_dir():
        raise OutputError(f"output_dir {out} exists and is a file", "choose another output_dir")
    has_files = out.is_dir() and any(out.iterdir())
    if resume:
        if not has_files:
            raise OutputError(f"nothing to resume: {out} does not exist or is empty", "drop --resume to start a run")
        removed = ckpt.remove_incomplete(out)
        for path in removed:
            log.warning("removed incomplete checkpoint %s (interrupted write)", path.name)
        latest = ckpt.latest_checkpoint(out)
        if latest is None:
            raise OutputError(
                f"{out} has no complete checkpoint to resume from",
                "drop --resume and pass --overwrite to start afresh (the old directory is moved aside)",
            )
        return latest
    if has_files:
        if not overwrite:
            what = "a qlora-kit run" if rundir.is_run_dir(out) else "files that are not from qlora-kit"
            raise OutputError(
                f"output_dir {out} already holds {what}",
                "--resume continues that run, --overwrite starts afresh (the old directory is moved aside), "
                "or set another output_dir",
            )
        aside = out.with_name(f"{out.name}.old-{datetime.now().strftime('%Y%m%d-%H%M%S')}")
        out.rename(aside)
        log.warning("--overwrite: moved the existing %s aside to %s (delete it when no longer needed)", out, aside)
    out.mkdir(parents=True, exist_ok=True)
    return None


def check_resume_compatible(checkpoint_dir: Path, cfg: Config) -> None:
    """Refuse to resume when settings that define the model or the data order changed.

    Raises:
        ConfigError: naming every changed setting with its old and new value.
    """
    old = validate(read_yaml(checkpoint_dir / "config.yaml"), origin=str(checkpoint_dir / "config.yaml"))
    old_flat, new_flat = _flatten(old.model_dump()), _flatten(cfg.model_dump())
    changed = [k for k in RESUME_BREAKING if old_flat.get(k) != new_flat.get(k)]
    if changed:
        lines = "; ".join(f"{k}: {old_flat.get(k)!r} -> {new_flat.get(k)!r}" for k in changed)
        raise ConfigError(
            f"cannot resume {checkpoint_dir.name}: the config changed in ways that break the run ({lines})",
            "restore those settings, or start a new run with --overwrite / another output_dir",
        )
    soft = [k for k in new_flat if k not in RESUME_BREAKING and old_flat.get(k) != new_flat.get(k)]
    if soft:
        log.warning("resuming with changed settings: %s (the LR curve may differ from the first run)",
                    ", ".join(soft))


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            flat.update(_flatten(v, f"{prefix}{k}."))
        else:
            flat[f"{prefix}{k}"] = v
    return flat


# --------------------------------------------------------------------------- setup


def setup(cfg: Config, config_text: str, out: Path, resume_from: Path | None, skip_memory_check: bool) -> Run:
    """Load data first (fails fast), then the 4-bit model, adapters, optimizer and schedule.

    ``cfg`` may hold ``"auto"`` memory settings; the returned run's ``cfg`` has them resolved.
    """
    from qlora_kit import model as qmodel
    from qlora_kit.ops.precision import resolve_precision

    seed_everything(cfg.train.seed)
    device = qmodel.pick_device()
    compute_dtype = qmodel.resolve_compute_dtype(cfg.model.compute_dtype, device)
    precision = resolve_precision(compute_dtype, cfg.lora.adapter_dtype, device)
    source = qmodel.resolve_source(cfg.model)
    cfg = resolve_memory_settings(cfg, source, device, _recorded_memory(out) if resume_from is not None else None)
    tokenizer = qmodel.load_tokenizer(source, cfg.model)
    data = _setup_data(cfg, tokenizer, out)
    if resume_from is not None:
        _check_data_unchanged(resume_from, data.fingerprint)
    if device.type == "cuda" and not skip_memory_check:
        _check_memory(cfg, source, device)
    model = build_model(cfg, source, precision)
    if cfg.train.fused_loss:
        cfg = _check_fused_loss(cfg, model, data, tokenizer, precision)
        if not cfg.train.fused_loss and device.type == "cuda" and not skip_memory_check:
            _check_memory(cfg, source, device)  # full logits need more memory: re-check before training
    spec = qmodel.quant_spec(model, cfg.model, compute_dtype)
    trainable, total = qmodel.count_parameters(model)
    log.info("model: %s | 4-bit %s (double quant: %s) | LoRA r=%d on %s | trainable %s of %s parameters",
             cfg.model.name_or_path, spec.quant_type, spec.double_quant, cfg.lora.r,
             ",".join(model.peft_config["default"].target_modules), f"{trainable:,}", f"{total:,}")
    (out / rundir.CONFIG).write_text(config_text)
    tokenizer.save_pretrained(out / rundir.TOKENIZER)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(cfg, params, device)
    micro_per_epoch = len(_epoch_plan(cfg, data, 0))
    total_steps = compute_total_steps(cfg, micro_per_epoch)
    scheduler = build_scheduler(cfg, optimizer, total_steps)
    manifest = _new_manifest(cfg, device, source, spec, data, model, trainable, out, resume_from)
    manifest["memory"] = memory_record(cfg, model, precision)
    run = Run(cfg, config_text, out, device, model, tokenizer, data, optimizer, scheduler, total_steps,
              micro_per_epoch, manifest, MetricsLog(out / rundir.METRICS), params=params,
              precision=precision, scaler=precision.make_scaler())
    run.nonfinite = torch.zeros((), dtype=torch.bool, device=device)
    run.first_bad_step = torch.full((), -1, dtype=torch.long, device=device)
    if resume_from is not None:
        _restore(run, resume_from)
    write_manifest(out / rundir.MANIFEST, manifest)
    return run


MEMORY_KEYS = ("checkpoint_every_n_layers", "tiled_mlp", "activation_offload", "optimizer")


def resolve_memory_settings(cfg: Config, source: Path, device: torch.device,
                            recorded: dict[str, Any] | None = None) -> Config:
    """``cfg`` with every ``"auto"`` memory setting made concrete by the planner (logged).

    On ``--resume`` the choices recorded in the run's manifest are kept for the settings left
    "auto" (``recorded``): another card or more free memory must not change the optimizer class
    or the computation of a resumed run.
    """
    from qlora_kit.errors import ModelError
    from qlora_kit.plan import conservative_settings, load_shape_file, resolve_auto

    pinned = {k: recorded[k] for k in MEMORY_KEYS if recorded and k in recorded and
              getattr(cfg.train, k) == "auto"}
    if pinned:
        cfg = cfg.model_copy(deep=True)
        for key, value in pinned.items():
            setattr(cfg.train, key, value)
        log.info("resume: keeping the memory settings the run started with (%s)",
                 ", ".join(f"{k}={v}" for k, v in pinned.items()))
    try:
        shape = load_shape_file(source / "config.json")
    except ModelError as exc:  # an architecture the planner cannot model: safe settings
        log.warning("memory planner unavailable (%s): conservative memory settings", exc.message)
        resolved = conservative_settings(cfg)
    else:
        resolved = resolve_auto(cfg, shape, device_memory(device))
    t = resolved.train
    log.info("memory settings: packing=%s fused_loss=%s checkpoint_every_n_layers=%s tiled_mlp=%s "
             "activation_offload=%s optimizer=%s", resolved.data.packing, t.fused_loss,
             t.checkpoint_every_n_layers, t.tiled_mlp, t.activation_offload, t.optimizer)
    return resolved


def device_memory(device: torch.device) -> int:
    """Memory the run may plan for on ``device`` (host RAM for the CPU).

    CUDA: what is free now (other processes and a desktop already hold some), plus what our
    allocator holds and the CUDA context the planner counts, capped at the card's total.
    """
    if device.type == "cuda":
        from qlora_kit.plan import CUDA_CONTEXT_BYTES

        free, total = torch.cuda.mem_get_info(device)
        return min(total, free + torch.cuda.memory_reserved(device) + CUDA_CONTEXT_BYTES)
    import psutil

    return psutil.virtual_memory().total


def build_model(cfg: Config, source: Path, precision: Any) -> Any:
    """NF4 base → fused loss head → LoRA (+ checkpointing) → packed attention, tiled MLP, offload."""
    from qlora_kit import model as qmodel
    from qlora_kit.ops import loss, packing, precision as prec, tiled_mlp

    device, t = precision.device, cfg.train
    model = qmodel.load_quantized_base(source, cfg.model, precision.compute_dtype, device)
    if t.fused_loss:
        loss.add_fused_loss(model)  # before peft wraps the model
    model = qmodel.attach_lora(model, cfg.lora, precision.adapter_dtype, t.gradient_checkpointing,
                               t.checkpoint_every_n_layers)
    if precision.autocast:
        prec.keep_adapter_inputs_in_compute_dtype(model)
    packing.use_packed_attention(model)
    if t.tiled_mlp:
        log.info("tiled_mlp: %d MLPs computed in tiles of %d tokens", tiled_mlp.tile_mlps(model),
                 tiled_mlp.MLP_TILE_TOKENS)
    if t.activation_offload:
        _enable_offload(model, cfg, device)
    model.train()
    return model


def _check_fused_loss(cfg: Config, model: Any, data: Any, tokenizer: Any, precision: Any) -> Config:
    """Keep the fused loss only if it reproduces the model's own loss on the first batch."""
    from qlora_kit.data import collate
    from qlora_kit.ops.loss import check_fused_loss

    rows = _epoch_plan(cfg, data, 0)[0]
    batch = to_device(collate(data.train, rows, tokenizer.pad_token_id, cfg.train.max_length, cfg.data.packing),
                      precision.device)
    with precision.forward_context():
        if check_fused_loss(model, batch):
            return cfg
    log.warning("fused_loss: the fused loss differs from this model's own loss (its forward changes the logits "
                "in a way the fused path does not know); training with the full-logits loss instead")
    cfg = cfg.model_copy(deep=True)
    cfg.train.fused_loss = False
    return cfg


def _enable_offload(model: Any, cfg: Config, device: torch.device) -> None:
    from qlora_kit.ops.offload import ActivationOffload, enable_offload

    if device.type != "cuda":
        log.info("activation_offload: nothing to do on CPU (activations already live in host memory)")
        return
    enable_offload(model, ActivationOffload(device), cfg.train.checkpoint_every_n_layers)
    log.info("activation_offload: checkpointed layer inputs kept in pinned host memory")


def _recorded_memory(out: Path) -> dict[str, Any] | None:
    """The memory settings recorded in ``out``'s manifest (None for runs that predate them)."""
    manifest = ckpt.read_json(out / rundir.MANIFEST)
    memory = manifest.get("memory") if isinstance(manifest, dict) else None
    return memory if isinstance(memory, dict) else None


def memory_record(cfg: Config, model: Any, precision: Any) -> dict[str, Any]:
    """The memory/speed settings this run actually used (for the manifest)."""
    t = cfg.train
    return {
        "packing": cfg.data.packing, "fused_loss": t.fused_loss, "gradient_checkpointing": t.gradient_checkpointing,
        "checkpoint_every_n_layers": t.checkpoint_every_n_layers, "tiled_mlp": t.tiled_mlp,
        "activation_offload": bool(t.activation_offload) and precision.device.type == "cuda",
        "optimizer": t.optimizer, "attention": getattr(model.config, "_attn_implementation", None),
        "compute_dtype": str(precision.compute_dtype).removeprefix("torch."),
        "adapter_dtype": str(precision.adapter_dtype).removeprefix("torch."),
        "autocast": precision.autocast, "loss_scaling": precision.loss_scaling,
    }


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _setup_data(cfg: Config, tokenizer: Any, out: Path) -> Any:
    from qlora_kit.data import build_data, print_summary

    data = build_data(cfg.data, tokenizer, cfg.train.max_length, cfg.train.seed)
    print_summary(data.summary)
    ckpt.write_json_atomic(out / rundir.DATA_SUMMARY, data.summary.to_json())
    with open(out / rundir.HELDOUT, "w", encoding="utf-8") as fh:
        import json

        for row in data.heldout:
            fh.write(json.dumps(row) + "\n")
    return data


def _check_data_unchanged(resume_from: Path, fingerprint: dict[str, Any]) -> None:
    old = ckpt.read_checkpoint_state(resume_from).get("data_fingerprint", {})
    for key in ("sha256", "val_sha256"):
        if old.get(key) != fingerprint.get(key):
            raise ConfigError(
                f"cannot resume {resume_from.name}: the data file changed since it was written "
                f"({key} {str(old.get(key))[:12]} -> {str(fingerprint.get(key))[:12]})",
                "restore the original data file, or start a new run with --overwrite / another output_dir",
            )


def _check_memory(cfg: Config, source: Path, device: torch.device) -> None:
    from qlora_kit.errors import ModelError
    from qlora_kit.plan import check_fits

    try:
        check_fits(cfg, source, device)
    except ModelError as exc:  # an architecture the planner cannot model: train without the check
        log.warning("memory pre-flight skipped: %s", exc.message)


def build_optimizer(cfg: Config, params: list[torch.nn.Parameter], device: torch.device) -> torch.optim.Optimizer:
    """bitsandbytes 8-bit AdamW (non-paged or paged), paged 32-bit AdamW, or torch AdamW (fused on CUDA)."""
    lr, wd = cfg.train.learning_rate, cfg.train.weight_decay
    name = cfg.train.optimizer
    if name == "adamw_torch":
        return torch.optim.AdamW(params, lr=lr, weight_decay=wd, fused=device.type == "cuda")
    import bitsandbytes as bnb

    if device.type != "cuda" and name.startswith("paged_"):
        log.info("%s: paged memory needs CUDA; bitsandbytes uses its non-paged version on CPU", name)
    classes = {"adamw_8bit": bnb.optim.AdamW8bit, "paged_adamw_8bit": bnb.optim.PagedAdamW8bit,
               "paged_adamw_32bit": bnb.optim.PagedAdamW32bit}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return classes[name](params, lr=lr, weight_decay=wd)


def compute_total_steps(cfg: Config, micro_per_epoch: int) -> int:
    """``train.max_steps``, or enough optimizer steps for ``train.num_epochs``."""
    if cfg.train.max_steps is not None:
        return cfg.train.max_steps
    wanted = cfg.train.num_epochs * micro_per_epoch
    steps = max(1, math.ceil(wanted / cfg.train.gradient_accumulation_steps))
    if steps * cfg.train.gradient_accumulation_steps > 1.5 * wanted:
        log.warning("the data gives %d micro-batches per epoch but one optimizer step takes %d: the run covers "
                    "%.1f epochs instead of %s (lower train.gradient_accumulation_steps)", micro_per_epoch,
                    cfg.train.gradient_accumulation_steps,
                    steps * cfg.train.gradient_accumulation_steps / micro_per_epoch, cfg.train.num_epochs)
    return steps


def warmup_steps(cfg: Config, total_steps: int) -> int:
    """Explicit ``warmup_steps`` or ``warmup_ratio`` of the run."""
    if cfg.train.warmup_steps is not None:
        return min(cfg.train.warmup_steps, max(total_steps - 1, 0))
    return min(int(cfg.train.warmup_ratio * total_steps), max(total_steps - 1, 0))


def build_scheduler(cfg: Config, optimizer: torch.optim.Optimizer, total_steps: int) -> Any:
    """Warmup then cosine / linear decay, or constant (transformers' schedules)."""
    from transformers import get_scheduler

    name = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}[cfg.train.lr_scheduler]
    return get_scheduler(name, optimizer, num_warmup_steps=warmup_steps(cfg, total_steps),
                         num_training_steps=total_steps)


def _new_manifest(cfg: Config, device: torch.device, source: Path, spec: Any, data: Any, model: Any,
                  trainable: int, out: Path, resume_from: Path | None) -> dict[str, Any]:
    previous = ckpt.read_json(out / rundir.MANIFEST) if resume_from is not None else {}
    return {
        "qlora_kit_version": package_versions().get("qlora-kit"),
        "status": "running",
        "versions": package_versions(),
        "device": device_info(device),
        "base": {"name_or_path": cfg.model.name_or_path, "source_dir": str(source.resolve()),
                 "revision": cfg.model.revision},
        "quant": spec.to_json(),
        "data": data.fingerprint,
        "lora": {"target_modules": sorted(model.peft_config["default"].target_modules),
                 "trainable_parameters": trainable},
        "start_time": previous.get("start_time", now_iso()),
        "resumed": previous.get("resumed", []) + ([{"from": resume_from.name, "at": now_iso()}] if resume_from else []),
        "end_time": None,
        "final_metrics": None,
    }


def _restore(run: Run, resume_from: Path) -> None:
    state = ckpt.load_checkpoint(resume_from, run.model, run.optimizer, run.scheduler)
    run.step, run.micro_index = state["step"], state["micro_index"]
    run.skipped_steps = state.get("skipped_steps", 0)
    run.last_save_step = run.step
    run.last_eval_step = state.get("last_eval_step", -1)
    if run.scaler is not None and "grad_scaler" in state:
        run.scaler.load_state_dict(state["grad_scaler"])
    run.metrics.truncate_after(run.step)
    log.info("resumed from %s: step %d of %d", resume_from.name, run.step, run.total_steps)


# --------------------------------------------------------------------------- data order


def _epoch_plan(cfg: Config, data: Any, epoch: int) -> list[list[list[int]]]:
    from qlora_kit.data import plan_batches

    lengths = [len(s["input_ids"]) for s in data.train]
    return plan_batches(lengths, cfg.train.micro_batch_size, cfg.train.max_length, cfg.data.packing,
                        cfg.train.seed, epoch, cfg.data.shuffle)


def micro_batches_from(cfg: Config, data: Any, start: int) -> Iterator[tuple[int, list[list[int]]]]:
    """Yield (epoch, rows) for the global micro-batch index ``start`` onwards, forever.

    The order is a pure function of the seed and the epoch, so a resumed run sees
    exactly the batches an uninterrupted run would have seen.
    """
    epoch, first = 0, 0
    while True:
        plan = _epoch_plan(cfg, data, epoch)
        if not plan:
            raise RuntimeError("empty batch plan")
        if first + len(plan) > start:
            for rows in plan[max(0, start - first):]:
                yield epoch, rows
            start = first + len(plan)
        first += len(plan)
        epoch += 1


# --------------------------------------------------------------------------- the loop


def train(run: Run, stop: StopRequest) -> None:
    """Optimizer steps until ``total_steps``, logging, evaluating and checkpointing on schedule."""
    from qlora_kit.data import collate

    cfg = run.cfg.train
    eval_every = cfg.eval_steps or cfg.save_steps
    stream = micro_batches_from(run.cfg, run.data, run.micro_index)
    pad_id = run.tokenizer.pad_token_id
    window = _Window()
    progress = _Progress(run.total_steps, run.step)
    log.info("training: %d optimizer steps x %d micro-batches of %d (max_length %d) on %s",
             run.total_steps - run.step, cfg.gradient_accumulation_steps, cfg.micro_batch_size, cfg.max_length,
             run.device)
    try:
        while run.step < run.total_steps:
            if stop.requested:
                _preempt(run, stop)
            lr = run.optimizer.param_groups[0]["lr"]
            micro = [next(stream)[1] for _ in range(cfg.gradient_accumulation_steps)]
            batches = [collate(run.data.train, rows, pad_id, cfg.max_length, run.cfg.data.packing) for rows in micro]
            loss, grad_norm = train_step(run, batches)
            n_tokens = sum(len(run.data.train[i]["input_ids"]) for rows in micro for row in rows for i in row)
            run.micro_index += cfg.gradient_accumulation_steps
            skipped = _guard_nonfinite(run, loss, grad_norm)
            optimizer_step(run, skipped)
            run.optimizer.zero_grad(set_to_none=True)
            scheduler_step(run)
            run.step += 1
            if not skipped:
                window.add(loss, n_tokens)
            if run.step % cfg.logging_steps == 0 or run.step == run.total_steps:
                _log_step(run, window, lr, grad_norm, progress)
            if run.data.val and (run.step % eval_every == 0 or run.step == run.total_steps):
                _evaluate_and_log(run, stop)
            if run.step % cfg.save_steps == 0 or run.step == run.total_steps:
                save(run)
    finally:
        progress.close()


def train_step(run: Run, batches: list[dict[str, Any]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward/backward over the accumulated micro-batches; returns (loss, grad norm) on device.

    The loss is the sum over *all* trainable tokens of the step divided by their number
    (``num_items_in_batch``), so micro-batches with few trainable tokens are not
    over-weighted.  Each forward runs in the run's precision context (autocast with fp32
    adapters); with fp16 compute the loss is scaled before the backward and the gradients
    unscaled before clipping.
    """
    from qlora_kit.ops.loss import causal_lm_loss, count_targets

    n_items = max(1, sum(count_targets(b["labels"]) for b in batches))
    loss_sum = torch.zeros((), device=run.device)
    for batch in batches:
        batch = to_device(batch, run.device)
        with run.precision.forward_context():
            loss = causal_lm_loss(run.model, batch, n_items, run.cfg.train.fused_loss)
        (run.scaler.scale(loss) if run.scaler is not None else loss).backward()
        loss_sum += loss.detach().float()
    if run.scaler is not None:
        run.scaler.unscale_(run.optimizer)
    max_norm = run.cfg.train.max_grad_norm or float("inf")
    grad_norm = torch.nn.utils.clip_grad_norm_(run.params, max_norm)
    return loss_sum, grad_norm.detach().float()


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """Tensors of a collated batch on ``device`` (host values such as ``max_length_q`` stay)."""
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def optimizer_step(run: Run, skipped: bool) -> None:
    """Apply the step (the loss scaler skips it by itself when the scaled gradients overflowed)."""
    if run.scaler is None:
        if not skipped:
            run.optimizer.step()
        return
    if not skipped:
        run.scaler.step(run.optimizer)  # one host sync: the scaler reads its overflow flag
    run.scaler.update()


def scheduler_step(run: Run) -> None:
    """Advance the LR schedule (a pure function of the step, skipped steps included)."""
    with warnings.catch_warnings():  # torch warns when the loss scaler skipped the very first optimizer step
        warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)` before")
        run.scheduler.step()


def _guard_nonfinite(run: Run, loss: torch.Tensor, grad_norm: torch.Tensor) -> bool:
    """Record a non-finite step; return True when the optimizer step must be skipped.

    ``stop`` mode only updates device flags (no host sync); they are read with the logged
    loss and before every save.  ``skip`` mode reads the flag every step (one sync).  With
    fp16 loss scaling, overflowing gradients are the scaler's business (it skips the step
    and lowers the scale); only a non-finite loss counts here.
    """
    finite = torch.isfinite(loss) if run.scaler is not None else torch.isfinite(loss) & torch.isfinite(grad_norm)
    bad = ~finite
    if run.cfg.train.on_nonfinite == "stop":
        run.first_bad_step = torch.where(run.nonfinite | ~bad, run.first_bad_step, run.step + 1)
        run.nonfinite = run.nonfinite | bad
        return False
    if not bool(bad):
        run.skipped_consecutive = 0
        return False
    run.skipped_steps += 1
    run.skipped_consecutive += 1
    log.warning("step %d: non-finite loss or gradient; step skipped (%d skipped so far)", run.step + 1,
                run.skipped_steps)
    if run.skipped_consecutive >= MAX_CONSECUTIVE_SKIPS:
        raise NonFiniteLossError(
            f"{MAX_CONSECUTIVE_SKIPS} consecutive steps had a non-finite loss; stopping",
            "lower train.learning_rate, use bfloat16 compute, or check the data",
        )
    return True


def _raise_if_nonfinite(run: Run, bad: bool) -> None:
    if not bad:
        return
    first = int(run.first_bad_step)
    last = ckpt.latest_checkpoint(run.out)
    where = f"; the last good checkpoint is {last.name}" if last else "; no checkpoint was written before it"
    raise NonFiniteLossError(
        f"non-finite loss or gradient at step {first}: training stopped, nothing was saved after it{where}",
        "lower train.learning_rate or max_grad_norm, use bfloat16 compute, check the data; "
        "or set train.on_nonfinite=skip",
    )


def _raise_if_scale_collapsed(run: Run, scale: float | None) -> None:
    """fp16: a loss scale below 1 means the gradients kept overflowing (or are NaN) step after step."""
    if scale is not None and scale < MIN_LOSS_SCALE:
        raise NonFiniteLossError(
            f"the fp16 loss scale fell to {scale:g} by step {run.step}: the gradients are non-finite step after "
            "step; nothing was saved after the last good checkpoint",
            "lower train.learning_rate or max_grad_norm, check the data, or train on a GPU with bfloat16 "
            "(compute capability 8.0+)",
        )


@dataclass
class _Window:
    """Loss and throughput since the last log line (device tensors until logged)."""

    loss: torch.Tensor | None = None
    steps: int = 0
    tokens: int = 0
    start: float = field(default_factory=time.perf_counter)

    def add(self, loss: torch.Tensor, tokens: int) -> None:
        self.loss = loss if self.loss is None else self.loss + loss
        self.steps += 1
        self.tokens += tokens

    def reset(self) -> None:
        self.loss, self.steps, self.tokens, self.start = None, 0, 0, time.perf_counter()


def _log_step(run: Run, window: _Window, lr: float, grad_norm: torch.Tensor, progress: "_Progress") -> None:
    if window.loss is None:  # every step of the window was skipped (on_nonfinite=skip)
        window.reset()
        return
    scale = run.scaler.get_scale() if run.scaler is not None else None
    values = torch.stack([window.loss / window.steps, grad_norm, run.nonfinite.float()]).tolist()  # one sync
    loss, gnorm, bad = values
    _raise_if_nonfinite(run, bad > 0)
    _raise_if_scale_collapsed(run, scale)
    elapsed = time.perf_counter() - window.start
    record: dict[str, Any] = {
        "step": run.step,
        "epoch": round(run.micro_index / run.micro_per_epoch, 4),
        "loss": round(loss, 6),
        "learning_rate": lr,
        "grad_norm": round(gnorm, 6),
        "tokens_per_second": round(window.tokens / max(elapsed, 1e-9), 2),
    }
    if run.skipped_steps:
        record["skipped_steps"] = run.skipped_steps
    if scale is not None:
        record["loss_scale"] = scale
    if run.device.type == "cuda":
        record["peak_memory_allocated"] = torch.cuda.max_memory_allocated(run.device)
        record["peak_memory_reserved"] = torch.cuda.max_memory_reserved(run.device)
    run.metrics.append(record)
    run.last_train_loss = loss
    progress.update(run.step, record)
    window.reset()


def evaluate(run: Run, stop: StopRequest) -> float | None:
    """Token-weighted mean loss on the validation rows; None when interrupted by a stop signal.

    Batched like training (same packing, same fused loss, same precision context), in
    eval mode and without gradients.
    """
    from qlora_kit.data import collate, plan_batches
    from qlora_kit.ops.loss import causal_lm_loss, count_targets

    cfg = run.cfg
    lengths = [len(s["input_ids"]) for s in run.data.val]
    plan = plan_batches(lengths, cfg.train.micro_batch_size, cfg.train.max_length, cfg.data.packing,
                        cfg.train.seed, 0, False)
    total = torch.zeros((), device=run.device)
    count = 0
    run.model.eval()
    try:
        with torch.no_grad():
            for rows in plan:
                if stop.requested:
                    return None
                batch = collate(run.data.val, rows, run.tokenizer.pad_token_id, cfg.train.max_length,
                                cfg.data.packing)
                n = count_targets(batch["labels"])
                with run.precision.forward_context():
                    loss = causal_lm_loss(run.model, to_device(batch, run.device), max(n, 1), cfg.train.fused_loss)
                total += loss.float() * n
                count += n
    finally:
        run.model.train()
    return float(total / max(count, 1))


def _evaluate_and_log(run: Run, stop: StopRequest) -> None:
    eval_loss = evaluate(run, stop)
    if eval_loss is None:
        return  # interrupted: the caller checkpoints at this step boundary
    run.last_eval_loss, run.last_eval_step = eval_loss, run.step
    run.metrics.append({"step": run.step, "eval_loss": round(eval_loss, 6)})
    log.info("step %d: eval loss %.4f", run.step, eval_loss)


# --------------------------------------------------------------------------- saving


def save(run: Run) -> Path:
    """Checkpoint the current step, refusing to write non-finite weights."""
    if run.last_save_step == run.step:
        return run.out / f"{rundir.CHECKPOINT_PREFIX}{run.step}"
    _raise_if_nonfinite(run, bool(run.nonfinite) or not adapters_finite(run))
    state = {
        "micro_index": run.micro_index,
        "total_steps": run.total_steps,
        "skipped_steps": run.skipped_steps,
        "last_eval_step": run.last_eval_step,
        "data_fingerprint": run.data.fingerprint,
        "saved_at": now_iso(),
    }
    if run.scaler is not None:
        state["grad_scaler"] = run.scaler.state_dict()
    path = ckpt.save_checkpoint(run.out, run.step, run.model, run.optimizer, run.scheduler, state, run.config_text)
    ckpt.prune_checkpoints(run.out, run.cfg.train.save_total_limit)
    run.last_save_step = run.step
    log.info("saved %s", path.name)
    return path


def adapters_finite(run: Run) -> bool:
    """True when every trainable weight is finite (one sync)."""
    flags = torch.stack([torch.isfinite(p).all() for p in run.params])
    return bool(flags.all())


def _preempt(run: Run, stop: StopRequest) -> None:
    path = save(run)
    raise Preempted(
        f"stopped by {stop.signal_name} at step {run.step} of {run.total_steps}; checkpoint saved in {path}",
        "continue with the same command plus --resume",
    )


def finish(run: Run) -> None:
    """Publish the final adapter, plot, and mark the manifest completed."""
    if not adapters_finite(run):
        _raise_if_nonfinite(run, True)
    tmp = run.out / f".tmp-{rundir.ADAPTER}"
    ckpt.save_adapter(run.model, tmp)
    ckpt.publish_dir(tmp, run.out / rundir.ADAPTER)
    plot_loss(run.metrics.read(), run.out / rundir.LOSS_PLOT)
    run.manifest["final_metrics"] = {"step": run.step, "train_loss": run.last_train_loss,
                                     "eval_loss": run.last_eval_loss, "skipped_steps": run.skipped_steps}
    _set_status(run, "completed")
    log.info("done: adapter in %s", run.out / rundir.ADAPTER)
    log.info("next: qlora-kit generate %s \"your prompt\"  |  qlora-kit export %s --out %s-merged",
             run.out, run.out, run.out)


def _set_status(run: Run, status: str, error: str | None = None) -> None:
    run.manifest["status"] = status
    run.manifest["end_time"] = now_iso()
    if error:
        run.manifest["error"] = error
    write_manifest(run.out / rundir.MANIFEST, run.manifest)


def _oom_error(run: Run, exc: BaseException) -> OutOfMemoryError:
    """Turn a CUDA OOM into the knob to turn, with what the planner predicted for this config."""
    knobs = ("lower train.micro_batch_size or train.max_length (raise gradient_accumulation_steps to keep the "
             "batch); `qlora-kit plan CONFIG` shows what fits")
    predicted = ""
    try:
        from qlora_kit.plan import GiB, estimate, load_shape_file, suggest

        shape = load_shape_file(Path(run.manifest["base"]["source_dir"]) / "config.json")
        predicted = f"; the planner predicted {estimate(run.cfg, shape).total_bytes / GiB:.1f} GiB for this config"
        if run.device.type == "cuda":
            knobs = suggest(run.cfg, shape, torch.cuda.get_device_properties(run.device).total_memory)
    except Exception as plan_exc:  # the planner is advisory here; never hide the OOM behind it
        log.debug("memory planner failed: %s", plan_exc)
    return OutOfMemoryError(f"CUDA out of memory at step {run.step + 1}{predicted}", knobs)


class _Progress:
    """A rich progress bar on a terminal; plain log lines otherwise (CI, files)."""

    def __init__(self, total: int, done: int):
        self.bar = None
        if sys.stderr.isatty():
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(TextColumn("train"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                                TextColumn("{task.fields[info]}"), transient=False)
            self.task = self.bar.add_task("train", total=total, completed=done, info="")
            self.bar.start()

    def update(self, step: int, record: dict[str, Any]) -> None:
        info = (f"loss {record['loss']:.4f}  lr {record['learning_rate']:.2e}  "
                f"{record['tokens_per_second']:.0f} tok/s")
        if self.bar is not None:
            self.bar.update(self.task, completed=step, info=info)
        else:
            log.info("step %d  %s", step, info)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
