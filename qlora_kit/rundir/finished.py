"""A finished run, as export, generate and verification read it: manifest, config, adapter, base."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qlora_kit.core.config import load_config
from qlora_kit.core.errors import ModelError
from qlora_kit.core.safetensors import HeaderError, check_complete
from qlora_kit.model.fingerprint import run_base
from qlora_kit.model.weights import require_loadable_weights
from qlora_kit.rundir.integrity import CorruptCheckpoint, verify_files
from qlora_kit.rundir.layout import ADAPTER, ADAPTER_FILES, CONFIG, MANIFEST, TOKENIZER
from qlora_kit.rundir.manifest import manifest_damage

log = logging.getLogger("qlora_kit")


_MANIFEST_FIX = "restore it from a backup, or finish the run again with `qlora-kit train ... --resume`"


def read_manifest(run: Path) -> dict[str, Any]:
    """``manifest.json`` of a run as a dict.

    Raises:
        ModelError: it is missing, not JSON, or not an object.
    """

    path = run / MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ModelError(f"{run} is not a finished qlora-kit run: {MANIFEST} is missing",
                         "pass the output_dir of a completed `qlora-kit train`") from exc
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ModelError(f"{path} is damaged (not readable JSON)", _MANIFEST_FIX) from exc
    problem = manifest_damage(manifest)
    if problem is not None:
        raise ModelError(f"{path} is damaged ({problem})", _MANIFEST_FIX)
    return manifest


def require_finished_run(run: Path) -> dict[str, Any]:
    """Check that ``run`` holds a completed training run and that its adapter is intact; return the manifest.

    The adapter files are checked against the sizes and sha256 the manifest recorded when
    training published them (runs from before that record: the safetensors header is parsed).

    Raises:
        ModelError: the directory is missing or incomplete (naming the first missing file), the
            manifest is damaged, or the adapter is truncated or changed.
    """

    hint = "pass the output_dir of a completed `qlora-kit train`"
    if not run.is_dir():
        raise ModelError(f"run directory {run} does not exist", hint)
    for path in (run / MANIFEST, run / CONFIG, run / ADAPTER / "adapter_config.json", run / TOKENIZER):
        if not path.exists():
            raise ModelError(f"{run} is not a finished qlora-kit run: {path.relative_to(run)} is missing", hint)
    manifest = read_manifest(run)
    check_adapter(run / ADAPTER, manifest.get(ADAPTER_FILES))
    return manifest


def check_adapter(adapter: Path, files: Any) -> None:
    """Verify the adapter against the manifest's file list, or at least parse its safetensors header.

    Raises:
        ModelError: missing, truncated or changed adapter files.
    """

    fix = ("resume training to rewrite it (`qlora-kit train ... --resume` republishes the adapter of the last "
           "checkpoint), or restore the run from a backup")
    try:
        if isinstance(files, dict) and files:
            verify_files(adapter, files)
        else:
            _check_safetensors(adapter / "adapter_model.safetensors")
    except CorruptCheckpoint as exc:
        raise ModelError(f"the adapter in {adapter} is damaged: {exc}", fix) from exc


def _check_safetensors(path: Path) -> None:
    try:
        check_complete(path)
    except FileNotFoundError as exc:
        raise CorruptCheckpoint(f"{path.name} is missing") from exc
    except HeaderError as exc:
        raise CorruptCheckpoint(f"{path.name} {exc}") from exc


@dataclass
class RunInfo:
    """What export and verification need from a finished run directory."""

    run_dir: Path
    manifest: dict[str, Any]
    config: Any  # qlora_kit.config.Config
    source_dir: Path
    quant: dict[str, Any]


def read_run(run_dir: str | Path) -> RunInfo:
    """Read manifest, config and base source of a finished run.

    Raises:
        ModelError: the directory is not a finished qlora-kit run, or its base cannot be found.
    """

    run = Path(run_dir)
    manifest = require_finished_run(run)
    if manifest.get("status") not in (None, "completed"):
        log.warning("run status is %r, not 'completed': exporting the adapter it saved last", manifest.get("status"))
    cfg, _ = load_config(run / CONFIG)
    source = run_base(run, manifest, cfg)
    require_loadable_weights(source, cfg.model.trust_remote_code)
    quant = manifest.get("quant") or {}
    for key in ("quant_type", "double_quant", "blocksize", "load_dtype"):
        if key not in quant:
            raise ModelError(f"{run / MANIFEST} has no quant.{key}: cannot reproduce the NF4 base",
                             "the run was written by an older qlora-kit; add the quant section from its training log")
    return RunInfo(run, manifest, cfg, source, quant)
