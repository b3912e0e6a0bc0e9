"""ops.selfcheck on CPU, for real: each path of ours against the library path on a tiny NF4 model.

The CPU-capable comparisons run as they do at the start of a run (per-sample SDPA against
transformers' eager mask, tiled against plain MLP, fused against full-logits loss, a sparse
checkpoint layout against every layer, offload with CPU copies against plain checkpointing);
then each path is made slightly wrong, or made to raise, and only that path is blamed.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from conftest import make_qlora_model

from qlora_kit.core.config import Config
from qlora_kit.ops import packing, selfcheck, tiled_mlp
from qlora_kit.ops.loss import causal_lm_loss, count_targets
from qlora_kit.ops.offload import ActivationOffload, enable_offload, offload_of
from qlora_kit.ops.precision import resolve_precision
from qlora_kit.ops.selfcheck import NOT_APPLICABLE, PASSED, SWITCHED_OFF, UNCHECKED, Measured
from qlora_kit.train.startup_checks import PATH_NAMES, check_batch, custom_paths

CPU = resolve_precision(torch.float32, "float32", torch.device("cpu"))


def _config(**train: Any) -> Config:
    return Config.model_validate({"model": {"name_or_path": "tiny"}, "data": {"path": "d.jsonl"}, "output_dir": "out",
                                  "train": {"fused_loss": True, "tiled_mlp": True, "activation_offload": True,
                                            "checkpoint_every_n_layers": 2, **train}})


def _model(source, dropout: float = 0.0, offload: bool = True):
    """NF4 + all-linear LoRA with every path of ours on: packed attention, fused loss, tiled MLP, CPU offload,
    layer 0 of 2 checkpointed; LoRA's B at zero as at the start of a run."""
    model = make_qlora_model(source, fused_loss=True, targets="all-linear", dropout=dropout, every_n_layers=2)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.zero_()
    assert packing.use_packed_attention(model)
    tiled_mlp.tile_mlps(model)
    if offload:
        enable_offload(model, ActivationOffload(torch.device("cpu")), 2)
    return model


def _batch() -> dict[str, Any]:
    g = torch.Generator().manual_seed(0)
    samples = []
    for n in (90, 150, 60):
        ids = torch.randint(6, 400, (n,), generator=g).tolist()
        samples.append({"input_ids": ids, "labels": [-100] * (n // 3) + ids[n // 3:]})
    return check_batch(samples, [[0, 1], [2]], pad_id=0, packed=True)


def _check(model, batch=None) -> dict[str, selfcheck.Outcome]:
    batch = batch or _batch()
    paths, skipped = custom_paths(_config(), model, CPU)
    n = count_targets(batch["labels"])
    outcomes = selfcheck.compare_paths(model, lambda fused: causal_lm_loss(model, batch, n, fused), paths,
                                       torch.float32)
    return {o.name: o for o in [*outcomes, *skipped]}


@pytest.fixture(scope="module")
def tiny(tiny_models):
    return tiny_models("llama")


def test_every_cpu_path_matches_the_library_path(tiny, one_thread, monkeypatch) -> None:
    model = _model(tiny)
    calls = {"per_sample": 0, "eager": 0, "tiles": 0}
    per_sample = packing.sdpa_per_sample
    monkeypatch.setattr(packing, "sdpa_per_sample", lambda *a: calls.__setitem__("per_sample", calls["per_sample"] + 1)
                        or per_sample(*a))
    forward = tiled_mlp.TiledMLPFunction.forward
    monkeypatch.setattr(tiled_mlp.TiledMLPFunction, "forward",
                        staticmethod(lambda ctx, fn, tile, x, *p: calls.__setitem__("tiles", x.shape[-2] // tile)
                                     or forward(ctx, fn, tile, x, *p)))
    found = _check(model)
    assert set(found) == set(PATH_NAMES)
    for name in PATH_NAMES:
        outcome = found[name]
        assert outcome.status == PASSED, (name, outcome)
        assert outcome.loss_diff <= 1e-5 and outcome.grad_diff <= 1e-4, (name, outcome)
    assert found["packed_attention"].reference == "eager attention (mask)"
    assert calls["per_sample"] > 0 and calls["tiles"] >= 3  # 300 tokens in tiles of 64
    assert offload_of(model).stats["offloaded"] > 0  # every saved input offloaded during the check
    assert packing.uses_packed_attention(model) and len(tiled_mlp.tiled_mlps(model)) == 2  # all left as they were


def _scaled_attention(original):
    return lambda *a: original(*a) * 1.01


@pytest.mark.parametrize("path", PATH_NAMES)
def test_a_path_made_slightly_wrong_is_blamed_alone(tiny, one_thread, monkeypatch, path: str) -> None:
    model = _model(tiny)
    if path == "packed_attention":  # 1 % off in every attention output
        monkeypatch.setattr(packing, "sdpa_per_sample", _scaled_attention(packing.sdpa_per_sample))
    elif path == "fused_loss":  # the model scales its logits: the fused head does not know
        model.get_base_model().lm_head.register_forward_hook(lambda module, args, out: out * 1.01)
    elif path == "tiled_mlp":
        forward = tiled_mlp.TiledMLPFunction.forward
        monkeypatch.setattr(tiled_mlp.TiledMLPFunction, "forward",
                            staticmethod(lambda *a: forward(*a) * 1.01))
    elif path == "activation_offload":  # a copy that comes back slightly changed
        unpack = ActivationOffload.unpack
        monkeypatch.setattr(ActivationOffload, "unpack", lambda self, item: unpack(self, item) * 1.01)
    else:  # the layer left out of checkpointing computes something else (not a plain scale: a norm follows)
        layer = model.get_base_model().model.layers[1]
        layer.register_forward_hook(lambda m, args, out: out if m.gradient_checkpointing
                                    else out + 0.01 * out.roll(1, dims=-1))
    found = _check(model)
    wrong = found[path]
    tol = selfcheck.tolerance_for(torch.float32)
    assert wrong.status == SWITCHED_OFF and wrong.error is None
    assert wrong.loss_diff > tol.loss or wrong.grad_diff > tol.gradients
    assert wrong.worst_gradient and "lora" in wrong.worst_gradient
    assert all(found[n].status == PASSED for n in PATH_NAMES if n != path), found


def test_a_path_that_raises_is_switched_off_with_the_error(tiny, one_thread, monkeypatch) -> None:
    model = _model(tiny)

    def broken(*args):
        raise RuntimeError("no kernel image is available for execution on the device")

    monkeypatch.setattr(tiled_mlp.TiledMLPFunction, "forward", staticmethod(broken))
    found = _check(model)
    assert found["tiled_mlp"].status == SWITCHED_OFF
    assert found["tiled_mlp"].error == "RuntimeError: no kernel image is available for execution on the device"
    assert all(found[n].status == PASSED for n in PATH_NAMES if n != "tiled_mlp")


def test_out_of_memory_is_raised_not_blamed_on_the_path(tiny, one_thread, monkeypatch) -> None:
    model = _model(tiny, offload=False)

    def oom(*args):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(tiled_mlp.TiledMLPFunction, "forward", staticmethod(oom))
    with pytest.raises(torch.cuda.OutOfMemoryError):
        _check(model)


def test_a_failing_reference_leaves_the_paths_unchecked(tiny, one_thread, monkeypatch) -> None:
    model = _model(tiny, offload=False)
    with packing.attention_as(model, "eager"):
        pass
    from transformers import AttentionInterface

    def broken(*args, **kwargs):
        raise ValueError("eager attention is broken")

    monkeypatch.setitem(AttentionInterface._global_mapping, "eager", broken)
    found = _check(model)
    checked = [n for n in PATH_NAMES if found[n].status != NOT_APPLICABLE]
    assert checked and all(found[n].status == UNCHECKED and "eager attention is broken" in found[n].reason
                           for n in checked)


def test_the_check_leaves_the_run_as_it_was(tiny, one_thread) -> None:
    """RNG, gradients, train/eval modes (dropout included) and the adapters' values are untouched."""
    model = _model(tiny, dropout=0.3, offload=False)
    model.eval()
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert any(not v.any() for v in before.values())  # LoRA's B: probed during the check, zero again after
    rng = torch.get_rng_state()
    found = _check(model)
    assert all(o.status in (PASSED, NOT_APPLICABLE) for o in found.values())
    assert torch.equal(torch.get_rng_state(), rng)
    assert not model.training and not any(m.training for m in model.modules())
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is None and torch.equal(p.detach(), before[name]), name


def test_padded_rows_compare_too(tiny, one_thread) -> None:
    """data.packing=false: right-padded rows through the packed attention's plain causal branch vs eager's mask."""
    model = _model(tiny, offload=False)
    g = torch.Generator().manual_seed(3)
    samples = [{"input_ids": (ids := torch.randint(6, 400, (n,), generator=g).tolist()), "labels": ids}
               for n in (40, 70)]
    batch = check_batch(samples, [[0], [1]], pad_id=0, packed=False)
    assert (batch["attention_mask"] == 0).any()
    found = _check(model, batch)
    assert found["packed_attention"].status == PASSED and found["packed_attention"].loss_diff < 1e-5


def test_difference_is_relative_per_tensor_with_a_floor() -> None:
    want = Measured(2.0, {"a": torch.tensor([3.0, 4.0]), "b": torch.tensor([0.0, 0.0])})
    same = selfcheck.difference(Measured(2.0, {k: v.clone() for k, v in want.grads.items()}), want)
    assert same == (0.0, 0.0, "a")
    got = Measured(2.002, {"a": torch.tensor([3.0, 4.05]), "b": torch.tensor([0.0, 0.0])})
    loss, grads, worst = selfcheck.difference(got, want)
    assert loss == pytest.approx(1e-3, rel=1e-5) and grads == pytest.approx(0.05 / 5, rel=1e-5) and worst == "a"
    # a tensor whose reference is zero is judged against a tenth of the typical norm (5 / sqrt(2))
    got = Measured(2.0, {"a": torch.tensor([3.0, 4.0]), "b": torch.tensor([0.0, 0.01])})
    assert selfcheck.difference(got, want)[1] == pytest.approx(0.01 / (0.1 * 5 / math.sqrt(2)), rel=1e-5)
    assert selfcheck.difference(Measured(float("nan"), want.grads), want)[0] == math.inf
    assert selfcheck.difference(Measured(2.0, {"a": torch.tensor([math.inf, 4.0]), "b": want.grads["b"]}),
                                want)[1] == math.inf
    assert selfcheck.difference(Measured(2.0, {"a": want.grads["a"]}), want)[1] == math.inf


def test_tolerance_per_compute_dtype() -> None:
    fp32, bf16, fp16 = (selfcheck.tolerance_for(d) for d in (torch.float32, torch.bfloat16, torch.float16))
    assert fp32.loss < fp16.loss < bf16.loss and fp32.gradients < fp16.gradients < bf16.gradients
    assert selfcheck.within(fp32.loss, fp32.gradients, fp32) and not selfcheck.within(fp32.loss * 2, 0, fp32)


def test_the_reference_of_packed_attention() -> None:
    cpu = torch.device("cpu")
    assert packing.reference_attention(cpu, torch.bfloat16, 64) == "eager"  # per-sample SDPA already
    assert not packing.flash_varlen_runs(cpu, torch.bfloat16, 64)
