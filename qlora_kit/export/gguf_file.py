"""The GGUF writer: merged tensors → one ``.gguf`` file for llama.cpp, Ollama and LM Studio.

Written with the ``gguf`` package's ``GGUFWriter``: the metadata (hyperparameters, the
tokenizer from ``gguf_vocab``) and every tensor's name, type and byte size go into the header
first, then the data is streamed tensor by tensor as ``merge`` produces it — the same
dequantised-NF4 merge as the HF export, so memory stays bounded by the largest tensor.

Per tensor:

* names via ``gguf.get_tensor_name_map`` (``model.layers.3.self_attn.q_proj.weight`` →
  ``blk.3.attn_q.weight``); a tensor the map does not know is refused, never dropped;
* Llama and Mistral q/k projections (weights and biases) are permuted from transformers'
  rotate-half RoPE layout to llama.cpp's interleaved one; Qwen2 needs no permutation;
* 1-D tensors (norms, biases) stay float32; matrices become F16/BF16/Q8_0/Q4_0 with the
  ``gguf`` package's numpy quantisers (Q4_0 keeps the output layer in Q8_0, as llama.cpp's own
  quantiser keeps it at higher precision; a matrix whose rows do not split into whole blocks
  falls back to F16);
* Llama 3.1 RoPE scaling is written as llama.cpp's ``rope_freqs`` tensor, computed with
  transformers' own RoPE functions.

K-quants (q4_k_m, q5_k_m, q6_k) are made from an F16 GGUF by llama.cpp's quantiser
(``llamacpp.quantize``); the F16 file is deleted afterwards.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from qlora_kit.core.errors import ModelError, QloraKitError
from qlora_kit.export.gguf_vocab import GgufVocab, write_vocab
from qlora_kit.export.merge import Job, MergeContext, Plan, WeightStats, check_finite, stream_weights

log = logging.getLogger("qlora_kit")

NUMPY_QUANTS = ("f16", "bf16", "q8_0", "q4_0")
LLAMACPP_QUANTS = ("q4_k_m", "q5_k_m", "q6_k")
QUANTS = NUMPY_QUANTS + LLAMACPP_QUANTS
# HF model_type → (llama.cpp architecture, q/k permuted for llama.cpp's RoPE layout)
ARCHITECTURES = {"llama": ("llama", True), "mistral": ("llama", True), "qwen2": ("qwen2", False)}
_ROWS_PER_CHUNK_ELEMENTS = 1 << 22  # quantise ~4M weights at a time: numpy's temporaries stay small
_SKIPPED_SOURCE_SUFFIXES = (".rotary_emb.inv_freq",)  # non-persistent buffers some old checkpoints saved


def _types() -> dict[str, Any]:
    import gguf

    q = gguf.GGMLQuantizationType
    return {"f32": q.F32, "f16": q.F16, "bf16": q.BF16, "q8_0": q.Q8_0, "q4_0": q.Q4_0}


def file_type(quant: str) -> int:
    """``general.file_type`` (llama_ftype) of a quant name."""
    import gguf

    t = gguf.LlamaFileType
    return int({"f16": t.MOSTLY_F16, "bf16": t.MOSTLY_BF16, "q8_0": t.MOSTLY_Q8_0, "q4_0": t.MOSTLY_Q4_0,
                "q4_k_m": t.MOSTLY_Q4_K_M, "q5_k_m": t.MOSTLY_Q5_K_M, "q6_k": t.MOSTLY_Q6_K}[quant])


def gguf_file_name(target: Path, quant: str) -> str:
    """``<export dir name>-<QUANT>.gguf``, e.g. ``smol-tuned-Q8_0.gguf``."""
    return f"{target.name}-{quant.upper()}.gguf"


# --------------------------------------------------------------------------- the model's hyperparameters


@dataclass
class GgufModel:
    """The architecture facts the writer needs, checked once against what llama.cpp implements."""

    arch: str
    permute_qk: bool
    n_vocab: int
    n_layers: int
    n_head: int
    n_head_kv: int
    head_dim: int
    hidden: int
    config: Any
    rope_type: str
    notes: list[str]


def describe_model(config: Any) -> GgufModel:
    """Map an HF config to llama.cpp's architecture, refusing what llama.cpp would run differently.

    Raises:
        ModelError: an architecture, activation, RoPE scaling or attention pattern the GGUF writer
            does not map (one line naming it, with ``--format hf`` as the fix).
    """
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHITECTURES:
        raise ModelError(f"GGUF export supports the Llama, Mistral and Qwen2 families, not {model_type!r}",
                         "export with --format hf and convert with llama.cpp's convert_hf_to_gguf.py")
    arch, permute = ARCHITECTURES[model_type]
    act = getattr(config, "hidden_act", "silu")
    if act != "silu":
        raise ModelError(f"{model_type} with hidden_act={act!r}: llama.cpp's {arch} graph uses SiLU",
                         "export with --format hf")
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    rope = _rope_parameters(config)
    if float(rope.get("partial_rotary_factor", 1.0)) != 1.0:
        raise ModelError("partial rotary embeddings are not mapped to GGUF", "export with --format hf")
    rope_type = rope.get("rope_type", "default")
    if rope_type not in ("default", "linear", "llama3"):
        raise ModelError(f"RoPE scaling {rope_type!r} is not mapped to GGUF (default, linear and llama3 are)",
                         "export with --format hf")
    notes = _attention_notes(config, model_type)
    return GgufModel(arch, permute, config.vocab_size, config.num_hidden_layers, heads,
                     getattr(config, "num_key_value_heads", None) or heads, head_dim, config.hidden_size, config,
                     rope_type, notes)


def _rope_parameters(config: Any) -> dict[str, Any]:
    """transformers 5 keeps theta and scaling in ``rope_parameters``; older configs in rope_theta/rope_scaling."""
    params = dict(getattr(config, "rope_parameters", None) or {})
    if not params:
        params = dict(getattr(config, "rope_scaling", None) or {})
        params.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    params.setdefault("rope_type", params.get("type", "default"))
    return params


def _attention_notes(config: Any, model_type: str) -> list[str]:
    if model_type == "qwen2" and getattr(config, "use_sliding_window", False):
        raise ModelError("Qwen2 with use_sliding_window=true: llama.cpp's qwen2 graph attends to the full context",
                         "export with --format hf")
    window = getattr(config, "sliding_window", None)
    if model_type == "mistral" and window and window < config.max_position_embeddings:
        return [f"the model uses a {window}-token sliding window; llama.cpp attends to the full context, so "
                f"outputs differ only for prompts longer than {window} tokens"]
    return []


def write_hparams(writer: Any, model: GgufModel, quant: str, name: str, base_name: str | None) -> None:
    """General and architecture keys (``llama.*`` / ``qwen2.*``)."""
    c = model.config
    rope = _rope_parameters(c)
    writer.add_type("model")
    writer.add_name(name)
    writer.add_description("QLoRA fine-tune merged onto the dequantised NF4 base by qlora-kit")
    if base_name:
        writer.add_base_model_count(1)
        writer.add_base_model_name(0, base_name)
    writer.add_file_type(file_type("f16" if quant in LLAMACPP_QUANTS else quant))
    if quant in ("q8_0", "q4_0"):
        import gguf

        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_vocab_size(model.n_vocab)
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(model.hidden)
    writer.add_block_count(model.n_layers)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(model.n_head)
    writer.add_head_count_kv(model.n_head_kv)
    writer.add_layer_norm_rms_eps(float(c.rms_norm_eps))
    writer.add_rope_freq_base(float(rope["rope_theta"]))
    writer.add_rope_dimension_count(model.head_dim)
    if model.head_dim * model.n_head != model.hidden:
        writer.add_key_length(model.head_dim)
        writer.add_value_length(model.head_dim)
    if model.rope_type == "linear":
        import gguf

        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))


def rope_freqs(model: GgufModel) -> np.ndarray | None:
    """llama.cpp's ``rope_freqs`` (per-frequency divisors) for Llama 3.1 scaling, from transformers' own RoPE math."""
    if model.rope_type != "llama3":
        return None
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    theta = float(_rope_parameters(model.config)["rope_theta"])
    dim = model.head_dim
    plain = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](model.config, torch.device("cpu"))
    return (plain / scaled.float()).numpy().astype(np.float32)


# --------------------------------------------------------------------------- tensors


@dataclass
class GgufTensor:
    """One GGUF tensor: its name, ggml type, logical shape and byte size, and how to make it from a job."""

    name: str
    qtype: Any  # gguf.GGMLQuantizationType
    shape: list[int]
    nbytes: int
    permute_heads: int = 0  # >0: permute rows for llama.cpp's RoPE layout with this many heads


def plan_tensors(plan: Plan, model: GgufModel, quant: str) -> dict[int, GgufTensor]:
    """The GGUF tensor for every job (``id(job)`` → tensor); a tied, redundant lm_head is left out.

    Raises:
        ModelError: a source tensor the llama.cpp architecture has no place for.
    """
    import gguf

    arch = next(a for a, name in gguf.MODEL_ARCH_NAMES.items() if name == model.arch)
    names = gguf.get_tensor_name_map(arch, model.n_layers)
    allowed = set(gguf.MODEL_TENSORS[arch]) - {gguf.MODEL_TENSOR.ATTN_ROT_EMBD, gguf.MODEL_TENSOR.ROPE_FREQS}
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    out: dict[int, GgufTensor] = {}
    for job in plan.jobs:
        src = job.src.name
        if src.endswith(_SKIPPED_SOURCE_SUFFIXES) or (tied and src == "lm_head.weight"):
            continue
        found = names.get_type_and_name(src, try_suffixes=(".weight", ".bias"))
        if found is None or found[0] not in allowed or not job.src.dtype.is_floating_point:
            raise ModelError(f"the base checkpoint has a tensor {src!r} that llama.cpp's {model.arch} "
                             "architecture has no place for", "export with --format hf")
        kind, name = found
        qtype = _tensor_type(name, job.src.shape, quant, tied)
        heads = 0
        if model.permute_qk and kind in (gguf.MODEL_TENSOR.ATTN_Q, gguf.MODEL_TENSOR.ATTN_K):
            heads = model.n_head if kind == gguf.MODEL_TENSOR.ATTN_Q else model.n_head_kv
        out[id(job)] = GgufTensor(name, qtype, list(job.src.shape), _nbytes(job.src.shape, qtype), heads)
    return out


def _tensor_type(name: str, shape: list[int], quant: str, tied: bool) -> Any:
    import gguf

    types = _types()
    if len(shape) < 2:
        return types["f32"]
    wanted = types["f16"] if quant in LLAMACPP_QUANTS else types[quant]
    is_output = name == "output.weight" or (tied and name == "token_embd.weight")
    if quant == "q4_0" and is_output:
        wanted = types["q8_0"]
    block = gguf.GGML_QUANT_SIZES[wanted][0]
    return wanted if shape[-1] % block == 0 else types["f16"]


def _nbytes(shape: list[int], qtype: Any) -> int:
    import gguf

    block, size = gguf.GGML_QUANT_SIZES[qtype]
    n = 1
    for d in shape:
        n *= d
    return n // block * size


def permute_for_rope(t: torch.Tensor, n_head: int) -> torch.Tensor:
    """Reorder each head's rows from rotate-half pairs (i, i+d/2) to llama.cpp's interleaved pairs (2i, 2i+1)."""
    rows = t.shape[0]
    head_dim = rows // n_head
    return t.reshape(n_head, 2, head_dim // 2, *t.shape[1:]).transpose(1, 2).reshape(t.shape).contiguous()


def encode_tensor(name: str, t: torch.Tensor, spec: GgufTensor) -> np.ndarray:
    """The bytes of one tensor in its GGUF type (float32 in; quantised in row chunks to bound memory).

    Raises:
        ModelError: a non-finite value in the merged weights or after rounding to 16 bits.
    """
    import gguf

    types = _types()
    if spec.permute_heads:
        t = permute_for_rope(t, spec.permute_heads)
    if spec.qtype == types["f32"]:
        check_finite(name, t)
        return t.float().numpy()
    if spec.qtype in (types["f16"], types["bf16"]):
        half = t.to(torch.float16 if spec.qtype == types["f16"] else torch.bfloat16)
        check_finite(name, half)
        return half.view(torch.int16).numpy() if half.dtype == torch.bfloat16 else half.numpy()
    check_finite(name, t)
    flat = t.float().reshape(-1, t.shape[-1])
    rows = max(1, _ROWS_PER_CHUNK_ELEMENTS // flat.shape[1])
    parts = [gguf.quants.quantize(flat[i:i + rows].numpy(), spec.qtype) for i in range(0, flat.shape[0], rows)]
    return np.concatenate(parts, axis=0)


# --------------------------------------------------------------------------- writing


@dataclass
class GgufInfo:
    """What was written, for the report."""

    file: str
    arch: str
    permuted_qk: bool
    tensor_types: dict[str, int]
    tokenizer_model: str
    tokenizer_pre: str
    notes: list[str]


def write_gguf(path: Path, plan: Plan, ctx: MergeContext, model: GgufModel, vocab: GgufVocab, quant: str,
               name: str, base_name: str | None, show_progress: bool = True) -> tuple[WeightStats, GgufInfo]:
    """Write the merged model to ``path`` as GGUF in ``quant`` (F16 when the quant is a llama.cpp K-quant).

    Raises:
        ModelError: an unmappable tensor or a non-finite merged value.
    """
    import gguf

    specs = plan_tensors(plan, model, quant)
    writer = gguf.GGUFWriter(path, model.arch)
    try:
        write_hparams(writer, model, quant, name, base_name)
        write_vocab(writer, vocab)
        freqs = rope_freqs(model)
        if freqs is not None:
            writer.add_tensor_info("rope_freqs.weight", freqs.shape, freqs.dtype, freqs.nbytes)
        for job in plan.jobs:
            spec = specs.get(id(job))
            if spec is not None:
                writer.add_tensor_info(spec.name, spec.shape, np.dtype(np.float32), spec.nbytes, raw_dtype=spec.qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        if freqs is not None:
            writer.write_tensor_data(freqs)

        def write(job: Job, tensor: torch.Tensor) -> int:
            spec = specs.get(id(job))
            if spec is None:
                return 0
            data = encode_tensor(job.src.name, tensor, spec)
            writer.write_tensor_data(data)
            return data.nbytes

        stats = stream_weights(plan, ctx, write, show_progress, f"merging into {path.name}")
        writer.flush()
        for fh in writer.fout or []:
            os.fsync(fh.fileno())
    finally:
        writer.close()
    counts: dict[str, int] = {}
    for spec in specs.values():
        counts[spec.qtype.name] = counts.get(spec.qtype.name, 0) + 1
    if freqs is not None:
        counts["F32"] = counts.get("F32", 0) + 1
    info = GgufInfo(path.name, model.arch, model.permute_qk, counts, vocab.model, vocab.pre, model.notes)
    return stats, info


def check_quant(quant: str) -> None:
    """Refuse an unknown ``--quant`` value.

    Raises:
        QloraKitError: naming the supported values.
    """
    if quant not in QUANTS:
        raise QloraKitError(f"--quant {quant!r} is not supported", f"use one of {', '.join(QUANTS)}")


def tensor_type_counts(path: Path) -> dict[str, int]:
    """How many tensors of each ggml type a GGUF file holds."""
    import gguf

    counts: dict[str, int] = {}
    for tensor in gguf.GGUFReader(path).tensors:
        counts[tensor.tensor_type.name] = counts.get(tensor.tensor_type.name, 0) + 1
    return counts
