"""Preference losses (DPO and its IPO / hinge variants, ORPO) on per-sequence log-probabilities.

The per-token log-probabilities come from trl's fused LM head (``ops/loss.py``: the model is
given ``add_fused_lm_head``; ``model(..., labels=..., fused_lm_head=True).log_probs`` projects
the hidden states in vocabulary tiles, so no ``[tokens x vocab]`` logits exist), or with
``fused=False`` from the full logits (the reference path, trl's ``selective_log_softmax``).
They are summed per sequence with ``sequence_index`` (:func:`sequence_logps`), so padded rows
and padding-free packed rows give the same sums.

trl 1.16 computes these losses inline in ``DPOTrainer._compute_loss`` and
``ORPOTrainer.odds_ratio_loss`` (no function to call), so the formulas are written here,
each a few lines, and ``tests/unit/ops/test_preference_loss.py`` checks them against trl's
own code on the same log-probabilities.  With ``c``/``r`` the summed log-probabilities of
the chosen/rejected completion under the policy, ``c0``/``r0`` under the reference, ``n_c``/
``n_r`` their completion tokens, and ``d = (c - c0) - (r - r0)``:

- DPO ``sigmoid``: ``-log sigmoid(beta * d)``  (Rafailov et al. 2023);
- ``hinge``: ``max(0, 1 - beta * d)``  (SLiC);
- ``ipo``: ``((c - c0) / n_c - (r - r0) / n_r - 1 / (2 beta))^2``  (Azar et al. 2023, normalised per
  completion token as trl does);
- rewards (logged): ``beta * (c - c0)`` and ``beta * (r - r0)``;
- ORPO (Hong et al. 2024), with mean log-probabilities ``a = c / n_c``, ``b = r / n_r``:
  ``-a - beta * log sigmoid(log_odds)``, ``log_odds = (a - b) - (log(1 - e^a) - log(1 - e^b))``;
  the NLL term is the chosen completion's mean token NLL per pair (the paper's L_SFT; trl
  averages it over the batch's tokens, prompt included); rewards ``beta * a`` and ``beta * b``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

DPO_LOSSES = ("sigmoid", "ipo", "hinge")
IGNORE_INDEX = -100


def token_logps(model: nn.Module, inputs: dict[str, Any], fused: bool) -> torch.Tensor:
    """Log-probability of every next-token label, ``[rows, T-1]`` in fp32, 0 where the label is -100.

    ``fused`` needs ``ops.loss.add_fused_loss`` on the model (trl's fused LM head: no full logits).
    """
    labels = inputs["labels"]
    if fused:
        return model(**inputs, fused_lm_head=True, use_cache=False).log_probs.float()
    from trl.trainer.utils import selective_log_softmax

    rest = {k: v for k, v in inputs.items() if k != "labels"}
    logits = model(**rest, use_cache=False).logits[:, :-1].float()
    shifted = labels[:, 1:]
    logps = selective_log_softmax(logits, shifted.clamp(min=0))
    return logps.masked_fill(shifted == IGNORE_INDEX, 0.0)


def sequence_logps(per_token: torch.Tensor, labels: torch.Tensor, sequence_index: torch.Tensor, sequences: int
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed log-probabilities, labelled tokens) of each of ``sequences`` sequences.

    ``per_token`` is shifted (``[rows, T-1]``: position t scores label t+1), ``sequence_index``
    is not (``[rows, T]``); a label belongs to the sequence of its own token.
    """
    mask = labels[:, 1:] != IGNORE_INDEX
    index = sequence_index[:, 1:].reshape(-1)
    sums = per_token.new_zeros(sequences).index_add(0, index, (per_token * mask).reshape(-1))
    counts = per_token.new_zeros(sequences).index_add(0, index, mask.reshape(-1).to(per_token.dtype))
    return sums, counts


def dpo_losses(chosen: torch.Tensor, rejected: torch.Tensor, ref_chosen: torch.Tensor, ref_rejected: torch.Tensor,
               beta: float, loss_type: str, chosen_tokens: torch.Tensor, rejected_tokens: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair DPO loss of ``loss_type`` and the (chosen, rejected) rewards (see the module docstring).

    Raises:
        ValueError: an unknown ``loss_type``.
    """
    chosen_ratio, rejected_ratio = chosen - ref_chosen, rejected - ref_rejected
    delta = chosen_ratio - rejected_ratio
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * delta)
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * delta)
    elif loss_type == "ipo":
        per_token = chosen_ratio / chosen_tokens.clamp(min=1) - rejected_ratio / rejected_tokens.clamp(min=1)
        losses = (per_token - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown DPO loss {loss_type!r} (one of {', '.join(DPO_LOSSES)})")
    return losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """``log(1 - exp(x))`` for x < 0, accurate on both sides of -log 2 (Maechler 2012).

    ``x`` is clamped to at most -1e-7: a completion the model is certain of (mean log-probability
    0 in float32) would give ``log 0``; the clamp keeps the loss finite and changes nothing else.
    """
    x = x.clamp(max=-1e-7)
    return torch.where(x < -math.log(2), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def orpo_losses(chosen_mean: torch.Tensor, rejected_mean: torch.Tensor, beta: float
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair ORPO loss, the (chosen, rejected) rewards and the log odds ratio, from mean log-probabilities."""
    log_odds = (chosen_mean - rejected_mean) - (log1mexp(chosen_mean) - log1mexp(rejected_mean))
    losses = -chosen_mean - beta * F.logsigmoid(log_odds)
    return losses, beta * chosen_mean.detach(), beta * rejected_mean.detach(), log_odds.detach()
