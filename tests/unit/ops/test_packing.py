"""ops.packing: packed rows give the loss and gradients of the samples trained one by one."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import adapter_grads, assert_grads_close, gpu, make_qlora_model

from qlora_kit.data import batching as D
from qlora_kit.ops import packing as P
from qlora_kit.ops.loss import causal_lm_loss, count_targets


def _samples(lengths: list[int], seed: int = 0) -> list[dict[str, list[int]]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(6, 400, (n,), generator=g).tolist()
        labels = [-100] * (n // 3) + ids[n // 3:]  # a masked "prompt", then targets
        labels[0] = -100
        out.append({"input_ids": ids, "labels": labels})
    return out


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
@pytest.mark.parametrize("fused", [True, False])
def test_packed_loss_and_grads_equal_unpacked_per_sample(tiny_models, one_thread, arch: str, fused: bool) -> None:
    source = tiny_models(arch)
    samples = _samples([9, 17, 5, 12])
    n_items = sum(count_targets(torch.tensor([s["labels"]])) for s in samples)

    packed_model = make_qlora_model(source, fused_loss=fused)
    assert P.use_packed_attention(packed_model)
    batch = D.collate(samples, [[0, 1], [2, 3]], pad_id=0, max_length=64, packing=True)
    assert count_targets(batch["labels"]) == n_items  # no sample predicts the next one's first token
    packed_loss = causal_lm_loss(packed_model, batch, n_items, fused)
    packed_loss.backward()

    alone_model = make_qlora_model(source, fused_loss=fused)  # stock sdpa, one sample at a time
    alone_loss = 0.0
    for s in samples:
        single = {"input_ids": torch.tensor([s["input_ids"]]), "labels": torch.tensor([s["labels"]])}
        loss = causal_lm_loss(alone_model, single, n_items, fused)
        loss.backward()
        alone_loss += loss.item()
    assert packed_loss.item() == pytest.approx(alone_loss, rel=1e-6, abs=1e-6)
    assert_grads_close(adapter_grads(packed_model), adapter_grads(alone_model), atol=1e-6, rtol=1e-5)


SLIDING = {  # window 6 < the 9-, 12- and 17-token samples: the window changes the result
    "mistral": {"sliding_window": 6},
    "gemma3_text": {"sliding_window": 6, "layer_types": ["sliding_attention", "full_attention"]},
    "qwen3": {"use_sliding_window": True, "sliding_window": 6, "layer_types": ["full_attention", "sliding_attention"]},
    "gemma2": {"sliding_window": 6},  # soft-capped: no sdpa in transformers, eager only
}


@pytest.mark.parametrize("arch, attn", [("mistral", "sdpa"), ("gemma3_text", "sdpa"), ("qwen3", "sdpa"),
                                        ("gemma2", "eager"), ("mistral", "eager")])
def test_sliding_window_models_pack_like_unpacked_samples(tmp_path, one_thread, arch: str, attn: str) -> None:
    """Local-attention layers keep their window inside packed rows (packed attention or transformers' eager mask)."""
    from qlora_kit.model.tiny import build_tiny_model

    source = build_tiny_model(tmp_path / arch, arch, **SLIDING[arch])
    samples = _samples([9, 17, 5, 12])
    n_items = sum(count_targets(torch.tensor([s["labels"]])) for s in samples)
    packed_model = make_qlora_model(source, attn=attn)
    assert P.use_packed_attention(packed_model) == (attn == "sdpa")
    packed_loss = causal_lm_loss(packed_model, D.collate(samples, [[0, 1], [2, 3]], pad_id=0, max_length=64,
                                                         packing=True), n_items, False)
    packed_loss.backward()
    alone_model = make_qlora_model(source, attn=attn)
    alone = [causal_lm_loss(alone_model, {"input_ids": torch.tensor([s["input_ids"]]),
                                          "labels": torch.tensor([s["labels"]])}, n_items, False) for s in samples]
    sum(alone).backward()
    assert packed_loss.item() == pytest.approx(sum(x.item() for x in alone), rel=1e-6, abs=1e-6)
    assert_grads_close(adapter_grads(packed_model), adapter_grads(alone_model), atol=1e-6, rtol=1e-5)
    unwindowed = make_qlora_model(build_tiny_model(tmp_path / f"{arch}-full", arch), attn=attn)
    full = sum(causal_lm_loss(unwindowed, {"input_ids": torch.tensor([s["input_ids"]]),
                                           "labels": torch.tensor([s["labels"]])}, n_items, False) for s in samples)
    assert abs(full.item() - packed_loss.item()) > 1e-4  # the window mattered


def test_no_mask_reaches_the_packed_attention(tiny_llama, one_thread, monkeypatch) -> None:
    """transformers builds no mask for the packed attention: no T x T tensor, only cu_seq_lens."""
    seen = []
    original = P.packed_attention_forward

    def spy(module, query, key, value, attention_mask, **kwargs):
        seen.append((attention_mask, kwargs.get("packed_seq_lens"), kwargs.get("max_length_q")))
        return original(module, query, key, value, attention_mask, **kwargs)

    model = make_qlora_model(tiny_llama)
    P.use_packed_attention(model)
    from transformers import AttentionInterface

    monkeypatch.setitem(AttentionInterface._global_mapping, P.ATTENTION_NAME, spy)
    batch = D.collate(_samples([7, 4, 9]), [[0, 1, 2]], pad_id=0, max_length=64, packing=True)
    causal_lm_loss(model, batch, 1, False).backward()
    assert seen and all(mask is None and lens == (7, 4, 9) and longest == 9 for mask, lens, longest in seen)


def _reference_attention(q, k, v, lengths, window=None):
    """Block-diagonal causal attention with an explicit mask (what transformers' sdpa path computes)."""
    n = q.shape[2]
    seg = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    pos = torch.arange(n)
    mask = (seg[:, None] == seg[None, :]) & (pos[None, :] <= pos[:, None])
    if window is not None:
        mask &= pos[None, :] > pos[:, None] - window
    rep = q.shape[1] // k.shape[1]
    out = F.scaled_dot_product_attention(q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1), attn_mask=mask)
    return out.transpose(1, 2)


@pytest.mark.parametrize("window", [None, 3])
def test_packed_attention_function_matches_masked_reference(window) -> None:
    torch.manual_seed(0)
    lengths = [5, 1, 8, 3]
    n = sum(lengths)
    q, k, v = torch.randn(1, 4, n, 8), torch.randn(1, 2, n, 8), torch.randn(1, 2, n, 8)  # GQA: 4 query, 2 kv heads
    kwargs = P.varlen_kwargs(lengths)
    out, _ = P.packed_attention_forward(torch.nn.Module(), q, k, v, None, sliding_window=window, **kwargs)
    torch.testing.assert_close(out, _reference_attention(q, k, v, lengths, window), atol=1e-6, rtol=1e-5)
    # without host lengths (another caller): same result
    del kwargs["packed_seq_lens"]
    out2, _ = P.packed_attention_forward(torch.nn.Module(), q, k, v, None, sliding_window=window, **kwargs)
    torch.testing.assert_close(out2, out, atol=0, rtol=0)


def test_unpacked_rows_run_plain_causal_attention() -> None:
    torch.manual_seed(1)
    q, k, v = torch.randn(2, 4, 6, 8), torch.randn(2, 4, 6, 8), torch.randn(2, 4, 6, 8)
    out, _ = P.packed_attention_forward(torch.nn.Module(), q, k, v, None)
    want = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2)
    torch.testing.assert_close(out, want, atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="no mask"):
        P.packed_attention_forward(torch.nn.Module(), q, k, v, torch.ones(2, 1, 6, 6, dtype=torch.bool))


def test_inference_mode_restores_stock_attention(tiny_llama, one_thread) -> None:
    from qlora_kit.inference.load import set_inference_mode

    model = make_qlora_model(tiny_llama)
    P.use_packed_attention(model)
    set_inference_mode(model)
    assert model.config._attn_implementation == "sdpa"
    assert not P.use_flash_varlen(torch.zeros(4, 2, 8))  # CPU: the per-sample SDPA fallback


def test_pack_batch_refuses_empty_pieces() -> None:
    with pytest.raises(ValueError, match="non-empty"):
        P.pack_batch([([1, 2], [-100, 2]), ([], [])])


@gpu
def test_cuda_flash_varlen_matches_per_sample_sdpa() -> None:
    torch.manual_seed(0)
    lengths = [70, 3, 129, 40]
    n = sum(lengths)
    q = torch.randn(n, 8, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(n, 2, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(n, 2, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    assert P.use_flash_varlen(q)
    cu = P.varlen_kwargs(lengths)["cu_seq_lens_q"].cuda()
    out = P.flash_varlen(q, k, v, cu, max(lengths), None, None)
    ref = P.sdpa_per_sample(q.float(), k.float(), v.float(), lengths, None, None)
    torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=2e-2)
    grads = torch.autograd.grad(out.float().square().sum(), (q, k, v))
    ref_grads = torch.autograd.grad(ref.square().sum(), (q, k, v))
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g.float(), r.float(), atol=5e-2, rtol=5e-2)
