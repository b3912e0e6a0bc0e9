"""The residual NF4 base of a base-changing init, saved once in the run directory.

PiSSA, OLoRA, LoRA-GA and multi-step LoftQ train against NF4(W - scale * B0 @ A0), not against
NF4(W).  Rebuilding that from a recipe would mean re-running an SVD/QR (or a gradient estimate
on data) and re-quantising, which different devices and BLAS libraries round differently, so
the exact 4-bit tensors are stored instead: ``OUTPUT_DIR/base_residual.safetensors`` holds, for
every changed module, the packed 4-bit weight and its bitsandbytes quant state in the format
transformers uses for 4-bit checkpoints (``<module>.weight``, ``<module>.weight.absmax``, ...).

It is written once, before the first training step, and never changes; its sha256 is in
``manifest.json`` (``lora.residual_base``) and is checked whenever the run is loaded again
(training resume, generate, export, verification).  Modules not listed keep the NF4 weights the
loader makes from the source checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qlora_kit.core.errors import ModelError
from qlora_kit.core.files import atomic_file, file_sha256

RESIDUAL_FILE = "base_residual.safetensors"
_FORMAT = "qlora-kit residual nf4 base v1"


def save_residual(layers: dict[str, nn.Module], modules: list[str], path: Path) -> dict[str, Any]:
    """Write the 4-bit weights of ``modules`` (``layers``: HF module name → peft LoRA layer) atomically.

    Returns the manifest entry (file, sha256, module count, bytes).
    """
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    for name in modules:
        weight = layers[name].get_base_layer().weight
        tensors[f"{name}.weight"] = weight.data.detach().cpu().contiguous()
        for key, value in weight.quant_state.as_dict(packed=True).items():
            tensors[f"{name}.weight.{key}"] = value.detach().cpu().contiguous()
    with atomic_file(path) as tmp:
        save_file(tensors, str(tmp), metadata={"format": _FORMAT, "modules": json.dumps(modules)})
    return {"file": path.name, "sha256": file_sha256(path), "modules": len(modules), "bytes": path.stat().st_size}


def check_residual(run_dir: Path, entry: dict[str, Any] | None) -> Path | None:
    """The run's residual file, verified against its manifest entry; None when the run has none.

    Raises:
        ModelError: the manifest names a residual base that is missing or changed.
    """
    if not entry:
        return None
    path = Path(run_dir) / entry["file"]
    if not path.is_file():
        raise ModelError(f"{path} is missing: this run's adapter was trained against a re-quantised residual base "
                         "stored there, and cannot be used without it", "restore the file from the run directory")
    if file_sha256(path) != entry["sha256"]:
        raise ModelError(f"{path} does not match the sha256 recorded in manifest.json: the residual base changed "
                         "since training", "restore the original file")
    return path


def residual_modules(path: Path) -> list[str]:
    """HF module names whose base weight the residual file replaces."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        meta = fh.metadata() or {}
    if meta.get("format") != _FORMAT:
        raise ModelError(f"{path} is not a qlora-kit residual base file")
    return json.loads(meta["modules"])


def _module_tensors(fh: Any, name: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    prefix = f"{name}.weight."
    stats = {k[len(prefix):]: fh.get_tensor(k) for k in fh.keys() if k.startswith(prefix)}
    return fh.get_tensor(f"{name}.weight"), stats


def load_residual(model: nn.Module, path: Path) -> list[str]:
    """Put the stored 4-bit weights into a bare (not yet peft-wrapped) quantised model, in place; return the modules.

    Raises:
        ModelError: a stored module is not a 4-bit layer of this model, or has another shape.
    """
    import bitsandbytes as bnb
    from safetensors import safe_open

    modules = residual_modules(path)
    with safe_open(str(path), framework="pt") as fh:
        for name in modules:
            try:
                layer = model.get_submodule(name)
            except AttributeError as exc:
                raise ModelError(f"{path.name} holds {name}, which this model does not have") from exc
            if not isinstance(layer, bnb.nn.Linear4bit):
                raise ModelError(f"{path.name} holds {name}, which is not a 4-bit layer of this model")
            data, stats = _module_tensors(fh, name)
            if data.shape != layer.weight.shape:
                raise ModelError(f"{path.name}: {name} has shape {tuple(data.shape)}, the model's layer "
                                 f"{tuple(layer.weight.shape)}")
            device = layer.weight.device
            layer.weight = bnb.nn.Params4bit.from_prequantized(data, stats, requires_grad=False, device=device,
                                                               module=layer)
    return modules


def residual_weight(path: Path, module: str, device: torch.device) -> torch.Tensor:
    """The float32 weight the trained model computed with for ``module`` (stored NF4, dequantised)."""
    import bitsandbytes.functional as bnbf
    from bitsandbytes.functional import QuantState
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        data, stats = _module_tensors(fh, module)
    state = QuantState.from_dict(qs_dict=stats, device=device)
    return bnbf.dequantize_4bit(data.to(device), state).float()
