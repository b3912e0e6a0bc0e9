"""Comparing one of qlora-kit's own computation paths with the plain library path, on real inputs.

qlora-kit trains through code of its own where the libraries are too slow or too large for a
24 GB card: packed attention (torch's varlen flash kernel on CUDA), trl's fused LM-head loss,
the tiled MLP, activation offload on a side CUDA stream, a sparse checkpoint layout.  Each
is a :class:`Path`: a context that puts the model back on the library path for a block
(``plain``) and, optionally, one that makes the path do real work on a short input
(``active``: short MLP tiles, every saved tensor offloaded).

:func:`compare_paths` runs one forward and backward with every path on the library path (the
reference), then one per path with only that path switched on, and compares the loss and
every adapter gradient (:func:`difference`) within :data:`TOLERANCES` for the compute dtype.
Each path is isolated: a path that is wrong or raises is blamed alone.  The passes run in
train mode (checkpointing and offload only act there) with every dropout module off, adapters
that are all zeros (LoRA's B at init) temporarily probed with small seeded values so every
adapter gradient carries signal, the RNG forked (a run's random stream is untouched) and the
gradients put back afterwards.  Out-of-memory errors are raised, never taken for a failing path.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, ContextManager, Iterator, Sequence

import torch
from torch import nn

PASSED, SWITCHED_OFF, NOT_APPLICABLE, UNCHECKED = "passed", "switched_off", "not_applicable", "unchecked"
PROBE_STD = 0.02  # std of the values given to all-zero adapter tensors during the check
GRAD_FLOOR = 0.1  # a gradient tensor's error is relative to at least this fraction of the typical tensor norm
FP16_BACKWARD_SCALE = 1024.0  # fp16 compute: the check's backward is scaled (no underflow), results unscaled


@dataclass(frozen=True)
class Tolerance:
    """Largest relative differences accepted between a path and the library path.

    ``loss``: ``|loss - ref| / |ref|``.  ``gradients``: per adapter tensor ``||g - ref|| /
    max(||ref||, GRAD_FLOOR x the typical tensor norm)``, the largest over all tensors.
    """

    loss: float
    gradients: float

    def to_json(self) -> dict[str, float]:
        return {"loss": self.loss, "gradients": self.gradients}


# Per compute dtype.  fp32: summation order only (a tiled weight gradient, a fused log-sum-exp) differs,
# ~1e-6 measured on CPU.  16-bit: the kernels round intermediate values differently (bf16 keeps 8 bits of
# mantissa, fp16 11): differences of ~1e-3 in the loss and ~1e-2 in gradients are rounding; a wrong mask,
# scale or stream order changes them by far more (tests/unit/ops/test_selfcheck_paths.py).
TOLERANCES: dict[torch.dtype, Tolerance] = {
    torch.float32: Tolerance(loss=1e-4, gradients=1e-3),
    torch.float16: Tolerance(loss=5e-3, gradients=2e-2),
    torch.bfloat16: Tolerance(loss=1e-2, gradients=5e-2),
}


def tolerance_for(dtype: torch.dtype) -> Tolerance:
    """The tolerance of a run computing in ``dtype`` (fp32's for anything else)."""
    return TOLERANCES.get(dtype, TOLERANCES[torch.float32])


@dataclass
class Path:
    """One of qlora-kit's own paths as the check sees it.

    ``plain()``: a context running the block on the library path instead.  ``active()``: a
    context making the path do real work on a short input (default: nothing to do).
    ``fused_loss``: the path is the loss call itself (the pass asks ``loss_fn`` for it).
    ``reference``: what the path is compared with, in words (for logs and the manifest).
    """

    name: str
    plain: Callable[[], ContextManager[Any]]
    reference: str
    active: Callable[[], ContextManager[Any]] = contextlib.nullcontext
    fused_loss: bool = False


@dataclass
class Outcome:
    """What the check found for one path."""

    name: str
    status: str  # PASSED, SWITCHED_OFF (differs or raised), NOT_APPLICABLE, UNCHECKED (the reference failed)
    reference: str = ""
    loss_diff: float | None = None
    grad_diff: float | None = None
    worst_gradient: str | None = None
    error: str | None = None
    reason: str | None = None  # why not applicable / unchecked
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        record: dict[str, Any] = {"status": self.status}
        for key in ("reference", "loss_diff", "grad_diff", "worst_gradient", "error", "reason"):
            value = getattr(self, key)
            if value not in (None, ""):
                record[key] = _rounded(value) if isinstance(value, float) else value
        if self.status in (PASSED, SWITCHED_OFF):
            record["seconds"] = round(self.seconds, 3)
        return record

    def summary(self) -> str:
        """``loss 1.2e-06, gradients 3.4e-05`` or the error."""
        if self.error:
            return f"raised {self.error}"
        if self.loss_diff is None:
            return self.reason or self.status
        return f"loss {self.loss_diff:.1e}, gradients {self.grad_diff:.1e}"


@dataclass
class Measured:
    """Loss and adapter gradients (fp32 copies) of one forward + backward."""

    loss: float
    grads: dict[str, torch.Tensor] = field(default_factory=dict)


def is_oom(exc: BaseException) -> bool:
    """An out-of-memory error (torch's, or a kernel's RuntimeError saying so)."""
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def difference(got: Measured, want: Measured) -> tuple[float, float, str | None]:
    """(relative loss difference, largest relative gradient difference, the tensor it was found in).

    Non-finite values count as an infinite difference.
    """
    if not math.isfinite(got.loss) or not math.isfinite(want.loss):
        loss_diff = 0.0 if got.loss == want.loss else math.inf
    else:
        loss_diff = abs(got.loss - want.loss) / max(abs(want.loss), 1e-12)
    if got.grads.keys() != want.grads.keys():
        return loss_diff, math.inf, "a different set of adapter gradients"
    norms = {n: float(g.norm()) for n, g in want.grads.items()}
    typical = math.sqrt(sum(v * v for v in norms.values()) / max(len(norms), 1))
    floor = max(GRAD_FLOOR * typical, 1e-30)
    worst, worst_name = 0.0, None
    for name, ref in want.grads.items():
        err = float((got.grads[name] - ref).norm())
        rel = err / max(norms[name], floor) if math.isfinite(err) else math.inf
        if worst_name is None or rel > worst:
            worst, worst_name = rel, name
    return loss_diff, worst, worst_name


def within(loss_diff: float, grad_diff: float, tol: Tolerance) -> bool:
    return loss_diff <= tol.loss and grad_diff <= tol.gradients


def measure(model: nn.Module, loss_fn: Callable[[bool], torch.Tensor], fused: bool,
            contexts: Sequence[ContextManager[Any]], backward_scale: float = 1.0) -> Measured:
    """Forward (``loss_fn(fused)``) and backward inside ``contexts``; the loss and adapter gradients."""
    params = trainable(model)
    for _, p in params:
        p.grad = None
    with contextlib.ExitStack() as stack:
        for context in contexts:
            stack.enter_context(context)
        loss = loss_fn(fused)
        (loss * backward_scale if backward_scale != 1.0 else loss).backward()
    grads = {n: p.grad.detach().float() / backward_scale if p.grad is not None
             else torch.zeros_like(p, dtype=torch.float32) for n, p in params}
    value = float(loss.detach().float())
    for _, p in params:
        p.grad = None
    return Measured(value, grads)


def compare_paths(model: nn.Module, loss_fn: Callable[[bool], torch.Tensor], paths: Sequence[Path],
                  dtype: torch.dtype, backward_scale: float = 1.0) -> list[Outcome]:
    """Each path alone against the library path (every path plain): one outcome per path, in order.

    ``loss_fn(fused)`` runs the forward of the check input (in the run's precision context) and
    returns its loss; ``fused`` asks for the fused loss.  A path that raises anything but an
    out-of-memory error is SWITCHED_OFF with the error; one outside :func:`tolerance_for`
    ``dtype`` likewise; a reference that raises leaves every path UNCHECKED.

    Raises:
        torch.cuda.OutOfMemoryError (or a RuntimeError saying so): out of memory in any pass.
    """
    tol = tolerance_for(dtype)
    if not paths:
        return []
    with deterministic(model), probed_adapters(model):
        try:
            want = measure(model, loss_fn, False, [p.plain() for p in paths], backward_scale)
        except Exception as exc:
            if is_oom(exc):
                raise
            reason = f"the library path itself raised {_error_line(exc)}"
            return [Outcome(p.name, UNCHECKED, p.reference, reason=reason) for p in paths]
        outcomes = []
        for path in paths:
            outcomes.append(_check_one(model, loss_fn, path, paths, want, tol, backward_scale))
    return outcomes


def _check_one(model: nn.Module, loss_fn: Callable[[bool], torch.Tensor], path: Path, paths: Sequence[Path],
               want: Measured, tol: Tolerance, backward_scale: float) -> Outcome:
    started = time.perf_counter()
    contexts = [p.plain() for p in paths if p is not path]
    try:
        got = measure(model, loss_fn, path.fused_loss, [*contexts, path.active()], backward_scale)
    except Exception as exc:
        if is_oom(exc):
            raise
        return Outcome(path.name, SWITCHED_OFF, path.reference, error=_error_line(exc),
                       seconds=time.perf_counter() - started)
    loss_diff, grad_diff, worst = difference(got, want)
    status = PASSED if within(loss_diff, grad_diff, tol) else SWITCHED_OFF
    return Outcome(path.name, status, path.reference, loss_diff, grad_diff, worst if status != PASSED else None,
                   seconds=time.perf_counter() - started)


def trainable(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


@contextlib.contextmanager
def deterministic(model: nn.Module) -> Iterator[None]:
    """Train mode with every dropout module off, the RNG forked, gradients and modes put back afterwards."""
    params = trainable(model)
    grads = [p.grad for _, p in params]
    modes = [(m, m.training) for m in model.modules()]
    device = next((p.device for _, p in params), torch.device("cpu"))
    model.train()
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.eval()
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            yield
    finally:
        for (_, p), grad in zip(params, grads):
            p.grad = grad
        for module, mode in modes:
            module.training = mode


@contextlib.contextmanager
def probed_adapters(model: nn.Module, seed: int = 0) -> Iterator[None]:
    """Give all-zero adapter tensors (LoRA's B at init) small seeded values for the block; zero them again after.

    With B = 0 the gradients of every A are zero on both paths and compare nothing; probed,
    every adapter gradient carries signal and the adapters take part in the forward.
    """
    generator = torch.Generator().manual_seed(seed)
    zero = [p for _, p in trainable(model) if p.numel() and not bool(p.detach().any())]
    for p in zero:
        p.data.copy_(torch.randn(p.shape, generator=generator, dtype=torch.float32) * PROBE_STD)
    try:
        yield
    finally:
        for p in zero:
            p.data.zero_()


def _error_line(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text[:200]}" if text else type(exc).__name__


def _rounded(value: float) -> float | str:
    if not math.isfinite(value):
        return "inf" if value > 0 else "nan"
    return float(f"{value:.3g}")
