"""metrics.jsonl (one JSON object per logged step or evaluation) and the loss-curve PNG."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

from qlora_kit.core.files import atomic_file


class MetricsLog:
    """Append-only JSONL metrics file; each line is flushed as soon as it is written.

    ``listeners`` get every record after it is written (experiment trackers, train/tracking.py),
    so they see exactly what the file gets.
    """

    def __init__(self, path: Path):
        self.path = path
        self.listeners: list[Callable[[dict[str, Any]], None]] = []

    def append(self, record: dict[str, Any]) -> None:
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")
            fh.flush()
        for listener in self.listeners:
            listener(record)

    def read(self) -> list[dict[str, Any]]:
        """All records; a torn last line (process killed mid-write) is ignored."""
        if not self.path.exists():
            return []
        records = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return records

    def truncate_after(self, step: int) -> None:
        """Drop records after ``step`` (used on resume, so no step is logged twice)."""
        kept = [r for r in self.read() if r.get("step", 0) <= step]
        with atomic_file(self.path) as tmp:
            tmp.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")


def plot_loss(records: list[dict[str, Any]], png: Path) -> Path | None:
    """Write the training (and eval) loss curve; returns None when there is nothing to plot."""
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
    if not train and not evals:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if train:
        # one logged point is a line of no length: draw it as a point
        ax.plot(*zip(*train), label="train loss", linewidth=1.5, marker="o" if len(train) == 1 else None)
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss", linewidth=1.5)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (assistant tokens)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)
    return png
