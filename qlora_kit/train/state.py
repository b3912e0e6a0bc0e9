"""Run: everything the training loop needs, built by setup."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from qlora_kit.core.config import Config
from qlora_kit.ops.loss import causal_lm_loss
from qlora_kit.rundir.metrics import MetricsLog
from qlora_kit.train import distributed


@dataclass
class Run:
    """Everything the loop needs, built by :func:`setup`."""

    cfg: Config
    config_text: str
    out: Path
    device: torch.device
    model: Any
    tokenizer: Any
    data: Any
    optimizer: torch.optim.Optimizer
    scheduler: Any
    total_steps: int
    micro_per_epoch: int
    manifest: dict[str, Any]
    metrics: MetricsLog
    step: int = 0
    micro_index: int = 0
    skipped_steps: int = 0
    skipped_consecutive: int = 0
    last_eval_step: int = -1
    last_save_step: int = -1
    last_train_loss: float | None = None
    last_eval_loss: float | None = None
    fresh: bool = True  # a new run (not --resume): undone when it fails before its first checkpoint
    window: "LogWindow" = field(default_factory=lambda: LogWindow())  # loss/tokens since the last log line
    nonfinite: torch.Tensor | None = None  # device flag: any non-finite step so far (stop mode)
    first_bad_step: torch.Tensor | None = None
    params: list[torch.nn.Parameter] = field(default_factory=list)
    precision: Any = None  # ops.precision.Precision
    scaler: torch.amp.GradScaler | None = None  # fp16 compute only
    dist: distributed.Dist = distributed.SINGLE  # this process's rank in a multi-process run
    residual: Any = None  # _Residual: a base-changing init's NF4 base, stored by begin()
    wrapped: Any = None  # what runs forward/backward: DDP/FSDP around ``model`` (``model`` itself when single)
    loss_fn: Any = causal_lm_loss  # (model, batch, n_items, fused) -> loss: SFT's, or train.preference.PreferenceLoss


@dataclass
class LogWindow:
    """Loss and throughput since the last log line (device tensors until logged).

    Part of the checkpoint (``to_state``): a run resumed in the middle of a logging window
    logs the same loss at the window's end as the uninterrupted run.  ``sums``: a method's
    own summed metrics (preference tuning: rewards per pair, ``train.preference``).
    """

    loss: torch.Tensor | None = None
    steps: int = 0
    tokens: int = 0
    start: float = field(default_factory=time.perf_counter)
    sums: dict[str, torch.Tensor] | None = None

    def add(self, loss: torch.Tensor, tokens: int, sums: dict[str, torch.Tensor] | None = None) -> None:
        self.loss = loss if self.loss is None else self.loss + loss
        self.steps += 1
        self.tokens += tokens
        if sums is not None:
            self.sums = sums if self.sums is None else {k: self.sums[k] + v for k, v in sums.items()}

    def reset(self) -> None:
        self.loss, self.steps, self.tokens, self.start, self.sums = None, 0, 0, time.perf_counter(), None

    def to_state(self) -> dict[str, Any]:
        """JSON state: float32 sums are exact as Python floats (one sync, at save time)."""
        state: dict[str, Any] = {"loss_sum": None if self.loss is None else float(self.loss), "steps": self.steps,
                                 "tokens": self.tokens}
        if self.sums is not None:
            state["sums"] = {k: float(v) for k, v in self.sums.items()}
        return state

    @classmethod
    def from_state(cls, state: dict[str, Any] | None, device: torch.device) -> "LogWindow":
        """The window a checkpoint was saved in; an empty one for checkpoints written before it was saved."""
        if not state:
            return cls()
        loss = None if state["loss_sum"] is None else torch.tensor(state["loss_sum"], dtype=torch.float32,
                                                                   device=device)
        sums = {k: torch.tensor(v, dtype=torch.float32, device=device) for k, v in state["sums"].items()} \
            if state.get("sums") else None
        return cls(loss, int(state["steps"]), int(state["tokens"]), sums=sums)
