"""ops.tiled_mlp: the MLP computed in sequence tiles equals the untiled layer (values and gradients)."""

from __future__ import annotations

import pytest
import torch
from conftest import adapter_grads, assert_grads_close, gpu, make_qlora_model

from qlora_kit.ops.tiled_mlp import TiledMLPFunction, tile_mlps

ALL_LINEAR = "all-linear"  # LoRA on gate/up/down too: adapter gradients must flow through the tiles


def _mlps(model):
    return [m for n, m in model.named_modules() if n.endswith(".mlp")]


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_tiled_model_equals_untiled(tiny_models, one_thread, arch: str) -> None:
    source = tiny_models(arch)
    ids = torch.randint(6, 400, (2, 29), generator=torch.Generator().manual_seed(0))
    results = []
    for tiled in (False, True):
        model = make_qlora_model(source, targets=ALL_LINEAR)
        if tiled:
            assert tile_mlps(model, tile_tokens=8) == len(_mlps(model)) == 2
        out = model(input_ids=ids, labels=ids, use_cache=False)
        out.loss.backward()
        results.append((out.loss.detach(), adapter_grads(model)))
    (want_loss, want), (got_loss, got) = results
    assert any("gate_proj" in n for n in got) and any("down_proj" in n for n in got)
    torch.testing.assert_close(got_loss, want_loss, atol=1e-6, rtol=1e-6)
    assert_grads_close(got, want, atol=1e-6, rtol=1e-5)


def test_tiled_mlp_values_and_input_gradient(tiny_llama, one_thread) -> None:
    model = make_qlora_model(tiny_llama, targets=ALL_LINEAR)
    mlp = _mlps(model)[0]
    x = torch.randn(1, 37, 64, generator=torch.Generator().manual_seed(1))
    grad_out = torch.randn(1, 37, 64, generator=torch.Generator().manual_seed(2))

    x_ref = x.clone().requires_grad_()
    ref = mlp(x_ref)
    ref.backward(grad_out)
    want_params = {n: p.grad.clone() for n, p in mlp.named_parameters() if p.requires_grad}
    mlp.zero_grad()

    x_tiled = x.clone().requires_grad_()
    params = [p for p in mlp.parameters() if p.requires_grad]
    out = TiledMLPFunction.apply(mlp.forward, 10, x_tiled, *params)
    out.backward(grad_out)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(x_tiled.grad, x_ref.grad, atol=1e-6, rtol=1e-5)
    assert_grads_close({n: p.grad for n, p in mlp.named_parameters() if p.requires_grad}, want_params)
    with torch.no_grad():  # evaluation: tiles without autograd
        tile_mlps(model, tile_tokens=10)
        torch.testing.assert_close(mlp(x), ref.detach(), atol=1e-6, rtol=1e-6)


def test_only_adapters_need_gradients(tiny_llama, one_thread) -> None:
    """An input without grad (e.g. the first layer without checkpointing): adapters still get gradients."""
    model = make_qlora_model(tiny_llama, targets=["gate_proj", "up_proj", "down_proj"])
    mlp = _mlps(model)[0]
    x = torch.randn(1, 21, 64)
    mlp(x).square().sum().backward()
    want = {n: p.grad.clone() for n, p in mlp.named_parameters() if p.requires_grad}
    mlp.zero_grad()
    tile_mlps(model, tile_tokens=4)
    mlp(x).square().sum().backward()
    assert_grads_close({n: p.grad for n, p in mlp.named_parameters() if p.requires_grad}, want)


def test_dropout_masks_are_replayed_in_the_backward(tiny_llama, one_thread) -> None:
    """With LoRA dropout, the recomputed tiles see the forward's masks: gradients equal autograd's."""
    model = make_qlora_model(tiny_llama, targets=ALL_LINEAR, dropout=0.3)
    mlp = _mlps(model)[0]
    x = torch.randn(1, 25, 64, generator=torch.Generator().manual_seed(3))
    params = [p for p in mlp.parameters() if p.requires_grad]

    torch.manual_seed(7)
    x_ref = x.clone().requires_grad_()
    ref = torch.cat([mlp(t) for t in x_ref.split(6, dim=-2)], dim=-2)  # same tiles, plain autograd
    ref.square().sum().backward()
    want = {n: p.grad.clone() for n, p in mlp.named_parameters() if p.requires_grad}
    mlp.zero_grad()

    torch.manual_seed(7)
    x_tiled = x.clone().requires_grad_()
    out = TiledMLPFunction.apply(mlp.forward, 6, x_tiled, *params)
    rng_before_backward = torch.get_rng_state()
    out.square().sum().backward()
    assert torch.equal(torch.get_rng_state(), rng_before_backward), "the backward must not move the global RNG"
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(x_tiled.grad, x_ref.grad, atol=1e-6, rtol=1e-5)
    assert_grads_close({n: p.grad for n, p in mlp.named_parameters() if p.requires_grad}, want)


def test_mixture_of_experts_blocks_stay_untiled(caplog) -> None:
    class SparseMoeBlock(torch.nn.Module):
        def forward(self, x):
            return x

    class Layer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.mlp = SparseMoeBlock()

    model = torch.nn.Sequential(Layer())
    with caplog.at_level("WARNING", logger="qlora_kit"):
        assert tile_mlps(model) == 0
    assert "SparseMoeBlock" in caplog.text


@gpu
def test_cuda_tiled_mlp_matches_under_autocast(tiny_models) -> None:
    """NF4 on CUDA, bf16 autocast, fp32 adapters on gate/up/down: tiled equals untiled to bf16 precision."""
    from qlora_kit.core.config import LoraConfig, ModelConfig
    from qlora_kit.model.base import load_quantized_base
    from qlora_kit.model.lora import attach_lora

    source = tiny_models("llama")
    ids = torch.randint(6, 400, (1, 300), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    results = []
    for tiled in (False, True):
        torch.manual_seed(0)
        base = load_quantized_base(source, ModelConfig(name_or_path=str(source)), torch.bfloat16,
                                   torch.device("cuda"))
        model = attach_lora(base, LoraConfig(r=8, dropout=0.0, target_modules="all-linear"), torch.float32, True)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.1)
        if tiled:
            tile_mlps(model, tile_tokens=64)
        model.train()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        results.append((loss.detach().float(), adapter_grads(model)))
    torch.testing.assert_close(results[1][0], results[0][0], atol=1e-2, rtol=1e-2)
    assert_grads_close(results[1][1], results[0][1], atol=1e-2, rtol=5e-2)
