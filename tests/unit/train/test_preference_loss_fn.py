"""train.preference.PreferenceLoss on a tiny NF4 + LoRA model: batch layouts, loss paths, the reference pass."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import adapter_grads, assert_grads_close, make_qlora_model

from qlora_kit.core.config import TrainConfig
from qlora_kit.data.preference import CHOSEN_LENGTH, collate_pairs
from qlora_kit.train.preference import ITEMS, REFERENCE_ADAPTER, PreferenceLoss, means
from qlora_kit.train.state import LogWindow


def pair_samples(n: int, seed: int = 0) -> list[dict[str, list[int]]]:
    """``n`` pairs sharing a prompt per pair, completions of different lengths (ids inside the tiny vocab)."""
    gen = torch.Generator().manual_seed(seed)
    samples = []
    for _ in range(n):
        prompt = torch.randint(10, 500, (int(torch.randint(4, 9, (1,), generator=gen)),), generator=gen).tolist()
        sides = []
        for _side in range(2):
            completion = torch.randint(10, 500, (int(torch.randint(2, 7, (1,), generator=gen)),), generator=gen).tolist()
            sides.append((prompt + completion, [-100] * len(prompt) + completion))
        (ci, cl), (ri, rl) = sides
        samples.append({"input_ids": ci + ri, "labels": cl + rl, CHOSEN_LENGTH: [len(ci)]})
    return samples


def loss_and_grads(model, loss_fn: PreferenceLoss, batch: dict, n_items: int, fused: bool):
    model.zero_grad(set_to_none=True)
    loss = loss_fn(model, batch, n_items, fused)
    loss.backward()
    return loss.detach(), adapter_grads(model), loss_fn.take()


@pytest.mark.parametrize("method", ["dpo", "orpo"])
def test_packed_padded_fused_and_full_logits_agree(tiny_llama: Path, method: str, one_thread) -> None:
    samples = pair_samples(3)
    cfg = TrainConfig(method=method)
    results = []
    for fused in (True, False):
        model = make_qlora_model(tiny_llama, fused_loss=fused)
        loss_fn = PreferenceLoss(cfg, model)
        for packing in (True, False):
            rows = [[0, 1, 2]] if packing else [[0], [1], [2]]
            results.append(loss_and_grads(model, loss_fn, collate_pairs(samples, rows, 0, packing), 3, fused))
    loss0, grads0, sums0 = results[0]
    for loss, grads, sums in results[1:]:
        torch.testing.assert_close(loss, loss0, rtol=1e-5, atol=1e-6)
        assert_grads_close(grads, grads0, atol=1e-5, rtol=1e-4)
        for key in sums0:
            torch.testing.assert_close(sums[key], sums0[key], rtol=1e-4, atol=1e-5)


def test_dpo_starts_at_log_2_with_zero_rewards_and_the_adapter_trainable(tiny_llama: Path, one_thread) -> None:
    model = make_qlora_model(tiny_llama, fused_loss=True)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.zero_()  # a new adapter: the policy is the base, as the reference
    loss_fn = PreferenceLoss(TrainConfig(method="dpo"), model)
    loss, grads, sums = loss_and_grads(model, loss_fn, collate_pairs(pair_samples(4), [[0, 1, 2, 3]], 0, True), 4,
                                       True)
    assert float(loss) == pytest.approx(math.log(2), abs=1e-6)
    assert any(float(g.abs().max()) > 0 for g in grads.values()), "the policy gets gradients"
    logged = means({k: float(v) for k, v in sums.items()})
    assert float(sums[ITEMS]) == 4 and logged["rewards/chosen"] == logged["rewards/margins"] == 0.0
    assert model.training and all(p.requires_grad for n, p in model.named_parameters() if "lora_" in n)


def test_reference_adapter_is_the_frozen_start(tiny_llama: Path, tmp_path: Path, one_thread) -> None:
    """DPO from model.adapter: the reference is a frozen copy of the start adapter, the policy trains on."""
    from qlora_kit.model.lora import load_start_adapter

    start = make_qlora_model(tiny_llama, fused_loss=True, seed=3)
    start.save_pretrained(tmp_path / "start")
    model = make_qlora_model(tiny_llama, fused_loss=True, seed=7)  # other weights: overwritten by the start's
    load_start_adapter(model, tmp_path / "start", torch.float32, REFERENCE_ADAPTER)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(f".{REFERENCE_ADAPTER}." not in n for n in trainable)
    loss_fn = PreferenceLoss(TrainConfig(method="dpo"), model, REFERENCE_ADAPTER)
    batch = collate_pairs(pair_samples(2), [[0, 1]], 0, True)
    loss, _, sums = loss_and_grads(model, loss_fn, batch, 2, True)
    assert float(loss) == pytest.approx(math.log(2), abs=1e-6), "policy == reference at the start"
    assert float(sums["rewards/chosen"]) == 0.0
    assert {n for n, p in model.named_parameters() if p.requires_grad} == trainable, "requires_grad restored"
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B.default" in name:
                p.add_(0.05)
    loss, _, sums = loss_and_grads(model, loss_fn, batch, 2, True)
    assert float(loss) != pytest.approx(math.log(2), abs=1e-4) and float(sums["rewards/chosen"]) != 0.0


def test_masked_pairs_count_for_nothing(tiny_llama: Path, one_thread) -> None:
    model = make_qlora_model(tiny_llama, fused_loss=True)
    loss_fn = PreferenceLoss(TrainConfig(method="dpo"), model)
    batch = collate_pairs(pair_samples(2), [[0, 1]], 0, True)
    batch["pair_weight"] = torch.zeros(2)
    loss, grads, sums = loss_and_grads(model, loss_fn, batch, 2, True)
    assert float(loss) == 0.0 and float(sums[ITEMS]) == 0.0
    assert all(float(g.abs().max()) == 0 for g in grads.values())


def test_log_window_keeps_the_summed_metrics_in_its_state() -> None:
    window = LogWindow()
    window.add(torch.tensor(0.5), 10, {ITEMS: torch.tensor(4.0), "rewards/chosen": torch.tensor(0.3)})
    window.add(torch.tensor(0.25), 10, {ITEMS: torch.tensor(4.0), "rewards/chosen": torch.tensor(0.1)})
    again = LogWindow.from_state(window.to_state(), torch.device("cpu"))
    assert again.steps == 2 and float(again.sums[ITEMS]) == 8.0
    assert means({k: float(v) for k, v in again.sums.items()}) == {"rewards/chosen": pytest.approx(0.05)}
    assert LogWindow.from_state({"loss_sum": 1.0, "steps": 1, "tokens": 3}, torch.device("cpu")).sums is None


def test_planner_counts_both_sides_and_the_reference(tiny_llama: Path) -> None:
    from qlora_kit.core.config import validate
    from qlora_kit.plan.estimate import estimate
    from qlora_kit.plan.shape import load_shape_file
    from qlora_kit.plan.terms import PAIR_INPUT_BYTES

    shape = load_shape_file(tiny_llama / "config.json")
    base = {"model": {"name_or_path": str(tiny_llama)}, "data": {"path": "x.jsonl", "packing": False},
            "output_dir": "o"}
    train = {"max_length": 256, "micro_batch_size": 2, "checkpoint_every_n_layers": 1, "tiled_mlp": False,
             "activation_offload": False, "optimizer": "adamw_torch"}
    sft = estimate(validate({**base, "train": {**train, "micro_batch_size": 4}}), shape)
    dpo = estimate(validate({**base, "train": {**train, "method": "dpo"}}), shape)
    extra = PAIR_INPUT_BYTES * 4 * 256
    for phase in ("loss", "backward"):
        assert sum(dpo.phases[phase].values()) == sum(sft.phases[phase].values()) + extra
    assert "reference" in dpo.phases and "reference" not in sft.phases
    assert 0 < sum(dpo.phases["reference"].values()) < sum(dpo.phases["loss"].values())
    start = estimate(validate({**base, "model": {"name_or_path": str(tiny_llama), "adapter": "sft-run"},
                               "train": {**train, "method": "dpo"}}), shape)
    assert start.phases["loss"]["reference_adapter"] == start.phases["loss"]["lora_parameters"]
    orpo = estimate(validate({**base, "train": {**train, "method": "orpo"}}), shape)
    assert "reference" not in orpo.phases and "reference_adapter" not in orpo.phases["loss"]


def test_setup_picks_the_method_loss() -> None:
    from qlora_kit.train.preference import take_metrics

    assert take_metrics(lambda *a: None) is None
    fn = PreferenceLoss(TrainConfig(method="orpo"), SimpleNamespace())
    assert fn.take() is None and "nll_loss" in fn.names
    with pytest.raises(ValueError):
        PreferenceLoss(TrainConfig(), SimpleNamespace())
