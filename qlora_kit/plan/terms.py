"""The byte model's terms: weights, adapters, optimizer states and the activations of one layer."""

from __future__ import annotations

import math
from typing import Any

from qlora_kit.plan.shape import ModelShape, linear_layers
from qlora_kit.plan.techniques import Techniques

KiB, MiB, GiB = 1024, 1024**2, 1024**3
NF4_BLOCK = 64  # values per first-level absmax
NESTED_BLOCK = 256  # first-level absmax values per fp32 second-level constant
OPT8_MIN_NUMEL = 4096  # bitsandbytes keeps fp32 states for smaller tensors (min_8bit_size)
OPT8_BLOCK = 256  # values per fp32 absmax in 8-bit optimizer states
PAGED_MIN_NUMEL = 100_000  # bitsandbytes pages only state buffers at least this large
LOSS_FP32_BYTES = 12  # fp32 log-probs + fp32 gradient in + fp32 gradient out, per logit
LOSS_TOKEN_TILE = 4096  # trl's ChunkedLogProbFunction: tokens per projection tile (TOKEN_CHUNK_SIZE)
LOSS_VOCAB_TILE = 32768  # vocabulary entries per tile (trl.trainer.utils._CHUNKED_LOGPROB_CHUNK_SIZE)
LOSS_SCALARS_PER_LABEL = 48  # fp32 online-softmax statistics, log-probs, int64 target per labelled token
MLP_TILE_TOKENS = 4096  # qlora_kit.ops.tiled_mlp.MLP_TILE_TOKENS
NORM_BACKWARD_FP32_COPIES = 5  # fp32 [N, H] temporaries of an RMSNorm's backward (measured on CPU, same ops)
OFFLOAD_IN_FLIGHT = 2  # offloaded checkpoints on the GPU at once: the layer recomputed + one prefetched
STEP_INPUT_BYTES = 24  # int64 input_ids, labels, position_ids per token
PAIR_INPUT_BYTES = 8  # preference pairs: the int64 sequence index of every token (data/preference.collate_pairs)
CUDA_CONTEXT_BYTES = 500 * MiB
FRAGMENTATION_EXPANDABLE = 0.05  # allocator margin with expandable_segments (train's default)
FRAGMENTATION_LEGACY = 0.10  # ... with fixed-size segments


INIT_WORK_FACTOR = 5  # float32 copies of one matrix alive during a loftq/pissa/olora init


def nf4_bytes(numel: int, double_quant: bool = True) -> int:
    """Bytes of one matrix in bitsandbytes 4-bit (NF4/FP4), blocksize 64."""
    blocks = math.ceil(numel / NF4_BLOCK)
    data = math.ceil(numel / 2)
    if double_quant:
        return data + blocks + 4 * math.ceil(blocks / NESTED_BLOCK)
    return data + 4 * blocks


def adapter_tensors(shape: ModelShape, targets: list[str], r: int, dora: bool) -> list[int]:
    """Element counts of every trainable tensor (A, B, DoRA magnitude) in the whole model."""
    layers = linear_layers(shape)
    per_layer: list[int] = []
    for name in targets:
        lin = layers[name]
        per_layer += [r * lin.in_features, lin.out_features * r]
        if dora:
            per_layer.append(lin.out_features)
    return per_layer * shape.num_layers


def variant_tensors(shape: ModelShape, targets: list[str], lora: Any) -> tuple[list[int], int]:
    """(element counts of every trainable tensor, elements of frozen adapter state) for ``lora.type``.

    LoRA: A, B (+ DoRA magnitude).  AdaLoRA: A, B and the singular values E (r each) per module.
    VeRA: lambda_b (out) and lambda_d (r) per module, plus the shared frozen projections
    vera_A (r x largest in) and vera_B (largest out x r).
    """
    if lora.type == "lora":
        return adapter_tensors(shape, targets, lora.r, lora.use_dora), 0
    layers = linear_layers(shape)
    per_layer: list[int] = []
    for name in targets:
        lin = layers[name]
        if lora.type == "adalora":
            per_layer += [lora.r * lin.in_features, lin.out_features * lora.r, lora.r]
        else:
            per_layer += [lin.out_features, lora.r]
    frozen = 0
    if lora.type == "vera":
        frozen = lora.r * (max(layers[n].in_features for n in targets) + max(layers[n].out_features for n in targets))
    return per_layer * shape.num_layers, frozen


def optimizer_bytes(numels: list[int], optimizer: str, adapter_bytes: int) -> tuple[int, int]:
    """(total, pageable) optimizer-state bytes for adapter tensors of the given sizes.

    ``auto`` counts as ``adamw_8bit`` (what it resolves to unless paging matters, which
    does not change the total).  Pageable bytes are those a paged optimizer keeps in CUDA
    managed memory (tensors of at least :data:`PAGED_MIN_NUMEL` values).
    """
    total = pageable = 0
    for n in numels:
        if optimizer == "adamw_torch":
            total += 2 * adapter_bytes * n
            continue
        if optimizer in ("paged_adamw_8bit", "adamw_8bit", "auto") and n >= OPT8_MIN_NUMEL:
            state = 2 * n
            absmax = 2 * 4 * math.ceil(n / OPT8_BLOCK)
        else:
            state, absmax = 8 * n, 0
        total += state + absmax
        if n >= PAGED_MIN_NUMEL:
            pageable += state
    return total, pageable


def adapter_saved_per_token(shape: ModelShape, tech: Techniques, groups: tuple[str, ...]) -> int:
    """Bytes per token the LoRA adapters of the given input groups save for the backward pass.

    peft's LoRA forward is ``base(x) + B(A(dropout(x))) * scale``.  The 4-bit base saves
    nothing of ``x`` (bitsandbytes keeps only the packed weight).  With dropout, every
    adapted module saves its own dropout output plus the mask; without, ``A`` saves the
    input, one copy per input shared by the modules reading it (none for ``o_proj`` on the
    flash path, whose input is the output the attention kernel keeps anyway).  ``B`` saves
    ``A``'s r-wide output.  DoRA also keeps the base output for its magnitude (approximate).
    VeRA keeps ``x A`` scaled by lambda_d beside it, and ``(.) B`` (out wide) for lambda_b.
    """
    layers = linear_layers(shape)
    s, total, shared = tech.s, 0, set()
    for name in tech.targets:
        lin = layers[name]
        if lin.group not in groups:
            continue
        total += s * tech.r
        if tech.lora_type == "vera":
            total += s * (tech.r + lin.out_features)
        if tech.dora:
            total += s * lin.out_features
        if tech.dropout:
            total += (s + tech.mask_bytes) * lin.in_features
        elif lin.group not in shared:
            shared.add(lin.group)
            if not (lin.group == "attn_out" and tech.attention == "flash"):
                total += s * lin.in_features
    return total


def norm_saved_per_token(shape: ModelShape, tech: Techniques) -> int:
    """One RMSNorm: its fp32 input (a copy for 16-bit inputs) and the fp32 reciprocal norm."""
    return 4 * shape.hidden_size + 4


def attention_saved_per_token(shape: ModelShape, tech: Techniques) -> int:
    """Bytes per token the attention block keeps, T*T terms excluded (see :func:`attention_square`).

    Flash / CPU SDPA keep q and k after RoPE, v, the output and a fp32 log-sum-exp per head;
    K/V are never repeated for grouped-query heads.  Eager/math attention keeps k/v repeated
    to every head plus its own output copy.
    """
    s, qd, kvd = tech.s, shape.q_dim, shape.kv_dim
    total = adapter_saved_per_token(shape, tech, ("attn_in", "attn_out")) + norm_saved_per_token(shape, tech)
    if tech.attention in ("flash", "sdpa_cpu"):
        total += s * (qd + kvd) + s * kvd + s * qd + 4 * shape.num_heads
    else:
        total += s * qd * 4
    if shape.qk_norm:
        total += 4 * (qd + shape.kv_dim) + 4 * (shape.num_heads + shape.num_kv_heads)
    return total


def mlp_saved_per_token(shape: ModelShape, tech: Techniques, tiled: bool) -> int:
    """Bytes per token the MLP half keeps over the whole sequence: its norm and either its
    activations (SwiGLU gate, activation and up; the adapters' inputs) or, tiled, its input only."""
    total = norm_saved_per_token(shape, tech)
    if tiled:
        return total + tech.s * shape.hidden_size
    return total + 3 * tech.s * shape.intermediate_size + adapter_saved_per_token(shape, tech, ("mlp_in", "mlp_out"))


def mlp_tile_per_token(shape: ModelShape, tech: Techniques) -> int:
    """Bytes per token of one MLP tile during its backward: activations, adapter inputs and gradients."""
    s, h, i = tech.s, shape.hidden_size, shape.intermediate_size
    saved = 3 * s * i + adapter_saved_per_token(shape, tech, ("mlp_in", "mlp_out"))
    return saved + 2 * s * i + 2 * s * h


def mlp_is_tiled(tech: Techniques, batch: int, length: int) -> bool:
    """True when the tiled MLP really tiles: its rows (the packed row, or each padded row) exceed one tile."""
    return tech.tiled_mlp and (batch * length if tech.packed else length) > MLP_TILE_TOKENS


def layer_saved_bytes(shape: ModelShape, tech: Techniques, batch: int, length: int) -> tuple[int, int]:
    """(attention half, MLP half) of what one decoder layer saves for its backward, in bytes."""
    n = batch * length
    attention = attention_saved_per_token(shape, tech) * n + attention_square(shape, tech, batch, length)[1]
    return attention, mlp_saved_per_token(shape, tech, mlp_is_tiled(tech, batch, length)) * n


def attention_square(shape: ModelShape, tech: Techniques, batch: int, length: int) -> tuple[int, int]:
    """(mask kept all step, per-layer T*T bytes saved by one layer) for eager/math attention; (0, 0) otherwise."""
    if tech.attention not in ("eager", "math"):
        return 0, 0
    square = (batch * length) ** 2 if tech.packed else batch * length * length
    mask = square * tech.s if tech.attention == "eager" else 0
    return mask, square * shape.num_heads * (4 + tech.s)  # fp32 softmax output + 16-bit probabilities


def flash_backward_per_token(shape: ModelShape, tech: Techniques) -> int:
    """Buffers of the attention backward kernel per token.

    FlashAttention-2's backward (what torch's flash SDPA and ``varlen_attn`` run): dq, dk,
    dv in the compute dtype, an fp32 ``dq_accum`` over all query heads, an fp32
    ``softmax_d`` per head, and for grouped-query attention dk/dv expanded to every query
    head before they are summed per group.  The CPU backward is modelled the same way,
    without the expansion.
    """
    s, qd, kvd = tech.s, shape.q_dim, shape.kv_dim
    total = s * qd + 2 * s * kvd + 4 * qd + 4 * shape.num_heads
    if tech.attention == "flash" and shape.num_kv_heads != shape.num_heads:
        total += 2 * s * qd
    return total


def weight_components(shape: ModelShape, tech: Techniques) -> dict[str, int]:
    """The frozen base: 4-bit linear layers, 16-bit embeddings / lm_head / norms / biases."""
    layers = linear_layers(shape)
    nf4 = shape.num_layers * sum(nf4_bytes(lin.numel, tech.double_quant) for lin in layers.values())
    h, L = shape.hidden_size, shape.num_layers
    params16 = shape.vocab_size * h * (1 if shape.tie_word_embeddings else 2) + (2 * L + 1) * h
    if shape.qkv_bias:
        params16 += L * (shape.q_dim + 2 * shape.kv_dim)
    if shape.qk_norm:
        params16 += L * 2 * shape.head_dim
    return {"nf4_weights": nf4, "weights_16bit": params16 * tech.s}


def adapter_components(numels: list[int], tech: Techniques, frozen: int = 0) -> dict[str, int]:
    """Adapter weights (master copy), their gradients (resident across gradient accumulation), optimizer state;
    VeRA's ``frozen`` shared projections; AdaLoRA's importance scores (its RankAllocator keeps the score, its
    average and its uncertainty for every parameter)."""
    n, a = sum(numels), tech.adapter_bytes
    opt, _ = optimizer_bytes(numels, tech.optimizer, a)
    parts = {"lora_parameters": n * a, "lora_gradients": n * a, "optimizer_state": opt}
    if frozen:
        parts["vera_projections"] = frozen * a
    if tech.lora_type == "adalora":
        parts["adalora_importance"] = 3 * n * a
    return parts
