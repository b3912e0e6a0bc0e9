"""Batch plans (a pure function of seed and epoch) and collation, packed or padded."""

from __future__ import annotations

import hashlib
from typing import Any, Sequence

import torch

from qlora_kit.data.encode import IGNORE_INDEX, Sample
from qlora_kit.ops.packing import pack_batch

PACK_WINDOW = 16  # open rows considered when packing (first fit)


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
