"""Padding-free packing: the inputs attention kernels need to keep packed samples apart.

A packed micro-batch is one row of concatenated samples with no padding (``pack_batch``).
Besides ``position_ids`` that restart at 0 for every sample, it carries what the kernels
need to run each sample on its own with no per-layer work and no device-to-host sync:

- ``cu_seq_lens_q`` / ``cu_seq_lens_k``: int32 cumulative sample lengths ``[0, l1, l1+l2, ...]``
  (the flash-attention "varlen" convention);
- ``max_length_q`` / ``max_length_k``: the longest sample, a Python int;
- ``packed_seq_lens``: the sample lengths as a Python tuple (for the per-sample fallback).

transformers' ``flash_attention_2`` reads the first four directly (it no longer re-derives
them from ``position_ids`` in every layer).  For ``sdpa`` qlora-kit registers its own
attention function, :data:`ATTENTION_NAME`, through transformers' ``AttentionInterface``: on
a CUDA card with a flash kernel it runs torch's variable-length flash attention
(``torch.nn.attention.varlen.varlen_attn``), elsewhere causal SDPA once per sample.  No
mask function is registered for that name, so transformers builds no mask for it at all:
no ``B x T x T`` tensor, whatever the length.  Batches without ``cu_seq_lens_q`` (unpacked,
right-padded rows) run plain causal SDPA: with causal attention and right padding, real
tokens never see the padding, and padded positions carry no labels.
"""

from __future__ import annotations

import contextlib
import logging
from itertools import accumulate
from typing import Any, Iterator, Sequence

import torch
import torch.nn.functional as F

log = logging.getLogger("qlora_kit")

ATTENTION_NAME = "qlora_kit_varlen"
PER_SAMPLE_NAME = "qlora_kit_per_sample"  # the same function without the flash kernel (the start-up check's reference)
IGNORE_INDEX = -100
_HALF = (torch.float16, torch.bfloat16)


# --------------------------------------------------------------------------- collation


def pack_batch(pieces: Sequence[tuple[list[int], list[int]]]) -> dict[str, Any]:
    """One padding-free row from (input_ids, labels) pieces, with the varlen attention inputs.

    Each piece is one sample (already cut to fit); its first label must be -100 so no sample
    predicts the first token of the next one.

    Raises:
        ValueError: no pieces, or an empty piece.
    """
    if not pieces or any(len(ids) == 0 for ids, _ in pieces):
        raise ValueError("a packed batch needs at least one non-empty sample")
    lengths = tuple(len(ids) for ids, _ in pieces)
    input_ids = torch.tensor([t for ids, _ in pieces for t in ids], dtype=torch.long).unsqueeze(0)
    labels = torch.tensor([t for _, labs in pieces for t in labs], dtype=torch.long).unsqueeze(0)
    positions = torch.cat([torch.arange(n, dtype=torch.long) for n in lengths]).unsqueeze(0)
    return {"input_ids": input_ids, "labels": labels, "position_ids": positions, **varlen_kwargs(lengths)}


def varlen_kwargs(lengths: Sequence[int]) -> dict[str, Any]:
    """``cu_seq_lens_q/k`` (int32), ``max_length_q/k`` and ``packed_seq_lens`` for sample ``lengths``."""
    cu = torch.tensor([0, *accumulate(lengths)], dtype=torch.int32)
    longest = max(lengths)
    return {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": longest, "max_length_k": longest,
            "packed_seq_lens": tuple(int(n) for n in lengths)}


# --------------------------------------------------------------------------- attention


def packed_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    cu_seq_lens_q: torch.Tensor | None = None,
    max_length_q: int | None = None,
    packed_seq_lens: Sequence[int] | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Causal attention that keeps packed samples apart; the AttentionInterface signature.

    ``query`` is ``[B, Hq, T, D]``, ``key``/``value`` ``[B, Hkv, T, D]``; returns ``[B, T, Hq, D]``.

    Raises:
        ValueError: an explicit attention mask (this function is for causal training rows),
            attention dropout, or soft-capping, which it does not implement.
    """
    if attention_mask is not None:
        raise ValueError(f"{ATTENTION_NAME} attention takes no mask (packed or right-padded causal rows only)")
    if dropout or kwargs.get("softcap") is not None:
        raise ValueError(f"{ATTENTION_NAME} attention does not implement attention dropout or soft-capping")
    window = sliding_window if sliding_window and sliding_window < query.shape[2] else None
    if cu_seq_lens_q is None:  # one sample per row (right-padded): plain causal attention
        mask = None if window is None else causal_window_mask(query.shape[2], window, query.device)
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, is_causal=mask is None,
                                             scale=scaling, enable_gqa=key.shape[1] != query.shape[1])
        return out.transpose(1, 2).contiguous(), None
    q, k, v = (x.transpose(1, 2).reshape(-1, x.shape[1], x.shape[3]) for x in (query, key, value))  # [N, H, D]
    if use_flash_varlen(q) and not kwargs.get("per_sample_only", False):
        out = flash_varlen(q, k, v, cu_seq_lens_q, int(max_length_q), scaling, window)
    else:
        if packed_seq_lens is None:
            packed_seq_lens = torch.diff(cu_seq_lens_q).tolist()  # a device sync: collation passes them instead
        out = sdpa_per_sample(q, k, v, packed_seq_lens, scaling, window)
    return out.reshape(query.shape[0], query.shape[2], query.shape[1], query.shape[3]), None


def use_flash_varlen(q: torch.Tensor) -> bool:
    """True where torch's varlen flash kernel runs: CUDA, 16-bit, compute capability ≥ 8.0, head dim ≤ 256."""
    return flash_varlen_runs(q.device, q.dtype, q.shape[-1])


def flash_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seq_lens: torch.Tensor, max_len: int,
                 scaling: float | None, window: int | None) -> torch.Tensor:
    """torch's variable-length flash attention (CUDA), causal, GQA without repeating k/v."""
    from torch.nn.attention.varlen import varlen_attn

    cu = cu_seq_lens.to(device=q.device, dtype=torch.int32)
    return varlen_attn(q, k, v, cu, cu, max_len, max_len, scale=scaling,
                       window_size=(-1 if window is None else window - 1, 0), enable_gqa=k.shape[1] != q.shape[1])


def sdpa_per_sample(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: Sequence[int],
                    scaling: float | None, window: int | None) -> torch.Tensor:
    """Causal SDPA once per sample (``[N, H, D]`` in and out): the portable fallback."""
    outs = []
    gqa = k.shape[1] != q.shape[1]
    for qs, ks, vs in zip(*(x.split(list(lengths)) for x in (q, k, v))):
        qs, ks, vs = (x.transpose(0, 1).unsqueeze(0) for x in (qs, ks, vs))  # [1, H, L, D]
        n = qs.shape[2]
        mask = causal_window_mask(n, window, qs.device) if window is not None and n > window else None
        out = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, is_causal=mask is None, scale=scaling,
                                             enable_gqa=gqa)
        outs.append(out.squeeze(0).transpose(0, 1))
    return torch.cat(outs)


def per_sample_attention_forward(*args: Any, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """:func:`packed_attention_forward` that never takes the flash kernel: causal SDPA once per sample."""
    return packed_attention_forward(*args, **kwargs, per_sample_only=True)


def flash_varlen_runs(device: torch.device, compute_dtype: torch.dtype, head_dim: int) -> bool:
    """True when :data:`ATTENTION_NAME` runs torch's varlen flash kernel for these inputs (see :func:`use_flash_varlen`)."""
    if device.type != "cuda" or compute_dtype not in _HALF or head_dim > 256 or head_dim % 8:
        return False
    return torch.cuda.get_device_capability(device) >= (8, 0)


def causal_window_mask(n: int, window: int, device: torch.device) -> torch.Tensor:
    """``[n, n]`` bool mask: each token sees itself and the ``window - 1`` tokens before it."""
    idx = torch.arange(n, device=device)
    return (idx[None, :] <= idx[:, None]) & (idx[None, :] > idx[:, None] - window)


def register_packed_attention() -> None:
    """Register :func:`packed_attention_forward` as :data:`ATTENTION_NAME` (idempotent)."""
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION_NAME, packed_attention_forward)
    AttentionInterface.register(PER_SAMPLE_NAME, per_sample_attention_forward)


def use_packed_attention(model: torch.nn.Module) -> bool:
    """Switch an sdpa model to :data:`ATTENTION_NAME` for training; return True when switched.

    flash_attention_2 needs nothing (it reads ``cu_seq_lens_*``); eager keeps transformers'
    block-diagonal mask built from ``position_ids``.
    """
    config = model.config
    if getattr(config, "_attn_implementation", None) != "sdpa":
        return False
    register_packed_attention()
    model.set_attn_implementation(ATTENTION_NAME)
    if config._attn_implementation != ATTENTION_NAME:
        log.warning("%s cannot switch its attention function: packed rows use a block-diagonal mask",
                    type(model).__name__)
        return False
    return True


def restore_attention(model: torch.nn.Module, name: str = "sdpa") -> None:
    """Back to a stock attention implementation (generation needs its masks: left padding, KV cache)."""
    if getattr(model.config, "_attn_implementation", None) in (ATTENTION_NAME, PER_SAMPLE_NAME):
        model.set_attn_implementation(name)


def uses_packed_attention(model: torch.nn.Module) -> bool:
    """True when ``model`` runs :data:`ATTENTION_NAME` (what :func:`use_packed_attention` switched on)."""
    return getattr(model.config, "_attn_implementation", None) == ATTENTION_NAME


def reference_attention(device: torch.device, compute_dtype: torch.dtype, head_dim: int) -> str:
    """The library path :data:`ATTENTION_NAME` is checked against, and falls back to when it fails that check.

    Where it runs the flash varlen kernel: causal SDPA once per sample (:data:`PER_SAMPLE_NAME`);
    where it already runs per-sample SDPA (CPU, fp32, older cards): transformers' ``eager``
    attention with its block-diagonal mask built from ``position_ids``.
    """
    return PER_SAMPLE_NAME if flash_varlen_runs(device, compute_dtype, head_dim) else "eager"


@contextlib.contextmanager
def attention_as(model: torch.nn.Module, name: str) -> Iterator[None]:
    """Run the block with attention implementation ``name``, then switch back to the one in use."""
    before = model.config._attn_implementation
    model.set_attn_implementation(name)
    try:
        yield
    finally:
        model.set_attn_implementation(before)
