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
      base_residual.safetensors  base-changing lora.init only: the re-quantised NF4 weights the adapter
                           trains against (qlora_kit/variants/residual.py); never changes after setup
"""

from __future__ import annotations

from pathlib import Path

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
