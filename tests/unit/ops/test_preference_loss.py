"""The preference losses of ops/preference_loss.py against trl's own code on the same log-probabilities.

trl 1.16 has no loss function to call: DPO's loss is inline in ``DPOTrainer._compute_loss``
and ORPO's in ``ORPOTrainer.odds_ratio_loss``.  They are run here on a stand-in trainer whose
model returns given per-token log-probabilities (``precompute_ref_log_probs``' path supplies the
reference ones), so trl's formulas, masks and reductions run unchanged.
"""

from __future__ import annotations

from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from qlora_kit.ops import preference_loss as pl


def _pairs(seed: int, pairs: int = 5, width: int = 12) -> dict[str, torch.Tensor]:
    """Random per-token log-probs of P chosen then P rejected sequences with completions of different lengths."""
    gen = torch.Generator().manual_seed(seed)
    mask = torch.zeros(2 * pairs, width, dtype=torch.long)
    for row in range(2 * pairs):
        start = int(torch.randint(2, 5, (1,), generator=gen))
        end = int(torch.randint(start + 1, width + 1, (1,), generator=gen))
        mask[row, start:end] = 1
    shifted = mask[:, 1:].bool()
    policy = -torch.rand(2 * pairs, width - 1, generator=gen, dtype=torch.float64) * 3 * shifted
    reference = -torch.rand(2 * pairs, width - 1, generator=gen, dtype=torch.float64) * 3 * shifted
    return {"mask": mask, "policy": policy, "reference": reference}


def _trl_dpo(case: dict[str, torch.Tensor], beta: float, loss_type: str) -> tuple[float, dict[str, float]]:
    from trl.trainer.dpo_trainer import DPOTrainer

    policy, mask = case["policy"], case["mask"]
    ref = case["reference"].sum(1)

    def model(**_: object) -> SimpleNamespace:
        zeros = torch.zeros_like(policy)
        return SimpleNamespace(log_probs=policy, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool())

    model.training = True
    identity = lambda x: x  # noqa: E731 - one process: gather is the identity
    trainer = SimpleNamespace(
        model=model, accelerator=SimpleNamespace(device=torch.device("cpu"), gather=identity,
                                                 gather_for_metrics=identity),
        aux_loss_enabled=False, ld_alpha=None, precompute_ref_logps=True, f_divergence_type="reverse_kl",
        loss_types=[loss_type], loss_weights=[1.0], beta=beta, label_smoothing=0.0, use_weighting=False,
        _metrics=defaultdict(lambda: defaultdict(list)), _total_train_tokens=0, _tp_size=1)
    inputs = {"input_ids": torch.zeros_like(mask), "attention_mask": torch.ones_like(mask), "completion_mask": mask,
              "ref_chosen_logps": ref.chunk(2)[0], "ref_rejected_logps": ref.chunk(2)[1]}
    loss = DPOTrainer._compute_loss(trainer, model, inputs, return_outputs=False)
    return float(loss), {k: v[-1] for k, v in trainer._metrics["train"].items()}


def _ours_dpo(case: dict[str, torch.Tensor], beta: float, loss_type: str) -> tuple[float, dict[str, float]]:
    mask = case["mask"]
    labels = torch.where(mask.bool(), torch.ones_like(mask), torch.full_like(mask, -100))
    index = torch.arange(mask.shape[0]).unsqueeze(1).expand_as(mask)
    sums, tokens = pl.sequence_logps(case["policy"], labels, index, mask.shape[0])
    ref, _ = pl.sequence_logps(case["reference"], labels, index, mask.shape[0])
    (c, r), (rc, rr), (nc, nr) = sums.chunk(2), ref.chunk(2), tokens.chunk(2)
    losses, reward_c, reward_r = pl.dpo_losses(c, r, rc, rr, beta, loss_type, nc, nr)
    return float(losses.mean()), {"rewards/chosen": float(reward_c.mean()), "rewards/rejected": float(reward_r.mean()),
                                  "rewards/accuracies": float((reward_c > reward_r).double().mean()),
                                  "rewards/margins": float((reward_c - reward_r).mean()),
                                  "logps/chosen": float(c.mean()), "logps/rejected": float(r.mean())}


@pytest.mark.parametrize("loss_type", pl.DPO_LOSSES)
@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_dpo_losses_and_metrics_equal_trls(loss_type: str, beta: float) -> None:
    for seed in range(3):
        case = _pairs(seed)
        trl_loss, trl_metrics = _trl_dpo(case, beta, loss_type)
        loss, metrics = _ours_dpo(case, beta, loss_type)
        assert loss == pytest.approx(trl_loss, rel=1e-9, abs=1e-12)
        for name, value in metrics.items():
            assert value == pytest.approx(trl_metrics[name], rel=1e-6, abs=1e-9), name  # trl: float32 accuracies


def test_orpo_odds_ratio_term_equals_trls() -> None:
    from trl.experimental.orpo.orpo_trainer import ORPOTrainer

    gen = torch.Generator().manual_seed(0)
    chosen = -torch.rand(64, generator=gen, dtype=torch.float64) * 4 - 1e-3  # mean log-probs, both sides of -log 2
    rejected = -torch.rand(64, generator=gen, dtype=torch.float64) * 4 - 1e-3
    stub = SimpleNamespace(beta=0.1, accelerator=SimpleNamespace(device=torch.device("cpu")))
    trl_terms, trl_c, trl_r, _, trl_log_odds = ORPOTrainer.odds_ratio_loss(stub, chosen, rejected)
    losses, reward_c, reward_r, log_odds = pl.orpo_losses(chosen.float(), rejected.float(), 0.1)
    # trl: loss = nll - mean(beta * logsigmoid(log_odds)); here the per-pair nll is -mean log-prob of chosen
    torch.testing.assert_close(losses.double(), -chosen - trl_terms, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(reward_c.double(), trl_c.double(), rtol=1e-6, atol=1e-7)  # trl computes in float32
    torch.testing.assert_close(reward_r.double(), trl_r.double(), rtol=1e-6, atol=1e-7)
    assert float(log_odds.mean()) == pytest.approx(float(trl_log_odds), rel=1e-5)


def test_orpo_stays_finite_when_the_model_is_certain() -> None:
    losses, *_ = pl.orpo_losses(torch.tensor([0.0, -1e-9]), torch.tensor([-2.0, 0.0]), 0.1)
    assert torch.isfinite(losses).all()


def test_sequence_sums_are_the_same_packed_and_padded() -> None:
    """Log-probs of 3 sequences summed from one packed row equal their sums from padded rows."""
    gen = torch.Generator().manual_seed(1)
    lengths = [5, 7, 4]
    seqs = [torch.randn(n, generator=gen) for n in lengths]
    labels = [torch.tensor([-100] + [1] * (n - 1)) for n in lengths]
    packed_tok = torch.cat([torch.cat([s[1:], torch.zeros(1)]) for s in seqs])[:-1].unsqueeze(0)
    packed_labels = torch.cat(labels).unsqueeze(0)
    packed_index = torch.cat([torch.full((n,), k) for k, n in enumerate(lengths)]).unsqueeze(0)
    packed, counts = pl.sequence_logps(packed_tok * (packed_labels[:, 1:] != -100), packed_labels, packed_index, 3)
    width = max(lengths)
    padded_tok = torch.zeros(3, width - 1)
    padded_labels = torch.full((3, width), -100)
    for k, (s, lab) in enumerate(zip(seqs, labels)):
        padded_tok[k, : len(s) - 1] = s[1:]
        padded_labels[k, : len(lab)] = lab
    index = torch.arange(3).unsqueeze(1).expand(3, width)
    padded, padded_counts = pl.sequence_logps(padded_tok, padded_labels, index, 3)
    torch.testing.assert_close(packed, padded)
    torch.testing.assert_close(packed, torch.stack([s[1:].sum() for s in seqs]))
    assert counts.tolist() == padded_counts.tolist() == [n - 1 for n in lengths]


def test_unknown_loss_type_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown DPO loss"):
        pl.dpo_losses(*[torch.zeros(1)] * 4, 0.1, "kto", torch.ones(1), torch.ones(1))
