"""What training shows: the logging window, metrics records, the progress bar and, without a terminal,
paced progress lines."""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import torch

from qlora_kit.core import logs, pacing
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
    """What training shows between its metrics: one log line per logged step, with elapsed time and ETA.

    On a terminal also a rich progress bar, drawn below the log lines (they share
    ``logs.console()``, so neither overwrites the other).  Without a terminal (a pipe, a file,
    Slurm) a ``progress:`` line is written whenever ``pacing.interval()`` seconds (30 by default)
    passed without a line, between logged steps too: from :meth:`advance` after a step, and from
    a heartbeat thread during a long step, evaluation or checkpoint.  Only step counts and wall
    time are read (no host sync); ``metrics.jsonl`` gets nothing from it.
    """

    def __init__(self, total: int, done: int, enabled: bool = True, micro_per_step: int = 1,
                 clock: Callable[[], float] = time.monotonic):
        self.bar = None
        self.enabled = enabled  # False on ranks other than 0
        self.total, self.first, self.step, self.micro, self.micro_per_step = total, done, done, 0, micro_per_step
        self.logged = -1  # the last step with a step line
        self.clock = clock
        self.started = self.last = clock()
        self.every = pacing.interval()
        self.phase: tuple[str, float] | None = None  # (what, since when) outside the step loop's steps
        self.heartbeat: pacing.Heartbeat | None = None
        console = logs.console()
        if enabled and console.is_terminal:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(TextColumn("train"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                                TextColumn("{task.fields[info]}"), console=console, transient=True)
            self.task = self.bar.add_task("train", total=total, completed=done, info="")
            self.bar.start()
        elif enabled:
            self.heartbeat = pacing.Heartbeat(self.beat_line, self.every, clock).start()

    def timing(self) -> str:
        """``12/100  elapsed 1m02s  eta 9m18s``: this process's pace over the steps (and micro-batches) it ran."""
        done = self.step - self.first + self.micro / max(self.micro_per_step, 1)
        return f"{self.step}/{self.total}  " + pacing.timing(done, self.total - self.first, self.clock() - self.started)

    def update(self, step: int, record: dict[str, Any]) -> None:
        info = (f"loss {record['loss']:.4f}  lr {record['learning_rate']:.2e}  "
                f"{record['tokens_per_second']:.0f} tok/s")
        if "rewards/accuracies" in record:
            info += f"  reward acc {record['rewards/accuracies']:.2f}  margin {record['rewards/margins']:.3f}"
        self.step, self.micro, self.logged = step, 0, step
        if self.enabled:
            self._written()
            log.info("step %d  %s  %s", step, info, self.timing())
        if self.bar is not None:
            self.bar.update(self.task, completed=step, info=info)

    def advance(self, step: int) -> None:
        """A step finished; without a terminal, a ``progress:`` line when one is due."""
        self.step, self.micro = step, 0
        if self.bar is not None:
            self.bar.update(self.task, completed=step)
        elif self.heartbeat is not None and step != self.logged and self.clock() - self.last >= self.every:
            self.beat_line()

    def micro_batch(self, done: int) -> None:
        """``done`` micro-batches of the running step are finished (read by the heartbeat; no output)."""
        self.micro = done

    @contextmanager
    def doing(self, what: str) -> Iterator[None]:
        """Name the work between steps (evaluation, a checkpoint) for the heartbeat lines meanwhile."""
        self.phase = (what, self.clock())
        try:
            yield
        finally:
            self.phase = None

    def beat_line(self) -> None:
        """``progress: step 37/1000  elapsed ..  eta ..``, plus what runs now (main thread or heartbeat)."""
        self._written()
        now, phase, micro = self.clock(), self.phase, self.micro
        extra = ""
        if phase is not None:
            extra = f"  ({phase[0]} for {pacing.duration(now - phase[1])})"
        elif 0 < micro < self.micro_per_step:
            extra = f"  (step {self.step + 1}: micro-batch {micro}/{self.micro_per_step})"
        log.info("progress: step %s%s", self.timing(), extra)

    def _written(self) -> None:
        self.last = self.clock()
        if self.heartbeat is not None:
            self.heartbeat.beat()

    def close(self) -> None:
        if self.heartbeat is not None:
            self.heartbeat.stop()
        if self.bar is not None:
            self.bar.stop()
