"""The QLoRA SFT recipe: ``setup`` → ``begin`` → ``train`` → ``finish``.

One readable loop instead of a trainer class hierarchy, because the guarantees users
need here are easier to keep in plain code:

- exact resume: the data order is a pure function of (seed, epoch), the LR of the step,
  and checkpoints carry optimizer, scheduler and every RNG state (see checkpoint.py);
- loss normalised over all trainable tokens of the accumulated batch (not per micro-batch);
- non-finite loss/gradient detection with no extra host sync in ``stop`` mode: a device
  flag is read together with the logged loss (and before every save);
- one writer per run directory (runlock.py); ``setup`` works in memory and ``begin`` writes
  only once every check passed, so a refused or failed start changes nothing (outdir.py);
- SIGTERM/SIGINT: during setup the run stops at once (nothing written); afterwards it
  checkpoints the last finished step, also from within a step (signals.py);
- nothing is written that holds NaN/inf, checkpoints/adapters appear atomically, free disk
  space is checked before each of them (diskspace.py).
- several processes (``accelerate launch`` / ``torchrun``: DDP or FSDP-QLoRA) train the same
  global batch as one process would; ``run.dist`` (distributed.py) is asked at the few
  points where ranks matter (rows per rank, loss scale, agreement, who writes).

Memory and speed techniques live in ``qlora_kit/ops`` (one module each) and are switched
on in :func:`setup`: fused loss (no full logits), padding-free packing with packed
attention, tiled MLP, activation offload, fp32 adapters under autocast (fp16 loss
scaling on cards without native bf16).  ``"auto"`` settings are made concrete by the
planner (``plan.resolve_auto``) before anything is built.

Building blocks are the field's own: transformers models and schedulers, bitsandbytes
4-bit layers and 8-bit optimizers, peft adapters, trl's fused LM-head loss.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import shutil
import time
import warnings
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch

from qlora_kit import basecheck, diskspace, distributed, logs, outdir, rundir, runlock
from qlora_kit import checkpoint as ckpt
from qlora_kit.config import Config, attribute_origin, dump_config, load_config, read_yaml, validate
from qlora_kit.errors import (
    ConfigError,
    NonFiniteLossError,
    OutOfMemoryError,
    OutputError,
    Preempted,
    QloraKitError,
    short_repr,
)
from qlora_kit.manifest import device_info, now_iso, package_versions, write_manifest
from qlora_kit.metrics import MetricsLog, plot_loss
from qlora_kit.signals import StopNow, StopRequest

log = logging.getLogger("qlora_kit")

# Settings that change the model, the data or their order: resuming across a change is refused.
RESUME_BREAKING = (
    "model.name_or_path", "model.revision", "model.quant_type", "model.double_quant", "model.chat_template",
    "lora.r", "lora.alpha", "lora.dropout", "lora.target_modules", "lora.use_rslora", "lora.use_dora",
    "lora.adapter_dtype",
    "lora.type", "lora.init", "lora.loraga_samples", "lora.loftq_iter", "lora.adalora_target_r",
    "lora.adalora_tinit_ratio", "lora.adalora_tfinal_ratio", "lora.adalora_delta_t", "lora.adalora_orth_reg_weight",
    "data.path", "data.val_path", "data.format", "data.split", "data.val_fraction", "data.val_max_rows",
    "data.train_on_inputs", "data.packing", "data.shuffle",
    "train.seed", "train.micro_batch_size", "train.gradient_accumulation_steps", "train.max_length",
    "train.optimizer", "train.loraplus_lr_ratio",
)
BASE_LOCATION = ("model.name_or_path", "model.revision")  # where the base is; its fingerprint says what it is
DATA_LOCATION = ("data.path", "data.val_path")  # where the data are; their sha256 says what they are
MAX_CONSECUTIVE_SKIPS = 10
MIN_LOSS_SCALE = 1.0  # fp16 loss scaling: below this the run is not recovering
SETUP_BYTES = 64 * 2**20  # allowance for config, tokenizer, data audit, held-out rows, manifest


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
    fresh: bool = True  # a new run (not --resume): undone when it fails before its first checkpoint
    window: "_Window" = field(default_factory=lambda: _Window())  # loss/tokens since the last log line
    nonfinite: torch.Tensor | None = None  # device flag: any non-finite step so far (stop mode)
    first_bad_step: torch.Tensor | None = None
    params: list[torch.nn.Parameter] = field(default_factory=list)
    precision: Any = None  # ops.precision.Precision
    scaler: torch.amp.GradScaler | None = None  # fp16 compute only
    dist: distributed.Dist = distributed.SINGLE  # this process's rank in a multi-process run
    residual: Any = None  # _Residual: a base-changing init's NF4 base, stored by begin()
    wrapped: Any = None  # what runs forward/backward: DDP/FSDP around ``model`` (``model`` itself when single)


# --------------------------------------------------------------------------- entry point


def run_training(
    config_path: str | Path,
    overrides: list[str],
    resume: bool = False,
    overwrite: bool = False,
    skip_memory_check: bool = False,
) -> int:
    """``qlora-kit train``: returns 0, or raises a QloraKitError with a documented exit code.

    Order (see outdir.py): lock ``output_dir`` → check and inspect it (no writes) → build
    everything in memory (a refusal or SIGTERM here changes nothing) → write the run's files
    → train → publish the adapter.  A fresh run that fails before its first checkpoint
    removes what it created; every other failure leaves the manifest ``failed``/``preempted``.
    """
    from qlora_kit.ops.allocator import configure_cuda_allocator

    configure_cuda_allocator()  # before anything touches CUDA
    dist = distributed.current()
    cfg, sources = load_config(config_path, overrides)
    out = Path(cfg.output_dir).expanduser()
    _check_target(out, cfg, config_path, overwrite)  # read-only: refuse "/", home, ... before locking beside them
    check_writable(out)
    command = " ".join(["qlora-kit train", str(config_path), *(f"--set {o}" for o in overrides)]
                       + (["--resume"] if resume else []) + (["--overwrite"] if overwrite else []))
    header = f"{command} (qlora-kit {package_versions().get('qlora-kit')})"
    try:
        with _run_log(out, header, dist) as file_log, \
                StopRequest(immediate=True, echo_window=2.0 if dist.active else 0.0) as stop, _lock(out, dist):
            return _run_locked(cfg, sources, out, resume, overwrite, skip_memory_check, stop, file_log)
    except StopNow as exc:  # only raised before anything was written
        raise Preempted(f"stopped by {exc.signal_name} before training started; nothing was written",
                        "run the same command again") from None


def _run_log(out: Path, header: str, dist: distributed.Dist) -> contextlib.AbstractContextManager[Any]:
    """OUTPUT_DIR/train.log, written by the process that writes the run (rank 0; the others stay quiet)."""
    return logs.run_log(out / rundir.TRAIN_LOG, header) if dist.is_main else contextlib.nullcontext(None)


@contextlib.contextmanager
def _lock(out: Path, dist: distributed.Dist) -> Iterator[None]:
    """One writer per run: the process that writes (rank 0) holds ``output_dir``'s lock; a refusal reaches every rank."""
    with contextlib.ExitStack() as stack:
        def take() -> None:
            stack.enter_context(runlock.exclusive(out, "train"))

        dist.from_main(take)  # rank 0 holds the lock; a refusal there (RunInUseError) reaches every rank
        yield


def _run_locked(cfg: Config, sources: dict[str, str], out: Path, resume: bool, overwrite: bool,
                skip_memory_check: bool, stop: StopRequest, file_log: logs.RunLog | None) -> int:
    """The recipe, with ``output_dir`` locked: inspect → setup (in memory) → begin → train → finish.

    ``file_log`` holds the log lines until :func:`begin` has written the run's directory, then
    writes them, and every later one, to ``OUTPUT_DIR/train.log``.  Several processes: rank 0
    inspects and writes; every rank trains; failures agreed by all ranks end them together.
    """
    dist = distributed.current()
    if dist.is_main:
        warn_if_validation_elsewhere(cfg, sources)
    start = dist.from_main(lambda: outdir.inspect(out, resume, overwrite))
    if not start.fresh:
        check_resume_compatible(start.resume_from or out, cfg, relocatable_settings(out, start.resume_from))
    try:
        run = setup(cfg, dump_config(cfg, sources), out, start, skip_memory_check)
    except BaseException as exc:
        attribute_origin(exc, sources)
        raise
    if run.step >= run.total_steps and _already_complete(out):
        log.info("%s is already complete (%d of %d steps); raise train.max_steps with --set to train further",
                 out, run.step, run.total_steps)
        return 0
    stop.defer()
    try:
        dist.from_main(lambda: begin(run, start))
        if file_log is not None:
            file_log.open()
        train(run, stop)
        finish(run)
    except BaseException as exc:
        if dist.is_main:
            _fail(run, start, exc)
        if isinstance(exc, Preempted | NonFiniteLossError) and dist.active:
            dist.barrier()  # agreed by every rank at a step boundary: they leave together
        if dist.active:
            _release_wrapper(run)
        if isinstance(exc, torch.cuda.OutOfMemoryError):
            raise _oom_error(run, exc) from exc
        raise
    return 0


def _release_wrapper(run: Run) -> None:
    """Free the DDP/FSDP wrapper now, while its process group exists.

    The exception's traceback keeps ``run`` alive until the interpreter exits; a wrapper torn
    down then, after ``destroy_process_group``, can abort the process (SIGABRT).
    """
    import gc

    run.wrapped = None
    gc.collect()


def _check_target(out: Path, cfg: Config, config_path: str | Path, overwrite: bool) -> None:
    """Refuse output directories that must never be written or moved aside (see outdir.check_target).

    Raises:
        OutputError: a dangerous target, naming what it would clobber.
    """
    protected = {"the data file": Path(cfg.data.path), "the config file": Path(config_path)}
    if cfg.data.val_path:
        protected["the validation file"] = Path(cfg.data.val_path)
    if Path(cfg.model.name_or_path).expanduser().exists():
        protected["the model"] = Path(cfg.model.name_or_path)
    outdir.check_target(out, overwrite, protected)


def _already_complete(out: Path) -> bool:
    """The run finished and its adapter is intact (a damaged adapter is republished from the last checkpoint)."""
    manifest = ckpt.read_json(out / rundir.MANIFEST)
    if manifest.get("status") != "completed" or not (out / rundir.ADAPTER).is_dir():
        return False
    try:
        rundir.check_adapter(out / rundir.ADAPTER, manifest.get(rundir.ADAPTER_FILES))
    except QloraKitError as exc:
        log.warning("%s: publishing the adapter again from the last checkpoint", exc.message)
        return False
    return True


def _fail(run: "Run", start: outdir.Start, exc: BaseException) -> None:
    """Record a failure: undo a fresh start without checkpoints, else mark the manifest failed/preempted."""
    if not start.begun:
        return  # nothing was written
    if start.fresh and not ckpt.list_checkpoints(run.out):
        outdir.undo(start)
        return
    if isinstance(exc, Preempted):
        status, error = "preempted", None
    elif isinstance(exc, KeyboardInterrupt):
        status, error = "preempted", "aborted by a second Ctrl-C (the last checkpoint is intact)"
    elif isinstance(exc, torch.cuda.OutOfMemoryError):
        status, error = "failed", "CUDA out of memory"
    elif (peer := distributed.translate_failure(exc) if run.dist.active else None) is not None:
        status, error = "failed", peer.message  # another rank failed first: its reason, not the collective's
    else:
        message = exc.message if isinstance(exc, QloraKitError) else str(exc)
        status, error = "failed", f"{type(exc).__name__}: {message.splitlines()[0][:300] if message else ''}"
    try:
        try:
            _set_status(run, status, error)
        except OSError as write_exc:
            if not diskspace.is_no_space(write_exc):
                raise
            ckpt.write_json_in_place(run.out / rundir.MANIFEST, run.manifest)  # no room for a new file
    except OSError as write_exc:  # never hide the original failure behind this one
        log.warning("could not mark %s %s: %s", run.out / rundir.MANIFEST, status, write_exc)


# --------------------------------------------------------------------------- resume checks


def check_writable(out: Path) -> None:
    """Refuse an output_dir this user cannot write (e.g. a root-owned bind mount in a container).

    Raises:
        OutputError: ``out``, or the folder it would be created in, is not writable.
    """
    where = out
    while not where.exists() and where != where.parent:
        where = where.parent
    if os.access(where, os.W_OK | os.X_OK):
        return
    whom = f"uid {os.getuid()}" if hasattr(os, "getuid") else "this user"
    raise OutputError(
        f"output_dir {out} is not writable by {whom} ({where} is not)",
        "choose a writable output_dir or fix the folder's owner/permissions; in docker, run as the owner of the "
        "mounted folder: docker run --user $(id -u):$(id -g) ...",
    )


def warn_if_validation_elsewhere(cfg: Config, sources: dict[str, str]) -> None:
    """Say when validation rows come from another file than ``data.path`` (a leftover ``val_path`` is easy to miss).

    They feed the eval loss, the held-out prompts the export is checked on and the model card.
    """
    if cfg.data.val_path is None or Path(cfg.data.val_path).expanduser() == Path(cfg.data.path).expanduser():
        return
    origin = sources.get("data.val_path", "config")
    instead = "" if origin == "override --set" else "; `--set data.val_path=null` holds out rows of data.path instead"
    log.warning("validation rows come from data.val_path %s (%s), not from data.path %s: the eval loss, the export "
                "check and the model card use them%s", cfg.data.val_path, origin, cfg.data.path, instead)


def check_resume_compatible(checkpoint_dir: Path, cfg: Config, relocatable: tuple[str, ...] = ()) -> None:
    """Refuse to resume when settings that define the model or the data order changed.

    ``checkpoint_dir`` is a checkpoint, or the run directory itself when it has none yet.
    ``relocatable``: settings that say where the base or the data are, free to change because
    what they name is checked by content (:func:`relocatable_settings`).

    Raises:
        ConfigError: naming every changed setting with its old and new value.
    """
    old = validate(read_yaml(checkpoint_dir / "config.yaml"), origin=str(checkpoint_dir / "config.yaml"))
    old_flat, new_flat = _flatten(old.model_dump()), _flatten(cfg.model_dump())
    breaking = [k for k in RESUME_BREAKING if k not in relocatable]
    changed = [k for k in breaking if old_flat.get(k) != new_flat.get(k)]
    if changed:
        lines = "; ".join(f"{k}: {short_repr(old_flat.get(k), 60)} -> {short_repr(new_flat.get(k), 60)}"
                          for k in changed)
        raise ConfigError(
            f"cannot resume {checkpoint_dir.name}: the config changed in ways that break the run ({lines})",
            "restore those settings, or start a new run with --overwrite / another output_dir",
        )
    soft = [k for k in new_flat if k not in breaking and old_flat.get(k) != new_flat.get(k)]
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


# --------------------------------------------------------------------------- setup (in memory)


def setup(cfg: Config, config_text: str, out: Path, start: outdir.Start | None, skip_memory_check: bool) -> Run:
    """Load data first (fails fast), then the 4-bit model, adapters, optimizer, schedule and resume state.

    Nothing is written: :func:`_begin` writes the run's files once everything here succeeded.
    ``cfg`` may hold ``"auto"`` memory settings; the returned run's ``cfg`` has them resolved.
    """
    from qlora_kit import model as qmodel
    from qlora_kit.ops.precision import resolve_precision

    dist = distributed.current()
    start = start or outdir.Start(out, "fresh")
    seed_everything(cfg.train.seed)
    # a resumed run with a checkpoint: its residual base (base-changing lora.init) replaces the loaded weights
    resume_dir = out if start.resume_from is not None else None
    with dist.together():  # no collective inside: a failure on any rank ends every rank here, reported once
        device = dist.device or qmodel.pick_device()
        compute_dtype = qmodel.resolve_compute_dtype(cfg.model.compute_dtype, device)
        precision = resolve_precision(compute_dtype, cfg.lora.adapter_dtype, device)
        if start.resume_from is not None:
            _check_same_ranks(start.resume_from, dist)
        if dist.fsdp:
            _check_fsdp_supported(cfg, precision)
        source = qmodel.resolve_source(cfg.model)
        qmodel.require_safetensors(source)
        qmodel.require_attention(source, cfg.model)
        base_print = basecheck.fingerprint(source)
        if not start.fresh:  # the adapter continues only on the weights it was trained against
            basecheck.check_base(source, _recorded_base(out), out, base_print,
                                 f"point model.name_or_path at the base the run was trained on (checked against the "
                                 f"fingerprint in {out / rundir.MANIFEST})")
        cfg = resolve_memory_settings(cfg, source, device, None if start.fresh else _recorded_memory(out))
        tokenizer = qmodel.load_tokenizer(source, cfg.model)
        data = _setup_data(cfg, tokenizer, show=dist.is_main)
        _warn_beyond_context(source, data.summary.length_max)
        if start.resume_from is not None:
            _check_data_unchanged(start.resume_from, data.fingerprint)
        micro_per_epoch = len(_epoch_plan(cfg, data, 0))
        total_steps = compute_total_steps(cfg, micro_per_epoch)
        _check_variant_needs(cfg, data, total_steps)
        if device.type == "cuda" and not skip_memory_check:
            _check_memory(cfg, source, device)
        model = build_model(cfg, source, precision, total_steps, resume_dir,
                            quant_storage=compute_dtype if dist.fsdp else torch.uint8, load_on=dist.load_device(device))
        if start.resume_from is not None and dist.fsdp:
            ckpt.load_adapter_weights(start.resume_from, model)  # before sharding; FSDP syncs rank 0's to the others
    spec = qmodel.quant_spec(model, cfg.model, compute_dtype)
    variant, residual = _setup_variant(cfg, model, data, tokenizer, source, precision, out, resume_dir)
    if dist.rank:
        seed_everything(cfg.train.seed + dist.rank)  # dropout differs per rank; the adapters started equal
    trainable, total = qmodel.count_parameters(model)
    log.info("model: %s | 4-bit %s (double quant: %s) | %s r=%d on %s | trainable %s of %s parameters",
             cfg.model.name_or_path, spec.quant_type, spec.double_quant, cfg.lora.type, cfg.lora.r,
             ",".join(sorted(model.peft_config["default"].target_modules)), f"{trainable:,}", f"{total:,}")
    wrapped = dist.wrap(model)
    if cfg.train.fused_loss:
        cfg = _check_fused_loss(cfg, wrapped, data, tokenizer, precision)
        if not cfg.train.fused_loss and device.type == "cuda" and not skip_memory_check:
            _check_memory(cfg, source, device)  # full logits need more memory: re-check before training
    params = [p for p in wrapped.parameters() if p.requires_grad]
    optimizer = build_optimizer(cfg, params, device, model)
    scheduler = build_scheduler(cfg, optimizer, total_steps)
    manifest = _new_manifest(cfg, device, source, spec, data, model, trainable, out, not start.fresh, variant)
    manifest["base"]["fingerprint"] = base_print
    manifest["memory"] = memory_record(cfg, model, precision)
    if dist.active:
        manifest["distributed"] = dist.describe()
    metrics = MetricsLog(out / rundir.METRICS) if dist.is_main else _NoMetrics(out / rundir.METRICS)
    run = Run(cfg, config_text, out, device, model, tokenizer, data, optimizer, scheduler, total_steps,
              micro_per_epoch, manifest, metrics, params=params, fresh=start.fresh,
              precision=precision, scaler=precision.make_scaler(), dist=dist, wrapped=wrapped)
    run.residual = residual
    run.nonfinite = torch.zeros((), dtype=torch.bool, device=device)
    run.first_bad_step = torch.full((), -1, dtype=torch.long, device=device)
    if not start.fresh:
        _restore(run, start)
    return run


class _NoMetrics(MetricsLog):
    """metrics.jsonl as seen by ranks other than 0: rank 0 alone writes it."""

    def append(self, record: dict[str, Any]) -> None:
        return None

    def truncate_after(self, step: int) -> None:
        return None


def _check_same_ranks(resume_from: Path, dist: distributed.Dist) -> None:
    """Refuse to resume with another number of processes or another strategy than the checkpoint's.

    The data plan is the plan of the global batch (processes x micro_batch_size) and every
    rank's RNG (and, under FSDP, optimizer shard) is stored per rank: both change with the
    number of processes.

    Raises:
        ConfigError: naming both, and the launch that continues the run.
    """
    saved = ckpt.read_checkpoint_state(resume_from).get("distributed") or {"world_size": 1, "strategy": "single"}
    now = dist.describe() if dist.active else {"world_size": 1, "strategy": "single"}
    if (saved.get("world_size"), saved.get("strategy")) == (now["world_size"], now["strategy"]):
        return
    def name(d: dict[str, Any]) -> str:
        n = d.get("world_size", 1)
        return "1 process" if d.get("strategy") == "single" else f"{n} processes ({str(d.get('strategy')).upper()})"
    launch = ("qlora-kit train ... --resume (one process)" if saved.get("strategy") == "single" else
              f"the same launch with {saved.get('world_size')} processes"
              + (" and the FSDP accelerate config" if saved.get("strategy") == "fsdp" else ""))
    raise ConfigError(
        f"cannot resume {resume_from.name}: it was trained with {name(saved)}, this run has {name(now)} "
        "(the global batch, per-rank RNG and optimizer state depend on it)",
        f"continue with {launch}, or start a new run with --overwrite / another output_dir")


def _check_fsdp_supported(cfg: Config, precision: Any) -> None:
    """FSDP-QLoRA needs one floating dtype per FSDP unit and bf16 compute.

    Raises:
        ConfigError: fp16 compute (FSDP would need a sharded loss scaler) or DoRA (its
            magnitude vectors sit in the decoder layer's unit with frozen weights).
    """
    if precision.loss_scaling:
        raise ConfigError("FSDP-QLoRA needs bfloat16 compute; this GPU computes in float16 (no native bf16)",
                          "use the DDP accelerate config (configs/accelerate/ddp_2gpu.yaml) on this GPU")
    if cfg.lora.use_dora:
        raise ConfigError("lora.use_dora is not supported with FSDP-QLoRA (DoRA's magnitude vectors cannot be "
                          "sharded apart from the frozen 4-bit weights with fsdp_use_orig_params: false)",
                          "set lora.use_dora=false, or train with DDP")


MEMORY_KEYS = ("checkpoint_every_n_layers", "tiled_mlp", "activation_offload", "optimizer")


def resolve_memory_settings(cfg: Config, source: Path, device: torch.device,
                            recorded: dict[str, Any] | None = None) -> Config:
    """``cfg`` with every ``"auto"`` memory setting made concrete by the planner (logged).

    On ``--resume`` the choices recorded in the run's manifest are kept for the settings left
    "auto" (``recorded``): another card or more free memory must not change the optimizer class
    or the computation of a resumed run.
    """
    from qlora_kit.errors import ModelError
    from qlora_kit.plan import conservative_settings, load_shape_file, planning_for, resolve_auto

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
        with planning_for(distributed.current().parallel()):  # per GPU when several train together
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


def build_model(cfg: Config, source: Path, precision: Any, total_steps: int | None = None,
                resume_dir: Path | None = None, quant_storage: torch.dtype = torch.uint8,
                load_on: torch.device | None = None) -> Any:
    """NF4 base (+ a resumed run's residual base) → fused loss head → adapters of ``lora.type`` (+ checkpointing)
    → packed attention, tiled MLP, offload.

    ``total_steps``: the run's optimizer steps (AdaLoRA schedules its rank budget on them).
    ``resume_dir``: the run being resumed; a base-changing ``lora.init`` trained against the
    residual NF4 weights stored there, which replace the loaded ones before the adapters attach.
    ``quant_storage`` and ``load_on`` (default: the training device) serve FSDP (distributed.py).

    Raises:
        ModelError: the resumed run's residual base is missing or changed.
    """
    from qlora_kit import model as qmodel
    from qlora_kit.ops import loss, packing, precision as prec, tiled_mlp

    device, t = precision.device, cfg.train
    model = qmodel.load_quantized_base(source, cfg.model, precision.compute_dtype, load_on or device, quant_storage)
    if resume_dir is not None:
        qmodel.load_residual_base(model, resume_dir, ckpt.read_json(resume_dir / rundir.MANIFEST))
    if t.fused_loss:
        loss.add_fused_loss(model)  # before peft wraps the model
    model = qmodel.attach_lora(model, cfg.lora, precision.adapter_dtype, t.gradient_checkpointing,
                               t.checkpoint_every_n_layers, total_steps)
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
    """Keep the fused loss only if it reproduces the model's own loss on the first batch (every rank agrees)."""
    from qlora_kit.data import collate
    from qlora_kit.ops.loss import check_fused_loss

    rows = _epoch_plan(cfg, data, 0)[0]
    batch = to_device(collate(data.train, rows, tokenizer.pad_token_id, cfg.train.max_length, cfg.data.packing),
                      precision.device)
    with precision.forward_context():
        if not distributed.current().any(not check_fused_loss(model, batch)):
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


def relocatable_settings(out: Path, checkpoint: Path | None) -> tuple[str, ...]:
    """The location settings a resume may change: the base's when the run recorded its fingerprint
    (checked in ``setup``), the data's when ``checkpoint`` recorded the files' sha256 (checked by
    ``_check_data_unchanged``). A moved base or data file then resumes; other content does not."""
    keys = BASE_LOCATION if _recorded_base(out) is not None else ()
    try:
        data = ckpt.read_checkpoint_state(checkpoint).get("data_fingerprint") if checkpoint else None
    except ckpt.CorruptCheckpoint:
        data = None
    if isinstance(data, dict) and data.get("sha256"):  # a hub dataset's sha256 covers its name: renaming still fails
        keys += DATA_LOCATION
    return keys


def _recorded_base(out: Path) -> Any:
    """The base fingerprint recorded in ``out``'s manifest (None for runs that predate it)."""
    manifest = ckpt.read_json(out / rundir.MANIFEST)
    base = manifest.get("base") if isinstance(manifest, dict) else None
    return base.get("fingerprint") if isinstance(base, dict) else None


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


def _check_variant_needs(cfg: Config, data: Any, total_steps: int) -> None:
    """Data-dependent checks of the LoRA variant (the config-only ones live in config.py).

    Raises:
        ConfigError: LoRA-GA with fewer training rows than its gradient estimate uses, or an
            AdaLoRA schedule that does not fit the run's step count.
    """
    from qlora_kit.variants import adalora_steps

    if cfg.lora.init == "lora_ga" and len(data.train) < cfg.lora.loraga_samples:
        raise ConfigError(
            f"lora.init=lora_ga estimates its init from lora.loraga_samples={cfg.lora.loraga_samples} training rows, "
            f"but data.path leaves only {len(data.train)} after the validation split",
            f"set lora.loraga_samples to at most {len(data.train)}, or add data",
        )
    if cfg.lora.type == "adalora":
        adalora_steps(cfg.lora, total_steps)


def _setup_variant(cfg: Config, model: Any, data: Any, tokenizer: Any, source: Path, precision: Any, out: Path,
                   resume_dir: Path | None) -> tuple[dict[str, Any], "_Residual | None"]:
    """Apply ``lora.init`` to a fresh run's adapters: the manifest's ``lora`` variant facts, and the changed base to store.

    Nothing is written here: :func:`begin` stores the residual base (a base-changing init) with
    the run's other files.  On resume nothing is initialised: the adapters come from the
    checkpoint and the residual base was loaded by :func:`build_model`; the facts are carried
    over from the manifest.
    """
    from qlora_kit import variants
    from qlora_kit.variants import init as vinit

    info: dict[str, Any] = {"variant": variants.describe(cfg), "residual_base": None}
    if resume_dir is not None:
        previous = ckpt.read_json(out / rundir.MANIFEST).get("lora") or {}
        info["residual_base"] = previous.get("residual_base")
        info["variant"]["init_report"] = (previous.get("variant") or {}).get("init_report")
        return info, None
    if cfg.lora.init == "default":
        return info, None
    started = time.perf_counter()
    loraga = _estimate_loraga(cfg, model, data, tokenizer.pad_token_id, source, precision) \
        if cfg.lora.init == "lora_ga" else None
    estimate_s = time.perf_counter() - started
    # the residual is quantised from the dtype the loader quantises from (the compute dtype)
    report = vinit.initialise(model, cfg.lora, source, precision.compute_dtype, loraga)
    report.seconds += estimate_s  # LoRA-GA's gradient passes are part of its init
    info["variant"]["init_report"] = report.to_json()
    residual = _Residual(vinit.lora_layers(model), report.changed_base) if report.changed_base else None
    if precision.device.type == "cuda":
        torch.cuda.empty_cache()  # LoRA-GA's gradients and the init's working set
    return info, residual


@dataclass
class _Residual:
    """A base-changing init's re-quantised NF4 weights, written by :func:`begin` (variants/residual.py)."""

    layers: dict[str, Any]  # HF module name -> peft LoRA layer
    modules: list[str]

    def nbytes(self) -> int:
        return sum(self.layers[m].get_base_layer().weight.data.nbytes for m in self.modules) + 2**20

    def write(self, path: Path, manifest: dict[str, Any]) -> None:
        from qlora_kit.variants.residual import save_residual

        manifest["lora"]["residual_base"] = save_residual(self.layers, self.modules, path)


def _estimate_loraga(cfg: Config, model: Any, data: Any, pad_id: int, source: Path, precision: Any
                     ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """LoRA-GA's factors from dL/dW of every target weight on the first ``lora.loraga_samples`` training rows.

    The gradient is taken along the training path (same collation, packing, loss, precision,
    checkpointing) with the adapters disabled, i.e. of the NF4 base model.
    """
    from qlora_kit.ops.loss import causal_lm_loss
    from qlora_kit.variants.init import loraga_factors

    batches, n_items = _gradient_batches(cfg, data, pad_id)
    log.info("lora.init=lora_ga: estimating gradients on %d training rows (%d micro-batches, %d pass(es))",
             cfg.lora.loraga_samples, len(batches), cfg.lora.loraga_passes)

    def summed_loss(batch: dict[str, Any]) -> torch.Tensor:
        with precision.forward_context():
            return causal_lm_loss(model, to_device(batch, precision.device), 1, cfg.train.fused_loss)

    return loraga_factors(model, cfg.lora, batches, summed_loss, n_items, source)


def _gradient_batches(cfg: Config, data: Any, pad_id: int) -> tuple[list[dict[str, Any]], int]:
    """The first training micro-batches (in training order) holding ``lora.loraga_samples`` rows, and their
    trainable-token count."""
    from qlora_kit.data import collate
    from qlora_kit.ops.loss import count_targets

    batches, taken = [], 0
    for rows in _epoch_plan(cfg, data, 0):
        batches.append(collate(data.train, rows, pad_id, cfg.train.max_length, cfg.data.packing))
        taken += sum(len(row) for row in rows)
        if taken >= cfg.lora.loraga_samples:
            break
    return batches, max(1, sum(count_targets(b["labels"]) for b in batches))


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _setup_data(cfg: Config, tokenizer: Any, show: bool = True) -> Any:
    from qlora_kit.data import build_data, print_summary

    data = build_data(cfg.data, tokenizer, cfg.train.max_length, cfg.train.seed)
    if not show:  # another rank of a multi-process run: rank 0 prints the summary
        return data
    print_summary(data.summary)
    return data


def _warn_beyond_context(source: Path, longest: int) -> None:
    """Warn when samples are longer than the model's context (``max_position_embeddings``).

    Positions restart at 0 in every sample (packed or not), so only a sample's own length counts:
    positions past the context were never trained, and transformers does not refuse them.
    """
    try:
        context = json.loads((source / "config.json").read_text()).get("max_position_embeddings")
    except (OSError, ValueError, AttributeError):
        return
    if isinstance(context, int) and 0 < context < longest:
        log.warning("the longest sample has %d tokens, more than the model's context of %d "
                    "(max_position_embeddings): positions past %d were never trained; lower train.max_length "
                    "to %d to truncate such samples there", longest, context, context, context)


def _check_data_unchanged(resume_from: Path, fingerprint: dict[str, Any]) -> None:
    try:
        old = ckpt.read_checkpoint_state(resume_from).get("data_fingerprint") or {}
    except ckpt.CorruptCheckpoint:
        return  # checked again, with the fallback checkpoint, when it is restored

    for key in ("sha256", "val_sha256"):
        if old.get(key) != fingerprint.get(key):
            raise ConfigError(
                f"cannot resume {resume_from.name}: the data file changed since it was written "
                f"({key} {str(old.get(key))[:12]} -> {str(fingerprint.get(key))[:12]})",
                "restore the original data file, or start a new run with --overwrite / another output_dir",
            )


def _check_memory(cfg: Config, source: Path, device: torch.device) -> None:
    from qlora_kit.errors import ModelError
    from qlora_kit.plan import check_fits, planning_for

    try:
        with planning_for(distributed.current().parallel()):
            check_fits(cfg, source, device)
    except ModelError as exc:  # an architecture the planner cannot model: train without the check
        log.warning("memory pre-flight skipped: %s", exc.message)


def build_optimizer(cfg: Config, params: list[torch.nn.Parameter], device: torch.device,
                    model: torch.nn.Module | None = None) -> torch.optim.Optimizer:
    """bitsandbytes 8-bit AdamW (non-paged or paged), paged 32-bit AdamW, or torch AdamW (fused on CUDA).

    With ``train.loraplus_lr_ratio`` (LoRA+), peft's ``create_loraplus_optimizer`` groups the
    same parameters of ``model``: B matrices and 1-D adapter vectors at ratio x the learning rate.

    Raises:
        RuntimeError: LoRA+'s groups do not hold exactly ``params`` (a peft change to look at).
    """
    lr, wd = cfg.train.learning_rate, cfg.train.weight_decay
    cls, extra = _optimizer_class(cfg, device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if cfg.train.loraplus_lr_ratio is None:
            return cls(params, lr=lr, weight_decay=wd, **extra)
        from peft.optimizers import create_loraplus_optimizer

        optimizer = create_loraplus_optimizer(model, cls, lr=lr, loraplus_lr_ratio=cfg.train.loraplus_lr_ratio,
                                              loraplus_weight_decay=wd, **extra)
    grouped = {id(p) for g in optimizer.param_groups for p in g["params"]}
    if grouped != {id(p) for p in params}:
        raise RuntimeError("LoRA+ parameter groups do not cover exactly the trainable parameters")
    return optimizer


def _optimizer_class(cfg: Config, device: torch.device) -> tuple[type[torch.optim.Optimizer], dict[str, Any]]:
    """The class of ``train.optimizer`` (resolved, not "auto") and its extra keyword arguments."""
    name = cfg.train.optimizer
    if name == "adamw_torch":
        return torch.optim.AdamW, {"fused": device.type == "cuda"}
    import bitsandbytes as bnb

    if device.type != "cuda" and name.startswith("paged_"):
        log.info("%s: paged memory needs CUDA; bitsandbytes uses its non-paged version on CPU", name)
    classes = {"adamw_8bit": bnb.optim.AdamW8bit, "paged_adamw_8bit": bnb.optim.PagedAdamW8bit,
               "paged_adamw_32bit": bnb.optim.PagedAdamW32bit}
    return classes[name], {}


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
                  trainable: int, out: Path, resuming: bool, variant: dict[str, Any]) -> dict[str, Any]:
    previous = ckpt.read_json(out / rundir.MANIFEST) if resuming else {}
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
                 "trainable_parameters": trainable, **variant},
        "start_time": previous.get("start_time", now_iso()),
        "resumed": list(previous.get("resumed") or []),
        "end_time": None,
        "final_metrics": None,
    }


def _restore(run: Run, start: outdir.Start) -> None:
    """Load the newest checkpoint that verifies, parses and fits this model, in memory.

    A checkpoint that fails is named in the log and the one before it is tried; a run
    without any checkpoint yet (stopped before its first save) starts again from step 0.

    Raises:
        OutputError: there are checkpoints but none can be used.
        ConfigError: the data or config changed since the checkpoint that is used.
    """
    path, first = start.resume_from, start.resume_from
    while path is not None:
        try:
            if path != first:
                check_resume_compatible(path, run.cfg, relocatable_settings(run.out, path))
                _check_data_unchanged(path, run.data.fingerprint)
            model = None if run.dist.fsdp else run.model  # FSDP: the adapter was loaded before sharding
            state = ckpt.load_checkpoint(path, model, run.optimizer, run.scheduler, rank=run.dist.rank)
            _restore_variant(run, path, state)
            break
        except ckpt.CorruptCheckpoint as exc:
            log.warning("%s cannot be used (%s): trying the checkpoint before it", path.name, exc)
            start.corrupt.append((path, str(exc)))
            path, newer = outdir.newest_valid(run.out, below=ckpt.checkpoint_step(path))
            start.corrupt += newer
    start.resume_from = path
    if path is None:
        if start.corrupt:
            names = ", ".join(f"{p.name} ({reason})" for p, reason in start.corrupt[:3])
            raise OutputError(f"no checkpoint in {run.out} can be used, so there is nothing to resume from: {names}",
                              "start afresh with --overwrite (the old directory is moved aside)")
        log.info("%s has no checkpoint yet: training again from step 0", run.out)
        run.manifest["resumed"].append({"from": None, "at": now_iso()})
        return
    run.step, run.micro_index = state["step"], state["micro_index"]
    run.skipped_steps = state.get("skipped_steps", 0)
    run.last_save_step = run.step
    run.last_eval_step = state.get("last_eval_step", -1)
    run.window = _Window.from_state(state.get("log_window"), run.device)
    if run.scaler is not None and "grad_scaler" in state:
        run.scaler.load_state_dict(state["grad_scaler"])
    run.last_train_loss, run.last_eval_loss = _restored_losses(run, state)
    run.manifest["resumed"].append({"from": path.name, "at": now_iso()})
    log.info("resumed from %s: step %d of %d", path.name, run.step, run.total_steps)


def _restore_variant(run: Run, path: Path, state: dict[str, Any]) -> None:
    """A LoRA variant's own state from checkpoint ``path`` (AdaLoRA: rank budget, importance scores).

    Raises:
        ConfigError: AdaLoRA resumed with another step count than its rank budget was scheduled for.
    """
    from qlora_kit.variants import adalora

    if run.cfg.lora.type == "adalora" and state.get("total_steps") != run.total_steps:
        raise ConfigError(
            f"cannot resume {path.name}: lora.type=adalora scheduled its rank budget for "
            f"{state.get('total_steps')} steps, and train.max_steps / train.num_epochs now give {run.total_steps}",
            "restore train.max_steps / train.num_epochs, or start a new run",
        )
    adalora.restore_state(run.model, state.get("variant") or {}, ckpt.read_variant_tensors(path))


def _restored_losses(run: Run, state: dict[str, Any]) -> tuple[float | None, float | None]:
    """The last logged train/eval loss at the checkpoint (from its state, else from metrics.jsonl)."""
    train_loss, eval_loss = state.get("last_train_loss"), state.get("last_eval_loss")
    if train_loss is None or eval_loss is None:
        for record in run.metrics.read():
            if record.get("step", 0) <= run.step:
                train_loss = record.get("loss", train_loss) if "last_train_loss" not in state else train_loss
                eval_loss = record.get("eval_loss", eval_loss) if "last_eval_loss" not in state else eval_loss
    return train_loss, eval_loss


# --------------------------------------------------------------------------- writing the run's files


def begin(run: Run, start: outdir.Start) -> None:
    """Write the run's files, once every check passed: directory, config, tokenizer, data audit, manifest.

    Raises:
        DiskFullError: not enough space for the setup files, a checkpoint and the adapter.
    """
    fix = "free space on that disk, or set output_dir on another one"
    needed = SETUP_BYTES + _checkpoint_estimate(run) + _adapter_bytes(run)
    writers: dict[str, Callable[[Path], Any]] = {}
    if run.residual is not None:  # first: the manifest records its hash
        from qlora_kit.variants.residual import RESIDUAL_FILE

        needed += run.residual.nbytes()
        writers[RESIDUAL_FILE] = lambda p: run.residual.write(p, run.manifest)
    diskspace.require_free(run.out, needed, "the run's files, a checkpoint and the adapter", fix)
    writers |= {
        rundir.CONFIG: lambda p: p.write_text(run.config_text),
        rundir.TOKENIZER: lambda p: run.tokenizer.save_pretrained(p),
        rundir.DATA_SUMMARY: lambda p: p.write_text(json.dumps(run.data.summary.to_json(), indent=2, default=str)),
        rundir.HELDOUT: lambda p: p.write_text("".join(json.dumps(row) + "\n" for row in run.data.heldout),
                                               encoding="utf-8"),
        rundir.MANIFEST: lambda p: p.write_text(json.dumps(run.manifest, indent=2, default=str)),
    }
    with diskspace.no_space_as_error(run.out, "the run's files", fix):
        outdir.begin(start)
        outdir.write_files(run.out, writers)
        if not start.fresh:
            run.metrics.truncate_after(run.step)


def _checkpoint_estimate(run: Run) -> int:
    """Bytes the next checkpoint will take: the last one's size, else adapter + two fp32 optimizer moments."""
    latest = ckpt.latest_checkpoint(run.out)
    if latest is not None:
        return ckpt.checkpoint_bytes(latest)
    return _adapter_bytes(run) + 8 * sum(p.numel() for p in run.params) + 2**20


def _adapter_bytes(run: Run) -> int:
    return sum(p.numel() * p.element_size() for p in run.params)


# --------------------------------------------------------------------------- data order


def _epoch_plan(cfg: Config, data: Any, epoch: int) -> list[list[list[int]]]:
    """The epoch's *global* micro-batches: ``micro_batch_size`` rows per process (distributed.local_rows)."""
    from qlora_kit.data import plan_batches

    lengths = [len(s["input_ids"]) for s in data.train]
    return plan_batches(lengths, cfg.train.micro_batch_size * distributed.world_size(), cfg.train.max_length,
                        cfg.data.packing, cfg.train.seed, epoch, cfg.data.shuffle)


class EpochPlans:
    """Per-epoch micro-batch plans (pure functions of seed and epoch), the last two kept, all lengths known."""

    def __init__(self, cfg: Config, data: Any):
        self.cfg, self.data = cfg, data
        self.plans: dict[int, list[list[list[int]]]] = {}
        self.lengths: dict[int, int] = {}

    def plan(self, epoch: int) -> list[list[list[int]]]:
        if epoch not in self.plans:
            if len(self.plans) >= 2:
                del self.plans[min(self.plans)]
            self.plans[epoch] = _epoch_plan(self.cfg, self.data, epoch)
            self.lengths[epoch] = len(self.plans[epoch])
        return self.plans[epoch]

    def length(self, epoch: int) -> int:
        return self.lengths[epoch] if epoch in self.lengths else len(self.plan(epoch))


def micro_batches_from(cfg: Config, data: Any, start: int, plans: EpochPlans | None = None
                       ) -> Iterator[tuple[int, list[list[int]]]]:
    """Yield (epoch, rows) for the global micro-batch index ``start`` onwards, forever.

    The order is a pure function of the seed and the epoch, so a resumed run sees
    exactly the batches an uninterrupted run would have seen.
    """
    plans = plans or EpochPlans(cfg, data)
    epoch, first = 0, 0
    while True:
        n = plans.length(epoch)
        if not n:
            raise RuntimeError("empty batch plan")
        if first + n > start:
            for rows in plans.plan(epoch)[max(0, start - first):]:
                yield epoch, rows
            start = first + n
        first += n
        epoch += 1


# --------------------------------------------------------------------------- the loop


def train(run: Run, stop: StopRequest) -> None:
    """Optimizer steps until ``total_steps``, logging, evaluating and checkpointing on schedule.

    Micro-batches are collated one at a time as the step consumes them; a stop signal is
    honoured between micro-batches: the unfinished step is dropped (gradients cleared, RNG
    states put back) and the last finished step is checkpointed, so the resume stays exact.
    """
    cfg = run.cfg.train
    eval_every = cfg.eval_steps or cfg.save_steps
    plans = EpochPlans(run.cfg, run.data)
    stream = micro_batches_from(run.cfg, run.data, run.micro_index, plans)
    window = run.window
    progress = _Progress(run.total_steps, run.step, enabled=run.dist.is_main)
    log.info("training: %d optimizer steps x %d micro-batches of %d (max_length %d) on %s%s",
             run.total_steps - run.step, cfg.gradient_accumulation_steps, cfg.micro_batch_size, cfg.max_length,
             run.device, f" x {run.dist.world_size} processes" if run.dist.active else "")
    try:
        if _eval_pending(run, eval_every):  # resumed from a checkpoint whose evaluation a signal cut short
            _evaluate_and_log(run, stop)
        while run.step < run.total_steps:
            if run.dist.any(stop.requested):  # every rank stops after the same step
                _preempt(run, stop)
            lr = run.optimizer.param_groups[0]["lr"]
            rng = ckpt.rng_state()
            try:
                n_items, n_tokens = _count_step(run, plans, stop)
                loss, grad_norm = train_step(run, _collate_step(run, stream, stop), n_items)
            except _StepInterrupted:
                run.optimizer.zero_grad(set_to_none=True)
                ckpt.set_rng_state(rng)
                _preempt(run, stop)
            run.micro_index += cfg.gradient_accumulation_steps
            skipped = _guard_nonfinite(run, loss, grad_norm)
            optimizer_step(run, skipped)
            run.optimizer.zero_grad(set_to_none=True)
            scheduler_step(run)
            run.step += 1
            progress.advance(run.step)
            if not skipped:
                window.add(loss, n_tokens)
            if run.step % cfg.logging_steps == 0 or run.step == run.total_steps:
                _log_step(run, window, lr, grad_norm, progress)
            if run.data.val and (run.step % eval_every == 0 or run.step == run.total_steps):
                _evaluate_and_log(run, stop)
            if run.step % cfg.save_steps == 0 or run.step == run.total_steps:
                save(run)
        if stop.requested and _eval_pending(run, eval_every):  # the last evaluation was cut short
            _preempt(run, stop)
    finally:
        progress.close()


class _StepInterrupted(Exception):
    """A stop signal arrived between the micro-batches of an optimizer step."""


def _count_step(run: Run, plans: EpochPlans, stop: StopRequest) -> tuple[int, int]:
    """(trainable targets, tokens) of the next optimizer step, counted from the samples (nothing collated).

    Counted over the global micro-batches: every rank of a multi-process run gets the same number.

    Equals the collated labels' ``[:, 1:] != -100`` count: a sample's first label is always -100
    and samples/packed rows never exceed max_length.  Raises _StepInterrupted on a stop request.
    """
    from qlora_kit.data import IGNORE_INDEX

    targets = tokens = 0
    micro = micro_batches_from(run.cfg, run.data, run.micro_index, plans)
    for k, (_epoch, rows) in enumerate(islice(micro, run.cfg.train.gradient_accumulation_steps)):
        if k % 4096 == 4095 and stop.requested:
            raise _StepInterrupted
        for row in rows:
            for i in row:
                labels = run.data.train[i]["labels"]
                targets += len(labels) - labels.count(IGNORE_INDEX)
                tokens += len(labels)
    return max(1, targets), tokens


def _collate_step(run: Run, stream: Iterator[tuple[int, list[list[int]]]], stop: StopRequest
                  ) -> Iterator[dict[str, torch.Tensor]]:
    """The step's micro-batches (this rank's rows of each), collated lazily.

    Raises _StepInterrupted once a stop is requested, in a single process only: ranks of a
    multi-process run must run the same collectives, so they stop together at a step boundary.
    """
    for _ in range(run.cfg.train.gradient_accumulation_steps):
        if stop.requested and not run.dist.active:
            raise _StepInterrupted
        _epoch, rows = next(stream)
        yield _collate_local(run, rows)


def _collate_local(run: Run, rows: list[list[int]]) -> dict[str, Any]:
    """This rank's rows of a global micro-batch, collated (all of them in a single process).

    A rank left without rows (short final micro-batch) runs the first row with every label
    ignored: it contributes nothing, but its forward/backward keeps the collectives matched.
    """
    from qlora_kit.data import IGNORE_INDEX, collate

    mine, masked = run.dist.local_rows(rows)
    batch = collate(run.data.train, mine, run.tokenizer.pad_token_id, run.cfg.train.max_length,
                    run.cfg.data.packing)
    if masked:
        batch["labels"] = torch.full_like(batch["labels"], IGNORE_INDEX)
    return batch


def _eval_pending(run: Run, eval_every: int) -> bool:
    """True when this step is an evaluation step whose evaluation has not completed.

    A signal during an evaluation stops it; the checkpoint of that step records the last
    completed one (``last_eval_step``), so ``--resume`` runs it before training on and the
    metrics equal the uninterrupted run's.
    """
    due = run.step % eval_every == 0 or run.step == run.total_steps
    return bool(run.data.val) and run.step > 0 and due and run.last_eval_step < run.step


def train_step(run: Run, batches: Iterable[dict[str, torch.Tensor]], n_items: int | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward/backward over the accumulated micro-batches; returns (loss, grad norm) on device.

    The loss is the sum over *all* trainable tokens of the step divided by their number
    (``num_items_in_batch``, counted up front by the caller or here; in a multi-process run the
    global number, given by the caller), so micro-batches with few trainable tokens are not
    over-weighted.  ``batches`` may be lazy: only one micro-batch is alive at a time.  Each
    forward runs in the run's precision context (autocast with fp32 adapters); with fp16
    compute the loss is scaled before the backward and the gradients unscaled before
    clipping.  Several processes: gradients are synchronised on the last micro-batch only,
    and the loss is multiplied by the number of processes because DDP/FSDP average the
    gradients (the returned loss is this rank's share of the step's loss).
    """
    from qlora_kit.ops.loss import causal_lm_loss, count_targets
    from qlora_kit.variants.adalora import orthogonality_penalty

    if n_items is None:
        batches = list(batches)
        n_items = max(1, sum(count_targets(b["labels"]) for b in batches))
    count = len(batches) if isinstance(batches, list) else run.cfg.train.gradient_accumulation_steps
    model = run.wrapped if run.wrapped is not None else run.model
    factor = run.dist.loss_factor()
    loss_sum = torch.zeros((), device=run.device)
    for k, batch in enumerate(batches):
        batch = to_device(batch, run.device)
        with run.dist.accumulating(model, last=k == count - 1):
            with run.precision.forward_context():
                loss = causal_lm_loss(model, batch, n_items, run.cfg.train.fused_loss)
            scaled = loss * factor if factor != 1.0 else loss
            (run.scaler.scale(scaled) if run.scaler is not None else scaled).backward()
        loss_sum += loss.detach().float()
    penalty = orthogonality_penalty(run.model, run.cfg.lora.adalora_orth_reg_weight)
    if penalty is not None:  # AdaLoRA, once per optimizer step (not part of the logged loss)
        (run.scaler.scale(penalty) if run.scaler is not None else penalty).backward()
    if run.scaler is not None:
        run.scaler.unscale_(run.optimizer)
    max_norm = run.cfg.train.max_grad_norm or float("inf")
    grad_norm = run.dist.clip_grad_norm(model, run.params, max_norm)
    return loss_sum, grad_norm.detach().float()


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """Tensors of a collated batch on ``device`` (host values such as ``max_length_q`` stay)."""
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def optimizer_step(run: Run, skipped: bool) -> None:
    """Apply the step (the loss scaler skips it by itself when the scaled gradients overflowed).

    AdaLoRA's budget step follows every step that was applied, before the gradients are
    zeroed (it scores the triplets by |p * grad|); a step the scaler skipped has non-finite
    gradients that would poison its importance averages.
    """
    from qlora_kit.variants import adalora

    if run.scaler is None:
        if not skipped:
            run.optimizer.step()
            adalora.after_optimizer_step(run.model, run.step)
        return
    if skipped:
        run.scaler.update()
        return
    scale = run.scaler.get_scale() if adalora.tuner(run.model) is not None else None  # a host sync: AdaLoRA only
    run.scaler.step(run.optimizer)  # one host sync: the scaler reads its overflow flag
    run.scaler.update()
    if scale is not None and run.scaler.get_scale() >= scale:  # the scale only drops when the step was skipped
        adalora.after_optimizer_step(run.model, run.step)


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
    if not run.dist.any(bool(bad)):  # every rank skips the same steps
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
    when = f"at step {first}" if first > 0 else f"by step {run.step}"  # > 0: seen on this rank
    last = ckpt.latest_checkpoint(run.out)
    where = f"; the last good checkpoint is {last.name}" if last else "; no checkpoint was written before it"
    raise NonFiniteLossError(
        f"non-finite loss or gradient {when}: training stopped, nothing was saved after it{where}",
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
    """Loss and throughput since the last log line (device tensors until logged).

    Part of the checkpoint (``to_state``): a run resumed in the middle of a logging window
    logs the same loss at the window's end as the uninterrupted run.
    """

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

    def to_state(self) -> dict[str, Any]:
        """JSON state: the float32 loss sum is exact as a Python float (one sync, at save time)."""
        return {"loss_sum": None if self.loss is None else float(self.loss), "steps": self.steps,
                "tokens": self.tokens}

    @classmethod
    def from_state(cls, state: dict[str, Any] | None, device: torch.device) -> "_Window":
        """The window a checkpoint was saved in; an empty one for checkpoints written before it was saved."""
        if not state:
            return cls()
        loss = None if state["loss_sum"] is None else torch.tensor(state["loss_sum"], dtype=torch.float32,
                                                                   device=device)
        return cls(loss, int(state["steps"]), int(state["tokens"]))


def _log_step(run: Run, window: _Window, lr: float, grad_norm: torch.Tensor, progress: "_Progress") -> None:
    if window.loss is None:  # every step of the window was skipped (on_nonfinite=skip)
        window.reset()
        return
    scale = run.scaler.get_scale() if run.scaler is not None else None
    shared = run.dist.sum(torch.stack([window.loss / window.steps, run.nonfinite.float()]))  # every rank's share
    values = torch.stack([shared[0], grad_norm, shared[1]]).tolist()  # one sync
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
        "seconds_per_step": round(elapsed / window.steps, 4),
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
    eval mode and without gradients.  Several processes split each (global) batch like
    training and add up their sums; they stop together.
    """
    from qlora_kit.data import IGNORE_INDEX, collate, plan_batches
    from qlora_kit.ops.loss import causal_lm_loss, count_targets

    cfg = run.cfg
    lengths = [len(s["input_ids"]) for s in run.data.val]
    plan = plan_batches(lengths, cfg.train.micro_batch_size * run.dist.world_size, cfg.train.max_length,
                        cfg.data.packing, cfg.train.seed, 0, False)
    model = run.wrapped if run.wrapped is not None else run.model
    total = torch.zeros((), device=run.device)
    count = 0
    model.eval()
    try:
        with torch.no_grad():
            for rows in plan:
                if run.dist.any(stop.requested):
                    return None
                mine, masked = run.dist.local_rows(rows)
                batch = collate(run.data.val, mine, run.tokenizer.pad_token_id, cfg.train.max_length,
                                cfg.data.packing)
                if masked:
                    batch["labels"] = torch.full_like(batch["labels"], IGNORE_INDEX)
                n = count_targets(batch["labels"])
                with run.precision.forward_context():
                    loss = causal_lm_loss(model, to_device(batch, run.device), max(n, 1), cfg.train.fused_loss)
                total += loss.float() * n
                count += n
    finally:
        model.train()
    if run.dist.active:  # every rank's sums
        total, count = run.dist.sum(torch.stack([total.double(), total.new_tensor(count, dtype=torch.float64)]))
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
    """Checkpoint the current step, refusing to write non-finite weights; check free space first.

    Raises:
        NonFiniteLossError: a non-finite step happened since the last check.
        DiskFullError: not enough space for the checkpoint (nothing half-written is left).
    """
    name = f"{rundir.CHECKPOINT_PREFIX}{run.step}"
    if run.last_save_step == run.step:
        return run.out / name
    _raise_if_nonfinite(run, run.dist.any(bool(run.nonfinite) or not adapters_finite(run)))
    state = {
        "micro_index": run.micro_index,
        "total_steps": run.total_steps,
        "skipped_steps": run.skipped_steps,
        "last_eval_step": run.last_eval_step,
        "last_train_loss": run.last_train_loss,
        "last_eval_loss": run.last_eval_loss,
        "log_window": run.window.to_state(),
        "data_fingerprint": run.data.fingerprint,
        "saved_at": now_iso(),
    }
    if run.scaler is not None:
        state["grad_scaler"] = run.scaler.state_dict()
    from qlora_kit.variants import adalora

    state["variant"], variant_tensors = adalora.checkpoint_state(run.model)
    if run.dist.active:  # every rank's RNG (and FSDP optimizer shard) and the whole adapter, on rank 0
        state["distributed"] = run.dist.describe()
        ranks = run.dist.gather(run.dist.rank_state(run.optimizer))
        adapter = run.dist.adapter_state(run.wrapped, run.model)
    else:
        ranks, adapter = None, None
    # rank 0 writes; nobody moves on (or exits) before it has, and a failure there ends every rank
    with adalora.full_rank_state(run.model):
        path = run.dist.from_main(lambda: _write_checkpoint(run, name, state, ranks, adapter, variant_tensors))
    run.last_save_step = run.step
    log.info("saved %s", path.name)
    return path


def _write_checkpoint(run: Run, name: str, state: dict[str, Any], ranks: list[dict[str, Any]] | None,
                      adapter: dict[str, torch.Tensor] | None, variant_tensors: dict[str, torch.Tensor]) -> Path:
    """Write the checkpoint after checking free space, then prune old ones (the writing process only).

    Raises:
        DiskFullError: not enough space (nothing half-written is left).
    """
    last = ckpt.latest_checkpoint(run.out)
    if last is None and run.fresh:  # the start is undone: nothing to resume
        fix = "free space on that disk, then run the same command again"
    else:
        fix = "free space on that disk, then run the same command with --resume" + (
            f" (it continues from {last.name})" if last else "")
    diskspace.require_free(run.out, _checkpoint_estimate(run), name, fix)
    with diskspace.no_space_as_error(run.out, name, fix):
        path = ckpt.save_checkpoint(run.out, run.step, run.model, run.optimizer, run.scheduler, state,
                                    run.config_text, ranks, adapter, variant_tensors)
    ckpt.prune_checkpoints(run.out, run.cfg.train.save_total_limit)
    return path


def adapters_finite(run: Run) -> bool:
    """True when every trainable weight (this rank's shard under FSDP) is finite (one sync)."""
    flags = torch.stack([torch.isfinite(p).all() for p in run.params])
    return bool(flags.all())


def _preempt(run: Run, stop: StopRequest) -> None:
    if run.step == 0 and run.fresh:  # nothing learned yet: the fresh start is undone, no checkpoint needed
        raise Preempted(f"stopped by {stop.signal_name} before the first step finished; nothing was kept",
                        "run the same command again")
    path = save(run)
    by = stop.signal_name or "a stop signal to another process of this run"
    raise Preempted(
        f"stopped by {by} at step {run.step} of {run.total_steps}; checkpoint saved in {path}",
        "continue with the same command plus --resume",
    )


def finish(run: Run) -> None:
    """Publish the final adapter (with its sizes and sha256 in the manifest), plot, mark the run completed.

    Several processes: every rank checks its weights and hands its share of the adapter over;
    rank 0 writes, and a failure there (a full disk) ends every rank.

    Raises:
        NonFiniteLossError: non-finite adapter weights.
        DiskFullError: not enough space for the adapter (no partial adapter is left).
    """
    if run.dist.any(not adapters_finite(run)):
        _raise_if_nonfinite(run, True)
    from qlora_kit.variants import adalora

    ranks = adalora.ranks(run.model)
    if ranks is not None:
        run.manifest["lora"]["variant"]["ranks"] = ranks
        log.info("AdaLoRA kept %d of %d ranks (per module %d-%d)", ranks["total"], ranks["initial_total"],
                 ranks["min"], ranks["max"])
    adapter = run.dist.adapter_state(run.wrapped, run.model) if run.dist.active else None
    run.dist.from_main(lambda: _publish(run, adapter))
    log.info("done: adapter in %s", run.out / rundir.ADAPTER)
    log.info("next: qlora-kit generate %s \"your prompt\"  |  qlora-kit export %s --out %s-merged",
             run.out, run.out, run.out)


def _publish(run: Run, adapter: dict[str, torch.Tensor] | None) -> None:
    """Write the final adapter, the loss plot and the completed manifest (the writing process only)."""
    fix = "free space on that disk, then run the same command with --resume (it finishes from the last checkpoint)"
    diskspace.require_free(run.out, _adapter_bytes(run), "the final adapter", fix)
    tmp = run.out / f".tmp-{rundir.ADAPTER}"
    try:
        with diskspace.no_space_as_error(run.out, "the final adapter", fix):
            ckpt.save_adapter(run.model, tmp, adapter)
            files = ckpt.file_hashes(tmp)
            ckpt.publish_dir(tmp, run.out / rundir.ADAPTER)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    run.manifest[rundir.ADAPTER_FILES] = files
    try:
        plot_loss(run.metrics.read(), run.out / rundir.LOSS_PLOT)
    except OSError as exc:  # the plot is a convenience: never fail a finished run over it
        log.warning("could not write %s: %s", rundir.LOSS_PLOT, exc)
    run.manifest["final_metrics"] = {"step": run.step, "train_loss": run.last_train_loss,
                                     "eval_loss": run.last_eval_loss, "skipped_steps": run.skipped_steps}
    with diskspace.no_space_as_error(run.out, rundir.MANIFEST, fix):
        _set_status(run, "completed")


def _set_status(run: Run, status: str, error: str | None = None) -> None:
    if not run.dist.is_main:
        return
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
    """One log line per logged step; on a terminal also a rich progress bar, drawn below the log lines
    (they share ``logs.console()``, so neither overwrites the other)."""

    def __init__(self, total: int, done: int, enabled: bool = True):
        self.bar = None
        self.enabled = enabled  # False on ranks other than 0
        console = logs.console()
        if enabled and console.is_terminal:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(TextColumn("train"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                                TextColumn("{task.fields[info]}"), console=console, transient=True)
            self.task = self.bar.add_task("train", total=total, completed=done, info="")
            self.bar.start()

    def update(self, step: int, record: dict[str, Any]) -> None:
        info = (f"loss {record['loss']:.4f}  lr {record['learning_rate']:.2e}  "
                f"{record['tokens_per_second']:.0f} tok/s")
        if self.enabled:
            log.info("step %d  %s", step, info)
        if self.bar is not None:
            self.bar.update(self.task, completed=step, info=info)

    def advance(self, step: int) -> None:
        if self.bar is not None:
            self.bar.update(self.task, completed=step)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
