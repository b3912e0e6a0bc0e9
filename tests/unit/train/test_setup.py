"""Setup decisions: memory settings kept on resume, long samples warned about."""

from __future__ import annotations

import json
from pathlib import Path

import torch


def test_resume_keeps_the_memory_settings_the_run_started_with(tiny_llama: Path) -> None:
    """"auto" settings are re-decided only for new runs: a resumed run keeps its optimizer class etc."""
    from qlora_kit.core.config import validate
    from qlora_kit.train.setup import resolve_memory_settings

    cfg = validate({"model": {"name_or_path": str(tiny_llama)}, "data": {"path": "x"}, "output_dir": "x",
                    "train": {"tiled_mlp": False}})
    recorded = {"optimizer": "paged_adamw_8bit", "checkpoint_every_n_layers": 2, "tiled_mlp": True,
                "activation_offload": False}
    resumed = resolve_memory_settings(cfg, tiny_llama, torch.device("cpu"), recorded)
    assert resumed.train.optimizer == "paged_adamw_8bit" and resumed.train.checkpoint_every_n_layers == 2
    assert resumed.train.tiled_mlp is False  # set explicitly in the config: the user's value wins
    fresh = resolve_memory_settings(cfg, tiny_llama, torch.device("cpu"))
    assert fresh.train.optimizer != "auto" and fresh.train.checkpoint_every_n_layers != "auto"


def test_samples_longer_than_the_model_context_are_warned_about(tiny_llama: Path, caplog) -> None:
    from qlora_kit.train.setup import _warn_beyond_context

    context = json.loads((tiny_llama / "config.json").read_text())["max_position_embeddings"]
    with caplog.at_level("WARNING", logger="qlora_kit"):
        _warn_beyond_context(tiny_llama, context)  # rows (max_length) may be longer: only samples count
        assert not caplog.records
        _warn_beyond_context(tiny_llama, context + 1)
    assert f"more than the model's context of {context}" in caplog.text
    assert f"lower train.max_length to {context}" in caplog.text
