"""The planner against the CPU allocator's records of qlora-kit's real training step.

``benchmarks/memory_check.py`` runs the training loop's step (``train.loop``) (NF4 base, fp32 adapters under bf16
autocast, fused loss, packing, checkpointing) on a model with Llama-3's real 128,256-token
vocabulary and a small hidden size, under torch's profiler, and compares each component
the planner models with the measured memory of its window: the checkpoint a layer leaves
behind, the loss, the recomputed layer's backward, and the step's absolute peak.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
from conftest import ROOT, gpu

SCRIPT = ROOT / "benchmarks" / "memory_check.py"


spec = importlib.util.spec_from_file_location("memory_check", SCRIPT)


memory_check = importlib.util.module_from_spec(spec)


sys.modules.setdefault("memory_check", memory_check)  # dataclasses look their module up


spec.loader.exec_module(memory_check)


EXPECTED = {"checkpoint_per_layer", "loss", "recomputed_layer", "static", "loss_phase", "backward_phase", "step"}


@pytest.mark.parametrize("name", [
    "small",
    "dpo",  # a DPO step: the reference forward, then both sides of 4 pairs in one packed row
    pytest.param("no-dropout", marks=pytest.mark.slow),
    pytest.param("long-tiled", marks=pytest.mark.slow),  # 16K tokens, MLP in 4K tiles: the norm backward peaks
    pytest.param("every-2", marks=pytest.mark.slow),  # every other layer keeps all its activations
    pytest.param("three-of-four", marks=pytest.mark.slow),  # a fractional every-n: layer 1 of 4 keeps them
])
def test_planner_components_within_15_percent_of_the_measured_step(name: str, tmp_path: Path):
    result = memory_check.compare(memory_check.CASES[name], tmp_path)
    rows = result["components"]
    assert EXPECTED <= set(rows)
    if memory_check.CASES[name].every_n > 1:
        assert "non_checkpointed_layer" in rows
    off = {k: r for k, r in rows.items() if not r["within_tolerance"]}
    assert not off, f"{name}: outside ±15 %: {off}"


@gpu
@pytest.mark.parametrize("name", memory_check.DEFAULT_CASES["cuda"])
def test_planner_components_on_cuda(name: str, tmp_path: Path):
    # The CUDA-only terms: flash attention (varlen) buffers, Triton loss on labelled rows, bool dropout masks,
    # offloaded checkpoints in flight.  The allocator margin and the CUDA context are outside these windows.
    result = memory_check.compare(memory_check.CASES[name], tmp_path, "cuda")
    off = {k: r for k, r in result["components"].items() if not r["within_tolerance"]}
    assert not off, f"{name} on CUDA: outside ±15 %: {off}"
