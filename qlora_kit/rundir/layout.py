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
      tracking/            local files of train.report_to's trackers (TensorBoard events, wandb offline, MLflow
                           file store) unless train.tracking_dir puts them elsewhere
      checkpoint-<step>/   resumable state (see rundir/checkpoint.py); only complete ones are ever renamed here
      base_residual.safetensors  base-changing lora.init only: the re-quantised NF4 weights the adapter
                           trains against (qlora_kit/variants/residual.py); never changes after setup
      checkpoint-<step>.corrupt/  a checkpoint that did not verify on resume, kept for inspection

    ../.<output_dir name>.lock    the run's lock file (rundir/lock.py), beside the directory
"""

from __future__ import annotations

from pathlib import Path

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
TRACKING = "tracking"
CHECKPOINT_PREFIX = "checkpoint-"


# The run's plain files (a resume appends to or replaces them: each must be a regular file or absent).
RUN_FILES = (CONFIG, MANIFEST, DATA_SUMMARY, HELDOUT, METRICS, TRAIN_LOG, LOSS_PLOT)

# Files whose presence marks a directory as a qlora-kit run.
RUN_MARKERS = (CONFIG, MANIFEST)


def is_run_dir(path: Path) -> bool:
    """True when ``path`` holds a qlora-kit run (finished or not)."""
    return any((path / name).exists() for name in RUN_MARKERS)
