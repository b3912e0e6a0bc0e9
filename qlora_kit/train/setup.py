"""setup(): everything a run needs, built in memory and checked before anything is written."""

from __future__ import annotations

import json
import logging
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from qlora_kit import variants
from qlora_kit.core import pacing
from qlora_kit.core.config import Config
from qlora_kit.core.errors import ConfigError, ModelError
from qlora_kit.data.batching import collate
from qlora_kit.data.build import build_data
from qlora_kit.data.summary import print_summary
from qlora_kit.model import base as model_base
from qlora_kit.model import fingerprint as basecheck
from qlora_kit.model import lora as model_lora
from qlora_kit.model import sources as model_sources
from qlora_kit.model.weights import require_loadable_weights
from qlora_kit.ops.loss import causal_lm_loss, count_targets
from qlora_kit.ops.precision import resolve_precision
from qlora_kit.plan.fit import check_fits, free_gpu_memory, resolve_auto
from qlora_kit.plan.parallel import planning_for
from qlora_kit.plan.shape import beyond_context, load_shape_file
from qlora_kit.plan.techniques import conservative_settings
from qlora_kit.rundir import checkpoint as ckpt
from qlora_kit.rundir import layout as rundir
from qlora_kit.rundir import target
from qlora_kit.rundir.manifest import device_info, now_iso, package_versions, read_previous_manifest
from qlora_kit.rundir.metrics import MetricsLog
from qlora_kit.rundir.start_adapter import StartAdapter, check_start_unchanged, read_start_adapter
from qlora_kit.train import distributed
from qlora_kit.train.builders import build_model, build_optimizer, build_scheduler, compute_total_steps
from qlora_kit.train.loop import to_device
from qlora_kit.train.order import epoch_plan
from qlora_kit.train.outputs import no_space_fix
from qlora_kit.train.resume import (
    BASE_FIX,
    check_data_unchanged,
    check_same_ranks,
    recorded_base,
    recorded_memory,
    restore,
)
from qlora_kit.train.startup_checks import run_startup_checks
from qlora_kit.train.preference import REFERENCE_ADAPTER, PreferenceLoss
from qlora_kit.train.state import Run
from qlora_kit.variants import adalora_steps
from qlora_kit.variants import init as vinit
from qlora_kit.variants.init import loraga_factors
from qlora_kit.variants.residual import save_residual

log = logging.getLogger("qlora_kit")


def setup(cfg: Config, config_text: str, out: Path, start: target.Start | None, skip_memory_check: bool) -> Run:
    """Load data first (fails fast), then the 4-bit model, adapters, optimizer, schedule and resume state.

    Nothing is written: :func:`_begin` writes the run's files once everything here succeeded.
    ``cfg`` may hold ``"auto"`` memory settings; the returned run's ``cfg`` has them resolved.
    """

    dist = distributed.current()
    start = start or target.Start(out, "fresh")
    seed_everything(cfg.train.seed)
    # a resumed run with a checkpoint: its residual base (base-changing lora.init) replaces the loaded weights
    resume_dir = out if start.resume_from is not None else None
    with dist.together():  # no collective inside: a failure on any rank ends every rank here, reported once
        device = dist.device or model_base.pick_device()
        compute_dtype = model_base.resolve_compute_dtype(cfg.model.compute_dtype, device)
        precision = resolve_precision(compute_dtype, cfg.lora.adapter_dtype, device)
        if start.resume_from is not None:
            check_same_ranks(start.resume_from, dist)
        if dist.fsdp:
            _check_fsdp_supported(cfg, precision)
        source = model_sources.resolve_source(cfg.model)
        model_base.require_safetensors(source)
        require_loadable_weights(source, cfg.model.trust_remote_code)
        model_base.require_attention(source, cfg.model)
        base_print = basecheck.fingerprint(source)
        if not start.fresh:  # the adapter continues only on the weights it was trained against
            basecheck.check_base(source, recorded_base(out, start.resume_from), out, base_print, BASE_FIX)
            check_start_unchanged((read_previous_manifest(out / rundir.MANIFEST).get("method") or {}).get("start_adapter"))
        begin_from = _start_adapter(cfg, source, base_print)
        cfg = resolve_memory_settings(cfg, source, device, None if start.fresh else recorded_memory(out))
        tokenizer = model_base.load_tokenizer(source, cfg.model)
        data = _setup_data(cfg, tokenizer, show=dist.is_main)
        _warn_beyond_context(source, data.summary.length_max)
        _check_method_data(cfg, data)
        if start.resume_from is not None:
            check_data_unchanged(start.resume_from, data.fingerprint)
        micro_per_epoch = len(epoch_plan(cfg, data, 0))
        total_steps = compute_total_steps(cfg, micro_per_epoch)
        _check_variant_needs(cfg, data, total_steps)
        if device.type == "cuda" and not skip_memory_check:
            _check_memory(cfg, source, device)
        reference = REFERENCE_ADAPTER if begin_from is not None and cfg.train.method == "dpo" else None
        with pacing.working("loading the model", dist.is_main):  # minutes for a 7B base on a slow disk
            model = build_model(cfg, source, precision, total_steps, resume_dir,
                                quant_storage=compute_dtype if dist.fsdp else torch.uint8,
                                load_on=dist.load_device(device),
                                start_adapter=begin_from.adapter_dir if begin_from else None,
                                reference_adapter=reference)
        if start.resume_from is not None and dist.fsdp:
            ckpt.load_adapter_weights(start.resume_from, model)  # before sharding; FSDP syncs rank 0's to the others
    spec = model_base.quant_spec(model, cfg.model, compute_dtype)
    variant, residual = _setup_variant(cfg, model, data, tokenizer, source, precision, out, resume_dir)
    if dist.rank:
        seed_everything(cfg.train.seed + dist.rank)  # dropout differs per rank; the adapters started equal
    trainable, total = model_lora.count_parameters(model)
    log.info("model: %s | 4-bit %s (double quant: %s) | %s r=%d on %s | trainable %s of %s parameters",
             cfg.model.name_or_path, spec.quant_type, spec.double_quant, cfg.lora.type, cfg.lora.r,
             ",".join(sorted(model.peft_config["default"].target_modules)), f"{trainable:,}", f"{total:,}")
    cfg, checks = _startup_checks(cfg, model, data, tokenizer, precision, source, skip_memory_check)
    wrapped = dist.wrap(model)
    params = [p for p in wrapped.parameters() if p.requires_grad]
    optimizer = build_optimizer(cfg, params, device, model)
    scheduler = build_scheduler(cfg, optimizer, total_steps)
    manifest = _new_manifest(cfg, device, source, spec, data, model, trainable, out, not start.fresh, variant)
    manifest["base"]["fingerprint"] = base_print
    manifest["method"] = method_record(cfg, begin_from, reference)
    manifest["memory"] = memory_record(cfg, model, precision)
    manifest["startup_checks"] = checks
    if dist.active:
        manifest["distributed"] = dist.describe()
    metrics = MetricsLog(out / rundir.METRICS) if dist.is_main else _NoMetrics(out / rundir.METRICS)
    run = Run(cfg, config_text, out, device, model, tokenizer, data, optimizer, scheduler, total_steps,
              micro_per_epoch, manifest, metrics, params=params, fresh=start.fresh,
              precision=precision, scaler=precision.make_scaler(), dist=dist, wrapped=wrapped)
    run.residual = residual
    if cfg.train.method != "sft":
        run.loss_fn = PreferenceLoss(cfg.train, model, reference)
    metrics.no_space_fix = lambda: no_space_fix(run)  # --resume only once a checkpoint exists
    run.nonfinite = torch.zeros((), dtype=torch.bool, device=device)
    run.first_bad_step = torch.full((), -1, dtype=torch.long, device=device)
    if not start.fresh:
        restore(run, start)
    return run


class _NoMetrics(MetricsLog):
    """metrics.jsonl as seen by ranks other than 0: rank 0 alone writes it."""

    def append(self, record: dict[str, Any]) -> None:
        return None

    def truncate_after(self, step: int) -> None:
        return None


def _check_fsdp_supported(cfg: Config, precision: Any) -> None:
    """FSDP-QLoRA needs one floating dtype per FSDP unit and bf16 compute.

    Raises:
        ConfigError: fp16 compute (FSDP would need a sharded loss scaler) or DoRA (its
            magnitude vectors sit in the decoder layer's unit with frozen weights).
    """
    if precision.loss_scaling:
        raise ConfigError("FSDP-QLoRA needs bfloat16 compute; this GPU computes in float16 (no native bf16)",
                          "use the DDP accelerate config (configs/accelerate/ddp_2gpu.yaml) on this GPU")
    if cfg.model.adapter is not None and cfg.train.method == "dpo":
        raise ConfigError("train.method=dpo from model.adapter keeps a frozen reference adapter beside the trained "
                          "one, which FSDP-QLoRA cannot shard", "train with DDP, or start DPO from the base model")
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

    CUDA: what is free now (``plan.fit.free_gpu_memory``, the pre-flight's figure).
    """
    if device.type == "cuda":
        return free_gpu_memory(device)[0]
    import psutil

    return psutil.virtual_memory().total


def _startup_checks(cfg: Config, model: Any, data: Any, tokenizer: Any, precision: Any, source: Path,
                    skip_memory_check: bool) -> tuple[Config, dict[str, Any]]:
    """The start-up check of every path of ours in use (train/startup_checks.py), on the unwrapped model.

    Skipped when FSDP keeps the parameters in host memory until it shards them (they are not on
    the GPU yet, so the GPU paths cannot run).
    """
    if next(model.parameters()).device.type != precision.device.type:
        log.info("start-up check: skipped (the model is in host memory until FSDP shards it)")
        return cfg, {"ran": False, "reason": "the model is in host memory until FSDP shards it"}
    return run_startup_checks(cfg, model, data, tokenizer.pad_token_id, precision, source, skip_memory_check)


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


def _start_adapter(cfg: Config, source: Path, base_print: dict[str, Any]) -> StartAdapter | None:
    """The run ``model.adapter`` names, verified, trained on this very base (its recorded fingerprint).

    Raises:
        ConfigError: no usable start run (see ``rundir.start_adapter``).
        ModelError: the base at ``model.name_or_path`` is not the one the start run was trained on.
    """
    if cfg.model.adapter is None:
        return None
    begin_from = read_start_adapter(cfg.model.adapter)
    basecheck.check_base(source, (begin_from.manifest.get("base") or {}).get("fingerprint"), begin_from.run,
                         base_print, f"point model.name_or_path at the base {begin_from.run} was trained on (checked "
                         f"against the fingerprint in its {rundir.MANIFEST})")
    if begin_from.config.model.chat_template != cfg.model.chat_template:
        log.warning("model.chat_template differs from the one %s was trained with: the adapter learnt another "
                    "prompt format", begin_from.run)
    log.info("starting from the adapter of %s (train.method=%s there)", begin_from.run, begin_from.config.train.method)
    return begin_from


def _check_method_data(cfg: Config, data: Any) -> None:
    """Preference rows go with train.method dpo / orpo, every other format with sft (``data.format: auto``).

    Raises:
        ConfigError: the rows and the method do not go together.
    """
    pairs = data.summary.pairs is not None
    if pairs and cfg.train.method == "sft":
        raise ConfigError("data.path holds preference rows (prompt, chosen, rejected), and train.method is sft",
                          "set train.method to dpo or orpo", key="train.method")
    if not pairs and cfg.train.method != "sft":
        raise ConfigError(f"train.method={cfg.train.method} trains on preference rows (prompt, chosen, rejected); "
                          f"data.path holds {data.summary.format!r} rows",
                          "give it prompt/chosen/rejected rows, or set train.method=sft", key="train.method")


def method_record(cfg: Config, begin_from: StartAdapter | None, reference: str | None) -> dict[str, Any]:
    """The manifest's account of the training objective and where the adapter started."""
    t = cfg.train
    record: dict[str, Any] = {"name": t.method}
    if t.method != "sft":
        record["beta"] = t.beta
    if t.method == "dpo":
        record["loss_type"] = t.dpo_loss
        record["reference"] = ("the start adapter (a frozen copy)" if reference else
                               "the base model (the adapter switched off)")
    record["start_adapter"] = begin_from.record() if begin_from is not None else None
    return record


def _check_variant_needs(cfg: Config, data: Any, total_steps: int) -> None:
    """Data-dependent checks of the LoRA variant (the config-only ones live in core/config.py).

    Raises:
        ConfigError: LoRA-GA with fewer training rows than its gradient estimate uses, or an
            AdaLoRA schedule that does not fit the run's step count.
    """

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

    info: dict[str, Any] = {"variant": variants.describe(cfg), "residual_base": None}
    if resume_dir is not None:
        previous = read_previous_manifest(out / rundir.MANIFEST).get("lora") or {}
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
        manifest["lora"]["residual_base"] = save_residual(self.layers, self.modules, path)


def _estimate_loraga(cfg: Config, model: Any, data: Any, pad_id: int, source: Path, precision: Any
                     ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """LoRA-GA's factors from dL/dW of every target weight on the first ``lora.loraga_samples`` training rows.

    The gradient is taken along the training path (same collation, packing, loss, precision,
    checkpointing) with the adapters disabled, i.e. of the NF4 base model.
    """

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

    batches, taken = [], 0
    for rows in epoch_plan(cfg, data, 0):
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
    data = build_data(cfg.data, tokenizer, cfg.train.max_length, cfg.train.seed, model_name=cfg.model.name_or_path)
    if not show:  # another rank of a multi-process run: rank 0 prints the summary
        return data
    print_summary(data.summary)
    return data


def _warn_beyond_context(source: Path, longest: int) -> None:
    """Warn when samples are longer than the model's context (``plan.shape.beyond_context``)."""
    try:
        context = json.loads((source / "config.json").read_text()).get("max_position_embeddings")
    except (OSError, ValueError, AttributeError):
        return
    warning = beyond_context(longest, context, f"the longest sample has {longest} tokens")
    if warning:
        log.warning("%s", warning)


def _check_memory(cfg: Config, source: Path, device: torch.device) -> None:
    try:
        with planning_for(distributed.current().parallel()):
            check_fits(cfg, source, device)
    except ModelError as exc:  # an architecture the planner cannot model: train without the check
        log.warning("memory pre-flight skipped: %s", exc.message)


def _new_manifest(cfg: Config, device: torch.device, source: Path, spec: Any, data: Any, model: Any,
                  trainable: int, out: Path, resuming: bool, variant: dict[str, Any]) -> dict[str, Any]:
    previous = read_previous_manifest(out / rundir.MANIFEST) if resuming else {}
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
        **{k: previous[k] for k in CARRIED_OVER if k in previous},
    }


CARRIED_OVER = ("tracking", "exports")  # manifest facts of earlier sessions a resumed run keeps (tracked run ids, exports)
