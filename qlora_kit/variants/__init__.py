"""LoRA variants on the NF4 base: which peft adapter a config builds, and what the run records.

The variants and where each is done::

    lora.type=lora      peft LoraConfig (rsLoRA, DoRA as before)
    lora.type=adalora   peft AdaLoraConfig, r = the initial rank; budget steps in adalora.py
    lora.type=vera      peft VeraConfig (shared frozen projections saved with the adapter)
    lora.init=...       loftq | pissa | olora | lora_ga on the 4-bit base: init.py
    train.loraplus_lr_ratio  peft.optimizers.create_loraplus_optimizer (train.build_optimizer)

Why the inits are not peft's ``init_lora_weights`` (peft 0.21, read in its source and tried on a
bitsandbytes 4-bit base): PiSSA raises TypeError (it needs a float weight); LoRA-GA's
``preprocess_loraga`` refuses quantised modules; ``init_lora_weights="loftq"`` expects an
unquantised base; ``replace_lora_weights_loftq`` (peft's path for an already-quantised base) runs
on CUDA/XPU only and assigns the SVD factors without dividing by the LoRA scale, so with
alpha != r the NF4 error is corrected alpha/r times; OLoRA dequantises the NF4 weight, runs its QR
on that and re-quantises the residual in memory only.  qlora-kit uses peft's per-layer init math
(PiSSA, OLoRA, LoRA-GA) on a float copy of the 16-bit source weight and re-quantises the residual
exactly as the loader quantises (init.py).

Base-changing inits (pissa, olora, lora_ga, and loftq with loftq_iter > 1) replace the targeted
NF4 weights with NF4(W - scale * B0 @ A0).  That residual base is saved in the run directory
(residual.py), and training resume, generate, export and its verification load it, so the merge
uses exactly the weights the adapter was trained against.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from qlora_kit.core.config import Config, LoraConfig
from qlora_kit.core.errors import ConfigError

BASE_CHANGING_INITS = ("pissa", "olora", "lora_ga")


def changes_base(lora: LoraConfig) -> bool:
    """True when the init replaces the targeted NF4 weights by a re-quantised residual."""
    return lora.init in BASE_CHANGING_INITS or (lora.init == "loftq" and lora.loftq_iter > 1)


def adalora_steps(lora: LoraConfig, total_steps: int) -> tuple[int, int]:
    """(tinit, tfinal) in optimizer steps for a run of ``total_steps``.

    Raises:
        ConfigError: the run is too short to reallocate ranks at all.
    """
    tinit = int(lora.adalora_tinit_ratio * total_steps)
    tfinal = int(lora.adalora_tfinal_ratio * total_steps)
    if tinit >= total_steps - tfinal:
        raise ConfigError(
            f"lora.type=adalora needs steps between its warm-up and final phase, but the run has {total_steps} "
            f"optimizer steps (train.max_steps / train.num_epochs) with tinit {tinit} and tfinal {tfinal}",
            "train for more steps, or lower lora.adalora_tinit_ratio / lora.adalora_tfinal_ratio",
        )
    return tinit, tfinal


def peft_config(lora: LoraConfig, targets: list[str] | str, total_steps: int | None) -> Any:
    """The peft config for ``lora`` (adapters start at peft's default init; init.py changes them after).

    Raises:
        ConfigError: AdaLoRA without a total step count.
    """
    common = {"target_modules": targets, "task_type": "CAUSAL_LM"}
    if lora.type == "vera":
        from peft import VeraConfig

        return VeraConfig(r=lora.r, vera_dropout=lora.dropout, save_projection=True, **common)
    if lora.type == "adalora":
        from peft import AdaLoraConfig

        if total_steps is None:
            raise ConfigError("lora.type=adalora needs the run's total step count to schedule its rank budget",
                              "set train.max_steps, or train through `qlora-kit train` (it computes it from the data)")
        tinit, tfinal = adalora_steps(lora, total_steps)
        # orth_reg_weight=0: peft would add the penalty to every forward's loss (once per micro-batch and to
        # the eval loss); adalora.orthogonality_penalty adds it once per optimizer step instead.
        return AdaLoraConfig(init_r=lora.r, target_r=lora.adalora_target_r, lora_alpha=lora.alpha,
                             lora_dropout=lora.dropout, tinit=tinit, tfinal=tfinal, deltaT=lora.adalora_delta_t,
                             total_step=total_steps, orth_reg_weight=0.0, **common)
    from peft import LoraConfig as PeftLoraConfig

    return PeftLoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, use_rslora=lora.use_rslora,
                          use_dora=lora.use_dora, bias="none", **common)


def cast_frozen_adapter_state(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Give VeRA's frozen shared projections the adapter dtype (its forward multiplies them with the inputs)."""
    for name in ("vera_A", "vera_B"):
        buffers = getattr(getattr(model, "base_model", None), name, None)
        if buffers is not None:
            for key in list(buffers.keys()):
                buffers[key] = buffers[key].to(dtype)


def describe(cfg: Config) -> dict[str, Any]:
    """What the run used, for manifest.json and the model card."""
    lora = cfg.lora
    info: dict[str, Any] = {"type": lora.type, "init": lora.init, "loraplus_lr_ratio": cfg.train.loraplus_lr_ratio,
                            "use_dora": lora.use_dora, "use_rslora": lora.use_rslora, "r": lora.r}
    if lora.type == "lora":
        info["alpha"] = lora.alpha
        info["scale"] = lora.alpha / (math.sqrt(lora.r) if lora.use_rslora else lora.r)
    if lora.type == "adalora":
        info.update(alpha=lora.alpha, target_r=lora.adalora_target_r, tinit_ratio=lora.adalora_tinit_ratio,
                    tfinal_ratio=lora.adalora_tfinal_ratio, delta_t=lora.adalora_delta_t,
                    orth_reg_weight=lora.adalora_orth_reg_weight)
    if lora.init == "lora_ga":
        info.update(loraga_samples=lora.loraga_samples, loraga_passes=lora.loraga_passes)
    if lora.init == "loftq":
        info["loftq_iter"] = lora.loftq_iter
    info["changes_base"] = changes_base(lora)
    return info


def summary_line(info: dict[str, Any]) -> str:
    """One human line for the manifest's ``lora.variant`` (model card, logs)."""
    parts = [f"type={info.get('type', 'lora')}", f"init={info.get('init', 'default')}"]
    if info.get("loraplus_lr_ratio"):
        parts.append(f"LoRA+ lr ratio {info['loraplus_lr_ratio']:g}")
    if info.get("type") == "adalora" and info.get("ranks"):
        ranks = info["ranks"]
        parts.append(f"final ranks {ranks['min']}-{ranks['max']} (mean {ranks['mean']:.1f}, start {info.get('r')})")
    return ", ".join(parts)
