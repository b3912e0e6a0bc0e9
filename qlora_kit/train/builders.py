"""Builders of the training pieces: the model with its memory techniques, optimizer, schedule."""

from __future__ import annotations

import logging
import math
import warnings
from pathlib import Path
from typing import Any

import torch

from qlora_kit.core.config import Config
from qlora_kit.core.errors import ModelError
from qlora_kit.model import base as model_base
from qlora_kit.model import lora as model_lora
from qlora_kit.ops import loss, packing, tiled_mlp
from qlora_kit.ops import precision as prec
from qlora_kit.ops.offload import ActivationOffload, enable_offload
from qlora_kit.rundir import layout as rundir
from qlora_kit.rundir.manifest import read_previous_manifest
from qlora_kit.rundir.residual import load_residual_base
from qlora_kit.variants import changes_base

log = logging.getLogger("qlora_kit")


def build_model(cfg: Config, source: Path, precision: Any, total_steps: int | None = None,
                resume_dir: Path | None = None, quant_storage: torch.dtype = torch.uint8,
                load_on: torch.device | None = None, start_adapter: Path | None = None,
                reference_adapter: str | None = None) -> Any:
    """NF4 base (+ a resumed run's residual base) → fused loss head → adapters of ``lora.type`` (+ checkpointing)
    → packed attention, tiled MLP, offload.

    ``total_steps``: the run's optimizer steps (AdaLoRA schedules its rank budget on them).
    ``resume_dir``: the run being resumed; a base-changing ``lora.init`` trained against the
    residual NF4 weights stored there, which replace the loaded ones before the adapters attach.
    ``quant_storage`` and ``load_on`` (default: the training device) serve FSDP (train/distributed.py).
    ``start_adapter``: an adapter directory the adapters start from (``model.adapter``); with
    ``reference_adapter``, a frozen copy of it is attached under that name (DPO's reference).

    Raises:
        ModelError: the resumed run's residual base is missing or changed.
    """

    device, t = precision.device, cfg.train
    model = model_base.load_quantized_base(source, cfg.model, precision.compute_dtype, load_on or device, quant_storage)
    if resume_dir is not None:
        manifest = read_previous_manifest(resume_dir / rundir.MANIFEST)
        if not manifest and changes_base(cfg.lora):
            raise ModelError(f"lora.init={cfg.lora.init} trained against a residual base that {resume_dir / rundir.MANIFEST} "
                             "names, and that file is missing or damaged", "restore manifest.json from a backup, or start "
                             "a new run with --overwrite (the old directory is moved aside)")
        load_residual_base(model, resume_dir, manifest)
    if t.fused_loss:
        loss.add_fused_loss(model)  # before peft wraps the model
    model = model_lora.attach_lora(model, cfg.lora, precision.adapter_dtype, t.gradient_checkpointing,
                               t.checkpoint_every_n_layers, total_steps)
    if start_adapter is not None:
        model_lora.load_start_adapter(model, start_adapter, precision.adapter_dtype, reference_adapter)
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


def _enable_offload(model: Any, cfg: Config, device: torch.device) -> None:
    if device.type != "cuda":
        log.info("activation_offload: nothing to do on CPU (activations already live in host memory)")
        return
    enable_offload(model, ActivationOffload(device), cfg.train.checkpoint_every_n_layers)
    log.info("activation_offload: checkpointed layer inputs kept in pinned host memory")


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
