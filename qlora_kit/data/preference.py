"""Preference rows (prompt, chosen, rejected): parsing, pair encoding, truncation, batches and their audit.

A row is ``{"prompt", "chosen", "rejected"}``: strings, or trl's conversational layout (the
prompt a list of messages, chosen and rejected lists of assistant turns).  Each side is the
SFT row ``{"prompt", "completion": side}`` (:func:`qlora_kit.data.formats.prompt_completion_row`),
rendered and labelled exactly as SFT renders it (chat template, assistant spans of
``data/labels.py``, tokenised by ``data/encode.py``): the labels are the completion's tokens.

A pair is one sample: ``input_ids`` and ``labels`` hold the chosen sequence followed by the
rejected one, ``chosen_length`` says where the rejected one starts.  Batches keep the two
sequences apart (:func:`collate_pairs`).  ``train.max_length`` bounds each side.  A pair is cut
the same way on both sides, the prompt first: the shared prompt loses its oldest tokens
(down to half of max_length), then both completions are cut at the same length.
"""

from __future__ import annotations

import logging
import statistics
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

import torch

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

from qlora_kit.data.encode import ENCODE_CHUNK, IGNORE_INDEX, Encoded, Sample, encode_jobs, make_job
from qlora_kit.data.formats import Parsed, RowProblem
from qlora_kit.data.labels import ChatSpans
from qlora_kit.data.pairs import Pair
from qlora_kit.data.summary import MAX_REASONS, DataSummary, length_histogram, preview_pieces
from qlora_kit.ops.packing import pack_batch

log = logging.getLogger("qlora_kit")

CHOSEN_LENGTH = "chosen_length"  # sample key: tokens of the chosen sequence (input_ids = chosen + rejected)
PAIR_KEYS = ("sequence_index", "pair_weight")  # batch keys the loss reads and the model must not see
ENCODE_HEADROOM = 32  # a side is tokenised up to this many times max_length (bounded work), then the pair is cut


@dataclass
class EncodedPair:
    """A tokenised pair (the sample), or why it yields nothing to train on (``dropped``)."""

    number: int
    sample: Sample | None
    truncated: bool = False
    dropped: str | None = None
    prompt_tokens: int = 0


# --------------------------------------------------------------------------- parsing




def encode_pairs(pairs: list[Pair], tokenizer: PreTrainedTokenizerBase, max_length: int, chat: ChatSpans | None
                 ) -> tuple[list[EncodedPair], list[tuple[int, str]]]:
    """Tokenise both sides of every pair as SFT rows, then cut each pair to ``max_length`` per side.

    Returns the encodings and (row number, reason) for pairs the chat template rejects.
    """
    encoded: list[EncodedPair] = []
    bad: list[tuple[int, str]] = []
    bound = ENCODE_HEADROOM * max_length
    for lo in range(0, len(pairs), ENCODE_CHUNK):
        jobs, kept = [], []
        for pair in pairs[lo : lo + ENCODE_CHUNK]:
            try:
                jobs += [make_job(pair.chosen, chat, tokenizer), make_job(pair.rejected, chat, tokenizer)]
                kept.append(pair)
            except RowProblem as exc:
                bad.append((pair.number, str(exc)))
        sides = encode_jobs(jobs, tokenizer, bound, train_on_inputs=False)
        for k, pair in enumerate(kept):
            encoded.append(join_sides(pair.number, sides[2 * k], sides[2 * k + 1], max_length))
    return encoded, bad


def join_sides(number: int, chosen: Encoded, rejected: Encoded, max_length: int) -> EncodedPair:
    """One pair sample from its two encoded sides, cut to ``max_length`` tokens per side (prompt first)."""
    if chosen.truncated or rejected.truncated:  # only past ENCODE_HEADROOM x max_length: the prompt's end is lost
        return EncodedPair(number, None, truncated=True,
                           dropped=f"longer than {ENCODE_HEADROOM} x max_length tokens")
    if chosen.sample is None or rejected.sample is None:
        return EncodedPair(number, None, dropped="no completion token")
    c_ids, c_lab = chosen.sample["input_ids"], chosen.sample["labels"]
    r_ids, r_lab = rejected.sample["input_ids"], rejected.sample["labels"]
    prompt = min(_common_prefix(c_ids, r_ids), _first_label(c_lab), _first_label(r_lab))
    longest = max(len(c_ids), len(r_ids)) - prompt
    keep, cap = prompt, longest
    truncated = prompt + longest > max_length
    if truncated:
        keep = min(prompt, max(max_length - longest, max_length // 2))
        cap = max_length - keep
    sides = []
    for ids, labels in ((c_ids, c_lab), (r_ids, r_lab)):
        cut_ids = ids[prompt - keep : prompt] + ids[prompt : prompt + cap]
        cut_labels = [IGNORE_INDEX] * keep + labels[prompt : prompt + cap]
        cut_labels[0] = IGNORE_INDEX
        sides.append((cut_ids, cut_labels))
    (ci, cl), (ri, rl) = sides
    if all(x == IGNORE_INDEX for x in cl) or all(x == IGNORE_INDEX for x in rl):
        return EncodedPair(number, None, truncated, "no completion token left after truncation", keep)
    if ci == ri:
        return EncodedPair(number, None, truncated, "chosen and rejected are the same after truncation", keep)
    return EncodedPair(number, {"input_ids": ci + ri, "labels": cl + rl, CHOSEN_LENGTH: [len(ci)]}, truncated,
                       prompt_tokens=keep)


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    return next((i for i in range(n) if a[i] != b[i]), n)


def _first_label(labels: Sequence[int]) -> int:
    return next((i for i, x in enumerate(labels) if x != IGNORE_INDEX), len(labels))


def split_pair(sample: Sample) -> tuple[tuple[list[int], list[int]], tuple[list[int], list[int]]]:
    """((chosen ids, labels), (rejected ids, labels)) of a pair sample."""
    n = sample[CHOSEN_LENGTH][0]
    ids, labels = sample["input_ids"], sample["labels"]
    return (ids[:n], labels[:n]), (ids[n:], labels[n:])


# --------------------------------------------------------------------------- batches


def collate_pairs(samples: Sequence[Sample], rows: Sequence[Sequence[int]], pad_id: int, packing: bool
                  ) -> dict[str, Any]:
    """Tensors for one micro-batch of pairs: the chosen sequences first, then the rejected ones, in one forward.

    Packed: one padding-free row of all 2P sequences (:func:`qlora_kit.ops.packing.pack_batch`).
    Padded: 2P right-padded rows.  ``sequence_index`` gives each token its sequence (k: chosen
    side of pair k, P + k: its rejected side); ``pair_weight`` is 1 per pair (0 for a rank's
    masked filler, see ``train.loop``).
    """
    sides = [split_pair(samples[i]) for row in rows for i in row]
    sequences = [chosen for chosen, _ in sides] + [rejected for _, rejected in sides]
    if packing:
        batch = pack_batch(sequences)
        index = torch.cat([torch.full((len(ids),), k, dtype=torch.long) for k, (ids, _) in enumerate(sequences)])
        batch["sequence_index"] = index.unsqueeze(0)
    else:
        width = max(len(ids) for ids, _ in sequences)
        input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
        labels = torch.full((len(sequences), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(sequences), width), dtype=torch.long)
        for b, (ids, labs) in enumerate(sequences):
            input_ids[b, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            labels[b, : len(ids)] = torch.tensor(labs, dtype=torch.long)
            mask[b, : len(ids)] = 1
        batch = {"input_ids": input_ids, "labels": labels, "attention_mask": mask,
                 "sequence_index": torch.arange(len(sequences)).unsqueeze(1).expand(-1, width).contiguous()}
    batch["pair_weight"] = torch.ones(len(sides))
    return batch


# --------------------------------------------------------------------------- audit


def summarize_pairs(train_part: Parsed, val_part: Parsed | None, train_enc: list[EncodedPair],
                    val_enc: list[EncodedPair], tokenizer: PreTrainedTokenizerBase, max_length: int) -> DataSummary:
    """The data summary of preference rows: pairs, tokens per side, truncation, dropped pairs."""
    train = [e.sample for e in train_enc if e.sample is not None]
    val = [e.sample for e in val_enc if e.sample is not None]
    encoded = train_enc + val_enc
    sides = [split_pair(s) for s in train]
    lengths = [len(ids) for pair in sides for ids, _ in pair]
    unit = train_part.source.unit
    reasons = [f"{unit} {n}: {why}" for n, why in train_part.bad[:MAX_REASONS]]
    if val_part is not None:
        reasons += [f"val {val_part.source.unit} {n}: {why}" for n, why in val_part.bad[:MAX_REASONS]]
    dropped: dict[str, int] = {}
    for e in encoded:
        if e.dropped:
            dropped[e.dropped] = dropped.get(e.dropped, 0) + 1
    summary = DataSummary(
        source=train_part.source.label, format=train_part.format, format_detected=train_part.detected,
        rows=train_part.total + (val_part.total if val_part else 0), bad_rows=[n for n, _ in train_part.bad],
        row_unit=unit, bad_row_reasons=reasons, val_source=val_part.source.label if val_part else None,
        val_bad_rows=[n for n, _ in val_part.bad] if val_part else [], train_rows=len(train), val_rows=len(val),
        tokens=sum(lengths), trainable_tokens=sum(_trained(s["labels"]) for s in train),
        val_tokens=sum(len(s["input_ids"]) for s in val), val_trainable_tokens=sum(_trained(s["labels"]) for s in val),
        truncated=sum(e.truncated for e in encoded), no_trainable=sum(e.sample is None for e in encoded),
        no_trainable_truncated=sum(e.sample is None and e.truncated for e in encoded), max_length=max_length,
        train_on_inputs=False,
    )
    summary.pairs = {
        "prompt_tokens": sum(e.prompt_tokens for e in train_enc if e.sample is not None),
        "chosen_tokens": sum(len(c[0]) for c, _ in sides), "rejected_tokens": sum(len(r[0]) for _, r in sides),
        "chosen_trained": sum(_trained(c[1]) for c, _ in sides),
        "rejected_trained": sum(_trained(r[1]) for _, r in sides),
        "dropped": dropped,
    }
    if lengths:
        summary.length_min, summary.length_max = min(lengths), max(lengths)
        summary.length_mean = round(statistics.fmean(lengths), 1)
        summary.length_histogram = length_histogram(lengths)
        (c_ids, c_lab), _ = sides[0]
        summary.preview = preview_pieces({"input_ids": c_ids, "labels": c_lab}, tokenizer)
    return summary


def _trained(labels: Sequence[int]) -> int:
    return sum(1 for x in labels if x != IGNORE_INDEX)
