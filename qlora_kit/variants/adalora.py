"""AdaLoRA in the qlora-kit loop: budget steps, orthogonality penalty, and exact resume.

* ``after_optimizer_step`` calls peft's ``update_and_allocate`` right after ``optimizer.step()``
  and before the gradients are zeroed (it scores every singular triplet by |p * grad|), with the
  0-based index of the step just taken, as peft's examples do.
* ``orthogonality_penalty``: peft adds ``orth_reg_weight * mean ||P P^T - I||_F`` to the loss of
  every forward; with gradient accumulation that counts it once per micro-batch, and it also
  lands in the eval loss.  The peft config gets ``orth_reg_weight=0`` and the recipe adds the
  same term once per optimizer step instead; the logged train and eval losses stay pure
  cross-entropy, comparable with the other variants.
* checkpoints: during training every module keeps its initial rank and pruned triplets are
  masked (peft does not resize while training), so a checkpoint stores the full-rank adapter,
  the rank pattern and the RankAllocator's importance averages; the final adapter is saved by
  peft pruned to the rank pattern (``adapter_config.json`` ``rank_pattern``), which plain
  ``PeftModel.from_pretrained`` resizes back.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

import torch
from torch import nn

_STATS = ("ipt", "exp_avg_ipt", "exp_avg_unc")


def tuner(model: nn.Module) -> Any | None:
    """The AdaLoraModel inside a PeftModel, or None for other adapters."""
    inner = getattr(model, "base_model", None)
    return inner if type(inner).__name__ == "AdaLoraModel" else None


def after_optimizer_step(model: nn.Module, step: int) -> None:
    """Update importance scores and reallocate the rank budget for 0-based ``step`` (grads must still exist)."""
    ada = tuner(model)
    if ada is None:
        return
    config = ada.peft_config[ada.trainable_adapter_name]
    final = config.total_step - config.tfinal
    if step > final and config.rank_pattern is None:
        ada.update_and_allocate(final)  # the final allocation's step was skipped (non-finite loss): do it now
    ada.update_and_allocate(step)


def orthogonality_penalty(model: nn.Module, weight: float) -> torch.Tensor | None:
    """``weight`` * mean over A and B matrices of ||P P^T - I||_F (A: rows, B: columns), or None."""
    ada = tuner(model)
    if ada is None or weight == 0:
        return None
    name = ada.trainable_adapter_name
    terms = []
    for n, p in model.named_parameters():
        if ("lora_A" in n or "lora_B" in n) and n.endswith(f".{name}") and p.numel():
            cov = p @ p.T if "lora_A" in n else p.T @ p
            terms.append(torch.linalg.matrix_norm(cov - torch.eye(cov.shape[0], device=p.device, dtype=p.dtype)))
    if not terms:
        return None
    return weight * torch.stack(terms).float().mean()


@contextmanager
def full_rank_state(model: nn.Module) -> Iterator[None]:
    """Save checkpoints unpruned: peft prunes a saved AdaLoRA adapter to its rank pattern, which resume cannot train."""
    ada = tuner(model)
    if ada is None:
        yield
        return
    config = ada.peft_config[ada.trainable_adapter_name]
    pattern, config.rank_pattern = config.rank_pattern, None
    try:
        yield
    finally:
        config.rank_pattern = pattern


def checkpoint_state(model: nn.Module) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(JSON part, tensors) of the rank allocation: rank pattern and the importance averages."""
    ada = tuner(model)
    if ada is None:
        return {}, {}
    config = ada.peft_config[ada.trainable_adapter_name]
    allocator = ada.rankallocator
    tensors = {f"{stat}/{n}": t for stat in _STATS for n, t in getattr(allocator, stat).items()}
    return {"rank_pattern": config.rank_pattern}, tensors


def restore_state(model: nn.Module, state: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    """Inverse of :func:`checkpoint_state` on a freshly built model."""
    ada = tuner(model)
    if ada is None:
        return
    config = ada.peft_config[ada.trainable_adapter_name]
    config.rank_pattern = state.get("rank_pattern")
    allocator = ada.rankallocator
    allocator.reset_ipt()
    device = next(p.device for p in model.parameters() if p.requires_grad)
    for key, value in tensors.items():
        stat, _, name = key.partition("/")
        getattr(allocator, stat)[name] = value.to(device)


def ranks(model: nn.Module) -> dict[str, Any] | None:
    """Ranks kept per module by the current rank pattern (None before the first allocation)."""
    ada = tuner(model)
    if ada is None:
        return None
    config = ada.peft_config[ada.trainable_adapter_name]
    if not config.rank_pattern:
        return None
    per_module = {k.replace(".lora_E", "").removesuffix(f".{ada.trainable_adapter_name}"): int(sum(v))
                  for k, v in config.rank_pattern.items()}
    values = list(per_module.values())
    return {"min": min(values), "max": max(values), "mean": sum(values) / len(values), "total": sum(values),
            "initial_total": config.init_r * len(values), "per_module": per_module}
