"""build_data: read, audit, split and tokenise the training and validation rows."""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

from qlora_kit.core.config import DataConfig
from qlora_kit.core.errors import DataError
from qlora_kit.data.encode import Encoded, Sample, encode_rows
from qlora_kit.data.formats import CHAT_FORMATS, Parsed, Row, parse_rows, resolve_format
from qlora_kit.data.labels import TEMPLATE_ERROR, fold_system_rows, make_chat_spans, template_takes_system
from qlora_kit.data.read import read_source
from qlora_kit.data.summary import DataSummary, log_summary_line, summarize

log = logging.getLogger("qlora_kit")


@dataclass
class DataBundle:
    """Tokenised train/val samples plus what evaluation and the manifest need."""

    train: list[Sample]
    val: list[Sample]
    heldout: list[dict[str, Any]]
    summary: DataSummary
    fingerprint: dict[str, Any]


def build_data(cfg: DataConfig, tokenizer: PreTrainedTokenizerBase, max_length: int, seed: int) -> DataBundle:
    """Read, check, tokenise and split the data described by ``cfg``.

    Raises:
        DataError: unreadable or malformed input, too many bad rows, no chat template for
            chat rows, or nothing left to train on.
    """
    has_template = bool(getattr(tokenizer, "chat_template", None))
    train_part = load_and_parse(cfg.path, cfg, has_template)
    val_part = load_and_parse(cfg.val_path, cfg, has_template, "data.val_path") if cfg.val_path else None
    if val_part is not None:
        if val_part.format != train_part.format:
            log.info("data format of data.val_path: %s (auto-detected)", val_part.format)
        train_rows, val_rows = train_part.rows, cap_rows(val_part.rows, cfg.val_max_rows, seed)
    else:
        train_rows, val_rows = split_rows(train_part.rows, cfg.val_fraction, cfg.val_max_rows, seed)
    if has_template and not template_takes_system(tokenizer):
        (train_rows, folded), (val_rows, folded_val) = fold_system_rows(train_rows), fold_system_rows(val_rows)
        if folded + folded_val:
            log.info("the chat template has no system role: the system prompt of %d rows goes before their first "
                     "user message (prompt the trained model the same way; `qlora-kit generate --system` does)",
                     folded + folded_val)
    train_enc, val_enc = encode_splits(train_rows, val_rows, train_part, val_part, tokenizer, max_length, cfg)
    train = [e.sample for e in train_enc if e.sample is not None]
    check_trainable(train_enc + val_enc, train, max_length, cfg.train_on_inputs, train_part.source.label)
    kept_val = [e for e in val_enc if e.sample is not None]
    val_by_number = {r.number: r for r in val_rows}
    heldout = [make_heldout(val_by_number[e.number]) for e in kept_val]
    summary = summarize(train_part, val_part, train_enc, val_enc, tokenizer, max_length, cfg.train_on_inputs)
    log_summary_line(summary)
    return DataBundle(train, [e.sample for e in kept_val], heldout, summary, make_fingerprint(train_part, val_part))


def encode_splits(
    train_rows: list[Row],
    val_rows: list[Row],
    train_part: Parsed,
    val_part: Parsed | None,
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
    cfg: DataConfig,
) -> tuple[list[Encoded], list[Encoded]]:
    """Tokenise both splits; rows the chat template rejects count as bad rows of their file.

    Raises:
        DataError: too many bad rows once template failures are counted.
    """
    chat = make_chat_spans(tokenizer, train_rows + val_rows)
    train_enc, train_bad = encode_rows(train_rows, tokenizer, max_length, cfg.train_on_inputs, chat, "train")
    val_enc, val_bad = encode_rows(val_rows, tokenizer, max_length, cfg.train_on_inputs, chat, "val")
    if chat is not None and chat.searched_turns:
        log.info("the chat template renders earlier turns differently: %d %s located by text search",
                 chat.searched_turns, "reply" if chat.searched_turns == 1 else "replies")
    check_template_works(train_enc + val_enc, train_bad + val_bad)
    train_part.bad += train_bad + (val_bad if val_part is None else [])
    if val_part is not None:
        val_part.bad += val_bad
    for part in (train_part, val_part):
        if part is not None:
            check_bad_fraction(part, cfg.max_bad_fraction)
            log_bad_rows(part)
    return train_enc, val_enc


def load_and_parse(path: str, cfg: DataConfig, has_template: bool, key: str = "data.path") -> Parsed:
    """Read one data source (named by config ``key``), resolve its format, parse its rows and report bad ones.

    Raises:
        DataError: see ``read_source``/``resolve_format``; chat rows without a chat template.
    """
    source = read_source(path, cfg.split, key)
    fmt, detected = resolve_format(cfg.format, source, announce=key == "data.path")
    if fmt in CHAT_FORMATS and not has_template:
        raise DataError(
            f"the data is in {fmt!r} chat format but the tokenizer has no chat template",
            "set model.chat_template (a Jinja template) or use a chat/instruct model",
        )
    if fmt in ("alpaca", "prompt_completion") and not has_template:
        log.warning("tokenizer has no chat template: %s rows are trained as plain prompt + completion text", fmt)
    rows, bad = parse_rows(source, fmt, has_template)
    parsed = Parsed(rows, bad, len(source.records), source, fmt, detected)
    check_bad_fraction(parsed, cfg.max_bad_fraction)
    return parsed


def check_template_works(encoded: list[Encoded], bad: list[tuple[int, str]]) -> None:
    """Refuse a chat template that raises on every row it was given: a template problem, not malformed rows.

    Raises:
        DataError: naming the template's exception.
    """
    failures = [why for _, why in bad if why.startswith(TEMPLATE_ERROR)]
    if encoded or not failures or len(failures) != len(bad):
        return
    raise DataError(
        f"the chat template raises on every row ({len(failures)} of {len(failures)}): "
        f"{failures[0].removeprefix(TEMPLATE_ERROR)}",
        "fix model.chat_template (or the tokenizer's own template, when it is not set), or give rows with the roles "
        "and fields the template accepts")


def check_bad_fraction(parsed: Parsed, max_bad_fraction: float) -> None:
    """Abort when more than ``max_bad_fraction`` of the rows (or all of them) are bad.

    Raises:
        DataError: too many bad rows, naming the first few with their row numbers.
    """
    parsed.bad = sorted(dict(parsed.bad).items())
    bad, total = parsed.bad, parsed.total
    if bad and len(bad) == total:
        raise DataError(
            f"all {total} rows of {parsed.source.label} are malformed; {_first_bad(parsed)}",
            "fix the rows (or check data.format and data.path)",
        )
    if len(bad) > max_bad_fraction * total:
        raise DataError(
            f"{len(bad)} of {total} rows of {parsed.source.label} are malformed ({len(bad) / total:.1%}, more than "
            f"data.max_bad_fraction={max_bad_fraction}); {_first_bad(parsed)}",
            "fix those rows, or raise data.max_bad_fraction to skip them",
        )


def log_bad_rows(parsed: Parsed) -> None:
    """Warn about skipped rows with their (1-based) row or line numbers."""
    if not parsed.bad:
        return
    unit = parsed.source.unit
    numbers = ", ".join(str(n) for n, _ in parsed.bad[:10]) + (", ..." if len(parsed.bad) > 10 else "")
    log.warning(
        "skipped %d malformed rows of %s (%ss %s); %s", len(parsed.bad), parsed.source.label, unit, numbers,
        _first_bad(parsed),
    )


def _first_bad(parsed: Parsed, n: int = 3) -> str:
    return "; ".join(f"{parsed.source.unit} {num}: {why}" for num, why in parsed.bad[:n])


def check_trainable(
    encoded: list[Encoded], train: list[Sample], max_length: int, train_on_inputs: bool, label: str
) -> None:
    """Abort with the reason when no training sample is left (counting over all encoded rows).

    Raises:
        DataError: every row was cut to zero targets by truncation, had none to begin
            with, or the only usable rows went to validation.
    """
    if train:
        return
    cut = sum(e.cut_to_zero for e in encoded)
    empty = sum(e.sample is None and not e.cut_to_zero for e in encoded)
    if encoded and cut == len(encoded):
        raise DataError(
            f"all {cut} rows were truncated to zero trainable tokens: the replies start after token {max_length}",
            f"raise train.max_length (now {max_length})",
        )
    if cut == 0 and empty == len(encoded):
        hint = "add assistant replies to the rows" + ("" if train_on_inputs else ", or set data.train_on_inputs: true")
        raise DataError(f"no row of {label} has a token to train on (no assistant reply)", hint)
    raise DataError(
        f"no training sample left from {label}: {empty} rows have no reply, {cut} lost their reply to truncation, "
        f"{len(encoded) - empty - cut} went to validation",
        f"raise train.max_length (now {max_length}), add rows, or lower data.val_fraction",
    )


def split_rows(rows: list[Row], fraction: float, max_rows: int, seed: int) -> tuple[list[Row], list[Row]]:
    """Seeded random hold-out: round(fraction·n) rows (≥1 when fraction>0 and n≥2), capped at max_rows."""
    n = len(rows)
    if fraction <= 0 or n < 2:
        return rows, []
    n_val = min(max(1, round(n * fraction)), max_rows, n - 1)
    if n_val <= 0:
        return rows, []
    picked = set(random.Random(seed).sample(range(n), n_val))
    return [r for i, r in enumerate(rows) if i not in picked], [r for i, r in enumerate(rows) if i in picked]


def cap_rows(rows: list[Row], max_rows: int, seed: int) -> list[Row]:
    """At most ``max_rows`` rows of a separate validation file (a seeded sample, in file order)."""
    if len(rows) <= max_rows:
        return rows
    log.info("using %d of %d validation rows (data.val_max_rows)", max_rows, len(rows))
    keep = set(random.Random(seed).sample(range(len(rows)), max_rows))
    return [r for i, r in enumerate(rows) if i in keep]


def make_heldout(row: Row) -> dict[str, Any]:
    """Prompt and reference answer of a validation row, for generation checks."""
    if row.messages is not None:
        turns = row.train_turns or tuple(i for i, m in enumerate(row.messages) if m["role"] == "assistant")
        if not turns:
            return {"messages": list(row.messages), "reference": ""}
        last = turns[-1]
        return {"messages": [dict(m) for m in row.messages[:last]], "reference": row.messages[last]["content"]}
    if row.prompt is not None:
        return {"prompt": row.prompt, "reference": row.completion}
    text = row.text or ""
    cut = text.find(" ", len(text) // 2)
    cut = len(text) // 2 if cut < 0 else cut
    return {"prompt": text[:cut], "reference": text[cut:]}


def make_fingerprint(train: Parsed, val: Parsed | None) -> dict[str, Any]:
    """Identity of the data for the run manifest: paths, sha256s and format."""
    return {
        "path": train.source.label,
        "sha256": train.source.sha256,
        "val_path": val.source.label if val else None,
        "val_sha256": val.source.sha256 if val else None,
        "format": train.format,
    }
