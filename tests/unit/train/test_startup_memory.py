"""train.startup_checks: out of memory, and a run that no longer fits once a failed path is switched off, stop with
exit 4 (the memory re-check runs on CUDA only: here its inputs are given)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from qlora_kit.core.config import Config
from qlora_kit.core.errors import EXIT_OOM, OutOfMemoryError
from qlora_kit.plan.terms import GiB
from qlora_kit.train import startup_checks as S


def _config(**train) -> Config:
    return Config.model_validate({"model": {"name_or_path": "m"}, "data": {"path": "d"}, "output_dir": "o",
                                  "train": {"max_length": 256, "micro_batch_size": 1, **train}})


def test_a_run_that_no_longer_fits_stops_with_both_predictions(tiny_llama: Path, monkeypatch) -> None:
    before, after = _config(tiled_mlp=True), _config(tiled_mlp=False)
    monkeypatch.setattr(S, "predicted_need", lambda cfg, shape, device: (
        (20 if cfg.train.tiled_mlp else 30) * GiB, 22 * GiB))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA GeForce RTX 4090")
    with pytest.raises(OutOfMemoryError) as caught:
        S._check_still_fits(before, after, tiny_llama, torch.device("cuda"), ["tiled_mlp"])
    err = caught.value
    assert err.exit_code == EXIT_OOM
    assert "switched off tiled_mlp" in err.message and "RTX 4090" in err.message
    assert "need 30.0 GiB" in err.message and "(20.0 GiB with it)" in err.message and "22.0 GiB is free" in err.message
    assert "report it" in err.hint


def test_a_run_that_still_fits_goes_on(tiny_llama: Path, monkeypatch, caplog) -> None:
    monkeypatch.setattr(S, "predicted_need", lambda cfg, shape, device: (10 * GiB, 22 * GiB))
    with caplog.at_level("INFO", logger="qlora_kit"):
        S._check_still_fits(_config(fused_loss=True), _config(fused_loss=False), tiny_llama, torch.device("cuda"),
                            ["fused_loss"])
    assert "memory plan without fused_loss: ~10.0 GiB predicted peak, 22.0 GiB free" in caplog.text


def test_out_of_memory_during_the_check_is_exit_4(monkeypatch) -> None:
    def oom(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB")

    monkeypatch.setattr(S, "custom_paths", lambda cfg, model, precision: ([], []))
    monkeypatch.setattr(S, "compare_paths", oom)
    batch = {"input_ids": torch.ones(1, 8, dtype=torch.long), "labels": torch.ones(1, 8, dtype=torch.long)}
    cpu = SimpleNamespace(device=torch.device("cpu"), compute_dtype=torch.float32)
    with pytest.raises(OutOfMemoryError) as caught:
        S._local_outcomes(_config(), None, batch, cpu)
    assert caught.value.exit_code == EXIT_OOM and "start-up check" in caught.value.message
    assert "train.startup_checks=false" in caught.value.hint
