"""Rows to token ids and labels, in bounded, batched tokeniser calls."""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

from qlora_kit.core.pacing import Meter, counted
from qlora_kit.data.formats import Row, RowProblem
from qlora_kit.data.labels import ChatSpans, Span, template_time_limit

IGNORE_INDEX = -100
Sample = dict[str, list[int]]


ENCODE_CHUNK = 512  # rows tokenised per batch call
PROGRESS_MIN_ROWS = 5000  # show a progress bar from this many rows


# Tokenising is bounded: a row's text is cut to MAX_CHARS_PER_TOKEN * max_length characters first.
# The cut is kept only when the tokens before it, not counting the last CUT_MARGIN_CHARS characters, are
# already more than max_length (so the kept tokens are far from the cut); otherwise (a row of very long
# tokens) the whole row is tokenised.  Rows that fit max_length are therefore encoded exactly as before.
MAX_CHARS_PER_TOKEN = 32
CUT_MARGIN_CHARS = 1024


@dataclass
class Encoded:
    """A tokenised row, or why it yields nothing to train on."""

    number: int
    sample: Sample | None
    truncated: bool
    cut_to_zero: bool = False


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
        DataError: the chat template runs away on this row.
    """
    if row.messages is not None:
        assert chat is not None
        with template_time_limit(row.number):
            text, spans = chat.locate(row.messages, row.train_turns, row.tools)
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
    with _progress(len(rows), f"tokenising {label}".strip()) as meter:
        for lo in range(0, len(rows), ENCODE_CHUNK):
            jobs = []
            for row in rows[lo : lo + ENCODE_CHUNK]:
                try:
                    jobs.append(make_job(row, chat, tokenizer))
                except RowProblem as exc:
                    bad.append((row.number, str(exc)))
            encoded += encode_jobs(jobs, tokenizer, max_length, train_on_inputs)
            meter.advance(min(ENCODE_CHUNK, len(rows) - lo))
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


def _progress(total: int, description: str) -> Meter:
    """Progress of a large input (a bar on a terminal, paced lines in a pipe); nothing below PROGRESS_MIN_ROWS."""
    return Meter(description, total, counted("row"), enabled=total >= PROGRESS_MIN_ROWS)
