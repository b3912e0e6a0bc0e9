"""ops.loss: the fused LM-head loss equals the full-logits reference (loss and adapter gradients)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import adapter_grads, arithmetic_rows, assert_grads_close, make_qlora_model, write_jsonl

from qlora_kit.data import batching, build
from qlora_kit.ops.loss import causal_lm_loss, count_targets
from qlora_kit.ops.packing import use_packed_attention


@pytest.fixture(scope="module")
def samples_by_arch(tiny_models, tmp_path_factory):
    """Assistant-only labelled samples of a few lengths, per architecture's tokenizer."""
    from transformers import AutoTokenizer

    from qlora_kit.core.config import DataConfig

    rows = arithmetic_rows(4) + [{"messages": [
        {"role": "system", "content": "answer in words"},
        {"role": "user", "content": "the water is"}, {"role": "assistant", "content": "good for you and me"},
        {"role": "user", "content": "and the light"}, {"role": "assistant", "content": "very good too"}]}]
    path = write_jsonl(tmp_path_factory.mktemp("loss") / "rows.jsonl", rows)
    cache = {}

    def get(arch: str):
        if arch not in cache:
            tok = AutoTokenizer.from_pretrained(tiny_models(arch))
            cache[arch] = build.build_data(DataConfig(path=str(path), val_fraction=0.0), tok, 64, 0).train
        return cache[arch]

    return get


def _loss_and_grads(source: Path, fused: bool, batches: list[dict]) -> tuple[float, dict[str, torch.Tensor]]:
    model = make_qlora_model(source, fused_loss=fused)
    use_packed_attention(model)
    n_items = sum(count_targets(b["labels"]) for b in batches)
    total = 0.0
    for batch in batches:
        loss = causal_lm_loss(model, batch, n_items, fused)
        loss.backward()
        total += loss.item()
    return total, adapter_grads(model)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_fused_loss_equals_full_logits(tiny_models, samples_by_arch, one_thread, arch: str, layout: str) -> None:
    samples = samples_by_arch(arch)
    assert any(-100 in s["labels"][1:] for s in samples), "assistant-only labels expected (prompt tokens masked)"
    # two micro-batches of one optimizer step: the loss is normalised over both
    plans = [[[4], [0], [2]], [[1, 3]]] if layout == "padded" else [[[4, 0], [2]], [[1, 3]]]
    batches = [batching.collate(samples, rows, pad_id=0, max_length=64, packing=layout == "packed") for rows in plans]
    if layout == "padded":
        assert (batches[0]["attention_mask"] == 0).any(), "the padded layout must contain padding"
    want_loss, want = _loss_and_grads(tiny_models(arch), False, batches)
    got_loss, got = _loss_and_grads(tiny_models(arch), True, batches)
    assert got_loss == pytest.approx(want_loss, rel=1e-6, abs=1e-6)
    assert_grads_close(got, want, atol=1e-6, rtol=1e-5)


def test_fused_loss_of_a_batch_without_targets_is_zero_and_differentiable(tiny_llama, one_thread) -> None:
    model = make_qlora_model(tiny_llama, fused_loss=True)
    batch = {"input_ids": torch.tensor([[5, 6, 7, 8]]), "labels": torch.full((1, 4), -100)}
    loss = causal_lm_loss(model, batch, 1, fused=True)
    loss.backward()
    assert loss.item() == 0.0


def test_generation_is_untouched_by_the_fused_head(tiny_llama, one_thread) -> None:
    plain, fused = make_qlora_model(tiny_llama), make_qlora_model(tiny_llama, fused_loss=True)
    ids = torch.tensor([[4, 9, 10, 11]])
    with torch.no_grad():
        torch.testing.assert_close(fused(input_ids=ids).logits, plain(input_ids=ids).logits, rtol=0, atol=0)


def test_models_that_transform_logits_use_trls_head(tmp_path, one_thread) -> None:
    """Gemma-2 soft-caps its logits: trl's head applies it, so the fused loss still equals the model's own."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    from qlora_kit.ops.loss import add_fused_loss

    config = AutoConfig.for_model("gemma2", vocab_size=300, hidden_size=64, intermediate_size=128,
                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                  final_logit_softcapping=2.0, attn_implementation="eager")
    ids = torch.randint(0, 300, (2, 19), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[:, :6] = -100
    results = []
    for fused in (False, True):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config)
        if fused:
            add_fused_loss(model)
        model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
        loss = causal_lm_loss(model, {"input_ids": ids, "labels": labels}, count_targets(labels), fused)
        loss.backward()
        results.append((loss.detach(), adapter_grads(model)))
    torch.testing.assert_close(results[1][0], results[0][0], atol=1e-6, rtol=1e-6)
    assert_grads_close(results[1][1], results[0][1])


def test_fused_loss_goes_through_the_peft_wrapper(tiny_llama, one_thread) -> None:
    """peft's model-level forward runs (AdaLoRA adds its regulariser there; hooks see the call)."""
    model = make_qlora_model(tiny_llama, fused_loss=True)
    calls = []
    model.register_forward_pre_hook(lambda module, args, kwargs: calls.append(kwargs.get("fused_lm_head")),
                                    with_kwargs=True)
    ids = torch.randint(6, 400, (1, 12))
    causal_lm_loss(model, {"input_ids": ids, "labels": ids}, 11, fused=True).backward()
    assert calls == [True]
