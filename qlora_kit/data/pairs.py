"""Preference rows (prompt, chosen, rejected) parsed into pairs of SFT rows, and their system turns folded.

Each side is the SFT row ``{"prompt", "completion": side}``
(:func:`qlora_kit.data.formats.prompt_completion_row`); encoding, truncation and batches of pairs
are in ``data/preference.py``.  Kept apart so the sources stage (``data/sources.py``) can parse
preference files without depending on the summary and batching code.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from typing import Any

from qlora_kit.data.formats import Row, RowProblem, prompt_completion_row
from qlora_kit.data.labels import fold_system
from qlora_kit.data.read import Source

PREFERENCE = "preference"
SIDES = ("chosen", "rejected")


@dataclass
class Pair:
    """One well-formed preference row: the chosen and the rejected side as SFT rows sharing the prompt."""

    number: int
    chosen: Row
    rejected: Row



def parse_pairs(source: Source, fmt: str, chat_template: bool) -> tuple[list[Pair], list[tuple[int, str]]]:
    """Pairs of ``source`` and (row number, reason) for each bad record (``fmt`` is always preference)."""
    pairs, bad = [], []
    for number, rec in source.records:
        try:
            if not isinstance(rec, dict):
                raise RowProblem(f"is a {type(rec).__name__}, not an object")
            pairs.append(parse_pair(number, rec, chat_template))
        except RowProblem as exc:
            bad.append((number, str(exc)))
    return pairs, bad


def parse_pair(number: int, rec: dict[str, Any], chat_template: bool) -> Pair:
    """Both sides of one record, each parsed as the SFT prompt/completion row it is.

    Raises:
        RowProblem: a missing or empty side, chosen equal to rejected, or a side the SFT parser refuses.
    """
    for side in SIDES:
        _require_text(rec.get(side), side)
    if _normalised(rec["chosen"]) == _normalised(rec["rejected"]):
        raise RowProblem("chosen and rejected are the same (the pair prefers nothing)")
    rows = []
    for side in SIDES:
        try:
            row = prompt_completion_row(number, {"prompt": rec.get("prompt"), "completion": rec[side]}, chat_template)
        except RowProblem as exc:
            raise RowProblem(str(exc).replace("'completion'", f"'{side}'").replace("completion[", f"{side}[")) from None
        if row.messages is not None and not row.train_turns:
            raise RowProblem(f"{side} has no assistant turn")
        rows.append(row)
    return Pair(number, rows[0], rows[1])


def _require_text(value: Any, side: str) -> None:
    """A side must be there and hold some text (a string, or turns with content)."""
    value = _decoded(value)
    if value is None:
        raise RowProblem(f"missing field {side!r}")
    if isinstance(value, str) and not value.strip():
        raise RowProblem(f"field {side!r} is empty")
    if isinstance(value, list) and not any(isinstance(t, dict) and str(t.get("content") or t.get("value") or "").strip()
                                           for t in value):
        raise RowProblem(f"field {side!r} has no text")


def _decoded(value: Any) -> Any:
    """A CSV/parquet cell holding turns as a JSON string, decoded (as the SFT parser does); else ``value``."""
    if isinstance(value, str) and value.lstrip().startswith("["):
        try:
            return json.loads(value)
        except (json.JSONDecodeError, RecursionError):
            return value
    return value


def _normalised(value: Any) -> str:
    """A side's value for the chosen == rejected check (strings by their text, turns by their content)."""
    value = _decoded(value)
    return value.strip() if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)


def fold_system_pairs(pairs: list[Pair]) -> tuple[list[Pair], int]:
    """Both sides with a leading system turn folded into the first user message (see ``labels.fold_system``)."""
    out, folded = [], 0
    for pair in pairs:
        sides = []
        for row in (pair.chosen, pair.rejected):
            messages = fold_system(row.messages) if row.messages is not None else None
            if messages is not row.messages:
                row = replace(row, messages=messages, train_turns=tuple(i - 1 for i in row.train_turns))
            sides.append(row)
        folded += sides[0] is not pair.chosen
        out.append(Pair(pair.number, sides[0], sides[1]))
    return out, folded


# --------------------------------------------------------------------------- encoding
