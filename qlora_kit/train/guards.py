"""Non-finite losses and gradients: skip, stop, and never save them."""

from __future__ import annotations

import logging

import torch

from qlora_kit.core.errors import NonFiniteLossError
from qlora_kit.rundir import checkpoint as ckpt
from qlora_kit.train.state import Run

log = logging.getLogger("qlora_kit")


MAX_CONSECUTIVE_SKIPS = 10
MIN_LOSS_SCALE = 1.0  # fp16 loss scaling: below this the run is not recovering


def guard_nonfinite(run: Run, loss: torch.Tensor, grad_norm: torch.Tensor) -> bool:
    """Record a non-finite step; return True when the optimizer step must be skipped.

    ``stop`` mode only updates device flags (no host sync); they are read with the logged
    loss and before every save.  ``skip`` mode reads the flag every step (one sync).  With
    fp16 loss scaling, overflowing gradients are the scaler's business (it skips the step
    and lowers the scale); only a non-finite loss counts here.
    """
    finite = torch.isfinite(loss) if run.scaler is not None else torch.isfinite(loss) & torch.isfinite(grad_norm)
    bad = ~finite
    if run.cfg.train.on_nonfinite == "stop":
        run.first_bad_step = torch.where(run.nonfinite | ~bad, run.first_bad_step, run.step + 1)
        run.nonfinite = run.nonfinite | bad
        return False
    if not run.dist.any(bool(bad)):  # every rank skips the same steps
        run.skipped_consecutive = 0
        return False
    run.skipped_steps += 1
    run.skipped_consecutive += 1
    log.warning("step %d: non-finite loss or gradient; step skipped (%d skipped so far)", run.step + 1,
                run.skipped_steps)
    if run.skipped_consecutive >= MAX_CONSECUTIVE_SKIPS:
        raise NonFiniteLossError(
            f"{MAX_CONSECUTIVE_SKIPS} consecutive steps had a non-finite loss; stopping",
            "lower train.learning_rate, use bfloat16 compute, or check the data",
        )
    return True


def raise_if_nonfinite(run: Run, bad: bool) -> None:
    if not bad:
        return
    first = int(run.first_bad_step)
    when = f"at step {first}" if first > 0 else f"by step {run.step}"  # > 0: seen on this rank
    last = ckpt.latest_checkpoint(run.out)
    where = f"; the last good checkpoint is {last.name}" if last else "; no checkpoint was written before it"
    raise NonFiniteLossError(
        f"non-finite loss or gradient {when}: training stopped, nothing was saved after it{where}",
        "lower train.learning_rate or max_grad_norm, use bfloat16 compute, check the data; "
        "or set train.on_nonfinite=skip",
    )


def raise_if_scale_collapsed(run: Run, scale: float | None) -> None:
    """fp16: a loss scale below 1 means the gradients kept overflowing (or are NaN) step after step."""
    if scale is not None and scale < MIN_LOSS_SCALE:
        raise NonFiniteLossError(
            f"the fp16 loss scale fell to {scale:g} by step {run.step}: the gradients are non-finite step after "
            "step; nothing was saved after the last good checkpoint",
            "lower train.learning_rate or max_grad_norm, check the data, or train on a GPU with bfloat16 "
            "(compute capability 8.0+)",
        )


def adapters_finite(run: Run) -> bool:
    """True when every trainable weight (this rank's shard under FSDP) is finite (one sync)."""
    flags = torch.stack([torch.isfinite(p).all() for p in run.params])
    return bool(flags.all())
