"""The training loss without full logits: trl's fused LM head.

The plain path (``model(labels=...)``) builds ``[tokens x vocab]`` logits and upcasts them
to fp32 for the cross-entropy: ~1.25 MiB per token with a 128K vocabulary, the largest
activation of a QLoRA step.  trl's ``add_fused_lm_head`` (``trl.trainer.utils``, the default
loss path of trl's SFTTrainer) gives the model a forward that runs the backbone and hands
the last hidden states with the frozen ``lm_head`` weight to ``trl.kernels.ChunkedLogProbFunction``:
it projects them in tiles of 4096 tokens x 32768 vocabulary entries, folds each tile into an
online log-sum-exp (a Triton kernel on CUDA, torch ops elsewhere) and recomputes the tiles
in the backward pass, so no logits outlive a tile.  With Triton it projects only the
positions that carry a label; elsewhere (CPU) every position, for the same result.  It
applies the logit transforms models declare in their config (soft-capping, logit scaling).

The fused forward is called through the whole model stack (``model(..., fused_lm_head=True)``),
so peft's wrappers (AdaLoRA's orthogonal regulariser, forward hooks) still apply.  Loss
semantics are those of the training loop: ``sum of -log p(label) / num_items_in_batch`` over
the shifted labels (``labels[:, 1:]``), as transformers' ``ForCausalLMLoss``.  Since every
sample's first label is -100, a packed sample never predicts the next sample's first token.
The run's start-up check (``train/startup_checks.py``) compares both paths, loss and adapter
gradients, before step 1, so a model whose logits the fused head does not reproduce is never
trained with it.  Generation is untouched:
without ``fused_lm_head=True`` the model runs its original forward.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

def add_fused_loss(model: nn.Module) -> None:
    """Give ``model`` trl's fused LM-head loss; call before attaching adapters (peft wraps it)."""
    from trl.trainer.utils import add_fused_lm_head

    add_fused_lm_head(model)


def causal_lm_loss(model: nn.Module, batch: dict[str, Any], num_items_in_batch: int, fused: bool) -> torch.Tensor:
    """Summed next-token cross-entropy of ``batch`` divided by ``num_items_in_batch``.

    ``fused`` needs :func:`add_fused_loss` on the model; otherwise the full-logits reference
    path runs (transformers' own loss).  ``use_cache=False``: training rows never need a cache.
    """
    if fused:
        return model(**batch, fused_lm_head=True, num_items_in_batch=num_items_in_batch, use_cache=False).loss
    return model(**batch, num_items_in_batch=num_items_in_batch, use_cache=False).loss


def count_targets(labels: torch.Tensor) -> int:
    """Tokens that carry a loss in ``labels`` (shifted: position 0 never does)."""
    return int((labels[..., 1:] != -100).sum())
