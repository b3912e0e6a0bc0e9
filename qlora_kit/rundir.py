"""Layout of a run directory (``output_dir``): one place that names every file.

    output_dir/
      config.yaml          resolved config, each value annotated with its origin
      manifest.json        versions, device, quantisation spec, base source, data hashes, times, status
      data_summary.json    rows, tokens, truncated rows, rows without trainable tokens, bad rows
      heldout.jsonl        held-out prompts + reference answers (validation rows), for eval/export checks
      tokenizer/           tokenizer files with the training chat template
      adapter/             adapter_model.safetensors + adapter_config.json (final)
      metrics.jsonl        one JSON object per logged step / eval
      loss.png             loss curve
      checkpoint-<step>/   resumable state (see checkpoint.py); only complete ones are ever renamed here
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
DATA_SUMMARY = "data_summary.json"
HELDOUT = "heldout.jsonl"
TOKENIZER = "tokenizer"
ADAPTER = "adapter"
METRICS = "metrics.jsonl"
LOSS_PLOT = "loss.png"
CHECKPOINT_PREFIX = "checkpoint-"

# Files whose presence marks a directory as a qlora-kit run.
RUN_MARKERS = (CONFIG, MANIFEST)


def is_run_dir(path: Path) -> bool:
    """True when ``path`` holds a qlora-kit run (finished or not)."""
    return any((path / name).exists() for name in RUN_MARKERS)


def require_finished_run(run: Path) -> None:
    """Check that ``run`` holds a completed training run (adapter, tokenizer, config, manifest).

    Raises:
        ModelError: the directory is missing or incomplete (naming the first missing file).
    """
    from qlora_kit.errors import ModelError

    hint = "pass the output_dir of a completed `qlora-kit train`"
    if not run.is_dir():
        raise ModelError(f"run directory {run} does not exist", hint)
    for path in (run / MANIFEST, run / CONFIG, run / ADAPTER / "adapter_config.json", run / TOKENIZER):
        if not path.exists():
            raise ModelError(f"{run} is not a finished qlora-kit run: {path.relative_to(run)} is missing", hint)


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
    from qlora_kit.config import load_config
    from qlora_kit.errors import ModelError
    from qlora_kit.model import resolve_source

    run = Path(run_dir)
    require_finished_run(run)
    manifest = json.loads((run / MANIFEST).read_text())
    if manifest.get("status") not in (None, "completed"):
        log.warning("run status is %r, not 'completed': exporting the adapter it saved last", manifest.get("status"))
    cfg, _ = load_config(run / CONFIG)
    source = Path(manifest.get("base", {}).get("source_dir") or "")
    if not (source / "config.json").is_file():
        source = resolve_source(cfg.model)
    quant = manifest.get("quant") or {}
    for key in ("quant_type", "double_quant", "blocksize", "load_dtype"):
        if key not in quant:
            raise ModelError(f"{run / MANIFEST} has no quant.{key}: cannot reproduce the NF4 base",
                             "the run was written by an older qlora-kit; add the quant section from its training log")
    return RunInfo(run, manifest, cfg, source, quant)
