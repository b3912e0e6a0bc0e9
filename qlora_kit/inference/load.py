"""A model ready to generate: a run (NF4 base + adapter), an export, or a GGUF file."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qlora_kit.core.config import load_config
from qlora_kit.core.errors import ModelError, shorten
from qlora_kit.inference.chat import eos_token_ids
from qlora_kit.model.base import DTYPES, load_quantized_base, load_saved_tokenizer, pick_device
from qlora_kit.model.fingerprint import run_base
from qlora_kit.model.sources import convert_gguf, gguf_path
from qlora_kit.model.weights import require_loadable_weights
from qlora_kit.ops.packing import restore_attention
from qlora_kit.rundir import finished
from qlora_kit.rundir import layout as rundir
from qlora_kit.rundir import lock as runlock
from qlora_kit.rundir.residual import load_residual_base


def set_inference_mode(model: nn.Module) -> None:
    """eval(), no gradient checkpointing, KV cache on, stock attention: generating in train mode is wrong and slow.

    Training swaps sdpa for qlora-kit's packed attention (``ops.packing``), which takes no
    mask; generation needs transformers' own (left padding, KV cache).
    """

    model.eval()
    restore_attention(model)
    if getattr(model, "is_gradient_checkpointing", False):
        model.gradient_checkpointing_disable()
    for m in (model, getattr(model, "base_model", None), getattr(model, "model", None)):
        if m is not None and getattr(m, "config", None) is not None:
            m.config.use_cache = True


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

    run = Path(run_dir)
    manifest = finished.require_finished_run(run)
    cfg, _ = load_config(run / rundir.CONFIG)
    device = device or pick_device()
    source = run_base(run, manifest, cfg)
    if compute_dtype is None:
        stored = str((manifest.get("quant") or {}).get("compute_dtype"))
        compute_dtype = DTYPES.get(stored, torch.bfloat16) if device.type == "cuda" else torch.float32
    require_loadable_weights(source, cfg.model.trust_remote_code)
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


@dataclass
class Loaded:
    """A model ready to generate, with its tokenizer and stop tokens."""

    model: Any
    tokenizer: Any
    eos_ids: list[int]
    kind: str  # "run" (NF4 + adapter) or "export" (plain checkpoint)
    info: dict[str, Any] = field(default_factory=dict)


def load_for_generation(path: str | Path, device: torch.device | None = None) -> Loaded:
    """Load a run directory (NF4 + adapter), an exported/plain HF model directory, or a ``.gguf`` file.

    A GGUF file (or ``smollm2-demo``, the demo's) is converted once into the cached HF
    checkpoint that configs use (``model.convert_gguf``) and loaded from there.

    Raises:
        ModelError: ``path`` is none of these, or the run is damaged.
        RunInUseError: a training run is writing ``path``.
    """

    p = Path(path)
    if not p.exists():
        p = gguf_path(str(path)) or p  # smollm2-demo: the demo model's GGUF file
    if not p.exists():
        raise ModelError(f"{p} does not exist",
                         "pass a run directory (output_dir of `qlora-kit train`), an export, or a .gguf file")
    if p.is_file() and p.suffix.lower() == ".gguf":
        return _load_export(convert_gguf(p), device)
    if p.is_dir() and rundir.is_run_dir(p):
        with runlock.shared(p, "generate"):  # not while a training run writes it
            return _load_run(p, device)
    if p.is_dir() and (p / "config.json").is_file():
        return _load_export(p, device)
    raise ModelError(
        f"{p} is neither a qlora-kit run directory, a model directory nor a .gguf file "
        "(no manifest.json/config.yaml, no config.json)",
        "pass the output_dir of `qlora-kit train`, a directory written by `qlora-kit export`, or a .gguf file",
    )


def _load_run(run: Path, device: torch.device | None) -> Loaded:
    model, tokenizer, manifest = load_run_for_inference(run, device=device)
    base_eos = getattr(model.generation_config, "eos_token_id", None)
    return Loaded(model, tokenizer, eos_token_ids(tokenizer, base_eos), "run", {"manifest": manifest})


def _load_export(path: Path, device: torch.device | None) -> Loaded:
    from transformers import AutoModelForCausalLM

    device = device or pick_device()
    dtype = inference_dtype(path, device)
    fix = "export the run again (`qlora-kit export RUN --out DIR --overwrite`), or restore it from a backup"
    tokenizer = load_saved_tokenizer(path, fix=fix)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, device_map={"": device})
    except (OSError, ValueError, RuntimeError) as exc:
        raise ModelError(f"cannot load the model in {path}: {shorten(str(exc), 200)}", fix) from exc
    set_inference_mode(model)
    base_eos = getattr(model.generation_config, "eos_token_id", None)
    return Loaded(model, tokenizer, eos_token_ids(tokenizer, base_eos), "export", {"dtype": str(dtype)})


def inference_dtype(path: Path, device: torch.device) -> torch.dtype | str:
    """Stored dtype on GPU; float32 on CPU when it fits in half the free RAM (16-bit matmuls are slow there)."""
    if device.type != "cpu":
        return "auto"
    import psutil

    weights = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    stored = _stored_dtype(path)
    upcast = weights * (2 if stored in ("float16", "bfloat16") else 1)
    if upcast < psutil.virtual_memory().available / 2:
        return torch.float32
    return "auto"


def _stored_dtype(path: Path) -> str | None:
    try:
        cfg = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return None
    return cfg.get("dtype") or cfg.get("torch_dtype")
