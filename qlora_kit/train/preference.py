"""Preference tuning in the training loop: the loss of ``train.method`` dpo / orpo and its logged metrics.

:class:`PreferenceLoss` is what ``train.loop.forward_loss`` calls for these methods (setup
picks it; SFT calls ``ops.loss.causal_lm_loss``).  One micro-batch is P pairs collated by
``data.preference.collate_pairs``: the chosen and the rejected sequences go through the model
in one forward.  DPO first runs the *reference* forward on the same batch, without
gradients, in eval mode, with the adapter switched off (peft's ``disable_adapter``: the NF4
base) or, for a run started from another run's adapter (``model.adapter``), with the frozen
copy of that adapter active (the starting policy) — no second model in memory.  Then the
policy forward with gradients; both score the completions through trl's fused LM head
(``ops.preference_loss.token_logps``).  ORPO needs no reference.

The micro-batch's loss is ``sum over its pairs of loss_p / n_items``, ``n_items`` being the
pairs of the whole optimizer step (every rank's), so the step's loss is the mean over its
pairs whatever the accumulation or the number of processes.  The metrics trl logs (rewards,
reward accuracy and margin, log-probabilities) are summed on the device, per pair, and read
with the logged loss (no extra host sync): :meth:`PreferenceLoss.take`.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch

from qlora_kit.core.config import TrainConfig
from qlora_kit.data.preference import PAIR_KEYS
from qlora_kit.ops.preference_loss import dpo_losses, orpo_losses, sequence_logps, token_logps

ITEMS = "items"  # key of the summed metrics holding their count (pairs): the others are averaged over it
REFERENCE_ADAPTER = "reference"  # peft name of the frozen start adapter (DPO from model.adapter)
METRICS = {
    "dpo": ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
            "logps/rejected"),
    "orpo": ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
             "logps/rejected", "nll_loss", "log_odds_ratio", "log_odds_chosen"),
}


class PreferenceLoss:
    """``forward_loss`` of a preference method: ``loss(model, batch, n_items, fused)``, metrics kept on the device.

    ``peft_model`` is the PeftModel inside ``model`` (``model`` may be its DDP/FSDP wrapper, which
    runs every forward); ``reference_adapter`` names the frozen adapter the reference runs with
    (None: the adapter switched off).
    """

    def __init__(self, cfg: TrainConfig, peft_model: Any, reference_adapter: str | None = None):
        if cfg.method not in METRICS:
            raise ValueError(f"train.method {cfg.method!r} is not a preference method")
        self.method, self.beta, self.loss_type = cfg.method, cfg.beta, cfg.dpo_loss
        self.peft_model, self.reference_adapter = peft_model, reference_adapter
        self.names = METRICS[cfg.method]
        self.sums: torch.Tensor | None = None

    def __call__(self, model: Any, batch: dict[str, Any], n_items: int, fused: bool) -> torch.Tensor:
        inputs = {k: v for k, v in batch.items() if k not in PAIR_KEYS}
        index, weight = batch["sequence_index"], batch["pair_weight"]
        pairs = weight.numel()
        labels = inputs["labels"]
        if self.method == "dpo":
            with torch.no_grad(), self.reference(model):
                ref, _ = sequence_logps(token_logps(model, inputs, fused), labels, index, 2 * pairs)
        logps, tokens = sequence_logps(token_logps(model, inputs, fused), labels, index, 2 * pairs)
        (chosen, rejected), (n_c, n_r) = logps.split(pairs), tokens.split(pairs)
        if self.method == "dpo":
            ref_c, ref_r = ref.split(pairs)
            losses, reward_c, reward_r = dpo_losses(chosen, rejected, ref_c, ref_r, self.beta, self.loss_type, n_c, n_r)
            extra: list[torch.Tensor] = []
        else:
            mean_c, mean_r = chosen / n_c.clamp(min=1), rejected / n_r.clamp(min=1)
            losses, reward_c, reward_r, log_odds = orpo_losses(mean_c, mean_r, self.beta)
            chosen, rejected = mean_c, mean_r  # ORPO logs mean log-probabilities (trl's logps/*)
            extra = [-mean_c.detach(), torch.nn.functional.logsigmoid(log_odds), log_odds]
        weight = weight.to(losses.dtype)
        self._accumulate(weight, [reward_c, reward_r, (reward_c > reward_r).to(weight.dtype), reward_c - reward_r,
                                  chosen.detach(), rejected.detach(), *extra])
        return (losses * weight).sum() / n_items

    @contextlib.contextmanager
    def reference(self, model: Any) -> Iterator[None]:
        """The reference policy for one forward: the adapter switched off, or the frozen start adapter active.

        Eval mode: no dropout, so the reference is a fixed function (and draws no random numbers).
        """
        was_training = model.training
        model.eval()
        try:
            if self.reference_adapter is None:
                with self.peft_model.disable_adapter():
                    yield
            else:
                self.peft_model.set_adapter(self.reference_adapter, inference_mode=True)
                try:
                    yield
                finally:
                    self.peft_model.set_adapter("default")  # trainable again; the reference stays frozen
        finally:
            model.train(was_training)

    def _accumulate(self, weight: torch.Tensor, values: list[torch.Tensor]) -> None:
        sums = torch.stack([weight.sum(), *((v.detach().to(weight.dtype) * weight).sum() for v in values)])
        self.sums = sums if self.sums is None else self.sums + sums

    def take(self) -> dict[str, torch.Tensor] | None:
        """The metrics summed since the last call (``ITEMS``: their pair count), on the device; then reset."""
        if self.sums is None:
            return None
        sums, self.sums = self.sums, None
        return dict(zip((ITEMS, *self.names), sums.unbind()))


def take_metrics(loss_fn: Any) -> dict[str, torch.Tensor] | None:
    """The summed metrics of a preference loss since the last call (None for SFT's loss)."""
    return loss_fn.take() if isinstance(loss_fn, PreferenceLoss) else None


def means(sums: dict[str, float], prefix: str = "") -> dict[str, float]:
    """Per-pair means of summed metrics, by trl's names (``prefix`` e.g. ``eval_``), rounded for the log."""
    items = max(sums.get(ITEMS, 0.0), 1.0)
    return {f"{prefix}{k}": round(v / items, 6) for k, v in sums.items() if k != ITEMS}
