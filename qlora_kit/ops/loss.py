"""The training loss without full logits: trl's fused LM head.

The plain path (``model(labels=...)``) builds ``[tokens x vocab]`` logits and upcasts them
to fp32 for the cross-entropy: ~1.25 MiB per token with a 128K vocabulary, the largest
activation of a QLoRA step.  trl's ``add_fused_lm_head`` (``trl.trainer.utils``, the
default loss path of trl's SFTTrainer) replaces it with a custom autograd function that
projects the last hidden states through ``lm_head`` in tiles (4096 tokens x 32768 vocabulary
entries), folds each tile into an online log-sum-exp, and recomputes the tiles in the
backward pass, so no logits outlive a tile.  On CUDA (Triton) it projects only the positions
whose label is not -100; elsewhere every position (same result, more work).

Loss semantics are those of the training loop: ``sum of -log p(label) / num_items_in_batch``
over the shifted labels (``labels[:, 1:]``), the same as transformers' ``ForCausalLMLoss``.
Since every sample's first label is -100, a packed sample never predicts the next sample's
first token.  Generation is untouched: without ``fused_lm_head=True`` the model runs its
original forward and returns logits.
"""

from __future__ import annotations

from typing import Any

import torch


def add_fused_loss(model: torch.nn.Module) -> None:
    """Give ``model`` trl's fused LM-head loss; call before attaching adapters (peft wraps it)."""
    from trl.trainer.utils import add_fused_lm_head

    add_fused_lm_head(model)


def causal_lm_loss(model: torch.nn.Module, batch: dict[str, Any], num_items_in_batch: int, fused: bool) -> torch.Tensor:
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
