"""Row formats (messages, sharegpt, alpaca, prompt/completion, text): detection and parsing.

A format is a row of ``FORMAT_FIELDS`` (the fields that detect it) and of ``PARSERS`` (record → :class:`Row`);
a new format adds one entry to each (and to ``core.config.DataFormat``).
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable

from qlora_kit.core.errors import DataError, short_repr
from qlora_kit.data.read import BadLine, Source
from qlora_kit.data.tools import ToolProblem, maybe_json, parse_tool_calls, parse_tools, tool_result_text

log = logging.getLogger("qlora_kit")


CHAT_FORMATS = ("messages", "sharegpt")
FORMAT_FIELDS: dict[str, tuple[str, ...]] = {
    "messages": ("messages",),
    "sharegpt": ("conversations",),
    "alpaca": ("instruction", "output"),
    "prompt_completion": ("prompt", "completion"),
    "text": ("text",),
    "preference": ("prompt", "chosen", "rejected"),  # parsed by data/preference.py
}
ROLE_NAMES = {
    "system": "system",
    "developer": "system",  # OpenAI's newer name for system instructions
    "user": "user",
    "human": "user",
    "assistant": "assistant",
    "gpt": "assistant",
    "model": "assistant",
    "function_call": "assistant",  # ShareGPT tool datasets: the value is the call's JSON
    "tool": "tool",
    "function": "tool",  # OpenAI's older name for tool results
    "ipython": "tool",  # Llama-3.1's name for them
    "observation": "tool",  # ShareGPT tool datasets
}
DETECT_SAMPLE = 200  # rows looked at for format detection


class RowProblem(ValueError):
    """One row cannot be used (missing field, wrong type, template failure)."""


Message = dict[str, Any]  # role, content; tool_calls (assistant), tool_call_id and name (tool results)


@dataclass
class Row:
    """One well-formed row: a conversation (with the tools it may call), a prompt/completion pair, or raw text."""

    number: int
    messages: list[Message] | None = None
    train_turns: tuple[int, ...] = ()
    prompt: str | None = None
    completion: str | None = None
    text: str | None = None
    tools: list[dict[str, Any]] | None = None


@dataclass
class Parsed:
    rows: list[Row]
    bad: list[tuple[int, str]]
    total: int
    source: Source
    format: str
    detected: bool


def detect_format(records: list[tuple[int, Any]]) -> str | None:
    """The format most of the first rows match (by their keys), or None."""
    votes: Counter[str] = Counter()
    for _, rec in records[:DETECT_SAMPLE]:
        if isinstance(rec, dict):
            fmt = next((f for f, keys in FORMAT_FIELDS.items() if all(k in rec for k in keys)), None)
            if fmt:
                votes[fmt] += 1
    if not votes:
        return None
    order = list(FORMAT_FIELDS)
    return max(votes, key=lambda f: (votes[f], -order.index(f)))


def resolve_format(requested: str, source: Source, announce: bool = True) -> tuple[str, bool]:
    """Return (format, auto_detected); check that an explicit format fits the rows.

    ``announce`` logs the choice (once per run: for the training file; a validation file is
    only mentioned when its auto-detected format differs).

    Raises:
        DataError: nothing recognisable to detect, or an explicit format whose fields no row has.
    """
    detected = detect_format(source.records)
    found = _fields_seen(source.records)
    if requested == "auto":
        if detected is None:
            raise DataError(
                f"cannot detect the data format of {source.label}: rows have fields {found}; expected one of "
                + "; ".join(f"{f} ({', '.join(k)})" for f, k in FORMAT_FIELDS.items()),
                "rename the fields, or set data.format",
            )
        if announce:
            log.info("data format: %s (auto-detected from the fields %s; set data.format to override)", detected,
                     found)
        return detected, True
    needed = FORMAT_FIELDS[requested]
    if not any(isinstance(r, dict) and all(k in r for k in needed) for _, r in source.records[:DETECT_SAMPLE]):
        suggestion = f"set data.format: {detected} (matches these rows) or auto" if detected else "fix the rows' fields"
        raise DataError(
            f"data.format is {requested!r}, which needs fields {list(needed)}, but the rows of {source.label} "
            f"have fields {found}",
            suggestion,
        )
    if announce:
        log.info("data format: %s (from data.format)", requested)
    return requested, False


def _fields_seen(records: list[tuple[int, Any]]) -> list[str]:
    keys: dict[str, None] = {}
    for _, rec in records[:DETECT_SAMPLE]:
        if isinstance(rec, dict):
            keys.update(dict.fromkeys(str(k)[:40] for k in rec))
    return list(keys)[:12]


def parse_rows(source: Source, fmt: str, chat_template: bool) -> tuple[list[Row], list[tuple[int, str]]]:
    """Turn records into Rows; return them with (row number, reason) for each bad record.

    alpaca and prompt_completion rows become a user/assistant conversation when the
    tokenizer has a chat template, else a plain prompt + completion.
    """
    rows, bad = [], []
    for number, rec in source.records:
        try:
            if isinstance(rec, BadLine):
                raise RowProblem(rec.reason)
            if not isinstance(rec, dict):
                raise RowProblem(f"is a {type(rec).__name__}, not an object")
            rows.append(parse_row(number, rec, fmt, chat_template))
        except (RowProblem, ToolProblem) as exc:
            bad.append((number, str(exc)))
    return rows, bad


def parse_row(number: int, rec: dict[str, Any], fmt: str, chat_template: bool) -> Row:
    """Parse one record of the given format (``PARSERS[fmt]``).

    Raises:
        RowProblem: a required field is missing, has the wrong type, or a role is unknown.
        ToolProblem: a tool call, tool result or tool list that cannot be used.
    """
    return PARSERS[fmt](number, rec, chat_template)


def messages_row(number: int, rec: dict[str, Any], chat_template: bool) -> Row:
    """``{"messages": [...], "tools": [...]?}``."""
    return chat_row(number, _turns(rec, "messages"), parse_tools(rec.get("tools")))


def sharegpt_row(number: int, rec: dict[str, Any], chat_template: bool) -> Row:
    """``{"conversations": [{"from", "value"}...], "tools": "..."?}``."""
    return chat_row(number, _turns(rec, "conversations"), parse_tools(rec.get("tools")))


def text_row(number: int, rec: dict[str, Any], chat_template: bool) -> Row:
    """``{"text": ...}``: trained on entirely."""
    return Row(number, text=_text(rec, "text", allow_empty=False))


def alpaca_row(number: int, rec: dict[str, Any], chat_template: bool) -> Row:
    """``{"instruction", "input"?, "output", "system"?}``."""
    prompt, system = _alpaca_prompt(rec)
    return pair_row(number, prompt, _text(rec, "output"), system, chat_template)


def chat_row(number: int, messages: list[Message], tools: list[dict[str, Any]] | None = None) -> Row:
    """A conversation row training on every assistant turn (replies and tool calls) without ``weight: 0``."""
    turns = tuple(i for i, m in enumerate(messages) if m["role"] == "assistant" and m.get("weight", 1) != 0)
    return Row(number, messages=[{k: v for k, v in m.items() if k != "weight"} for m in messages], train_turns=turns,
               tools=tools)


def pair_row(number: int, prompt: str, completion: str, system: str | None, chat_template: bool) -> Row:
    """A prompt/completion pair: a user/assistant conversation, or plain text without a template."""
    if not chat_template:
        return Row(number, prompt=prompt, completion=completion)
    messages = [{"role": "system", "content": system}] if system else []
    messages += [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
    return Row(number, messages=messages, train_turns=(len(messages) - 1,))


def prompt_completion_row(number: int, rec: dict[str, Any], chat_template: bool) -> Row:
    """prompt/completion as strings, or as message lists (conversational, TRL style)."""
    if isinstance(maybe_json(rec.get("prompt")), list):
        prompt = _turns(rec, "prompt")
        completion = _turns(rec, "completion")
        if not chat_template:
            raise RowProblem("conversational prompt/completion needs a chat template")
        row = chat_row(number, prompt + completion, parse_tools(rec.get("tools")))
        row.train_turns = tuple(i for i in row.train_turns if i >= len(prompt))
        return row
    return pair_row(number, _text(rec, "prompt"), _text(rec, "completion"), None, chat_template)


def _alpaca_prompt(rec: dict[str, Any]) -> tuple[str, str | None]:
    instruction = _text(rec, "instruction", allow_empty=False)
    extra = rec.get("input")
    if extra is not None and not isinstance(extra, str):
        raise RowProblem(f"field 'input' must be a string, got {type(extra).__name__}")
    system = rec.get("system")
    if system is not None and not isinstance(system, str):
        raise RowProblem(f"field 'system' must be a string, got {type(system).__name__}")
    prompt = f"{instruction}\n\n{extra}" if extra and extra.strip() else instruction
    return prompt, system or None


def _text(rec: dict[str, Any], key: str, allow_empty: bool = True) -> str:
    if key not in rec or rec[key] is None:
        raise RowProblem(f"missing field {key!r}")
    value = rec[key]
    if not isinstance(value, str):
        raise RowProblem(f"field {key!r} must be a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise RowProblem(f"field {key!r} is empty")
    return value


def _turns(rec: dict[str, Any], key: str) -> list[Message]:
    """Validate a list of {role, content} (or ShareGPT {from, value}) turns."""
    turns = maybe_json(rec.get(key))  # CSV/parquet cells may hold a conversation as JSON text
    if turns is None:
        raise RowProblem(f"missing field {key!r}")
    if not isinstance(turns, list):
        raise RowProblem(f"field {key!r} must be a list of turns, got {type(turns).__name__}")
    if not turns:
        raise RowProblem(f"field {key!r} is an empty list")
    return [_turn(t, key, i) for i, t in enumerate(turns, 1)]


def _turn(turn: Any, key: str, index: int) -> Message:
    where = f"{key}[{index}]"
    if not isinstance(turn, dict):
        raise RowProblem(f"{where} must be an object, got {type(turn).__name__}")
    role = turn.get("role", turn.get("from"))
    content = turn.get("content", turn.get("value"))
    calls = turn.get("tool_calls")
    if role == "function_call":  # ShareGPT: the value is the call itself
        calls, content = content, ""
    if role is None or ("content" not in turn and "value" not in turn and not calls):
        raise RowProblem(f"{where} needs 'role' and 'content' (or 'from' and 'value')")
    if not isinstance(role, str) or role not in ROLE_NAMES:
        raise RowProblem(f"{where} has unsupported role {short_repr(role, 40)} (use system, user, assistant or tool)")
    out: Message = {"role": ROLE_NAMES[role]}
    if out["role"] == "tool":
        out["content"] = tool_result_text(content, where)
        for field in ("tool_call_id", "name"):
            if turn.get(field) is not None:
                out[field] = str(turn[field])
    else:
        out["content"] = "" if content is None and calls else _content_text(content, where)
    if calls:
        if out["role"] != "assistant":
            raise RowProblem(f"{where} has tool_calls but role {role!r} (only assistant turns call tools)")
        out["tool_calls"] = parse_tool_calls(calls, where)
    if "weight" in turn:
        out["weight"] = turn["weight"]
    return out


def _content_text(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in content):
        return "".join(str(p.get("text", "")) for p in content)
    raise RowProblem(f"{where} content must be a string (or text parts), got {type(content).__name__}")


RowParser = Callable[[int, dict[str, Any], bool], Row]
PARSERS: dict[str, RowParser] = {
    "messages": messages_row,
    "sharegpt": sharegpt_row,
    "alpaca": alpaca_row,
    "prompt_completion": prompt_completion_row,
    "text": text_row,
}
