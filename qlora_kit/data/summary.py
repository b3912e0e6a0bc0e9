"""The data audit: counts, lengths, truncation, bad rows, and a preview of the trained tokens."""

from __future__ import annotations

import logging
import math
import statistics
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

if TYPE_CHECKING:
    from rich.console import Console
    from rich.text import Text
    from transformers import PreTrainedTokenizerBase

from qlora_kit.core import logs
from qlora_kit.data.encode import IGNORE_INDEX, Sample
from qlora_kit.data.sources import SourceData
from qlora_kit.data.system_prompt import SystemPromptUse
from qlora_kit.data.tools import tool_needs

log = logging.getLogger("qlora_kit")


MAX_REASONS = 20  # bad-row reasons kept in the summary


@dataclass
class SourceSummary:
    """The audit of one data source (a row of the per-source table)."""

    key: str  # data.path, data.datasets[2], data.val_path
    source: str
    format: str
    format_detected: bool
    rows: int  # rows read from it (and its own validation file)
    bad_rows: list[int]
    row_unit: str
    weight: float
    train_rows: int  # its training samples, before weighting
    used_rows: int  # its training samples per epoch, after weighting
    val_rows: int
    tokens: int  # tokens of its samples per epoch (after weighting)
    trainable_tokens: int
    tool_rows: int  # rows with tool calls or tool results
    preview: list[tuple[str, bool]] = field(default_factory=list)


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
    sources: list[SourceSummary] = field(default_factory=list)  # one per source (data.path: one)
    default_system_prompt: str | None = None  # the chat template's default system prompt
    system_prompt_note: str | None = None  # what rows without a system prompt were trained with
    tool_rows: int = 0  # rows with tool calls or tool results
    pairs: dict[str, Any] | None = None  # preference rows: tokens per side, dropped pairs (data/preference.py)

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict; previews are one string with trained text inside «»."""
        out = asdict(self)
        out["length_histogram"] = [list(b) for b in self.length_histogram]
        out["preview"] = mark_preview(self.preview)
        for entry, src in zip(out["sources"], self.sources):
            entry["preview"] = mark_preview(src.preview)
        return out

    @property
    def bad_total(self) -> int:
        """Bad rows of every file read."""
        return sum(len(s.bad_rows) for s in self.sources) if self.sources else len(self.bad_rows) + len(
            self.val_bad_rows)


def summarize(
    sources: list[SourceData],
    shared: SourceData | None,
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
    train_on_inputs: bool,
    system: SystemPromptUse | None = None,
) -> DataSummary:
    """Collect counts, token totals, length statistics and previews into a DataSummary (one row per source)."""
    everything = sources + ([shared] if shared else [])
    train = [sample for src in sources for sample in src.mixed]
    val = [e.sample for src in everything for e in src.val_enc if e.sample is not None]
    encoded = [e for src in everything for e in src.train_enc + src.val_enc]
    lengths = [len(s["input_ids"]) for s in train]
    first = sources[0]
    single = len(sources) == 1
    val_part = shared.part if shared else first.val_part if single else None
    unit = first.part.source.unit
    per_source = [source_summary(src, tokenizer) for src in everything]
    if single:
        reasons = [f"{unit} {n}: {why}" for n, why in first.part.bad[:MAX_REASONS]]
        if val_part is not None:
            reasons += [f"val {val_part.source.unit} {n}: {why}" for n, why in val_part.bad[:MAX_REASONS]]
    else:
        reasons = [f"{s.key} {s.row_unit} {n}: {why}" for s, src in zip(per_source, everything)
                   for n, why in _bad_of(src)[:MAX_REASONS]]
    summary = DataSummary(
        source=first.part.source.label if single else f"{len(sources)} sources",
        format=first.part.format if single else "+".join(dict.fromkeys(s.part.format for s in sources)),
        format_detected=all(s.part.detected for s in sources),
        rows=sum(s.rows for s in per_source),
        bad_rows=[n for n, _ in first.part.bad] if single else [],
        row_unit=unit,
        bad_row_reasons=reasons,
        val_source=val_part.source.label if val_part else _val_files(sources),
        val_bad_rows=[n for n, _ in val_part.bad] if val_part and (single or shared) else [],
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
        sources=per_source,
        default_system_prompt=system.template_default if system else None,
        system_prompt_note=system.describe() if system else None,
        tool_rows=sum(s.tool_rows for s in per_source),
    )
    if lengths:
        summary.length_min, summary.length_max = min(lengths), max(lengths)
        summary.length_mean = round(statistics.fmean(lengths), 1)
        summary.length_histogram = length_histogram(lengths)
        summary.preview = preview_pieces(train[0], tokenizer)
    return summary


def _val_files(sources: list[SourceData]) -> str | None:
    """Where validation rows of several sources come from when some have their own val_path."""
    own = [s.spec.key for s in sources if s.val_part is not None]
    if len(sources) < 2 or not own:
        return None
    return f"the val_path of {', '.join(own)}" + ("" if len(own) == len(sources) else "; a split of the others")


def _bad_of(src: SourceData) -> list[tuple[int, str]]:
    return src.part.bad + (src.val_part.bad if src.val_part else [])


def source_summary(src: SourceData, tokenizer: PreTrainedTokenizerBase) -> SourceSummary:
    """One source's row of the summary: what it read, dropped and adds to an epoch."""
    parts = [p for p in (src.part, src.val_part) if p is not None]
    samples = [e.sample for e in src.train_enc if e.sample is not None]
    tool_rows = sum(1 for p in parts for r in p.rows if r.messages is not None and tool_needs([(r.messages, None)]))
    return SourceSummary(
        key=src.spec.key, source=src.part.source.label, format=src.part.format, format_detected=src.part.detected,
        rows=sum(p.total for p in parts), bad_rows=[n for n, _ in _bad_of(src)], row_unit=src.part.source.unit,
        weight=src.spec.weight, train_rows=len(samples), used_rows=len(src.mixed),
        val_rows=sum(e.sample is not None for e in src.val_enc),
        tokens=sum(len(s["input_ids"]) for s in src.mixed), trainable_tokens=_count_targets(src.mixed),
        tool_rows=tool_rows, preview=preview_pieces(samples[0], tokenizer) if samples else [],
    )


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
        summary.rows, summary.bad_total, summary.train_rows, summary.val_rows,
        "samples" if summary.pairs is None else "pairs", summary.tokens, summary.trainable_tokens, summary.truncated,
        summary.no_trainable,
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
    if len(summary.sources) > 1:
        console.print(sources_table(summary))
    if summary.length_histogram:
        top = max(c for _, _, c in summary.length_histogram) or 1
        for lo, hi, count in summary.length_histogram:
            console.print(f"  {lo:>6}-{hi:<6} {'█' * max(1 if count else 0, round(24 * count / top)):<24} {count}")
    colour = console.color_system is not None
    if len(summary.sources) > 1:
        for src in summary.sources:
            if src.preview:
                console.print(f"{src.key} ({src.source}):", style="bold")
                console.print(preview_text(src.preview, preview_chars, colour=colour))
    elif summary.preview:
        console.print(preview_text(summary.preview, preview_chars, colour=colour))


def sources_table(summary: DataSummary) -> Any:
    """The per-source table: rows, bad rows, samples, weight and tokens of each source per epoch."""
    from rich.table import Table

    tools = any(s.tool_rows for s in summary.sources)
    table = Table(title="per source (used: samples per epoch, weighted; tokens of those)")
    names = ("source (format)", "rows(bad)", "train/val", "used(×w)", "tokens", "trained") + (
        ("tools",) if tools else ())
    for i, name in enumerate(names):
        table.add_column(name, justify="right" if i else "left", no_wrap=bool(i), overflow="fold", min_width=None
                         if i else 12)
    for s in summary.sources:
        cells = [f"{s.key.removeprefix('data.').removeprefix('datasets')} {Path(s.source).name or s.source} "
                 f"({s.format})", f"{s.rows} ({len(s.bad_rows)})", f"{s.train_rows}/{s.val_rows}",
                 f"{s.used_rows} (×{s.weight:g})", f"{s.tokens:,}", f"{s.trainable_tokens:,}"]
        table.add_row(*cells, *([str(s.tool_rows)] if tools else []))
    return table


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
    if len(summary.sources) > 1:
        bad_text = f"{summary.bad_total} (per source below)" if summary.bad_total else "0"
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
        ("validation from", summary.val_source or ("random split of the training file" if len(summary.sources) < 2
                                                   else "random split of each source, in proportion")),
        ("tokens (train)", f"{summary.tokens:,}"),
        ("trainable tokens", f"{summary.trainable_tokens:,} ({pct:.1f}%, {trained_on})"),
        ("truncated to max_length", f"{summary.truncated} (max_length {summary.max_length})"),
        ("dropped, no trainable tokens", f"{summary.no_trainable} ({summary.no_trainable_truncated} by truncation)"),
        ("length min / mean / max", f"{summary.length_min} / {summary.length_mean} / {summary.length_max}"),
    ] + ([("tool-calling rows", str(summary.tool_rows))] if summary.tool_rows else []) + (
        [("system prompt", summary.system_prompt_note)] if summary.system_prompt_note else [])


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
