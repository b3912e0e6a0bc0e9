"""Safetensors files as their headers describe them: the one header reader, the tensor index, single tensors.

A safetensors file is an 8-byte little-endian header length, a JSON header (names, dtypes,
shapes, data offsets) and the tensor data.  Everything in qlora-kit that looks at a header
(the base's fingerprint, the adapter's completeness check, the exporter's index) reads it here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import torch

from qlora_kit.core.errors import ModelError

_ST_DTYPES = {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32", torch.float64: "F64",
              torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
              torch.bool: "BOOL"}
_FROM_ST = {v: k for k, v in _ST_DTYPES.items()}
HEADER_MAX = 100 * 1024 * 1024  # safetensors itself refuses JSON headers larger than 100 MB


class HeaderError(ValueError):
    """A file that is not a complete safetensors file; the message completes "<file name> ..."."""


@dataclass
class Header:
    """A parsed header: its entries (``__metadata__`` included) and the bytes it takes and describes."""

    entries: dict[str, Any]
    header_bytes: int  # 8 + the JSON header's length
    data_bytes: int  # end of the last tensor's data, from the offsets


def read_header_bytes(fh: BinaryIO) -> bytes:
    """The raw header (length prefix + JSON, at most :data:`HEADER_MAX` bytes of it) from the start of ``fh``.

    Never parses or validates: what it returns is what the file holds (possibly truncated).
    """
    head = fh.read(8)
    length = int.from_bytes(head, "little") if len(head) == 8 else 0
    return head + fh.read(min(length, HEADER_MAX))


def read_header(path: Path) -> Header:
    """Parse the header of ``path``.

    Raises:
        FileNotFoundError: no such file.
        HeaderError: truncated, not JSON, or with malformed data offsets.
    """
    size = path.stat().st_size
    try:
        with open(path, "rb") as fh:
            raw = read_header_bytes(fh)
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise HeaderError("is not a readable safetensors file") from exc
    length = int.from_bytes(raw[:8], "little") if len(raw) >= 8 else 0
    if length <= 0 or 8 + length > size or len(raw) != 8 + length:
        raise HeaderError("is truncated")
    try:
        entries = json.loads(raw[8:])
        end = max((int(v["data_offsets"][1]) for k, v in entries.items() if k != "__metadata__"), default=0)
    except (ValueError, KeyError, TypeError, IndexError, AttributeError) as exc:
        raise HeaderError("is not a readable safetensors file") from exc
    return Header(entries, 8 + length, end)


def check_complete(path: Path) -> None:
    """Refuse a safetensors file whose size differs from what its header describes (an interrupted write or copy).

    Raises:
        FileNotFoundError: no such file.
        HeaderError: truncated, unreadable, or of another size than its header says.
    """
    header = read_header(path)
    size, expected = path.stat().st_size, header.header_bytes + header.data_bytes
    if size != expected:
        raise HeaderError(f"has {size} bytes, its header describes {expected} (truncated?)")


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
        for name, entry in _header_entries(path).items():
            if name == "__metadata__":
                continue
            if entry["dtype"] not in _FROM_ST:
                raise ModelError(f"{path.name}: tensor {name} has unsupported dtype {entry['dtype']}")
            tensors.append(SourceTensor(name, path, _FROM_ST[entry["dtype"]], list(entry["shape"])))
    return tensors


def _header_entries(path: Path) -> dict[str, Any]:
    try:
        return read_header(path).entries
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot read the safetensors header of {path}: {exc}") from exc


def read_tensor(src: SourceTensor) -> torch.Tensor:
    """One tensor from its file, mapped only while the tensor lives, so other tensors' pages never pile up in RSS."""
    from safetensors import safe_open

    with safe_open(str(src.file), framework="pt") as fh:
        return fh.get_tensor(src.name)
