"""The base checkpoint as the exporter sees it: safetensors headers, and which modules training quantised.

Nothing here reads tensor data: the file headers give every tensor's name, dtype and shape,
and a weightless (meta) model replays transformers' bitsandbytes module selection.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from qlora_kit.errors import ModelError

_ST_DTYPES = {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32", torch.float64: "F64",
              torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
              torch.bool: "BOOL"}
_FROM_ST = {v: k for k, v in _ST_DTYPES.items()}


def safetensors_dtype(dtype: torch.dtype) -> str:
    """The safetensors header name of a torch dtype (``F16``, ``BF16``, ...)."""
    return _ST_DTYPES[dtype]


def source_files(source: Path) -> list[Path]:
    """Safetensors files of the base checkpoint, in index order.

    Raises:
        ModelError: no safetensors weights (pickle ``.bin`` checkpoints are refused).
    """
    index = source / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [source / name for name in dict.fromkeys(weight_map.values())]
    if (source / "model.safetensors").is_file():
        return [source / "model.safetensors"]
    found = sorted(source.glob("*.safetensors"))
    if found:
        return found
    if list(source.glob("*.bin")):
        raise ModelError(f"{source} holds only pickle .bin weights, which the streaming exporter does not unpickle",
                         "convert the base to safetensors once (load it and save_pretrained(safe_serialization=True))")
    raise ModelError(f"no safetensors weights found in {source}")


@dataclass
class SourceTensor:
    """One tensor of the base checkpoint, known from its file header only."""

    name: str
    file: Path
    dtype: torch.dtype
    shape: list[int]

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


def read_source_index(files: list[Path]) -> list[SourceTensor]:
    """Names, dtypes and shapes of every source tensor, from the safetensors headers (no data read).

    Raises:
        ModelError: an unreadable header or an unsupported dtype.
    """
    tensors = []
    for path in files:
        header = _read_header(path)
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            if entry["dtype"] not in _FROM_ST:
                raise ModelError(f"{path.name}: tensor {name} has unsupported dtype {entry['dtype']}")
            tensors.append(SourceTensor(name, path, _FROM_ST[entry["dtype"]], list(entry["shape"])))
    return tensors


def _read_header(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as fh:
            size = int.from_bytes(fh.read(8), "little")
            return json.loads(fh.read(size))
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot read the safetensors header of {path}: {exc}") from exc


def read_tensor(src: SourceTensor) -> torch.Tensor:
    """One tensor from its file, mapped only while the tensor lives, so other tensors' pages never pile up in RSS."""
    from safetensors import safe_open

    with safe_open(str(src.file), framework="pt") as fh:
        return fh.get_tensor(src.name)


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
    from transformers import AutoConfig, AutoModelForCausalLM, BitsAndBytesConfig
    from transformers.integrations import replace_with_bnb_linear
    from transformers.quantizers.base import HfQuantizer

    import bitsandbytes as bnb

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
