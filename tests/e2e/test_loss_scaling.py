"""fp16 loss scaling in the training loop: exact when nothing overflows, resumable."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from conftest import arithmetic_rows, write_config, write_jsonl

from qlora_kit.ops import precision as P
from qlora_kit.train import setup as train_setup

pytestmark = pytest.mark.e2e


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
