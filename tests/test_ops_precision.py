"""ops.precision and ops.allocator: native-bf16 detection, fp32 adapters without fp32 activations,
fp16 loss scaling with the NaN guard and exact resume, the CUDA allocator setting."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from conftest import arithmetic_rows, make_qlora_model, write_config, write_jsonl

from qlora_kit.model.base import resolve_compute_dtype
from qlora_kit.ops import allocator
from qlora_kit.ops import precision as P
from qlora_kit.train import setup as train_setup


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


# --------------------------------------------------------------------------- fp16 loss scaling in the loop


def _force_loss_scaling(monkeypatch, init_scale: float) -> None:
    """CPU stand-in for a card without bf16: fp32 compute, but the fp16 path's GradScaler."""

    def resolve(compute_dtype, adapter_dtype, device):
        return P.Precision(device, torch.float32, torch.float32, loss_scaling=True)

    monkeypatch.setattr(train_setup, "resolve_precision", resolve)
    original = torch.amp.GradScaler.__init__
    monkeypatch.setattr(torch.amp.GradScaler, "__init__",
                        lambda self, device="cuda", **kw: original(self, device, init_scale=init_scale))


def _overflow_first_backward(run) -> None:
    """Simulate an fp16 gradient overflow: the first backward gives one adapter an inf gradient."""
    calls = []

    def hook(grad: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        return grad * float("inf") if len(calls) == 1 else grad

    run.params[0].register_hook(hook)


def _run(tmp_path: Path, model: Path, out: str, resume_from: Path | None = None, before_train=None, **train):
    from qlora_kit.core.config import dump_config, load_config
    from qlora_kit.core.signals import StopRequest
    from qlora_kit.rundir.target import Start
    from qlora_kit.train.loop import train as train_loop
    from qlora_kit.train.outputs import begin
    from qlora_kit.train.setup import setup

    data = write_jsonl(tmp_path / "data.jsonl", arithmetic_rows(40))
    cfg_path = write_config(tmp_path / f"{out}.yaml", model, data, tmp_path / out,
                            train={"max_steps": 4, "save_steps": 2, "gradient_accumulation_steps": 2, **train})
    cfg, sources = load_config(cfg_path)
    start = Start(Path(cfg.output_dir), "fresh" if resume_from is None else "resume", resume_from)
    run = setup(cfg, dump_config(cfg, sources), Path(cfg.output_dir), start, skip_memory_check=True)
    begin(run, start)
    if before_train is not None:
        before_train(run)
    with StopRequest() as stop:
        train_loop(run, stop)
    return run


def _adapter(run) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in run.model.named_parameters() if p.requires_grad}


def test_loss_scaling_is_exact_when_nothing_overflows(tmp_path, tiny_llama, monkeypatch) -> None:
    plain = _adapter(_run(tmp_path, tiny_llama, "plain"))
    _force_loss_scaling(monkeypatch, init_scale=2.0 ** 16)
    scaled_run = _run(tmp_path, tiny_llama, "scaled")
    assert scaled_run.scaler is not None and scaled_run.scaler.get_scale() == 2.0 ** 16
    scaled = _adapter(scaled_run)
    assert all(torch.equal(scaled[n], plain[n]) for n in plain), "power-of-two scaling must not change fp32 math"


def test_overflow_is_skipped_by_the_scaler_not_the_nan_guard(tmp_path, tiny_llama, monkeypatch) -> None:
    from qlora_kit.core.errors import NonFiniteLossError

    with pytest.raises(NonFiniteLossError):  # without loss scaling an inf gradient stops the run
        _run(tmp_path, tiny_llama, "unscaled", before_train=_overflow_first_backward, on_nonfinite="stop")
    _force_loss_scaling(monkeypatch, init_scale=2.0 ** 16)
    run = _run(tmp_path, tiny_llama, "scaled", before_train=_overflow_first_backward, on_nonfinite="stop")
    assert run.step == 4 and run.scaler.get_scale() == 2.0 ** 15  # one step skipped, the scale halved
    assert all(torch.isfinite(p).all() for p in run.params)
    logged = [r for r in run.metrics.read() if "loss_scale" in r]
    assert logged and logged[-1]["loss_scale"] == 2.0 ** 15


def test_loss_scale_is_checkpointed_for_exact_resume(tmp_path, tiny_llama, monkeypatch) -> None:
    from qlora_kit.rundir.checkpoint import read_checkpoint_state

    _force_loss_scaling(monkeypatch, init_scale=2.0 ** 16)
    full = _run(tmp_path, tiny_llama, "full", before_train=_overflow_first_backward)
    state = read_checkpoint_state(tmp_path / "full" / "checkpoint-2")
    assert state["grad_scaler"]["scale"] == 2.0 ** 15

    resumed_dir = tmp_path / "resumed"
    shutil.copytree(tmp_path / "full", resumed_dir)
    shutil.rmtree(resumed_dir / "checkpoint-4")
    resumed = _run(tmp_path, tiny_llama, "resumed", resume_from=resumed_dir / "checkpoint-2")
    assert resumed.step == 4 and resumed.scaler.get_scale() == full.scaler.get_scale() == 2.0 ** 15
    want, got = _adapter(full), _adapter(resumed)
    assert all(torch.equal(got[n], want[n]) for n in want), "resume must continue bit-identically"


# --------------------------------------------------------------------------- allocator


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
