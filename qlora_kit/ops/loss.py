"""The training loss without full logits: trl's fused LM-head kernel, on labelled positions only.

The plain path (``model(labels=...)``) builds ``[tokens x vocab]`` logits and upcasts them
to fp32 for the cross-entropy: ~1.25 MiB per token with a 128K vocabulary, the largest
activation of a QLoRA step.  The fused path runs the backbone, keeps the last hidden state
of the positions that carry a label (after the causal shift) and hands them with the frozen
``lm_head`` weight to trl's ``ChunkedLogProbFunction`` (``trl.kernels``, the kernel behind
trl's ``add_fused_lm_head``, the default loss of its SFTTrainer).  It projects them in tiles
of 4096 tokens x 32768 vocabulary entries, folds each tile into an online log-sum-exp
(Triton on CUDA, torch ops elsewhere) and recomputes the tiles in the backward pass: no
logits outlive a tile.

Positions are selected on every device (trl's own wrapper does so only with Triton), so a
CPU run with assistant-only labels projects only the replies.  Models whose logits are
transformed after ``lm_head`` (soft-capping, logit scaling: Gemma-2/3, Cohere, Granite, ...)
go through trl's ``add_fused_lm_head`` instead, which applies those transforms.

Loss semantics are those of the training loop: ``sum of -log p(label) / num_items_in_batch``
over the shifted labels (``labels[:, 1:]``), as transformers' ``ForCausalLMLoss``.  Since every
sample's first label is -100, a packed sample never predicts the next sample's first token.
:func:`check_fused_loss` compares both paths once before training, so a model whose
logits the fused path does not reproduce is never trained with it.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

log = logging.getLogger("qlora_kit")

VOCAB_CHUNK = 32768  # vocabulary entries per projection tile (trl's default)
# config attributes that transform the logits after lm_head (handled by trl's add_fused_lm_head)
LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "output_multiplier", "lm_head_multiplier",
                    "logits_scaling")
CHECK_TOKENS = 256  # tokens of the first batch used by check_fused_loss
CHECK_TOLERANCE = 1e-3  # relative


def causal_lm(model: nn.Module) -> nn.Module:
    """The transformers ``*ForCausalLM`` inside a peft model (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def transforms_logits(config: Any) -> bool:
    """True when the model changes its logits after ``lm_head`` (soft-capping, scaling)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return any(getattr(text, name, None) is not None for name in LOGIT_TRANSFORMS)


def add_fused_loss(model: nn.Module) -> None:
    """Prepare ``model`` for the fused loss; call before peft wraps it.

    Only models that transform their logits need preparing (trl's ``add_fused_lm_head``);
    the others are used as they are.
    """
    if transforms_logits(model.config):
        from trl.trainer.utils import add_fused_lm_head

        add_fused_lm_head(model)


def causal_lm_loss(model: nn.Module, batch: dict[str, Any], num_items_in_batch: int, fused: bool) -> torch.Tensor:
    """Summed next-token cross-entropy of ``batch`` divided by ``num_items_in_batch``.

    ``fused`` needs :func:`add_fused_loss` on the model; otherwise the full-logits reference
    path runs (transformers' own loss).  ``use_cache=False``: training rows never need a cache.
    """
    if not fused:
        return model(**batch, num_items_in_batch=num_items_in_batch, use_cache=False).loss
    lm = causal_lm(model)
    if transforms_logits(lm.config):
        return model(**batch, fused_lm_head=True, num_items_in_batch=num_items_in_batch, use_cache=False).loss
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    hidden = lm.base_model(**inputs, use_cache=False).last_hidden_state[:, :-1]
    labels = batch["labels"][:, 1:].to(hidden.device)
    mask = labels != -100
    return -label_log_probs(hidden[mask], lm.get_output_embeddings(), labels[mask]).sum() / num_items_in_batch


def label_log_probs(hidden: torch.Tensor, lm_head: nn.Module, labels: torch.Tensor) -> torch.Tensor:
    """``log softmax(hidden @ W.T)[label]`` per row (``[N, H]`` → ``[N]``), tiled by trl's kernel."""
    from trl.kernels import ChunkedLogProbFunction

    log_probs, *_ = ChunkedLogProbFunction.apply(hidden, lm_head.weight, lm_head.bias, labels, 1.0, VOCAB_CHUNK,
                                                 None, 1.0, ("log_probs",))
    return log_probs


def count_targets(labels: torch.Tensor) -> int:
    """Tokens that carry a loss in ``labels`` (shifted: position 0 never does)."""
    return int((labels[..., 1:] != -100).sum())


def check_fused_loss(model: nn.Module, batch: dict[str, Any]) -> bool:
    """True when the fused loss equals the model's own (full-logits) loss on the start of ``batch``.

    Run once before training, without gradients, on at most :data:`CHECK_TOKENS` tokens: a
    model whose forward changes the logits in a way the fused path does not know would
    otherwise train on a different loss without anyone noticing.
    """
    short = {k: v[:, :CHECK_TOKENS] if isinstance(v, torch.Tensor) and v.dim() == 2 else v for k, v in batch.items()}
    if "cu_seq_lens_q" in batch:  # packed: keep the samples that fit whole in the slice
        short = _packed_prefix(batch, CHECK_TOKENS)
    n = count_targets(short["labels"])
    if n == 0:
        return True
    with torch.no_grad():
        fused = causal_lm_loss(model, short, n, fused=True).float()
        plain = causal_lm_loss(model, short, n, fused=False).float()
    return bool(torch.isclose(fused, plain, rtol=CHECK_TOLERANCE, atol=1e-5))


def _packed_prefix(batch: dict[str, Any], tokens: int) -> dict[str, Any]:
    from qlora_kit.ops.packing import varlen_kwargs

    lengths = list(batch["packed_seq_lens"])
    keep, total = [], 0
    for n in lengths:
        if keep and total + n > tokens:
            break
        keep.append(n)
        total += n
    short = {k: batch[k][:, :total] for k in ("input_ids", "labels", "position_ids")}
    return {**short, **{k: v.to(batch["input_ids"].device) if isinstance(v, torch.Tensor) else v
                        for k, v in varlen_kwargs(keep).items()}}
