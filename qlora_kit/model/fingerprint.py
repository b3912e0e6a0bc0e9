"""The base a run was trained on: a cheap fingerprint of its weights, checked before it is used again.

An adapter is only right on the exact weights it was trained against. A base directory that
was replaced after training (another revision in the hub cache, the instruct model where the
base model was, a re-download) loads without complaint, and the export's verification cannot
see it: it compares the merged model with adapter + *the same* new base. So training records
a fingerprint of every ``*.safetensors`` file of the base, and resume, generate and export
refuse a base whose fingerprint differs.

The fingerprint of a file is its size and the sha256 of its safetensors header (names, dtypes,
shapes, offsets) plus :data:`SAMPLES` blocks of :data:`BLOCK` bytes spread evenly over the
file: a few MiB read per file, instead of hashing gigabytes, and any other model of the same
shape (a fine-tune changes essentially every weight) differs in the sampled blocks.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from qlora_kit.core.errors import ModelError
from qlora_kit.core.safetensors import HeaderError, check_complete, read_header_bytes
from qlora_kit.model.sources import resolve_source

SAMPLES = 64
BLOCK = 64 * 1024


def fingerprint(source: Path) -> dict[str, dict[str, Any]]:
    """``{file name: {"size": bytes, "sampled_sha256": hex}}`` for every ``*.safetensors`` file of ``source``."""
    return {p.name: {"size": p.stat().st_size, "sampled_sha256": _sampled_sha256(p)}
            for p in sorted(source.glob("*.safetensors"))}


def _sampled_sha256(path: Path) -> str:
    size = path.stat().st_size
    digest = hashlib.sha256()
    with path.open("rb") as f:
        digest.update(read_header_bytes(f))
        start = f.tell()
        span = max(size - start - BLOCK, 0)
        for i in range(SAMPLES):
            f.seek(start + span * i // max(SAMPLES - 1, 1))
            digest.update(f.read(BLOCK))
    return digest.hexdigest()


def check_base(source: Path, recorded: Any, run: Path, current: dict[str, Any] | None = None,
               fix: str | None = None) -> None:
    """Refuse ``source`` unless its fingerprint (``current`` when already taken) equals the one ``run``
    recorded (runs without one pass).

    Raises:
        ModelError: a weight file is missing, added, or differs in size or sampled content.
    """
    if not isinstance(recorded, dict) or not recorded:
        return
    current = fingerprint(source) if current is None else current
    if current == recorded:
        return
    missing = sorted(set(recorded) - set(current))
    added = sorted(set(current) - set(recorded))
    changed = sorted(n for n in set(recorded) & set(current) if recorded[n] != current[n])
    what = (f"{missing[0]} is missing" if missing else f"{changed[0]} differs" if changed
            else f"it has the new file {added[0]}")
    if changed:
        try:
            check_complete(source / changed[0])
        except (OSError, HeaderError) as exc:  # say why it differs: a short file is an interrupted download or copy
            what = f"{changed[0]} {exc}"
    raise ModelError(
        f"the base model at {source} is not the one {run} was trained on ({what}): the adapter would be applied "
        "to other weights",
        fix or f"restore the base the run was trained on at {source}, or point model.name_or_path in "
        f"{run}/config.yaml at a copy of it (checked against the fingerprint in manifest.json)",
        key="model.name_or_path")


def run_base(run: Path, manifest: dict[str, Any], cfg: Any) -> Path:
    """The base model directory of the finished ``run``, checked against its fingerprint.

    The directory training used (``manifest.base.source_dir``) when it still holds those weights;
    else what the run's ``config.yaml`` names (``model.name_or_path``, so a moved base can be
    pointed at), which must hold them.

    Raises:
        ModelError: neither is there, or the base found is not the one the run was trained on.
    """

    base = manifest.get("base") or {}
    recorded = base.get("fingerprint")
    trained_at = Path(str(base.get("source_dir") or "")) if base.get("source_dir") else None
    there = trained_at is not None and (trained_at / "config.json").is_file()
    if there and (not isinstance(recorded, dict) or fingerprint(trained_at) == recorded):
        return trained_at
    try:
        source = resolve_source(cfg.model)
    except ModelError as exc:
        if there:
            check_base(trained_at, recorded, run)
        raise ModelError(f"the base model of {run} is not where it was: {exc.message}",
                         f"restore it at {trained_at or cfg.model.name_or_path}, or point model.name_or_path in "
                         f"{run}/config.yaml at a copy", key="model.name_or_path") from exc
    check_base(source, recorded, run)
    return source
