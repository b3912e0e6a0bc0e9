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
from qlora_kit.data.formats import Parsed, Row, RowProblem
from qlora_kit.data.labels import (
    TEMPLATE_ERROR,
    ChatSpans,
    fold_system_rows,
    make_chat_spans,
    template_takes_system,
    template_time_limit,
)
from qlora_kit.data.sources import (
    SourceData,
    SourceSpec,
    fingerprint,
    load_and_parse,
    pick,
    source_specs,
    split_sources,
    weighted,
)
from qlora_kit.data.pairs import PREFERENCE, Pair, fold_system_pairs
from qlora_kit.data.preference import encode_pairs, summarize_pairs
from qlora_kit.data.summary import DataSummary, log_summary_line, summarize
from qlora_kit.data.system_prompt import SystemPromptUse, apply_system_policy, template_default_system
from qlora_kit.data.tools import tool_needs, tool_support_problem

log = logging.getLogger("qlora_kit")


@dataclass
class DataBundle:
    """Tokenised train/val samples plus what evaluation and the manifest need."""

    train: list[Sample]
    val: list[Sample]
    heldout: list[dict[str, Any]]
    summary: DataSummary
    fingerprint: dict[str, Any]


def build_data(cfg: DataConfig, tokenizer: PreTrainedTokenizerBase, max_length: int, seed: int,
               model_name: str | None = None) -> DataBundle:
    """Read, check, tokenise, split and mix the data described by ``cfg`` (``model_name``: for messages).

    Raises:
        DataError: unreadable or malformed input, too many bad rows, no chat template for
            chat rows, a template that cannot render the rows' tool calls, or nothing left to train on.
    """
    has_template = bool(getattr(tokenizer, "chat_template", None))
    specs = source_specs(cfg)
    sources = [load_source(spec, has_template, seed, cfg.max_bad_fraction, announce=len(specs) == 1)
               for spec in specs]
    shared = shared_validation(cfg, has_template, seed)
    if shared is None:
        split_sources(sources, cfg.val_fraction, cfg.val_max_rows, seed)
    for src in sources if shared is not None else ():
        src.train_rows = src.part.rows
    everything = sources + ([shared] if shared else [])
    if any(src.part.format == PREFERENCE for src in everything):
        return build_pairs(sources, shared, tokenizer, max_length, cfg)
    check_tools(tokenizer, everything, model_name)
    system = prepare_rows(everything, tokenizer, cfg.default_system_prompt)
    chat = make_chat_spans(tokenizer, [r for s in everything for r in s.train_rows + s.val_rows])
    for src in everything:
        encode_source(src, tokenizer, max_length, cfg, chat)
    if chat is not None and chat.searched_turns:
        log.info("the chat template renders earlier turns differently: %d %s located by text search",
                 chat.searched_turns, "reply" if chat.searched_turns == 1 else "replies")
    for index, src in enumerate(sources):
        src.mixed = weighted([e.sample for e in src.train_enc if e.sample is not None], src.spec.weight, seed, index)
    train = [sample for src in sources for sample in src.mixed]
    warn_empty_sources(sources, max_length)
    label = sources[0].part.source.label if len(sources) == 1 else f"the {len(sources)} data sources"
    check_trainable([e for s in everything for e in s.train_enc + s.val_enc], train, max_length,
                    cfg.train_on_inputs, label)
    val, heldout = validation_samples(everything, chat)
    summary = summarize(sources, shared, tokenizer, max_length, cfg.train_on_inputs, system)
    log_summary_line(summary)
    return DataBundle(train, val, heldout, summary, fingerprint(sources, shared.part if shared else None))


def shared_validation(cfg: DataConfig, has_template: bool, seed: int) -> SourceData | None:
    """``data.val_path`` beside ``data.datasets``: one validation source for all (at most ``val_max_rows`` rows)."""
    if cfg.datasets is None or not cfg.val_path:
        return None
    spec = SourceSpec("data.val_path", cfg.val_path, cfg.format, cfg.split)
    part = load_and_parse(cfg.val_path, spec, "data.val_path", has_template, seed, announce=False)
    check_bad_fraction(part, cfg.max_bad_fraction)
    return SourceData(spec, part, val_rows=pick(part.rows, cfg.val_max_rows, random.Random(seed)))


def validation_samples(sources: list[SourceData], chat: ChatSpans | None
                       ) -> tuple[list[Sample], list[dict[str, Any]]]:
    """Every source's validation samples, and the held-out row (prompt + reference) of each."""
    val, heldout = [], []
    for src in sources:
        by_number = {r.number: r for r in src.val_rows}
        for e in src.val_enc:
            if e.sample is not None:
                val.append(e.sample)
                heldout.append(make_heldout(by_number[e.number], chat))
    return val, heldout


def load_source(spec: SourceSpec, has_template: bool, seed: int, max_bad_fraction: float, announce: bool
                ) -> SourceData:
    """Read and parse one source and its own validation file (if any); check their share of bad rows.

    Raises:
        DataError: see :func:`load_and_parse`; too many bad rows.
    """
    part = load_and_parse(spec.path, spec, spec.path_key, has_template, seed, announce)
    if not announce:
        log.info("%s: %s, format %s%s", spec.key, part.source.label, part.format,
                 " (auto-detected)" if part.detected else "")
    check_bad_fraction(part, max_bad_fraction)
    val_part = None
    if spec.val_path:
        val_part = load_and_parse(spec.val_path, spec, spec.val_key, has_template, seed, announce=False)
        if val_part.format != part.format:
            log.info("data format of %s: %s (auto-detected)", spec.val_key, val_part.format)
        check_bad_fraction(val_part, max_bad_fraction)
    return SourceData(spec, part, val_part)


def check_tools(tokenizer: PreTrainedTokenizerBase, sources: list[SourceData], model_name: str | None) -> None:
    """Refuse a chat template that cannot render the tool calls, tool results or tool lists the rows hold.

    Raises:
        DataError: naming the model, what the template leaves out, and the fix.
    """
    parts = [p for s in sources for p in (s.part, s.val_part) if p is not None]
    needs = tool_needs([(r.messages, r.tools) for p in parts for r in p.rows if r.messages is not None])
    with template_time_limit():  # renders probe conversations through the template
        problem = tool_support_problem(tokenizer, needs)
    if problem is None:
        return
    rows = sum(1 for p in parts for r in p.rows if r.messages is not None and tool_needs([(r.messages, r.tools)]))
    raise DataError(
        f"{rows} rows call tools, but the chat template of {model_name or 'the model'} cannot render them: {problem}",
        "set model.chat_template: chatml, llama3 or mistral (qlora-kit's templates render tools) or a Jinja "
        "template that renders `tools`, `tool_calls` and `role: tool` turns",
        key="model.chat_template",
    )


def prepare_rows(sources: list[SourceData], tokenizer: PreTrainedTokenizerBase, policy: str) -> SystemPromptUse:
    """Apply ``data.default_system_prompt`` to each source's rows, then fold system turns into the first user turn
    for templates without a system role; in place. Returns what happened to rows without a system turn."""
    has_template = bool(getattr(tokenizer, "chat_template", None))
    with template_time_limit():  # renders a probe conversation through the template
        default = template_default_system(tokenizer) if has_template else None
    use = SystemPromptUse.of(policy, default)
    takes_system = not has_template or template_takes_system(tokenizer)
    folded = 0
    for src in sources:
        (src.train_rows, train_use), (src.val_rows, val_use) = (
            apply_system_policy(rows, policy, use.template_default) for rows in (src.train_rows, src.val_rows))
        use.rows += train_use.rows + val_use.rows
        use.text = train_use.text
        if not takes_system:
            (src.train_rows, n_train), (src.val_rows, n_val) = map(fold_system_rows, (src.train_rows, src.val_rows))
            folded += n_train + n_val
    if folded:
        log.info("the chat template has no system role: the system prompt of %d rows goes before their first "
                 "user message (prompt the trained model the same way; `qlora-kit generate --system` does)", folded)
    if (said := use.describe()) is not None:
        log.info("%s", said)
    return use


def encode_source(src: SourceData, tokenizer: PreTrainedTokenizerBase, max_length: int, cfg: DataConfig,
                  chat: ChatSpans | None) -> None:
    """Tokenise a source's train and validation rows; rows the chat template rejects count as bad rows of
    their file.

    Raises:
        DataError: too many bad rows once template failures are counted.
    """
    name = "" if src.spec.key == "data.path" else f"{src.spec.key} "
    src.train_enc, train_bad = encode_rows(src.train_rows, tokenizer, max_length, cfg.train_on_inputs, chat,
                                           f"{name}train")
    src.val_enc, val_bad = encode_rows(src.val_rows, tokenizer, max_length, cfg.train_on_inputs, chat, f"{name}val")
    check_template_works(src.train_enc + src.val_enc, train_bad + val_bad)
    src.part.bad += train_bad + (val_bad if src.val_part is None else [])
    if src.val_part is not None:
        src.val_part.bad += val_bad
    for part in (src.part, src.val_part):
        if part is not None:
            finish_bad_rows(part, cfg.max_bad_fraction)


def finish_bad_rows(part: Parsed, max_bad_fraction: float) -> None:
    """Check a file's share of bad rows (parse and template failures) and list the skipped ones.

    Raises:
        DataError: too many bad rows.
    """
    check_bad_fraction(part, max_bad_fraction)
    log_bad_rows(part)


def warn_empty_sources(sources: list[SourceData], max_length: int) -> None:
    """Say which source of several adds no training sample (all its rows cut or without replies)."""
    if len(sources) < 2:
        return
    for src in sources:
        if src.mixed or not src.train_enc:
            continue
        cut = sum(e.cut_to_zero for e in src.train_enc)
        why = (f"{cut} of its {len(src.train_enc)} training rows lost every trained token to truncation; raise "
               f"train.max_length (now {max_length})" if cut else "its rows have no token to train on")
        log.warning("%s (%s) adds no training sample: %s", src.spec.key, src.part.source.label, why)


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


def make_heldout(row: Row, chat: ChatSpans | None = None) -> dict[str, Any]:
    """Prompt and reference answer of a validation row, for generation checks (with the row's tool list; the
    reference of a tool-calling turn is the text the template renders for it)."""
    if row.messages is not None:
        tools = {"tools": row.tools} if row.tools else {}
        turns = row.train_turns or tuple(i for i, m in enumerate(row.messages) if m["role"] == "assistant")
        if not turns:
            return {"messages": list(row.messages), **tools, "reference": ""}
        last = turns[-1]
        reference = row.messages[last]["content"]
        if row.messages[last].get("tool_calls") and chat is not None:
            reference = rendered_turn(chat, row, last) or reference
        return {"messages": [dict(m) for m in row.messages[:last]], **tools, "reference": reference}
    if row.prompt is not None:
        return {"prompt": row.prompt, "reference": row.completion}
    text = row.text or ""
    cut = text.find(" ", len(text) // 2)
    cut = len(text) // 2 if cut < 0 else cut
    return {"prompt": text[:cut], "reference": text[cut:]}


def rendered_turn(chat: ChatSpans, row: Row, turn: int) -> str | None:
    """The text the chat template writes for assistant turn ``turn`` of ``row``, without its end-of-turn text."""
    assert row.messages is not None
    try:
        text, spans = chat.locate(row.messages[: turn + 1], (turn,), row.tools)
    except RowProblem:
        return None
    if not spans:
        return None
    piece = text[spans[-1][0]:spans[-1][1]]
    return piece[: -len(chat.end_of_turn)] if chat.end_of_turn and piece.endswith(chat.end_of_turn) else piece


def build_pairs(sources: list[SourceData], shared: SourceData | None, tokenizer: PreTrainedTokenizerBase,
                max_length: int, cfg: DataConfig) -> DataBundle:
    """The DataBundle of preference rows (data/preference.py): one sample per pair, both sides rendered as SFT rows.

    Raises:
        DataError: several sources or a validation file in another format, too many bad rows, or no pair left
            to train on.
    """
    everything = sources + ([shared] if shared else [])
    if len(sources) > 1:
        raise DataError(f"preference rows come from one source; this config mixes {len(sources)} (data.datasets)",
                        "give the pairs as data.path (or one data.datasets entry); mixing sources is for SFT rows",
                        key="data.datasets")
    for part, key in ((p, k) for s in everything for p, k in ((s.part, s.spec.key), (s.val_part, s.spec.val_key))):
        if part is not None and part.format != PREFERENCE:
            raise DataError(f"{key} ({part.source.label}) holds {part.format!r} rows, the training rows are "
                            "prompt/chosen/rejected pairs", "give preference rows everywhere (validation too), or "
                            "train.method: sft with SFT rows", key=key)
    src = sources[0]
    train_part = src.part
    val_part = src.val_part or (shared.part if shared else None)
    train_pairs = list(src.train_rows)
    val_pairs = list(src.val_rows) + (list(shared.val_rows) if shared else [])
    train_pairs, val_pairs = _system_pairs(train_pairs, cfg, tokenizer), _system_pairs(val_pairs, cfg, tokenizer)
    chat = make_chat_spans(tokenizer, [p.chosen for p in train_pairs + val_pairs])
    train_enc, train_bad = encode_pairs(train_pairs, tokenizer, max_length, chat)
    val_enc, val_bad = encode_pairs(val_pairs, tokenizer, max_length, chat)
    train_part.bad += train_bad + (val_bad if val_part is None else [])
    if val_part is not None:
        val_part.bad += val_bad
    for part in (train_part, val_part):
        if part is not None:
            finish_bad_rows(part, cfg.max_bad_fraction)
    train = [e.sample for e in train_enc if e.sample is not None]
    if not train:
        reasons = sorted({e.dropped for e in train_enc + val_enc if e.dropped})
        raise DataError(f"no preference pair of {train_part.source.label} is left to train on"
                        + (f" ({'; '.join(reasons)})" if reasons else " (they went to validation)"),
                        f"raise train.max_length (now {max_length}), add rows, or lower data.val_fraction")
    by_number = {p.number: p for p in val_pairs}
    kept_val = [e for e in val_enc if e.sample is not None]
    heldout = [{**make_heldout(by_number[e.number].chosen, chat),
                "rejected": make_heldout(by_number[e.number].rejected, chat)["reference"]} for e in kept_val]
    summary = summarize_pairs(train_part, val_part, train_enc, val_enc, tokenizer, max_length)
    log_summary_line(summary)
    return DataBundle(train, [e.sample for e in kept_val], heldout, summary,
                      fingerprint(sources, shared.part if shared else None))


def _system_pairs(pairs: list[Pair], cfg: DataConfig, tokenizer: PreTrainedTokenizerBase) -> list[Pair]:
    """``data.default_system_prompt`` applied to both sides of each pair, then system turns folded for templates
    without a system role (as :func:`prepare_rows` does for SFT rows)."""
    has_template = bool(getattr(tokenizer, "chat_template", None))
    with template_time_limit():
        default = template_default_system(tokenizer) if has_template else None
    chosen, _ = apply_system_policy([p.chosen for p in pairs], cfg.default_system_prompt, default)
    rejected, _ = apply_system_policy([p.rejected for p in pairs], cfg.default_system_prompt, default)
    pairs = [Pair(p.number, c, r) for p, c, r in zip(pairs, chosen, rejected)]
    if has_template and not template_takes_system(tokenizer):
        pairs, folded = fold_system_pairs(pairs)
        if folded:
            log.info("the chat template has no system role: the system prompt of %d pairs goes before their first "
                     "user message", folded)
    return pairs
