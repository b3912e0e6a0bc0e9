"""Training rows → token samples with assistant-only labels, batch plans and collation.

Data path: ``read_source`` loads a local .jsonl/.json/.parquet/.csv file or a hub
dataset; ``resolve_format`` detects (or checks) the row format; ``parse_rows`` turns
each row into a conversation, a prompt/completion pair or raw text (malformed rows are
skipped and counted); ``encode_rows`` renders conversations with the tokenizer's chat
template and labels only the assistant replies plus their end-of-turn token.

Loss masking is computed here, not by the template, so it works with templates that
have no ``{% generation %}`` markers.  Each assistant turn is located by rendering the
conversation up to that turn with and without the reply and taking the difference
(this also handles templates that inject a default system prompt); character spans are
mapped to tokens with the fast tokenizer's offsets.  When a template renders earlier
turns differently from prefixes (Qwen3 thinking blocks, Mistral's system prompt in the
last user turn), the reply is found by text search instead.

Packing (padding-free): ``plan_batches`` packs shuffled samples into rows of at most
``max_length`` tokens; ``collate`` concatenates a micro-batch's rows into one row with no
padding, ``position_ids`` that restart at 0 for every sample, and the cumulative sample
lengths the attention kernels use to keep samples apart (``qlora_kit.ops.packing``): no
T x T mask with qlora-kit's packed attention (sdpa) or flash_attention_2.  With eager
attention transformers builds a block-diagonal mask from ``position_ids`` (only when the
model is called without a KV cache: pass ``use_cache=False``).
"""

from __future__ import annotations

import bisect
import csv
import hashlib
import json
import logging
import math
import random
import re
import statistics
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Sequence

import torch

from qlora_kit.config import DataConfig
from qlora_kit.errors import DataError, short_repr

if TYPE_CHECKING:
    from rich.console import Console
    from rich.text import Text
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger("qlora_kit")

IGNORE_INDEX = -100
Sample = dict[str, list[int]]
Span = tuple[int, int]

LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")
CHAT_FORMATS = ("messages", "sharegpt")
FORMAT_FIELDS: dict[str, tuple[str, ...]] = {
    "messages": ("messages",),
    "sharegpt": ("conversations",),
    "alpaca": ("instruction", "output"),
    "prompt_completion": ("prompt", "completion"),
    "text": ("text",),
}
ROLE_NAMES = {
    "system": "system",
    "developer": "system",  # OpenAI's newer name for system instructions
    "user": "user",
    "human": "user",
    "assistant": "assistant",
    "gpt": "assistant",
    "model": "assistant",
}
DETECT_SAMPLE = 200  # rows looked at for format detection
ENCODE_CHUNK = 512  # rows tokenised per batch call
PROGRESS_MIN_ROWS = 5000  # show a progress bar from this many rows
MAX_REASONS = 20  # bad-row reasons kept in the summary
PACK_WINDOW = 16  # open rows considered when packing (first fit)
# Tokenising is bounded: a row's text is cut to MAX_CHARS_PER_TOKEN * max_length characters first.
# The cut is kept only when the tokens before it, not counting the last CUT_MARGIN_CHARS characters, are
# already more than max_length (so the kept tokens are far from the cut); otherwise (a row of very long
# tokens) the whole row is tokenised.  Rows that fit max_length are therefore encoded exactly as before.
MAX_CHARS_PER_TOKEN = 32
CUT_MARGIN_CHARS = 1024
_PROBE = "qlorakitprobe"
_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?$")


class RowProblem(ValueError):
    """One row cannot be used (missing field, wrong type, template failure)."""


# --------------------------------------------------------------------------- results


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

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict; the preview is one string with trained text inside «»."""
        out = asdict(self)
        out["length_histogram"] = [list(b) for b in self.length_histogram]
        out["preview"] = mark_preview(self.preview)
        return out


@dataclass
class DataBundle:
    """Tokenised train/val samples plus what evaluation and the manifest need."""

    train: list[Sample]
    val: list[Sample]
    heldout: list[dict[str, Any]]
    summary: DataSummary
    fingerprint: dict[str, Any]


@dataclass
class Source:
    """Raw records of one data file or hub split, numbered from 1."""

    label: str
    records: list[tuple[int, Any]]
    unit: str
    sha256: str


@dataclass
class Row:
    """One well-formed row: a conversation, a prompt/completion pair, or raw text."""

    number: int
    messages: list[dict[str, str]] | None = None
    train_turns: tuple[int, ...] = ()
    prompt: str | None = None
    completion: str | None = None
    text: str | None = None


@dataclass
class Encoded:
    """A tokenised row, or why it yields nothing to train on."""

    number: int
    sample: Sample | None
    truncated: bool
    cut_to_zero: bool = False


@dataclass
class _Parsed:
    rows: list[Row]
    bad: list[tuple[int, str]]
    total: int
    source: Source
    format: str
    detected: bool


# --------------------------------------------------------------------------- reading


def read_source(path: str, split: str = "train", key: str = "data.path") -> Source:
    """Read the records of a local data file, or of a hub dataset split (``key``: the config key naming it).

    Raises:
        DataError: missing file, directory, unsupported type, unreadable or empty file,
            invalid JSON (with the line), or a hub dataset that cannot be loaded.
    """
    p = Path(path).expanduser()
    if p.exists():
        return read_local(p)
    if p.suffix.lower() in LOCAL_SUFFIXES or path.startswith((".", "/", "~")) or not _HUB_NAME.match(path):
        where = "" if p.is_absolute() else f" (relative to the current directory {Path.cwd()})"
        raise DataError(f"data file {p} does not exist{where}", f"check {key}", key=key)
    return read_hub(path, split)


def read_local(p: Path) -> Source:
    """Read a local .jsonl/.json/.parquet/.csv file into numbered records.

    Raises:
        DataError: directory, unsupported suffix, undecodable/invalid content, or no rows.
    """
    if p.is_dir():
        found = sorted(x.name for x in p.iterdir() if x.suffix.lower() in LOCAL_SUFFIXES)[:5]
        hint = f"point data.path at a file inside it, e.g. {p / found[0]}" if found else "point data.path at a file"
        raise DataError(f"data path {p} is a directory, not a data file", hint)
    readers = {".jsonl": read_jsonl, ".json": read_json, ".parquet": read_parquet, ".csv": read_csv}
    reader = readers.get(p.suffix.lower())
    if reader is None:
        kind = p.suffix or "(none)"
        raise DataError(f"unsupported data file type {kind!r}: {p}", "use .jsonl, .json, .parquet or .csv")
    records = reader(p)
    if not records:
        raise DataError(f"data file {p} is empty (no rows)", "add rows, e.g. one JSON object per line in .jsonl")
    unit = "line" if p.suffix.lower() == ".jsonl" else "row"
    return Source(str(p.absolute()), records, unit, hash_file(p))


def read_jsonl(p: Path) -> list[tuple[int, Any]]:
    """One JSON value per non-blank line, numbered by file line.

    Raises:
        DataError: a line that is not UTF-8 or not valid JSON (naming the line).
    """
    records = []
    with p.open("rb") as f:
        for number, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as exc:
                msg = f"{p}: line {number} is not UTF-8 text ({exc.reason})"
                raise DataError(msg, "save the file as UTF-8") from exc
            if not line.strip():
                continue
            try:
                records.append((number, json.loads(line)))
            except json.JSONDecodeError as exc:
                raise DataError(
                    f"{p}: line {number} is not valid JSON ({exc.msg}, column {exc.colno})", _jsonl_hint(number, line)
                ) from exc
            except RecursionError:
                raise DataError(f"{p}: line {number} nests JSON too deeply to be a training row",
                                "fix or remove that line (a row is a few levels of objects and lists)") from None
    return records


def _jsonl_hint(number: int, line: str) -> str:
    if number == 1 and line.lstrip().startswith("["):
        return "the file looks like one JSON array: rename it to .json, or write one object per line"
    return "fix or remove that line (.jsonl needs exactly one JSON object per line)"


def read_json(p: Path) -> list[tuple[int, Any]]:
    """A JSON list of rows, or an object with the rows under ``"data"``.

    Raises:
        DataError: invalid JSON (with line/column) or a top level that holds no row list.
    """
    try:
        text = p.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(f"{p} is not UTF-8 text ({exc.reason})", "save the file as UTF-8") from exc
    if not text.strip():
        return []
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(
            f"{p}: invalid JSON at line {exc.lineno}, column {exc.colno} ({exc.msg})",
            "fix the JSON there (one row per line needs the .jsonl suffix)",
        ) from exc
    except RecursionError:
        raise DataError(f"{p} nests JSON too deeply to hold training rows",
                        "fix the file (a row is a few levels of objects and lists)") from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        keys = sorted(data)[:8] if isinstance(data, dict) else type(data).__name__
        raise DataError(f"{p}: expected a list of rows or {{\"data\": [...]}}, found {keys}", "wrap the rows in a list")
    return list(enumerate(data, 1))


def read_parquet(p: Path) -> list[tuple[int, Any]]:
    """Rows of a parquet file as dicts (nested lists/structs become lists/dicts).

    Raises:
        DataError: the file is not valid parquet.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(p)
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"cannot read parquet file {p}: {exc}", "check that it is a complete parquet file") from exc
    return list(enumerate(table.to_pylist(), 1))


def read_csv(p: Path) -> list[tuple[int, Any]]:
    """Rows of a CSV file with a header line, as dicts of strings.

    Raises:
        DataError: the file is not UTF-8 or not parseable CSV.
    """
    try:
        with p.open(newline="", encoding="utf-8-sig") as f:
            return list(enumerate(csv.DictReader(f), 1))
    except (UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"cannot read CSV file {p}: {exc}", "save it as UTF-8 CSV with a header line") from exc


def read_hub(name: str, split: str) -> Source:
    """Load a hub dataset split with ``datasets.load_dataset``.

    Raises:
        DataError: the dataset or split does not exist, or the hub cannot be reached.
    """
    import datasets
    from datasets.exceptions import DatasetNotFoundError

    try:
        ds = datasets.load_dataset(name, split=split)
    except DatasetNotFoundError as exc:
        raise DataError(f"dataset {name!r} not found: not a local file and not on the hub", _HUB_HINT) from exc
    except ConnectionError as exc:
        raise DataError(
            f"data.path {name!r} is not a local file and the hub cannot be reached (offline?)",
            "check the path, or download the dataset while online so it is cached",
        ) from exc
    except (ValueError, KeyError) as exc:
        if "split" in str(exc).lower():
            msg = f"dataset {name!r} has no split {split!r}: {exc}"
            raise DataError(msg, "set data.split to an existing split") from exc
        raise DataError(f"cannot load dataset {name!r}: {exc}", _HUB_HINT) from exc
    except (OSError, datasets.exceptions.DatasetsError) as exc:
        raise DataError(f"cannot load dataset {name!r}: {exc}", _HUB_HINT) from exc
    if not hasattr(ds, "to_list"):
        raise DataError(f"dataset {name!r} split {split!r} did not load as one table", "set data.split")
    records = list(enumerate(ds.to_list(), 1))
    if not records:
        raise DataError(f"dataset {name!r} split {split!r} is empty", "choose another data.split")
    token = f"{name}|{split}|{getattr(ds, '_fingerprint', '')}"
    return Source(f"{name} [{split}]", records, "row", hashlib.sha256(token.encode()).hexdigest())


_HUB_HINT = "check data.path: a local .jsonl/.json/.parquet/.csv file or a hub dataset name like org/name"


def hash_file(p: Path) -> str:
    """sha256 of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with p.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# --------------------------------------------------------------------------- formats


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
            if not isinstance(rec, dict):
                raise RowProblem(f"is a {type(rec).__name__}, not an object")
            rows.append(parse_row(number, rec, fmt, chat_template))
        except RowProblem as exc:
            bad.append((number, str(exc)))
    return rows, bad


def parse_row(number: int, rec: dict[str, Any], fmt: str, chat_template: bool) -> Row:
    """Parse one record of the given format.

    Raises:
        RowProblem: a required field is missing, has the wrong type, or a role is unknown.
    """
    if fmt == "messages":
        return chat_row(number, _turns(rec, "messages"))
    if fmt == "sharegpt":
        return chat_row(number, _turns(rec, "conversations"))
    if fmt == "text":
        return Row(number, text=_text(rec, "text", allow_empty=False))
    if fmt == "alpaca":
        prompt, system = _alpaca_prompt(rec)
        return pair_row(number, prompt, _text(rec, "output"), system, chat_template)
    return prompt_completion_row(number, rec, chat_template)


def chat_row(number: int, messages: list[dict[str, Any]]) -> Row:
    """A conversation row training on every assistant turn without ``weight: 0``."""
    turns = tuple(i for i, m in enumerate(messages) if m["role"] == "assistant" and m.get("weight", 1) != 0)
    return Row(number, messages=[{"role": m["role"], "content": m["content"]} for m in messages], train_turns=turns)


def pair_row(number: int, prompt: str, completion: str, system: str | None, chat_template: bool) -> Row:
    """A prompt/completion pair: a user/assistant conversation, or plain text without a template."""
    if not chat_template:
        return Row(number, prompt=prompt, completion=completion)
    messages = [{"role": "system", "content": system}] if system else []
    messages += [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
    return Row(number, messages=messages, train_turns=(len(messages) - 1,))


def prompt_completion_row(number: int, rec: dict[str, Any], chat_template: bool) -> Row:
    """prompt/completion as strings, or as message lists (conversational, TRL style)."""
    if isinstance(_maybe_json(rec.get("prompt")), list):
        prompt = _turns(rec, "prompt")
        completion = _turns(rec, "completion")
        if not chat_template:
            raise RowProblem("conversational prompt/completion needs a chat template")
        row = chat_row(number, prompt + completion)
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


def _maybe_json(value: Any) -> Any:
    """CSV/parquet cells may hold a conversation as a JSON string."""
    if isinstance(value, str) and value.lstrip().startswith("["):
        try:
            return json.loads(value)
        except (json.JSONDecodeError, RecursionError):
            return value
    return value


def _turns(rec: dict[str, Any], key: str) -> list[dict[str, Any]]:
    """Validate a list of {role, content} (or ShareGPT {from, value}) turns."""
    turns = _maybe_json(rec.get(key))
    if turns is None:
        raise RowProblem(f"missing field {key!r}")
    if not isinstance(turns, list):
        raise RowProblem(f"field {key!r} must be a list of turns, got {type(turns).__name__}")
    if not turns:
        raise RowProblem(f"field {key!r} is an empty list")
    return [_turn(t, key, i) for i, t in enumerate(turns, 1)]


def _turn(turn: Any, key: str, index: int) -> dict[str, Any]:
    where = f"{key}[{index}]"
    if not isinstance(turn, dict):
        raise RowProblem(f"{where} must be an object, got {type(turn).__name__}")
    role = turn.get("role", turn.get("from"))
    content = turn.get("content", turn.get("value"))
    if role is None or "content" not in turn and "value" not in turn:
        raise RowProblem(f"{where} needs 'role' and 'content' (or 'from' and 'value')")
    if not isinstance(role, str) or role not in ROLE_NAMES:
        raise RowProblem(f"{where} has unsupported role {short_repr(role, 40)} (use system, user or assistant)")
    out = {"role": ROLE_NAMES[role], "content": _content_text(content, where)}
    if "weight" in turn:
        out["weight"] = turn["weight"]
    return out


def _content_text(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in content):
        return "".join(str(p.get("text", "")) for p in content)
    raise RowProblem(f"{where} content must be a string (or text parts), got {type(content).__name__}")


# --------------------------------------------------------------------------- chat template spans


class ChatSpans:
    """Locate each trained assistant reply (plus its end-of-turn text) in the rendered chat."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase):
        self.tokenizer = tokenizer
        self.end_of_turn = self._probe_end_of_turn()
        self.searched_turns = 0

    def render(self, messages: list[dict[str, str]], add_generation_prompt: bool = False) -> str:
        return self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )

    def locate(self, messages: list[dict[str, str]], turns: Sequence[int]) -> tuple[str, list[Span]]:
        """Render ``messages``; return the text and the character spans to train on.

        Raises:
            RowProblem: the template fails on this conversation, or a reply cannot be found.
        """
        try:
            full = self.render(messages)
        except Exception as exc:  # jinja TemplateError, raise_exception() in templates, ...
            first_line = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise RowProblem(f"chat template error: {first_line}") from exc
        spans: list[Span] = []
        cursor = 0
        for i in turns:
            span = self._by_prefix(messages, i, full, cursor) or self._by_search(messages, i, full, cursor)
            if span is None:
                raise RowProblem(f"assistant turn {i + 1} not found in the chat template's output (it rewrites it)")
            if span[1] > span[0]:
                spans.append(span)
            cursor = max(cursor, span[1])
        return full, spans

    def _by_prefix(self, messages: list[dict[str, str]], i: int, full: str, cursor: int) -> Span | None:
        """Diff of the renders before and after turn ``i``, if both are prefixes of ``full``."""
        try:
            before = self.render(messages[:i], add_generation_prompt=True)
            through = full if i == len(messages) - 1 else self.render(messages[: i + 1])
        except Exception:
            return None
        if not (through.startswith(before) and full.startswith(through)) or len(before) < cursor:
            return None
        return len(before), len(before) + len(full[len(before) : len(through)].rstrip())

    def _by_search(self, messages: list[dict[str, str]], i: int, full: str, cursor: int) -> Span | None:
        """Find the reply's text after the preceding turn; extend over the end-of-turn text.

        Spaces right before the reply join it (a token like ``" The"`` starts there).
        """
        start = cursor
        previous = messages[i - 1]["content"].strip() if i > 0 else ""
        if previous and (k := full.find(previous, cursor)) >= 0:
            start = k + len(previous)
        content = messages[i]["content"].strip()
        if not content:
            k = full.find(self.end_of_turn, start) if self.end_of_turn else -1
            return (k, k + len(self.end_of_turn)) if k >= 0 else None
        k = full.find(content, start)
        if k < 0:
            return None
        end = k + len(content)
        while k > start and full[k - 1] in " \t":
            k -= 1
        if self.end_of_turn and full.startswith(self.end_of_turn, end):
            end += len(self.end_of_turn)
        self.searched_turns += 1
        return k, end

    def _probe_end_of_turn(self) -> str:
        """The text a template puts after a reply (e.g. ``<|im_end|>``), from a probe chat."""
        user = [{"role": "user", "content": "Hi"}]
        try:
            before = self.render(user, add_generation_prompt=True)
            through = self.render(user + [{"role": "assistant", "content": _PROBE}])
        except Exception:
            return self.tokenizer.eos_token or ""
        tail = through[len(before) :] if through.startswith(before) else ""
        if _PROBE not in tail:
            return self.tokenizer.eos_token or ""
        return tail.split(_PROBE, 1)[1].rstrip()


# --------------------------------------------------------------------------- tokenising


@dataclass
class _Job:
    """Text to tokenise and the character spans that are targets."""

    number: int
    text: str
    spans: list[Span]
    bos: bool = False
    eos: bool = False


def make_job(row: Row, chat: ChatSpans | None, tokenizer: PreTrainedTokenizerBase) -> _Job:
    """Render a row into text plus target spans.

    Raises:
        RowProblem: the chat template fails on this row or hides a reply.
    """
    if row.messages is not None:
        assert chat is not None
        text, spans = chat.locate(row.messages, row.train_turns)
        return _Job(row.number, text, spans)
    if row.text is not None:
        return _Job(row.number, row.text, [(0, len(row.text))], bos=True, eos=True)
    assert row.prompt is not None and row.completion is not None
    text = row.prompt + row.completion
    return _Job(row.number, text, [(len(row.prompt), len(text))], bos=True, eos=True)


def encode_rows(
    rows: list[Row],
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
    train_on_inputs: bool,
    chat: ChatSpans | None = None,
    label: str = "",
) -> tuple[list[Encoded], list[tuple[int, str]]]:
    """Tokenise rows in batches; return encodings and (row number, reason) for rows the template rejects."""
    if chat is None and any(r.messages is not None for r in rows):
        chat = ChatSpans(tokenizer)
    encoded: list[Encoded] = []
    bad: list[tuple[int, str]] = []
    with _Progress(len(rows), f"tokenising {label}".strip()) as advance:
        for lo in range(0, len(rows), ENCODE_CHUNK):
            jobs = []
            for row in rows[lo : lo + ENCODE_CHUNK]:
                try:
                    jobs.append(make_job(row, chat, tokenizer))
                except RowProblem as exc:
                    bad.append((row.number, str(exc)))
            encoded += encode_jobs(jobs, tokenizer, max_length, train_on_inputs)
            advance(min(ENCODE_CHUNK, len(rows) - lo))
    return encoded, bad


def encode_jobs(
    jobs: list[_Job], tokenizer: PreTrainedTokenizerBase, max_length: int, train_on_inputs: bool
) -> list[Encoded]:
    """Tokenise a batch of jobs (each cut to a bounded length first), label the targets, add BOS/EOS, truncate."""
    if not jobs:
        return []
    limit = MAX_CHARS_PER_TOKEN * max_length + CUT_MARGIN_CHARS
    short = [cut_job(job, limit) for job in jobs]
    pieces = token_labels(short, tokenizer)
    out = []
    for job, cut, (ids, labels, ends) in zip(jobs, short, pieces):
        cut_targets = False
        if cut is not job:
            if _tokens_before(ends, ids, len(cut.text) - CUT_MARGIN_CHARS) > max_length + 2:
                cut_targets = any(b > len(cut.text) for _, b in job.spans)
                ids, labels = ids[: max_length + 2], labels[: max_length + 2]
            else:  # very long tokens: the cut may reach into the kept part, tokenise the whole row
                ids, labels, _ = token_labels([job], tokenizer)[0]
        out.append(finish_sample(job, ids, labels, tokenizer, max_length, train_on_inputs, cut_targets))
    return out


def cut_job(job: _Job, limit: int) -> _Job:
    """``job`` with its text cut to ``limit`` characters (the same job when it is shorter); no EOS after a cut."""
    if len(job.text) <= limit:
        return job
    spans = [(a, min(b, limit)) for a, b in job.spans if a < limit]
    return _Job(job.number, job.text[:limit], spans, bos=job.bos, eos=False)


def _tokens_before(ends: list[int] | None, ids: list[int], position: int) -> int:
    """Tokens that end before character ``position`` (all but a safety margin of tokens without offsets)."""
    if ends is None:
        return len(ids) - CUT_MARGIN_CHARS
    return bisect.bisect_right(ends, position)


def token_labels(jobs: list[_Job], tokenizer: PreTrainedTokenizerBase
                 ) -> list[tuple[list[int], list[int], list[int] | None]]:
    """(ids, labels, token end offsets or None) per job, with the fast tokenizer when there is one."""
    if getattr(tokenizer, "is_fast", False):
        return token_labels_fast(jobs, tokenizer)
    return [(*token_labels_slow(job, tokenizer), None) for job in jobs]


def token_labels_fast(jobs: list[_Job], tokenizer: PreTrainedTokenizerBase
                      ) -> list[tuple[list[int], list[int], list[int]]]:
    """Batch-tokenise with offsets; a token is a target when it starts inside a target span."""
    out = []
    for job, (ids, offsets) in zip(jobs, encode_with_offsets(tokenizer, [j.text for j in jobs])):
        starts = [s for s, _ in offsets]
        labels = [IGNORE_INDEX] * len(ids)
        for a, b in job.spans:
            lo, hi = bisect.bisect_left(starts, a), bisect.bisect_left(starts, b)
            labels[lo:hi] = ids[lo:hi]
        out.append((list(ids), labels, [e for _, e in offsets]))
    return out


def encode_with_offsets(tokenizer: PreTrainedTokenizerBase, texts: list[str]) -> list[tuple[list[int], list[Span]]]:
    """(ids, character offsets) per text, without special tokens added.

    Calls the Rust backend directly when it is safe: the transformers wrapper spends
    longer converting the encodings than the backend spends tokenising.  Not when the
    tokenizer file carries truncation or padding settings: the raw backend would apply them.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    stored_settings = backend is not None and (backend.truncation is not None or backend.padding is not None)
    if backend is not None and not stored_settings and not getattr(tokenizer, "split_special_tokens", False):
        return [(e.ids, e.offsets) for e in backend.encode_batch(texts, add_special_tokens=False)]
    enc = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
    return list(zip(enc["input_ids"], enc["offset_mapping"]))


def token_labels_slow(job: _Job, tokenizer: PreTrainedTokenizerBase) -> tuple[list[int], list[int]]:
    """Without offsets (slow tokenizers): tokenise the text piece by piece at span edges."""
    cuts = sorted({0, len(job.text), *(x for span in job.spans for x in span)})
    ids: list[int] = []
    labels: list[int] = []
    for a, b in zip(cuts, cuts[1:]):
        piece = tokenizer.encode(job.text[a:b], add_special_tokens=False)
        trained = any(s <= a and b <= e for s, e in job.spans)
        ids += piece
        labels += piece if trained else [IGNORE_INDEX] * len(piece)
    return ids, labels


def finish_sample(
    job: _Job,
    ids: list[int],
    labels: list[int],
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
    train_on_inputs: bool,
    cut_targets: bool = False,
) -> Encoded:
    """Add BOS/EOS, apply train_on_inputs, force labels[0] = -100, truncate, count targets.

    ``cut_targets``: the row was cut before tokenising and had targets beyond the cut.
    """
    if job.bos and tokenizer.bos_token_id is not None:
        ids, labels = [tokenizer.bos_token_id] + ids, [IGNORE_INDEX] + labels
    if job.eos and tokenizer.eos_token_id is not None:
        ids, labels = ids + [tokenizer.eos_token_id], labels + [tokenizer.eos_token_id]
    if train_on_inputs:
        labels = list(ids)
    if labels:
        labels[0] = IGNORE_INDEX
    had_targets = cut_targets or any(x != IGNORE_INDEX for x in labels)
    truncated = len(ids) > max_length
    ids, labels = ids[:max_length], labels[:max_length]
    if not any(x != IGNORE_INDEX for x in labels):
        return Encoded(job.number, None, truncated, cut_to_zero=had_targets)
    return Encoded(job.number, {"input_ids": ids, "labels": labels}, truncated)


class _Progress:
    """A rich progress bar on stderr for large inputs; a no-op below PROGRESS_MIN_ROWS."""

    def __init__(self, total: int, description: str):
        self.total, self.description, self.bar = total, description, None

    def __enter__(self):
        if self.total < PROGRESS_MIN_ROWS:
            return lambda n: None
        from rich.progress import Progress

        from qlora_kit.logs import console

        self.bar = Progress(console=console(), transient=True)
        self.bar.start()
        task = self.bar.add_task(self.description, total=self.total)
        return lambda n: self.bar.advance(task, n)

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.stop()


# --------------------------------------------------------------------------- build_data


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
    train_part: _Parsed,
    val_part: _Parsed | None,
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
    train_part.bad += train_bad + (val_bad if val_part is None else [])
    if val_part is not None:
        val_part.bad += val_bad
    for part in (train_part, val_part):
        if part is not None:
            check_bad_fraction(part, cfg.max_bad_fraction)
            log_bad_rows(part)
    return train_enc, val_enc


def template_takes_system(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Whether the chat template renders a leading system turn (Gemma-2's raises "System role not supported").

    A template that fails on a plain user turn too counts as taking one: its rows report the error.
    """
    user = [{"role": "user", "content": "Hi"}]
    try:
        tokenizer.apply_chat_template(user, tokenize=False)
    except Exception:  # noqa: BLE001 - templates raise all kinds of errors (jinja, role checks)
        return True
    try:
        tokenizer.apply_chat_template([{"role": "system", "content": "Be brief."}, *user], tokenize=False)
    except Exception:  # noqa: BLE001 - as above
        return False
    return True


def fold_system(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A leading system turn put before the first user message (its content, a blank line, then the user's):
    what models whose template has no system role expect; other conversations are returned unchanged."""
    if len(messages) < 2 or messages[0]["role"] != "system" or messages[1]["role"] != "user":
        return messages
    first = {**messages[1], "content": f"{messages[0]['content']}\n\n{messages[1]['content']}"}
    return [first, *messages[2:]]


def fold_system_rows(rows: list[Row]) -> tuple[list[Row], int]:
    """``rows`` with :func:`fold_system` applied (trained turn indices shifted); how many rows changed."""
    out, folded = [], 0
    for row in rows:
        messages = fold_system(row.messages) if row.messages is not None else None
        if messages is not row.messages:
            row = replace(row, messages=messages, train_turns=tuple(i - 1 for i in row.train_turns))
            folded += 1
        out.append(row)
    return out, folded


def make_chat_spans(tokenizer: PreTrainedTokenizerBase, rows: list[Row]) -> ChatSpans | None:
    """A ChatSpans for conversation rows; warns when replies end without an end-of-turn marker."""
    if not any(r.messages is not None for r in rows):
        return None
    chat = ChatSpans(tokenizer)
    if not chat.end_of_turn:
        log.warning("the chat template puts no end-of-turn token after replies: the model may not learn to stop")
    return chat


def load_and_parse(path: str, cfg: DataConfig, has_template: bool, key: str = "data.path") -> _Parsed:
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
    parsed = _Parsed(rows, bad, len(source.records), source, fmt, detected)
    check_bad_fraction(parsed, cfg.max_bad_fraction)
    return parsed


def check_bad_fraction(parsed: _Parsed, max_bad_fraction: float) -> None:
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


def log_bad_rows(parsed: _Parsed) -> None:
    """Warn about skipped rows with their (1-based) row or line numbers."""
    if not parsed.bad:
        return
    unit = parsed.source.unit
    numbers = ", ".join(str(n) for n, _ in parsed.bad[:10]) + (", ..." if len(parsed.bad) > 10 else "")
    log.warning(
        "skipped %d malformed rows of %s (%ss %s); %s", len(parsed.bad), parsed.source.label, unit, numbers,
        _first_bad(parsed),
    )


def _first_bad(parsed: _Parsed, n: int = 3) -> str:
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


def make_fingerprint(train: _Parsed, val: _Parsed | None) -> dict[str, Any]:
    """Identity of the data for the run manifest: paths, sha256s and format."""
    return {
        "path": train.source.label,
        "sha256": train.source.sha256,
        "val_path": val.source.label if val else None,
        "val_sha256": val.source.sha256 if val else None,
        "format": train.format,
    }


# --------------------------------------------------------------------------- summary


def summarize(
    train_part: _Parsed,
    val_part: _Parsed | None,
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
        "data: %d rows read, %d bad, %d train / %d val samples, %d tokens (%d trained), %d truncated, "
        "%d without trainable tokens",
        summary.rows, len(summary.bad_rows) + len(summary.val_bad_rows), summary.train_rows, summary.val_rows,
        summary.tokens, summary.trainable_tokens, summary.truncated, summary.no_trainable,
    )


def print_summary(summary: DataSummary, console: Console | None = None, preview_chars: int = 800) -> None:
    """Print the data summary as a table, a length histogram and a trained-token preview."""
    from rich.table import Table

    from qlora_kit import logs

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
    return [
        ("format", fmt),
        ("rows read", str(summary.rows)),
        ("bad rows skipped", bad_text + (f"; val file {len(summary.val_bad_rows)}" if summary.val_bad_rows else "")),
        ("samples train / val", f"{summary.train_rows} / {summary.val_rows}"),
        ("validation from", summary.val_source or "random split of the training file"),
        ("tokens (train)", f"{summary.tokens:,}"),
        ("trainable tokens", f"{summary.trainable_tokens:,} ({pct:.1f}%, {trained_on})"),
        ("truncated to max_length", f"{summary.truncated} (max_length {summary.max_length})"),
        ("dropped, no trainable tokens", f"{summary.no_trainable} ({summary.no_trainable_truncated} by truncation)"),
        ("length min / mean / max", f"{summary.length_min} / {summary.length_mean} / {summary.length_max}"),
    ]


# --------------------------------------------------------------------------- batching


def epoch_seed(seed: int, epoch: int) -> int:
    """A 63-bit seed derived from (seed, epoch), different for every pair."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{epoch}".encode()).digest()[:8], "little") >> 1


def epoch_order(n: int, seed: int, epoch: int, shuffle: bool) -> list[int]:
    """Sample order of one epoch: a torch permutation seeded by (seed, epoch), or 0..n-1."""
    if not shuffle:
        return list(range(n))
    generator = torch.Generator().manual_seed(epoch_seed(seed, epoch))
    return torch.randperm(n, generator=generator).tolist()


def pack_rows(order: Sequence[int], lengths: Sequence[int], max_length: int) -> list[list[int]]:
    """Greedy first-fit of samples (in ``order``) into rows of ≤ max_length tokens.

    Only the last PACK_WINDOW open rows are tried, so packing stays linear and roughly
    keeps the shuffled order.  A sample longer than max_length gets a row of its own.
    """
    rows: list[list[int]] = []
    used: list[int] = []
    open_rows: list[int] = []
    for idx in order:
        size = lengths[idx]
        slot = next((r for r in open_rows if used[r] + size <= max_length), None)
        if slot is None:
            rows.append([])
            used.append(0)
            slot = len(rows) - 1
            open_rows.append(slot)
            if len(open_rows) > PACK_WINDOW:
                open_rows.pop(0)
        rows[slot].append(idx)
        used[slot] += size
    return rows


def plan_batches(
    lengths: Sequence[int], micro_batch_size: int, max_length: int, packing: bool, seed: int, epoch: int, shuffle: bool
) -> list[list[list[int]]]:
    """Micro-batches → rows → sample indices for one epoch; a pure function of its arguments.

    Every sample appears exactly once; the last micro-batch may be smaller.

    Raises:
        ValueError: micro_batch_size or max_length below 1.
    """
    if micro_batch_size < 1 or max_length < 1:
        raise ValueError(f"micro_batch_size ({micro_batch_size}) and max_length ({max_length}) must be ≥ 1")
    order = epoch_order(len(lengths), seed, epoch, shuffle)
    rows = pack_rows(order, lengths, max_length) if packing else [[i] for i in order]
    return [rows[k : k + micro_batch_size] for k in range(0, len(rows), micro_batch_size)]


def collate(
    samples: Sequence[Sample], rows: Sequence[Sequence[int]], pad_id: int, max_length: int, packing: bool | None = None
) -> dict[str, Any]:
    """Tensors for one micro-batch.

    Unpacked: ``input_ids``, ``labels`` (-100 on padding) and ``attention_mask``, right-padded
    to the longest row.  Packed (``packing`` True, or None and some row holds several
    samples): every row's samples, each row cut at ``max_length``, concatenated into one
    padding-free row with ``position_ids`` restarting at 0 per sample and the varlen
    attention inputs of :func:`qlora_kit.ops.packing.pack_batch` (``cu_seq_lens_q/k``,
    ``max_length_q/k``, ``packed_seq_lens``); no attention mask.
    """
    from qlora_kit.ops.packing import pack_batch

    packed = any(len(r) > 1 for r in rows) if packing is None else packing
    if packed:
        return pack_batch([piece for row in rows for piece in row_pieces(samples, row, max_length)])
    joined = [join_row(samples, row, max_length) for row in rows]
    width = max(len(ids) for ids, _, _ in joined)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for b, (ids, labs, _) in enumerate(joined):
        n = len(ids)
        input_ids[b, :n] = torch.tensor(ids, dtype=torch.long)
        labels[b, :n] = torch.tensor(labs, dtype=torch.long)
        mask[b, :n] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": mask}


def row_pieces(samples: Sequence[Sample], row: Sequence[int], max_length: int) -> list[tuple[list[int], list[int]]]:
    """A packed row's samples as (input_ids, labels) pieces, the row cut at ``max_length``."""
    pieces: list[tuple[list[int], list[int]]] = []
    room = max_length
    for idx in row:
        if room <= 0:
            break
        ids, labels = samples[idx]["input_ids"][:room], samples[idx]["labels"][:room]
        if ids:
            pieces.append((ids, labels))
        room -= len(ids)
    return pieces


def join_row(samples: Sequence[Sample], row: Sequence[int], max_length: int) -> tuple[list[int], list[int], list[int]]:
    """Concatenate a row's samples: ids, labels and per-sample positions, cut at max_length."""
    ids: list[int] = []
    labels: list[int] = []
    positions: list[int] = []
    for idx in row:
        sample = samples[idx]
        ids += sample["input_ids"]
        labels += sample["labels"]
        positions += range(len(sample["input_ids"]))
    return ids[:max_length], labels[:max_length], positions[:max_length]
