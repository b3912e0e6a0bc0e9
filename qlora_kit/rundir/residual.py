"""A run's residual NF4 base (base-changing inits), found through its manifest and loaded onto the base."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from qlora_kit.core.errors import ModelError
from qlora_kit.rundir import layout as rundir
from qlora_kit.variants.residual import check_residual, load_residual


def load_residual_base(base: nn.Module, run_dir: Path, manifest: dict[str, Any]) -> list[str]:
    """Put a base-changing init's stored residual NF4 weights into ``base`` (a bare 4-bit model); return the modules.

    This is what plain peft needs too: ``PeftModel.from_pretrained`` onto this base is the trained model.

    Raises:
        ModelError: the manifest names a residual file that is missing or changed.
    """

    lora = manifest.get("lora") or {}
    variant = lora.get("variant") or {}
    if variant.get("changes_base") and not lora.get("residual_base"):
        raise ModelError(f"lora.init={variant.get('init')} trained against a re-quantised residual base, but "
                         f"{Path(run_dir) / rundir.MANIFEST} names no residual base file",
                         "the run directory is incomplete: restore its manifest.json and base_residual.safetensors")
    path = check_residual(run_dir, lora.get("residual_base"))
    return load_residual(base, path) if path is not None else []
