"""The data order: global micro-batches as a pure function of seed and epoch (exact resume)."""

from __future__ import annotations

from typing import Any, Iterator

from qlora_kit.core.config import Config
from qlora_kit.data.batching import plan_batches
from qlora_kit.train import distributed


def epoch_plan(cfg: Config, data: Any, epoch: int) -> list[list[list[int]]]:
    """The epoch's *global* micro-batches: ``micro_batch_size`` rows per process (distributed.local_rows)."""

    lengths = [len(s["input_ids"]) for s in data.train]
    return plan_batches(lengths, cfg.train.micro_batch_size * distributed.world_size(), row_tokens(cfg),
                        cfg.data.packing, cfg.train.seed, epoch, cfg.data.shuffle)


def row_tokens(cfg: Config) -> int:
    """Tokens one (packed) row may hold: ``max_length``, twice that for preference pairs (two sequences of
    up to max_length each, always kept together)."""
    return cfg.train.max_length * (1 if cfg.train.method == "sft" else 2)


class EpochPlans:
    """Per-epoch micro-batch plans (pure functions of seed and epoch), the last two kept, all lengths known."""

    def __init__(self, cfg: Config, data: Any):
        self.cfg, self.data = cfg, data
        self.plans: dict[int, list[list[list[int]]]] = {}
        self.lengths: dict[int, int] = {}

    def plan(self, epoch: int) -> list[list[list[int]]]:
        if epoch not in self.plans:
            if len(self.plans) >= 2:
                del self.plans[min(self.plans)]
            self.plans[epoch] = epoch_plan(self.cfg, self.data, epoch)
            self.lengths[epoch] = len(self.plans[epoch])
        return self.plans[epoch]

    def length(self, epoch: int) -> int:
        return self.lengths[epoch] if epoch in self.lengths else len(self.plan(epoch))


def micro_batches_from(cfg: Config, data: Any, start: int, plans: EpochPlans | None = None
                       ) -> Iterator[tuple[int, list[list[int]]]]:
    """Yield (epoch, rows) for the global micro-batch index ``start`` onwards, forever.

    The order is a pure function of the seed and the epoch, so a resumed run sees
    exactly the batches an uninterrupted run would have seen.
    """
    plans = plans or EpochPlans(cfg, data)
    epoch, first = 0, 0
    while True:
        n = plans.length(epoch)
        if not n:
            raise RuntimeError("empty batch plan")
        if first + n > start:
            for rows in plans.plan(epoch)[max(0, start - first):]:
                yield epoch, rows
            start = first + n
        first += n
        epoch += 1
