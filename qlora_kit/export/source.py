"""Which modules of the base training quantised, replayed on a weightless (meta) model.

Nothing here reads tensor data: the safetensors headers (``core.safetensors``) give every
tensor's name, dtype and shape, and a meta model replays transformers' bitsandbytes module
selection.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from qlora_kit.core.errors import ModelError


def refuse_prequantised(source: Path) -> None:
    """Raise when the base checkpoint is itself quantised (GPTQ, AWQ, bitsandbytes...).

    Raises:
        ModelError: ``config.json`` has a ``quantization_config``.
    """
    config = json.loads((source / "config.json").read_text())
    if config.get("quantization_config"):
        method = config["quantization_config"].get("quant_method", "?")
        raise ModelError(f"the base {source} is already quantised ({method}): there are no 16-bit weights to "
                         "merge into",
                         "train from the 16-bit release of this model to get an exportable run")


@dataclass
class Layout:
    """Which modules the training loader quantised, which weights are tied, which stay float32."""

    quantised: set[str]
    tied: set[str]
    keep_fp32: set[str]


def model_layout(source: Path, quant: dict[str, Any], trust_remote_code: bool = False) -> Layout:
    """Replay transformers' bitsandbytes module selection on a weightless (meta) model.

    Raises:
        ModelError: the config cannot be read or the architecture cannot be built.
    """
    import bitsandbytes as bnb
    from transformers import AutoConfig, AutoModelForCausalLM, BitsAndBytesConfig
    from transformers.integrations import replace_with_bnb_linear
    from transformers.quantizers.base import HfQuantizer

    try:
        config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelError(f"cannot build the architecture of {source}: {exc}") from exc
    keep = set(getattr(model, "_keep_in_fp32_modules", None) or [])
    tied = dict(getattr(model, "all_tied_weights_keys", None) or {})
    skip = HfQuantizer.get_modules_to_not_convert(model, None, list(keep))
    bnb_cfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant["quant_type"],
                                 bnb_4bit_use_double_quant=bool(quant["double_quant"]))
    model = replace_with_bnb_linear(model, modules_to_not_convert=skip, quantization_config=bnb_cfg)
    quantised = {name for name, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    return Layout(quantised, set(tied) | set(tied.values()), keep)
