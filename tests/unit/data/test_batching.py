"""Batch plans and collation; packed samples never see each other (data.batching)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import arithmetic_rows, write_jsonl
from data_rows import (
    build,
    chat,
)

from qlora_kit.core.config import DataConfig
from qlora_kit.data import batching
from qlora_kit.data import build as D_build


@pytest.mark.parametrize("packing", [False, True])
def test_plan_batches_is_deterministic_and_complete(packing):
    lengths = [5 + (7 * i) % 40 for i in range(103)]
    args = dict(micro_batch_size=4, max_length=64, packing=packing, seed=3, shuffle=True)
    plan = batching.plan_batches(lengths, epoch=0, **args)
    assert plan == batching.plan_batches(lengths, epoch=0, **args)
    assert plan != batching.plan_batches(lengths, epoch=1, **args)
    assert plan != batching.plan_batches(lengths, epoch=0, **{**args, "seed": 4})
    for epoch in range(3):
        flat = [i for mb in batching.plan_batches(lengths, epoch=epoch, **args) for row in mb for i in row]
        assert sorted(flat) == list(range(103))
    assert all(len(mb) == 4 for mb in plan[:-1]) and 1 <= len(plan[-1]) <= 4
    if packing:
        assert all(sum(lengths[i] for i in row) <= 64 for mb in plan for row in mb)
        assert sum(len(mb) for mb in plan) < 103 / 1.5  # really packs
    else:
        assert all(len(row) == 1 for mb in plan for row in mb) and len(plan) == 26


def test_plan_batches_without_shuffle_keeps_order():
    plan = batching.plan_batches([3] * 5, micro_batch_size=2, max_length=8, packing=False, seed=0, epoch=7, shuffle=False)
    assert plan == [[[0], [1]], [[2], [3]], [[4]]]


def test_collate_unpacked_pads_right():
    samples = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8, 9], "labels": [-100, 9]}]
    batch = batching.collate(samples, [[0], [1]], pad_id=0, max_length=16)
    assert set(batch) == {"input_ids", "labels", "attention_mask"}
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 9, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [-100, 9, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]


def test_collate_packed_is_one_padding_free_row_with_varlen_inputs():
    samples = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8, 9], "labels": [-100, 9]},
               {"input_ids": [3, 4, 5, 6, 7, 8], "labels": [-100, 4, 5, 6, 7, 8]}]
    batch = batching.collate(samples, [[0, 1], [2]], pad_id=5, max_length=16)
    assert "attention_mask" not in batch
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9, 3, 4, 5, 6, 7, 8]]
    assert batch["labels"].tolist() == [[-100, 6, 7, -100, 9, -100, 4, 5, 6, 7, 8]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 1, 2, 3, 4, 5]]
    assert batch["cu_seq_lens_q"].tolist() == batch["cu_seq_lens_k"].tolist() == [0, 3, 5, 11]
    assert batch["cu_seq_lens_q"].dtype == torch.int32
    assert batch["max_length_q"] == batch["max_length_k"] == 6 and batch["packed_seq_lens"] == (3, 2, 6)
    # a row is cut at max_length (its last sample shortened), rows of one sample are packed too
    cut = batching.collate(samples, [[0, 2], [1]], pad_id=0, max_length=5, packing=True)
    assert cut["packed_seq_lens"] == (3, 2, 2) and cut["input_ids"].tolist() == [[5, 6, 7, 3, 4, 8, 9]]
    assert cut["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 1]]


def test_padding_with_eos_id_keeps_eos_targets(tmp_path, tok):
    bundle = build(tmp_path, arithmetic_rows(2), tok)
    batch = batching.collate(bundle.train, [[0], [1]], pad_id=tok.eos_token_id, max_length=64)
    assert (batch["labels"] == tok.eos_token_id).sum() == 2


@pytest.fixture(scope="module")
def packed_samples(tiny_llama: Path, tmp_path_factory):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    path = write_jsonl(tmp_path_factory.mktemp("pack") / "rows.jsonl", arithmetic_rows(5) + [
        {"messages": chat(("user", "the water is"), ("assistant", "good for you and me"))}])
    return D_build.build_data(DataConfig(path=str(path), val_fraction=0.0), tokenizer, 64, 0).train


def _qlora_model(source: Path, attn: str, gradient_checkpointing: bool):
    from qlora_kit.core.config import LoraConfig, ModelConfig
    from qlora_kit.model.base import load_quantized_base
    from qlora_kit.model.lora import attach_lora

    base = load_quantized_base(source, ModelConfig(name_or_path=str(source), attn_implementation=attn),
                               torch.float32, torch.device("cpu"))
    model = attach_lora(base, LoraConfig(r=8, alpha=16, dropout=0.0), torch.float32, gradient_checkpointing)
    torch.manual_seed(0)
    for name, p in model.named_parameters():
        if "lora_B" in name:  # B starts at zero; make the adapters matter
            torch.nn.init.normal_(p, std=0.2)
    model.train()
    return model


@pytest.mark.parametrize(("attn", "gradient_checkpointing"),
                         [("sdpa", False), ("sdpa", True), ("eager", True), ("packed", True), ("packed", False)])
def test_packed_samples_do_not_attend_to_each_other(tiny_llama, packed_samples, attn, gradient_checkpointing):
    from qlora_kit.ops.packing import ATTENTION_NAME, use_packed_attention

    model = _qlora_model(tiny_llama, "sdpa" if attn == "packed" else attn, gradient_checkpointing)
    if attn == "packed":  # what training uses: no mask at all, samples kept apart by cu_seq_lens
        assert use_packed_attention(model) and model.config._attn_implementation == ATTENTION_NAME
    rows = [[0, 5, 1], [2, 3]]  # two packed rows, flattened into one padding-free row
    batch = batching.collate(packed_samples, rows, pad_id=0, max_length=128, packing=True)
    assert "attention_mask" not in batch and batch["input_ids"].shape[0] == 1
    # transformers' own packed detection (sdpa/eager masks) needs a cache-free forward: training-mode gradient
    # checkpointing forces use_cache=False by itself; without it the caller must pass it.
    packed = model(**batch) if gradient_checkpointing else model(**batch, use_cache=False)
    assert torch.isfinite(packed.loss)
    offset = 0
    for idx in [i for row in rows for i in row]:
        ids = torch.tensor([packed_samples[idx]["input_ids"]])
        alone = model(input_ids=ids, use_cache=False).logits[0]
        inside = packed.logits[0, offset : offset + ids.shape[1]]
        torch.testing.assert_close(inside, alone, atol=1e-5, rtol=0)
        offset += ids.shape[1]
    assert offset == batch["input_ids"].shape[1]


def test_unpacked_padding_does_not_change_logits(tiny_llama, packed_samples):
    model = _qlora_model(tiny_llama, "sdpa", True)
    batch = batching.collate(packed_samples, [[5], [0]], pad_id=0, max_length=64)
    out = model(**batch, use_cache=False).logits
    for b, idx in enumerate([5, 0]):
        ids = torch.tensor([packed_samples[idx]["input_ids"]])
        torch.testing.assert_close(out[b, : ids.shape[1]], model(input_ids=ids).logits[0], atol=1e-5, rtol=0)
