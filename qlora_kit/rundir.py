"""Layout of a run directory (``output_dir``): one place that names every file.

    output_dir/
      config.yaml          resolved config, each value annotated with its origin
      manifest.json        versions, device, quantisation spec, base source, data hashes, times, status
      data_summary.json    rows, tokens, truncated rows, rows without trainable tokens, bad rows
      heldout.jsonl        held-out prompts + reference answers (validation rows), for eval/export checks
      tokenizer/           tokenizer files with the training chat template
      adapter/             adapter_model.safetensors + adapter_config.json (final)
      metrics.jsonl        one JSON object per logged step / eval
      train.log            every log line of every `qlora-kit train` of this run (appended on resume)
      loss.png             loss curve
      checkpoint-<step>/   resumable state (see checkpoint.py); only complete ones are ever renamed here
      base_residual.safetensors  base-changing lora.init only: the re-quantised NF4 weights the adapter
                           trains against (qlora_kit/variants/residual.py); never changes after setup
      checkpoint-<step>.corrupt/  a checkpoint that did not verify on resume, kept for inspection

    ../.<output_dir name>.lock    the run's lock file (runlock.py), beside the directory
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger("qlora_kit")

CONFIG = "config.yaml"
MANIFEST = "manifest.json"
ADAPTER_FILES = "adapter_files"  # manifest key: {file: {size, sha256}} of adapter/, written when it is published
DATA_SUMMARY = "data_summary.json"
HELDOUT = "heldout.jsonl"
TOKENIZER = "tokenizer"
ADAPTER = "adapter"
METRICS = "metrics.jsonl"
TRAIN_LOG = "train.log"
LOSS_PLOT = "loss.png"
CHECKPOINT_PREFIX = "checkpoint-"

# Files whose presence marks a directory as a qlora-kit run.
RUN_MARKERS = (CONFIG, MANIFEST)


def is_run_dir(path: Path) -> bool:
    """True when ``path`` holds a qlora-kit run (finished or not)."""
    return any((path / name).exists() for name in RUN_MARKERS)


_MANIFEST_FIX = "restore it from a backup, or finish the run again with `qlora-kit train ... --resume`"


def read_manifest(run: Path) -> dict[str, Any]:
    """``manifest.json`` of a run as a dict.

    Raises:
        ModelError: it is missing, not JSON, or not an object.
    """
    from qlora_kit.errors import ModelError

    path = run / MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ModelError(f"{run} is not a finished qlora-kit run: {MANIFEST} is missing",
                         "pass the output_dir of a completed `qlora-kit train`") from exc
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ModelError(f"{path} is damaged (not readable JSON)", _MANIFEST_FIX) from exc
    if not isinstance(manifest, dict):
        raise ModelError(f"{path} is damaged (a JSON {type(manifest).__name__}, not an object)", _MANIFEST_FIX)
    return manifest


def require_finished_run(run: Path) -> dict[str, Any]:
    """Check that ``run`` holds a completed training run and that its adapter is intact; return the manifest.

    The adapter files are checked against the sizes and sha256 the manifest recorded when
    training published them (runs from before that record: the safetensors header is parsed).

    Raises:
        ModelError: the directory is missing or incomplete (naming the first missing file), the
            manifest is damaged, or the adapter is truncated or changed.
    """
    from qlora_kit.errors import ModelError

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
    from qlora_kit.checkpoint import CorruptCheckpoint, verify_files
    from qlora_kit.errors import ModelError

    fix = ("resume training to rewrite it (`qlora-kit train ... --resume` republishes the adapter of the last "
           "checkpoint), or restore the run from a backup")
    try:
        if isinstance(files, dict) and files:
            verify_files(adapter, files)
        else:
            _parse_safetensors_header(adapter / "adapter_model.safetensors")
    except CorruptCheckpoint as exc:
        raise ModelError(f"the adapter in {adapter} is damaged: {exc}", fix) from exc


def _parse_safetensors_header(path: Path) -> None:
    from qlora_kit.checkpoint import CorruptCheckpoint

    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            if n <= 0 or 8 + n > size:
                raise CorruptCheckpoint(f"{path.name} is truncated")
            header = json.loads(fh.read(n))
        end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    except FileNotFoundError as exc:
        raise CorruptCheckpoint(f"{path.name} is missing") from exc
    except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError) as exc:
        raise CorruptCheckpoint(f"{path.name} is not a readable safetensors file") from exc
    if 8 + n + end != size:
        raise CorruptCheckpoint(f"{path.name} has {size} bytes, its header describes {8 + n + end} (truncated?)")


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
    from qlora_kit.basecheck import run_base
    from qlora_kit.config import load_config
    from qlora_kit.errors import ModelError

    run = Path(run_dir)
    manifest = require_finished_run(run)
    if manifest.get("status") not in (None, "completed"):
        log.warning("run status is %r, not 'completed': exporting the adapter it saved last", manifest.get("status"))
    cfg, _ = load_config(run / CONFIG)
    source = run_base(run, manifest, cfg)
    quant = manifest.get("quant") or {}
    for key in ("quant_type", "double_quant", "blocksize", "load_dtype"):
        if key not in quant:
            raise ModelError(f"{run / MANIFEST} has no quant.{key}: cannot reproduce the NF4 base",
                             "the run was written by an older qlora-kit; add the quant section from its training log")
    return RunInfo(run, manifest, cfg, source, quant)
