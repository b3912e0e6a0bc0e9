"""`qlora-kit data CONFIG` (and `qlora-kit train CONFIG --dry-run`): the data a run would train on, without
training.

Reads, audits, splits, tokenises and mixes the data exactly as ``train`` does (the same ``build_data`` with the
same tokenizer, chat template and seed), prints the summary and a masked preview per source, and writes
nothing. Only the tokenizer is loaded: no weights are read, and a hub model downloads its tokenizer files only.
Exit status: 0, or that of the error ``train`` would stop with on the same data (2 for bad data or config).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from qlora_kit.core.config import attribute_origin, load_config
from qlora_kit.core.logs import echo
from qlora_kit.data.build import build_data
from qlora_kit.data.summary import print_summary
from qlora_kit.model.base import load_tokenizer
from qlora_kit.model.sources import tokenizer_source
from qlora_kit.train.recipe import warn_if_validation_elsewhere

log = logging.getLogger("qlora_kit")


def run_data(config_path: str | Path, overrides: list[str], as_json: bool = False) -> int:
    """Build the run's data in memory and print its audit (``as_json``: the summary as JSON on stdout, as
    ``data_summary.json`` holds it); return 0 or raise the error training would.

    Raises:
        QloraKitError: the config, the tokenizer, the chat template or the data is unusable (with the
            config key's origin in the fix, as in ``train``).
    """
    started = time.monotonic()
    cfg, sources = load_config(config_path, overrides)
    warn_if_validation_elsewhere(cfg, sources)
    try:
        directory, gguf_file = tokenizer_source(cfg.model)
        tokenizer = load_tokenizer(directory, cfg.model, gguf_file)
        data = build_data(cfg.data, tokenizer, cfg.train.max_length, cfg.train.seed, model_name=cfg.model.name_or_path)
    except BaseException as exc:
        attribute_origin(exc, sources)
        raise
    if as_json:
        echo(json.dumps(data.summary.to_json(), ensure_ascii=False, indent=1), err=False)
    else:
        print_summary(data.summary)
    echo(f"dry run: {data.summary.train_rows} training and {data.summary.val_rows} validation samples in "
         f"{time.monotonic() - started:.1f} s; nothing was written (`qlora-kit train {config_path}` trains on "
         "exactly these)")
    return 0
