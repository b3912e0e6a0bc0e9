"""The data audit: counts, lengths, truncation, bad rows, and a preview of the trained tokens."""

from __future__ import annotations

import logging
import math
import statistics
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Iterable

if TYPE_CHECKING:
    from rich.console import Console
    from rich.text import Text
    from transformers import PreTrainedTokenizerBase

from qlora_kit.core import logs
from qlora_kit.data.encode import IGNORE_INDEX, Encoded, Sample
from qlora_kit.data.formats import Parsed

log = logging.getLogger("qlora_kit")


MAX_REASONS = 20  # bad-row reasons kept in the summary


@dataclass
class DataSummary:
    """What the data pipeline read, kept, dropped and trains on."""

    source: str
    format: str
    format_detected: bool
    rows: int  # rows read (train file plus val file)
    bad_rows: list[int]  # row numbers (line numbers for .jsonl), 1-based
    row_unit: str  # "line" or "row"
    bad_row_reasons: list[str]
    val_source: str | None
    val_bad_rows: list[int]
    train_rows: int
    val_rows: int
    tokens: int  # tokens in train samples
    trainable_tokens: int
    val_tokens: int
    val_trainable_tokens: int
    truncated: int
    no_trainable: int  # rows dropped for having no trainable token
    no_trainable_truncated: int  # of those, rows whose targets were all cut by truncation
    max_length: int
    train_on_inputs: bool
    length_min: int = 0
    length_mean: float = 0.0
    length_max: int = 0
    length_histogram: list[tuple[int, int, int]] = field(default_factory=list)  # (lo, hi, count)
    preview: list[tuple[str, bool]] = field(default_factory=list)  # (text, trained) pieces of one sample
    pairs: dict[str, Any] | None = None  # preference rows: tokens per side, dropped pairs (data/preference.py)

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict; the preview is one string with trained text inside «»."""
        out = asdict(self)
        out["length_histogram"] = [list(b) for b in self.length_histogram]
        out["preview"] = mark_preview(self.preview)
        return out


def summarize(
    train_part: Parsed,
    val_part: Parsed | None,
    train_enc: list[Encoded],
    val_enc: list[Encoded],
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
    train_on_inputs: bool,
) -> DataSummary:
    """Collect counts, token totals, length statistics and a preview into a DataSummary."""
    train = [e.sample for e in train_enc if e.sample is not None]
    val = [e.sample for e in val_enc if e.sample is not None]
    encoded = train_enc + val_enc
    lengths = [len(s["input_ids"]) for s in train]
    unit = train_part.source.unit
    reasons = [f"{unit} {n}: {why}" for n, why in train_part.bad[:MAX_REASONS]]
    if val_part is not None:
        reasons += [f"val {val_part.source.unit} {n}: {why}" for n, why in val_part.bad[:MAX_REASONS]]
    summary = DataSummary(
        source=train_part.source.label,
        format=train_part.format,
        format_detected=train_part.detected,
        rows=train_part.total + (val_part.total if val_part else 0),
        bad_rows=[n for n, _ in train_part.bad],
        row_unit=unit,
        bad_row_reasons=reasons,
        val_source=val_part.source.label if val_part else None,
        val_bad_rows=[n for n, _ in val_part.bad] if val_part else [],
        train_rows=len(train),
        val_rows=len(val),
        tokens=sum(lengths),
        trainable_tokens=_count_targets(train),
        val_tokens=sum(len(s["input_ids"]) for s in val),
        val_trainable_tokens=_count_targets(val),
        truncated=sum(e.truncated for e in encoded),
        no_trainable=sum(e.sample is None for e in encoded),
        no_trainable_truncated=sum(e.cut_to_zero for e in encoded),
        max_length=max_length,
        train_on_inputs=train_on_inputs,
    )
    if lengths:
        summary.length_min, summary.length_max = min(lengths), max(lengths)
        summary.length_mean = round(statistics.fmean(lengths), 1)
        summary.length_histogram = length_histogram(lengths)
        summary.preview = preview_pieces(train[0], tokenizer)
    return summary


def _count_targets(samples: Iterable[Sample]) -> int:
    return sum(sum(1 for x in s["labels"] if x != IGNORE_INDEX) for s in samples)


def length_histogram(lengths: list[int], bins: int = 8) -> list[tuple[int, int, int]]:
    """Equal-width bins (lo, hi, count) over [min, max] of the sample lengths."""
    lo, hi = min(lengths), max(lengths)
    width = max(1, math.ceil((hi - lo + 1) / bins))
    counts = Counter((x - lo) // width for x in lengths)
    n_bins = math.ceil((hi - lo + 1) / width)
    return [(lo + b * width, lo + (b + 1) * width - 1, counts.get(b, 0)) for b in range(n_bins)]


def preview_pieces(sample: Sample, tokenizer: PreTrainedTokenizerBase) -> list[tuple[str, bool]]:
    """Decode a sample into consecutive (text, trained) pieces."""
    pieces: list[tuple[str, bool]] = []
    ids, labels = sample["input_ids"], sample["labels"]
    start = 0
    for i in range(1, len(ids) + 1):
        if i == len(ids) or (labels[i] != IGNORE_INDEX) != (labels[start] != IGNORE_INDEX):
            pieces.append((tokenizer.decode(ids[start:i]), labels[start] != IGNORE_INDEX))
            start = i
    return pieces


def mark_preview(pieces: list[tuple[str, bool]]) -> str:
    """Plain-text preview: trained text inside « »."""
    return "".join(f"«{text}»" if trained else text for text, trained in pieces)


def log_summary_line(summary: DataSummary) -> None:
    log.info(
        "data: %d rows read, %d bad, %d train / %d val %s, %d tokens (%d trained), %d truncated, "
        "%d without trainable tokens",
        summary.rows, len(summary.bad_rows) + len(summary.val_bad_rows), summary.train_rows, summary.val_rows,
        "samples" if summary.pairs is None else "pairs", summary.tokens, summary.trainable_tokens, summary.truncated, summary.no_trainable,
    )


def print_summary(summary: DataSummary, console: Console | None = None, preview_chars: int = 800) -> None:
    """Print the data summary as a table, a length histogram and a trained-token preview."""
    from rich.table import Table

    console = console or logs.console()
    table = Table(title=f"data: {summary.source}", show_header=False)
    table.add_column("what", style="bold")
    table.add_column("value")
    for name, value in summary_rows(summary):
        table.add_row(name, value)
    console.print(table)
    if summary.length_histogram:
        top = max(c for _, _, c in summary.length_histogram) or 1
        for lo, hi, count in summary.length_histogram:
            console.print(f"  {lo:>6}-{hi:<6} {'█' * max(1 if count else 0, round(24 * count / top)):<24} {count}")
    if summary.preview:
        console.print(preview_text(summary.preview, preview_chars, colour=console.color_system is not None))


def preview_text(pieces: list[tuple[str, bool]], max_chars: int, colour: bool) -> Text:
    """The preview as rich Text: trained pieces green (or inside « » without colour), cut at max_chars."""
    from rich.text import Text

    legend = "trained tokens in green" if colour else "trained tokens inside « »"
    text = Text(f"preview ({legend}):\n", style="bold")
    shown = 0
    for piece, trained in pieces:
        piece = piece[: max(0, max_chars - shown)]
        shown += len(piece)
        if not colour and trained and piece:
            piece = f"«{piece}»"
        text.append(piece, style="bold green" if trained else "dim")
    if shown >= max_chars:
        text.append(" …", style="dim")
    return text


def summary_rows(summary: DataSummary) -> list[tuple[str, str]]:
    """(label, value) lines of the summary table."""
    bad = summary.bad_rows
    listed = ", ".join(map(str, bad[:8])) + (", ..." if len(bad) > 8 else "")
    bad_text = f"{len(bad)} ({summary.row_unit}s {listed})" if bad else "0"
    fmt = summary.format + (" (auto-detected)" if summary.format_detected else "")
    trained_on = "all tokens" if summary.train_on_inputs else "assistant replies only"
    pct = 100 * summary.trainable_tokens / summary.tokens if summary.tokens else 0.0
    head = [
        ("format", fmt),
        ("rows read", str(summary.rows)),
        ("bad rows skipped", bad_text + (f"; val file {len(summary.val_bad_rows)}" if summary.val_bad_rows else "")),
    ]
    if summary.pairs is not None:
        return head + pair_summary_rows(summary)
    return head + [
        ("samples train / val", f"{summary.train_rows} / {summary.val_rows}"),
        ("validation from", summary.val_source or "random split of the training file"),
        ("tokens (train)", f"{summary.tokens:,}"),
        ("trainable tokens", f"{summary.trainable_tokens:,} ({pct:.1f}%, {trained_on})"),
        ("truncated to max_length", f"{summary.truncated} (max_length {summary.max_length})"),
        ("dropped, no trainable tokens", f"{summary.no_trainable} ({summary.no_trainable_truncated} by truncation)"),
        ("length min / mean / max", f"{summary.length_min} / {summary.length_mean} / {summary.length_max}"),
    ]


def pair_summary_rows(summary: DataSummary) -> list[tuple[str, str]]:
    """The table's lines for preference rows: pairs, tokens per side, truncation, dropped pairs."""
    p = summary.pairs or {}
    dropped = ", ".join(f"{n} {why}" for why, n in (p.get("dropped") or {}).items()) or "none"
    return [
        ("pairs train / val", f"{summary.train_rows} / {summary.val_rows}"),
        ("validation from", summary.val_source or "random split of the training file"),
        ("tokens chosen / rejected", f"{p.get('chosen_tokens', 0):,} / {p.get('rejected_tokens', 0):,} (completions "
                                     f"{p.get('chosen_trained', 0):,} / {p.get('rejected_trained', 0):,}, prompts "
                                     f"{p.get('prompt_tokens', 0):,} on each side)"),
        ("pairs cut to max_length", f"{summary.truncated} (max_length {summary.max_length} per side: the prompt "
                                    "first, then both completions at the same length)"),
        ("pairs dropped", dropped),
        ("sequence length min / mean / max", f"{summary.length_min} / {summary.length_mean} / {summary.length_max}"),
    ]
