"""`qlora-kit plan` says what `train` would: the context warning, a free-memory figure a real card has,
and the multi-GPU layout a model too large for one card exists for."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from qlora_kit.core.config import load_config
from qlora_kit.plan import fit
from qlora_kit.plan import shape as plan_shape
from qlora_kit.plan.report import run_plan

GiB = 1024**3
CONFIGS = Path(__file__).resolve().parents[3] / "configs"


def _plan_json(capsys: pytest.CaptureFixture[str], config: Path, *overrides: str, **options) -> dict:
    run_plan(config, list(overrides), as_json=True, **options)
    return json.loads(capsys.readouterr().out)


def test_plan_warns_when_max_length_is_beyond_the_context(capsys, caplog) -> None:
    config = CONFIGS / "llama-2-7b-chat_qlora_24gb.yaml"
    with caplog.at_level(logging.WARNING, logger="qlora_kit"):
        report = _plan_json(capsys, config, "train.max_length=8192", gpu_memory=24)
    assert any("8192" in w and "context of 4096" in w for w in report["warnings"]), report["warnings"]
    assert "context of 4096" in caplog.text  # on stderr, as train prints it
    assert not _plan_json(capsys, config, "train.max_length=4096", gpu_memory=24)["warnings"]


def test_70b_on_one_card_points_at_its_two_gpu_layout(capsys) -> None:
    report = _plan_json(capsys, CONFIGS / "llama-3.1-70b-instruct_qlora_2x24gb.yaml", gpu_memory=24)
    assert not report["fits"] and "--num-gpus 2 --strategy fsdp-offload" in report["suggestion"]


def test_without_a_gpu_the_plan_names_the_free_memory_it_assumed(capsys, monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    report = _plan_json(capsys, CONFIGS / "llama-3.1-8b-instruct_qlora_24gb.yaml")
    free = report["gpu_memory_bytes"]
    assert free < 24 * GiB and f"{free / GiB:.1f} GiB free" in report["gpu_memory_source"]


def test_suggested_micro_batch_passes_trains_pre_flight_on_a_desktop_card(capsys, monkeypatch, tmp_path) -> None:
    """A 24 GiB card with 1 GiB held by the desktop: what plan --gpu-memory 24 suggests, train accepts."""
    from qlora_kit.train.setup import resolve_memory_settings

    config = CONFIGS / "llama-3.1-8b-instruct_qlora_24gb.yaml"
    batch = _plan_json(capsys, config, gpu_memory=24)["micro_batch_size_that_fits"]
    assert batch and batch > 1
    source = tmp_path / "model"
    source.mkdir()
    (source / "config.json").write_text((plan_shape.SHAPES_DIR / "llama-3.1-8b.json").read_text())
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (23 * GiB, 24 * GiB))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 0)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Fake RTX 4090")
    cfg, _ = load_config(config, [f"train.micro_batch_size={batch}", f"model.name_or_path={source}"])
    resolved = resolve_memory_settings(cfg, source, torch.device("cuda"))
    fit.check_fits(resolved, source, "cuda")  # raises OutOfMemoryError when the suggestion does not fit
