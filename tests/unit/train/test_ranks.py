"""Ranks without launching processes: rows per rank, failures told apart, FSDP checks."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from qlora_kit.core.errors import ConfigError, PeerFailed
from qlora_kit.train import distributed


def test_rows_per_rank() -> None:
    two = [distributed.Dist(rank=r, world_size=2, strategy="ddp") for r in (0, 1)]
    rows = [[0], [1], [2], [3]]
    assert [d.local_rows(rows) for d in two] == [([[0], [1]], False), ([[2], [3]], False)]
    assert [d.local_rows(rows[:3]) for d in two] == [([[0], [1]], False), ([[2]], False)]
    assert [d.local_rows(rows[:1]) for d in two] == [([[0]], False), ([[0]], True)]  # masked stand-in
    assert distributed.SINGLE.local_rows(rows) == (rows, False)
    assert distributed.SINGLE.loss_factor() == 1.0 and two[1].loss_factor() == 2.0


def test_collective_failures_are_told_apart() -> None:
    dead = distributed.translate_failure(RuntimeError("[gloo/transport/tcp/pair.cc:537] Read error: Connection "
                                                      "reset by peer"))
    assert isinstance(dead, PeerFailed) and dead.silent
    hung = distributed.translate_failure(RuntimeError("[gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting "
                                                      "120000ms for recv operation to complete"))
    assert isinstance(hung, PeerFailed) and not getattr(hung, "silent", False)
    assert distributed.translate_failure(RuntimeError("shape mismatch")) is None
    assert distributed.translate_failure(ValueError("Connection reset by peer")) is None


def test_fsdp2_with_a_4bit_base_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", "ACCELERATE_USE_FSDP": "true",
                       "FSDP_VERSION": "2"}.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ConfigError, match=r"FSDP2 with a 4-bit base corrupts .*bitsandbytes issue #1945"):
        distributed.start()
    assert distributed.current() is distributed.SINGLE


def test_bad_collective_timeout_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(distributed.TIMEOUT_ENV, "soon")
    with pytest.raises(ConfigError, match="QLORA_KIT_COLLECTIVE_TIMEOUT"):
        distributed.collective_timeout()


def test_fsdp_quant_storage_keeps_the_numbers(tiny_llama: Path, one_thread) -> None:
    """FSDP stores the packed 4-bit values in the compute dtype: same values, same outputs (export unaffected)."""
    from qlora_kit.core.config import ModelConfig
    from qlora_kit.model.base import load_quantized_base, quant_spec

    cfg = ModelConfig(name_or_path=str(tiny_llama))
    ids = torch.randint(5, 200, (1, 16), generator=torch.Generator().manual_seed(0))
    outputs, storages = [], []
    for storage in (torch.uint8, torch.bfloat16, torch.float32):
        model = load_quantized_base(tiny_llama, cfg, torch.float32, torch.device("cpu"), storage)
        storages.append(quant_spec(model, cfg, torch.float32).quant_storage)
        with torch.no_grad():
            outputs.append(model(input_ids=ids).logits)
    assert storages == ["uint8", "bfloat16", "float32"]
    assert all(torch.equal(outputs[0], o) for o in outputs[1:])
