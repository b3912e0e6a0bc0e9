"""metrics.jsonl (one JSON object per logged step or evaluation) and the loss-curve PNG."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Callable

from qlora_kit.core.diskspace import format_bytes, free_bytes, is_no_space
from qlora_kit.core.errors import DiskFullError
from qlora_kit.core.files import atomic_file

log = logging.getLogger("qlora_kit")


class MetricsLog:
    """Append-only JSONL metrics file; each line is flushed as soon as it is written.

    ``listeners`` get every record after it is written (experiment trackers, train/tracking.py),
    so they see exactly what the file gets.

    ``no_space_fix``: the ``fix:`` a full disk gets (whether ``--resume`` can continue depends on the run).
    """

    def __init__(self, path: Path, no_space_fix: Callable[[], str] = lambda: "free space on that disk, then run "
                                                                               "the same command again"):
        self.path = path
        self.no_space_fix = no_space_fix
        self.listeners: list[Callable[[dict[str, Any]], None]] = []

    def append(self, record: dict[str, Any]) -> None:
        """Write one record, then hand it to the listeners.

        Raises:
            DiskFullError: the disk filled up (naming this file).
        """
        try:
            with open(self.path, "a", encoding="utf-8") as fh:
                fh.write(json.dumps(record) + "\n")
                fh.flush()
        except OSError as exc:
            if not is_no_space(exc):
                raise
            raise DiskFullError(f"the disk holding {self.path} filled up while writing it "
                                f"({format_bytes(free_bytes(self.path.parent))} free now)", self.no_space_fix()) from exc
        for listener in self.listeners:
            listener(record)

    def read(self) -> list[dict[str, Any]]:
        """All records; a torn last line (process killed mid-write) is ignored, other broken lines with a warning.

        A line that is not UTF-8 JSON, not an object, or without a numeric ``step`` is skipped (named
        in the log); :meth:`truncate_after` on resume rewrites the file without it.
        """
        if not self.path.exists():
            return []
        records, broken = [], []
        lines = self.path.read_bytes().splitlines()
        for number, line in enumerate(lines, 1):
            record = _record(line)
            if record is not None:
                records.append(record)
            elif number < len(lines) and line.strip():  # a torn last line is expected after a kill
                broken.append(number)
        if broken and self.path not in _WARNED:
            _WARNED.add(self.path)
            log.warning("%s: skipping %d line(s) that are not metric records (line %s%s); a resume writes the file "
                        "again without them", self.path, len(broken), broken[0], ", ..." if len(broken) > 1 else "")
        return records

    def truncate_after(self, step: int) -> None:
        """Drop records after ``step`` (used on resume, so no step is logged twice)."""
        kept = [r for r in self.read() if r["step"] <= step]
        with atomic_file(self.path) as tmp:
            tmp.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")


_WARNED: set[Path] = set()


def _record(line: bytes) -> dict[str, Any] | None:
    """One metrics line as a record, or None when it is not a UTF-8 JSON object with a numeric ``step``."""
    try:
        record = json.loads(line.decode("utf-8"))
    except (ValueError, RecursionError):  # UnicodeDecodeError, JSONDecodeError
        return None
    if not isinstance(record, dict):
        return None
    return record if _number(record.get("step")) else None


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def plot_loss(records: list[dict[str, Any]], png: Path) -> Path | None:
    """Write the training (and eval) loss curve; returns None when there is nothing to plot."""
    train = [(r["step"], r["loss"]) for r in records if _number(r.get("loss"))]
    evals = [(r["step"], r["eval_loss"]) for r in records if _number(r.get("eval_loss"))]
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
