"""Files recorded with their sizes and sha256, and checked against that record."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from qlora_kit.core.files import file_sha256


class CorruptCheckpoint(Exception):
    """A checkpoint that does not verify, parse or fit: the message says what is wrong with it."""


def file_hashes(directory: Path) -> dict[str, dict[str, Any]]:
    """``{relative path: {"size": bytes, "sha256": hex}}`` for every file below ``directory``."""
    found = {}
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        found[path.relative_to(directory).as_posix()] = {"size": path.stat().st_size, "sha256": file_sha256(path)}
    return found


def verify_files(directory: Path, files: dict[str, Any]) -> None:
    """Check that every file listed by :func:`file_hashes` is there with its size and sha256.

    Raises:
        CorruptCheckpoint: naming the first file that is missing, truncated or changed.
    """
    for name, entry in files.items():
        file = directory / name
        if not isinstance(entry, dict) or not file.is_file():
            raise CorruptCheckpoint(f"{name} is missing")
        size = file.stat().st_size
        if size != entry.get("size"):
            raise CorruptCheckpoint(f"{name} has {size} bytes, {entry.get('size')} were written (truncated?)")
        if file_sha256(file) != entry.get("sha256"):
            raise CorruptCheckpoint(f"{name} does not match its sha256 (changed on disk)")
