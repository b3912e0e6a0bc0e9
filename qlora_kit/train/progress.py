"""What training shows: the logging window, metrics records and the progress bar."""

from __future__ import annotations

import logging
import time
from typing import Any

import torch

from qlora_kit.core import logs
from qlora_kit.train.guards import raise_if_nonfinite, raise_if_scale_collapsed
from qlora_kit.train.preference import means
from qlora_kit.train.state import LogWindow, Run

log = logging.getLogger("qlora_kit")


def log_step(run: Run, window: LogWindow, lr: float, grad_norm: torch.Tensor, progress: "Progress") -> None:
    if window.loss is None:  # every step of the window was skipped (on_nonfinite=skip)
        window.reset()
        return
    scale = run.scaler.get_scale() if run.scaler is not None else None
    sums = window.sums or {}  # a preference method's summed metrics: each rank sums its pairs
    names = list(sums)
    shared = run.dist.sum(torch.stack([window.loss / window.steps, run.nonfinite.float(),
                                       *(sums[k].float() for k in names)]))  # every rank's share
    values = torch.stack([shared[0], grad_norm, *shared[1:]]).tolist()  # one sync
    loss, gnorm, bad, *extra = values
    raise_if_nonfinite(run, bad > 0)
    raise_if_scale_collapsed(run, scale)
    elapsed = time.perf_counter() - window.start
    record: dict[str, Any] = {
        "step": run.step,
        "epoch": round(run.micro_index / run.micro_per_epoch, 4),
        "loss": round(loss, 6),
        "learning_rate": lr,
        "grad_norm": round(gnorm, 6),
        "tokens_per_second": round(window.tokens / max(elapsed, 1e-9), 2),
        "seconds_per_step": round(elapsed / window.steps, 4),
        **means(dict(zip(names, extra))),  # rewards/chosen, rewards/accuracies, ... (trl's names)
    }
    if run.skipped_steps:
        record["skipped_steps"] = run.skipped_steps
    if scale is not None:
        record["loss_scale"] = scale
    if run.device.type == "cuda":
        record["peak_memory_allocated"] = torch.cuda.max_memory_allocated(run.device)
        record["peak_memory_reserved"] = torch.cuda.max_memory_reserved(run.device)
    run.metrics.append(record)
    run.last_train_loss = loss
    progress.update(run.step, record)
    window.reset()


class Progress:
    """One log line per logged step; on a terminal also a rich progress bar, drawn below the log lines
    (they share ``logs.console()``, so neither overwrites the other)."""

    def __init__(self, total: int, done: int, enabled: bool = True):
        self.bar = None
        self.enabled = enabled  # False on ranks other than 0
        console = logs.console()
        if enabled and console.is_terminal:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(TextColumn("train"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                                TextColumn("{task.fields[info]}"), console=console, transient=True)
            self.task = self.bar.add_task("train", total=total, completed=done, info="")
            self.bar.start()

    def update(self, step: int, record: dict[str, Any]) -> None:
        info = (f"loss {record['loss']:.4f}  lr {record['learning_rate']:.2e}  "
                f"{record['tokens_per_second']:.0f} tok/s")
        if "rewards/accuracies" in record:
            info += f"  reward acc {record['rewards/accuracies']:.2f}  margin {record['rewards/margins']:.3f}"
        if self.enabled:
            log.info("step %d  %s", step, info)
        if self.bar is not None:
            self.bar.update(self.task, completed=step, info=info)

    def advance(self, step: int) -> None:
        if self.bar is not None:
            self.bar.update(self.task, completed=step)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
