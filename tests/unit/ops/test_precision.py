"""ops.precision and ops.allocator: native-bf16 detection, fp32 adapters without fp32 activations,
fp16 loss scaling with the NaN guard and exact resume, the CUDA allocator setting."""

from __future__ import annotations

import pytest
import torch
from conftest import make_qlora_model

from qlora_kit.model.base import resolve_compute_dtype
from qlora_kit.ops import allocator
from qlora_kit.ops import precision as P


@pytest.mark.parametrize(("capability", "expected"), [((7, 0), torch.float16), ((7, 5), torch.float16),
                                                      ((8, 0), torch.bfloat16), ((9, 0), torch.bfloat16)])
def test_bf16_only_on_cards_with_native_bf16(monkeypatch, capability, expected) -> None:
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)  # emulation counts there: ignored
    dtype = resolve_compute_dtype("auto", torch.device("cuda", 0))
    assert dtype == expected
    precision = P.resolve_precision(dtype, "float32", torch.device("cuda", 0))
    assert precision.adapter_dtype == torch.float32 and precision.autocast
    assert precision.loss_scaling is (expected == torch.float16)


def test_cpu_precision_is_plain_float32() -> None:
    assert resolve_compute_dtype("auto", torch.device("cpu")) == torch.float32
    precision = P.resolve_precision(torch.float32, "float32", torch.device("cpu"))
    assert not precision.autocast and not precision.loss_scaling and precision.make_scaler() is None
    bf16_adapters = P.resolve_precision(torch.bfloat16, "bfloat16", torch.device("cpu"))
    assert not bf16_adapters.autocast  # adapters already in the compute dtype


def _saved_lora_inputs(layer: torch.nn.Module, x: torch.Tensor, autocast: bool) -> list[tuple[torch.dtype, bool]]:
    """(dtype, shares the input's storage) of every saved tensor with the input's shape."""
    saved = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.shape[-1] == x.shape[-1] and t.numel() == x.numel():
            saved.append((t.dtype, t.untyped_storage().data_ptr() == x.untyped_storage().data_ptr()))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            layer(x).float().sum().backward()
    return saved


def test_fp32_adapters_keep_activations_in_the_compute_dtype(tiny_llama, one_thread) -> None:
    """peft alone saves an fp32 copy of every adapted input; autocast without peft's cast saves none."""
    model = make_qlora_model(tiny_llama, compute_dtype=torch.bfloat16, adapter_dtype=torch.float32,
                             checkpointing=False, targets="all-linear")
    q_proj = model.base_model.model.model.layers[0].self_attn.q_proj
    x = torch.randn(1, 37, 64, dtype=torch.bfloat16, requires_grad=True)
    assert _saved_lora_inputs(q_proj, x, autocast=False) == [(torch.float32, False)]  # a new fp32 copy
    assert q_proj.lora_A["default"].weight.grad.dtype == torch.float32
    model.zero_grad()
    assert P.keep_adapter_inputs_in_compute_dtype(model) == 7 * 2  # every adapted layer of both decoder layers
    assert _saved_lora_inputs(q_proj, x, autocast=True) == [(torch.bfloat16, True)]  # the input itself
    assert q_proj.lora_A["default"].weight.dtype == q_proj.lora_A["default"].weight.grad.dtype == torch.float32


def test_autocast_training_matches_fp32_adapter_math(tiny_llama, one_thread) -> None:
    """Whole model, bf16 compute: gradients with autocast are those of peft's fp32-cast path to bf16 precision."""
    ids = torch.randint(6, 400, (1, 31), generator=torch.Generator().manual_seed(0))
    grads = []
    for use_autocast in (False, True):
        model = make_qlora_model(tiny_llama, compute_dtype=torch.bfloat16, adapter_dtype=torch.float32)
        precision = P.Precision(torch.device("cpu"), torch.bfloat16, torch.float32)
        if use_autocast:
            P.keep_adapter_inputs_in_compute_dtype(model)
        with precision.forward_context() if use_autocast else torch.autocast("cpu", enabled=False):
            model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    for name, want in grads[0].items():
        got = grads[1][name]
        assert got.dtype == torch.float32 and torch.isfinite(got).all()
        assert torch.nn.functional.cosine_similarity(got.flatten(), want.flatten(), dim=0) > 0.99, name


def test_expandable_segments_unless_the_user_set_the_allocator(monkeypatch) -> None:
    monkeypatch.delenv(allocator.ALLOC_ENV, raising=False)
    monkeypatch.delenv(allocator.ALLOC_ENV_NEW, raising=False)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    assert allocator.configure_cuda_allocator()
    assert allocator.os.environ[allocator.ALLOC_ENV] == "expandable_segments:True"
    for name in (allocator.ALLOC_ENV, allocator.ALLOC_ENV_NEW):
        monkeypatch.delenv(allocator.ALLOC_ENV, raising=False)
        monkeypatch.setenv(name, "max_split_size_mb:128")
        assert not allocator.configure_cuda_allocator()
        assert allocator.os.environ[name] == "max_split_size_mb:128"
        monkeypatch.delenv(name)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)  # too late: torch would not read it
    assert not allocator.configure_cuda_allocator() and allocator.ALLOC_ENV not in allocator.os.environ
