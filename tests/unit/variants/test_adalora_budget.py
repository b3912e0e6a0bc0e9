"""AdaLoRA: no rank / schedule setting reaches peft's rank allocator with a budget it cannot run.

peft's RankAllocator masks ``init_bgt - budget`` triplets with ``torch.kthvalue``; with
``target_r >= r`` there is nothing to prune and it raises after the warm-up.  Every combination
the config accepts must run peft's real allocator through its whole schedule (gradients faked).
"""

from __future__ import annotations

import itertools
import random

import pytest
import torch
from pydantic import ValidationError
from torch import nn

from qlora_kit.core.config import LoraConfig, validate
from qlora_kit.core.errors import ConfigError
from qlora_kit.variants import peft_config
from qlora_kit.variants.adalora import after_optimizer_step


class _Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q_proj = nn.Linear(12, 12)
        self.v_proj = nn.Linear(12, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.v_proj(self.q_proj(x))

    def prepare_inputs_for_generation(self, *args: object, **kwargs: object) -> dict:  # peft's CAUSAL_LM wrapper
        return {}


def _lora(**values: object) -> LoraConfig | None:
    """The validated section, or None where the config refuses it (one line, checked below)."""
    try:
        return LoraConfig(type="adalora", **values)
    except ValidationError as exc:
        assert len(exc.errors()) == 1
        return None


def _run_schedule(lora: LoraConfig, total_steps: int) -> None:
    from peft import get_peft_model

    try:
        config = peft_config(lora, ["q_proj", "v_proj"], total_steps)
    except ConfigError:
        return  # refused with an error: and fix: line before anything is built
    model = get_peft_model(_Tiny(), config)
    generator = torch.Generator().manual_seed(total_steps)
    for step in range(total_steps):
        for p in model.parameters():
            if p.requires_grad:
                p.grad = torch.randn(p.shape, generator=generator)
        after_optimizer_step(model, step)


def test_default_target_rank_works_for_a_common_rank() -> None:
    lora = LoraConfig(type="adalora", r=8)
    assert 1 <= lora.adalora_target_r < 8
    _run_schedule(lora, 10)


def test_the_default_config_keeps_its_target_rank() -> None:
    assert LoraConfig(type="adalora").adalora_target_r == 8  # r=16: what runs trained so far used


@pytest.mark.parametrize("r,target", [(8, 8), (4, 8), (1, None), (1, 1)])
def test_nothing_to_prune_is_refused_in_one_line(r: int, target: int | None) -> None:
    lora: dict = {"type": "adalora", "r": r} | ({"adalora_target_r": target} if target else {})
    with pytest.raises(ConfigError) as err:
        validate({"model": {"name_or_path": "m"}, "data": {"path": "d.jsonl"}, "lora": lora, "output_dir": "o"})
    assert "lora.r" in err.value.message and len(err.value.message.splitlines()) == 1


def _grid() -> list[tuple]:
    ranks, targets = (1, 2, 3, 8, 16), (None, 1, 2, 7, 8, 12, 16)
    steps, tinits, tfinals, deltas = (1, 2, 3, 5, 11, 40), (0.0, 0.1, 0.5, 0.9), (0.0, 0.2, 0.5, 0.95), (1, 3)
    everything = list(itertools.product(ranks, targets, steps, tinits, tfinals, deltas))
    return random.Random(0).sample(everything, 150) + [(8, None, 10, 0.1, 0.2, 1), (2, None, 40, 0.0, 0.0, 1)]


@pytest.mark.parametrize("r,target,steps,tinit,tfinal,delta", _grid())
def test_every_accepted_setting_runs_peft_schedule(r: int, target: int | None, steps: int, tinit: float,
                                                    tfinal: float, delta: int) -> None:
    values: dict = {"r": r, "adalora_tinit_ratio": tinit, "adalora_tfinal_ratio": tfinal, "adalora_delta_t": delta}
    lora = _lora(**values, **({"adalora_target_r": target} if target else {}))
    if lora is not None:
        _run_schedule(lora, steps)


def test_runs_of_other_types_resume_whatever_their_adalora_keys(tmp_path) -> None:
    """Runs saved when the default target rank was a fixed 8 resume under the derived default."""
    from qlora_kit.core.config import dump_config
    from qlora_kit.train.resume import check_resume_compatible

    raw = {"model": {"name_or_path": "m"}, "data": {"path": "d.jsonl"}, "output_dir": "o"}
    old = validate(raw | {"lora": {"r": 8, "adalora_target_r": 8}})
    (tmp_path / "config.yaml").write_text(dump_config(old))
    check_resume_compatible(tmp_path, validate(raw | {"lora": {"r": 8}}))
