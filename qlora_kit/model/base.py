"""The base model on the training device: dtype, tokenizer, 4-bit NF4 load, and its quantisation spec."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qlora_kit.core.config import ModelConfig
from qlora_kit.core.errors import ModelError, shorten
from qlora_kit.core.logs import info_once
from qlora_kit.model.templates import apply_chat_template_setting
from qlora_kit.ops.precision import native_bf16

log = logging.getLogger("qlora_kit")

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def pick_device() -> torch.device:
    """CUDA device 0 when available, else CPU."""
    return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")


def resolve_compute_dtype(requested: str, device: torch.device) -> torch.dtype:
    """Pick the compute dtype: bf16 on CUDA cards with native bf16, fp16 (loss-scaled) on older ones, fp32 on CPU.

    ``torch.cuda.is_bf16_supported()`` is not used: it also says yes where bf16 is emulated
    (V100, T4), which is slow; compute capability 8.0 (Ampere) is the line.
    """

    if requested != "auto":
        dtype = DTYPES[requested]
        if device.type == "cpu" and dtype != torch.float32:
            log.warning("compute_dtype=%s on CPU is ~6x slower than float32 here; consider 'auto'", requested)
        if device.type == "cuda" and dtype == torch.bfloat16 and not native_bf16(device):
            log.warning("this GPU has no native bfloat16 (compute capability < 8.0): bf16 is emulated and slow; "
                        "'auto' picks float16 with loss scaling")
        return dtype
    if device.type == "cuda":
        if native_bf16(device):
            return torch.bfloat16
        log.info("this GPU has no native bfloat16 (compute capability < 8.0): float16 compute with fp32 adapters "
                 "and dynamic loss scaling")
        return torch.float16
    info_once("CPU run: using float32 compute and adapter dtype (bf16 is ~6x slower on CPU)")
    return torch.float32


def load_tokenizer(source: Path, cfg: ModelConfig, gguf_file: str | None = None):
    """Load the tokenizer (from ``gguf_file`` in ``source`` when given), apply ``model.chat_template`` (a name or
    a Jinja text), and make sure a pad token exists.

    Raises:
        ModelError: the tokenizer cannot be loaded.
        ConfigError: a named chat template whose turn markers this tokenizer lacks.
    """
    from transformers import AutoTokenizer

    try:
        extra = {"gguf_file": gguf_file} if gguf_file else {}
        tok = AutoTokenizer.from_pretrained(source, trust_remote_code=cfg.trust_remote_code, **extra)
    except Exception as exc:  # tokenizer files fail in many ways (missing, damaged JSON, sentencepiece, remote code)
        raise ModelError(f"cannot load the tokenizer from {source}: {type(exc).__name__}: {shorten(str(exc), 200)}",
                         "check its tokenizer files (tokenizer.json, tokenizer_config.json, tokenizer.model) or "
                         "download the model again; a model with its own tokenizer code needs "
                         "model.trust_remote_code: true", key="model.name_or_path") from exc
    apply_chat_template_setting(tok, cfg.chat_template, cfg.name_or_path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.unk_token
        log.info("tokenizer has no pad token: using %r for padding (padding is never trained on)", tok.pad_token)
    return tok


RUN_TOKENIZER_FIX = ("the run's tokenizer/ is damaged: resume the training to rewrite it (`qlora-kit train ... "
                     "--resume`), or restore the run from a backup")


def load_saved_tokenizer(path: Path, trust_remote_code: bool = False, fix: str = RUN_TOKENIZER_FIX):
    """A tokenizer qlora-kit saved (a run's ``tokenizer/``, an export), as-is.

    Raises:
        ModelError: it cannot be loaded (``fix``: what to do).
    """
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as exc:  # tokenizer files fail in many ways
        raise ModelError(f"cannot load the tokenizer in {path}: {type(exc).__name__}: {shorten(str(exc), 200)}",
                         fix) from exc


@dataclass(frozen=True)
class QuantSpec:
    """How the base was quantised; the exporter reproduces exactly this."""

    quant_type: str
    double_quant: bool
    blocksize: int
    compute_dtype: str
    load_dtype: str
    quant_storage: str = "uint8"

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def require_safetensors(source: Path) -> None:
    """Refuse a base whose weights exist only as pickle files, before anything is trained on it.

    Loading a pickle can run code, and the exporter streams safetensors only: training on
    such a base would end in an export that refuses it, hours later.

    Raises:
        ModelError: no ``*.safetensors`` in ``source`` (naming the pickle files found).
    """
    if any(source.glob("*.safetensors")):
        return
    pickles = sorted(p.name for p in source.iterdir() if p.suffix in PICKLE_SUFFIXES)[:3]
    if pickles:
        raise ModelError(
            f"the base {source} has only pickle weights ({', '.join(pickles)}): qlora-kit does not unpickle "
            "model files (loading a pickle can run code) and could not export a run trained on them",
            "convert it once, where you trust the file: AutoModelForCausalLM.from_pretrained(path)"
            ".save_pretrained(new_path, safe_serialization=True); then point model.name_or_path at new_path")
    raise ModelError(f"no safetensors weights found in {source}",
                     "point model.name_or_path at a Hugging Face model directory with *.safetensors files, "
                     "or at a .gguf file")


ATTENTION_FLAGS = {"sdpa": "_supports_sdpa", "flash_attention_2": "_supports_flash_attn"}


def require_attention(source: Path, cfg: ModelConfig) -> None:
    """Refuse ``model.attn_implementation`` when the architecture of ``source`` lacks it (see
    :func:`check_attention`); an unreadable config.json is left to transformers to report."""
    try:
        model_type = json.loads((source / "config.json").read_text()).get("model_type")
    except (OSError, ValueError, AttributeError):
        return
    check_attention(str(model_type), cfg.attn_implementation, str(source))


def check_attention(model_type: str, attn_implementation: str, where: str) -> None:
    """Refuse an attention implementation the ``model_type`` architecture lacks, naming the setting that works.

    A shipped config says ``sdpa``; Gemma-2 (soft-capped attention) has no sdpa path in
    transformers, whose own error is a paragraph ending in Python code. Remote-code models and
    architectures transformers does not map are left to transformers.

    Raises:
        ModelError: the implementation is not available for this architecture.
    """
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    flag = ATTENTION_FLAGS.get(attn_implementation)
    cls = getattr(transformers, str(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type, "")), None)
    if flag is None or cls is None or getattr(cls, flag, True):
        return
    hint = "set model.attn_implementation: eager"
    if attn_implementation != "flash_attention_2" and getattr(cls, ATTENTION_FLAGS["flash_attention_2"], False):
        hint += " (or flash_attention_2 on a CUDA card with the flash-attn package installed)"
    raise ModelError(f"{cls.__name__} ({where}) has no {attn_implementation} attention in transformers "
                     f"{transformers.__version__}", hint, key="model.attn_implementation")


def load_quantized_base(source: Path, cfg: ModelConfig, compute_dtype: torch.dtype, device: torch.device,
                        quant_storage: torch.dtype = torch.uint8) -> nn.Module:
    """Load ``source`` with every linear layer (except lm_head) in bitsandbytes 4-bit.

    Non-quantised layers (embeddings, norms, lm_head) stay in ``compute_dtype``.  All
    parameters are frozen.  ``quant_storage``: the dtype the packed 4-bit values are stored
    in; FSDP can only shard floating-point tensors of one dtype per unit, so FSDP-QLoRA
    stores them in the compute dtype (same values, same bytes: bitsandbytes ``fsdp_qlora``).

    Raises:
        ModelError: pickle-only weights, or transformers cannot load the model.
    """
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    require_safetensors(source)
    require_attention(source, cfg)
    bnb = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=cfg.quant_type,
        bnb_4bit_use_double_quant=cfg.double_quant,
        bnb_4bit_compute_dtype=compute_dtype,
        bnb_4bit_quant_storage=quant_storage,
    )
    try:
        model = AutoModelForCausalLM.from_pretrained(
            source,
            quantization_config=bnb,
            dtype=compute_dtype,
            device_map={"": device},
            attn_implementation=cfg.attn_implementation,
            trust_remote_code=cfg.trust_remote_code,
        )
    except torch.cuda.OutOfMemoryError:
        raise
    except (OSError, ValueError, ImportError) as exc:
        raise ModelError(f"cannot load model from {source}: {exc}") from exc
    for p in model.parameters():
        p.requires_grad_(False)
    disable_cpu_weight_repacking(model)
    return model


def disable_cpu_weight_repacking(model: nn.Module) -> None:
    """Keep one 4-bit layout for training and inference on CPU.

    On CPUs with AVX512-BF16, bitsandbytes repacks a Linear4bit's weight in place the first
    time it runs without gradients (eval) and un-nests the double-quantised absmax; saving
    or training afterwards re-quantises it.  That silently changes the frozen base after
    the first evaluation (measured here: different losses after resume, and eval numerics
    that differ from training).  Turning it off keeps the base bit-identical throughout.
    """
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit) and hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def quant_spec(model: nn.Module, cfg: ModelConfig, compute_dtype: torch.dtype) -> QuantSpec:
    """Read the 4-bit layout actually used by the loaded model."""
    import bitsandbytes as bnb

    layer = next((m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)), None)
    if layer is None:
        raise ModelError("no bitsandbytes 4-bit layer found after loading: quantisation did not happen")
    qs = layer.weight.quant_state
    name = str(compute_dtype).removeprefix("torch.")
    storage = str(layer.weight.dtype).removeprefix("torch.")
    return QuantSpec(cfg.quant_type, cfg.double_quant, int(qs.blocksize), name, name, storage)
