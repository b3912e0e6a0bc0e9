"""The training loop: micro-batches, forward and loss, backward, optimizer step, logging, evaluation, checkpoints.

The data order is a pure function of seed and epoch (``train.order``) and the loss is
normalised over every trainable token of the accumulated batch; a stop signal is honoured
between micro-batches by dropping the unfinished step and checkpointing the last one.
"""

from __future__ import annotations

import logging
import warnings
from itertools import islice
from typing import Any, Iterator

import torch

from qlora_kit.core.errors import Preempted
from qlora_kit.core.signals import StopRequest
from qlora_kit.data.batching import collate, plan_batches
from qlora_kit.data.encode import IGNORE_INDEX
from qlora_kit.data.preference import collate_pairs
from qlora_kit.ops.loss import count_targets
from qlora_kit.rundir import checkpoint as ckpt
from qlora_kit.train.guards import guard_nonfinite
from qlora_kit.train.order import EpochPlans, micro_batches_from, row_tokens
from qlora_kit.train.outputs import save
from qlora_kit.train.preference import means, take_metrics
from qlora_kit.train.progress import Progress, log_step
from qlora_kit.train.state import Run
from qlora_kit.variants import adalora
from qlora_kit.variants.adalora import orthogonality_penalty

log = logging.getLogger("qlora_kit")


def train(run: Run, stop: StopRequest) -> None:
    """Optimizer steps until ``total_steps``, logging, evaluating and checkpointing on schedule.

    Each step reads, in order: its micro-batches (collated one at a time as they are consumed),
    forward and loss, backward, gradient clipping, the optimizer step, logging, evaluation and
    checkpointing.  A stop signal is honoured between micro-batches: the unfinished step is
    dropped (gradients cleared, RNG states put back) and the last finished step is
    checkpointed, so the resume stays exact.
    """
    cfg = run.cfg.train
    eval_every = cfg.eval_steps or cfg.save_steps
    plans = EpochPlans(run.cfg, run.data)
    stream = micro_batches_from(run.cfg, run.data, run.micro_index, plans)
    model = run.wrapped if run.wrapped is not None else run.model  # DDP/FSDP around the model when several train
    progress = Progress(run.total_steps, run.step, enabled=run.dist.is_main,
                        micro_per_step=cfg.gradient_accumulation_steps)
    log.info("training: %d optimizer steps x %d micro-batches of %d (max_length %d) on %s%s",
             run.total_steps - run.step, cfg.gradient_accumulation_steps, cfg.micro_batch_size, cfg.max_length,
             run.device, f" x {run.dist.world_size} processes" if run.dist.active else "")
    try:
        if _eval_pending(run, eval_every):  # resumed from a checkpoint whose evaluation a signal cut short
            with progress.doing("evaluating"):
                _evaluate_and_log(run, stop)
        while run.step < run.total_steps:
            if run.dist.any(stop.requested):  # every rank stops after the same step
                _preempt(run, stop)
            lr, rng = run.optimizer.param_groups[0]["lr"], ckpt.rng_state()
            loss = torch.zeros((), device=run.device)  # this rank's share of the step's loss
            try:
                n_items, n_tokens = _count_step(run, plans, stop)  # the step's trainable tokens, before any forward
                for k, (last, batch) in enumerate(_step_batches(run, stream, stop)):
                    with run.dist.accumulating(model, last=last):  # gradients synchronised on the last one only
                        micro_loss = forward_loss(run, model, batch, n_items)
                        backward(run, micro_loss)
                    loss += micro_loss.detach().float()
                    progress.micro_batch(k + 1)
            except _StepInterrupted:
                run.optimizer.zero_grad(set_to_none=True)
                ckpt.set_rng_state(rng)
                take_metrics(run.loss_fn)  # the unfinished step's metrics go with it
                _preempt(run, stop)
            sums = take_metrics(run.loss_fn)  # a preference method's rewards etc. (None for SFT)
            grad_norm = clip_gradients(run, model)
            run.micro_index += cfg.gradient_accumulation_steps
            skipped = guard_nonfinite(run, loss, grad_norm)
            optimizer_step(run, skipped)
            run.optimizer.zero_grad(set_to_none=True)
            scheduler_step(run)
            run.step += 1
            if not skipped:
                run.window.add(loss, n_tokens, sums)
            if run.step % cfg.logging_steps == 0 or run.step == run.total_steps:
                log_step(run, run.window, lr, grad_norm, progress)
            progress.advance(run.step)  # after the step's log line: a progress line only when none was written
            if run.data.val and (run.step % eval_every == 0 or run.step == run.total_steps):
                with progress.doing("evaluating"):
                    _evaluate_and_log(run, stop)
            if run.step % cfg.save_steps == 0 or run.step == run.total_steps:
                with progress.doing("saving a checkpoint"):
                    save(run)
        if stop.requested and _eval_pending(run, eval_every):  # the last evaluation was cut short
            _preempt(run, stop)
    finally:
        progress.close()


class _StepInterrupted(Exception):
    """A stop signal arrived between the micro-batches of an optimizer step."""


def _count_step(run: Run, plans: EpochPlans, stop: StopRequest) -> tuple[int, int]:
    """(trainable targets, tokens) of the next optimizer step, counted from the samples (nothing collated).

    Counted over the global micro-batches: every rank of a multi-process run gets the same number.

    Equals the collated labels' ``[:, 1:] != -100`` count: a sample's first label is always -100
    and samples/packed rows never exceed max_length.  Preference methods count pairs (their loss
    is a mean over pairs).  Raises _StepInterrupted on a stop request.
    """

    pairs = run.cfg.train.method != "sft"
    targets = tokens = 0
    micro = micro_batches_from(run.cfg, run.data, run.micro_index, plans)
    for k, (_epoch, rows) in enumerate(islice(micro, run.cfg.train.gradient_accumulation_steps)):
        if k % 4096 == 4095 and stop.requested:
            raise _StepInterrupted
        for row in rows:
            for i in row:
                labels = run.data.train[i]["labels"]
                targets += 1 if pairs else len(labels) - labels.count(IGNORE_INDEX)
                tokens += len(labels)
    return max(1, targets), tokens


def _step_batches(run: Run, stream: Iterator[tuple[int, list[list[int]]]], stop: StopRequest
                  ) -> Iterator[tuple[bool, dict[str, Any]]]:
    """(is the last one, batch) for the step's micro-batches (this rank's rows of each), collated lazily.

    Raises _StepInterrupted once a stop is requested, in a single process only: ranks of a
    multi-process run must run the same collectives, so they stop together at a step boundary.
    """
    count = run.cfg.train.gradient_accumulation_steps
    for k in range(count):
        if stop.requested and not run.dist.active:
            raise _StepInterrupted
        _epoch, rows = next(stream)
        yield k == count - 1, _collate_local(run, rows)


def _collate_local(run: Run, rows: list[list[int]]) -> dict[str, Any]:
    """This rank's rows of a global micro-batch, collated (all of them in a single process).

    A rank left without rows (short final micro-batch) runs the first row with every label
    ignored: it contributes nothing, but its forward/backward keeps the collectives matched.
    """

    mine, masked = run.dist.local_rows(rows)
    return collate_rows(run, run.data.train, mine, masked)


def collate_rows(run: Run, samples: Any, rows: list[list[int]], masked: bool = False) -> dict[str, Any]:
    """One micro-batch of ``rows``: SFT samples (``data.batching.collate``) or preference pairs
    (``data.preference.collate_pairs``); ``masked``: nothing in it counts (labels -100, pair weights 0)."""
    if run.cfg.train.method == "sft":
        batch = collate(samples, rows, run.tokenizer.pad_token_id, run.cfg.train.max_length, run.cfg.data.packing)
    else:
        batch = collate_pairs(samples, rows, run.tokenizer.pad_token_id, run.cfg.data.packing)
    if masked:
        batch["labels"] = torch.full_like(batch["labels"], IGNORE_INDEX)
        if "pair_weight" in batch:
            batch["pair_weight"] = torch.zeros_like(batch["pair_weight"])
    return batch


def _eval_pending(run: Run, eval_every: int) -> bool:
    """True when this step is an evaluation step whose evaluation has not completed.

    A signal during an evaluation stops it; the checkpoint of that step records the last
    completed one (``last_eval_step``), so ``--resume`` runs it before training on and the
    metrics equal the uninterrupted run's.
    """
    due = run.step % eval_every == 0 or run.step == run.total_steps
    return bool(run.data.val) and run.step > 0 and due and run.last_eval_step < run.step


def forward_loss(run: Run, model: Any, batch: dict[str, Any], n_items: int) -> torch.Tensor:
    """Forward one micro-batch in the run's precision context; its summed token losses / ``n_items``.

    ``n_items`` counts the trainable tokens of the whole step (of every rank in a multi-process
    run), so micro-batches with few trainable tokens are not over-weighted and the step's loss
    is the mean over all of them.  ``run.loss_fn`` is SFT's next-token loss, or a preference
    method's (``train.preference``: summed pair losses / the step's pairs).
    """
    with run.precision.forward_context():  # autocast with fp32 adapter masters on CUDA
        return run.loss_fn(model, to_device(batch, run.device), n_items, run.cfg.train.fused_loss)


def backward(run: Run, loss: torch.Tensor) -> None:
    """Backward of a micro-batch's loss: times the number of processes (DDP/FSDP average the
    gradients), and scaled for fp16 compute (the gradients are unscaled before clipping)."""
    factor = run.dist.loss_factor()
    scaled = loss * factor if factor != 1.0 else loss
    (run.scaler.scale(scaled) if run.scaler is not None else scaled).backward()


def clip_gradients(run: Run, model: Any) -> torch.Tensor:
    """Finish the step's gradients and clip them to ``max_grad_norm``; returns the norm (on device).

    AdaLoRA's orthogonality penalty is added here, once per optimizer step (it is not part of the
    logged loss); fp16 gradients are unscaled first.
    """
    penalty = orthogonality_penalty(run.model, run.cfg.lora.adalora_orth_reg_weight)
    if penalty is not None:
        (run.scaler.scale(penalty) if run.scaler is not None else penalty).backward()
    if run.scaler is not None:
        run.scaler.unscale_(run.optimizer)
    max_norm = run.cfg.train.max_grad_norm or float("inf")
    return run.dist.clip_grad_norm(model, run.params, max_norm).detach().float()


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """Tensors of a collated batch on ``device`` (host values such as ``max_length_q`` stay)."""
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def optimizer_step(run: Run, skipped: bool) -> None:
    """Apply the step (the loss scaler skips it by itself when the scaled gradients overflowed).

    AdaLoRA's budget step follows every step that was applied, before the gradients are
    zeroed (it scores the triplets by |p * grad|); a step the scaler skipped has non-finite
    gradients that would poison its importance averages.
    """

    if run.scaler is None:
        if not skipped:
            run.optimizer.step()
            adalora.after_optimizer_step(run.model, run.step)
        return
    if skipped:
        run.scaler.update()
        return
    scale = run.scaler.get_scale() if adalora.tuner(run.model) is not None else None  # a host sync: AdaLoRA only
    run.scaler.step(run.optimizer)  # one host sync: the scaler reads its overflow flag
    run.scaler.update()
    if scale is not None and run.scaler.get_scale() >= scale:  # the scale only drops when the step was skipped
        adalora.after_optimizer_step(run.model, run.step)


def scheduler_step(run: Run) -> None:
    """Advance the LR schedule (a pure function of the step, skipped steps included)."""
    with warnings.catch_warnings():  # torch warns when the loss scaler skipped the very first optimizer step
        warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)` before")
        run.scheduler.step()


def evaluate(run: Run, stop: StopRequest) -> dict[str, float] | None:
    """``eval_loss`` (token-weighted for SFT, per pair for preference methods, with their ``eval_rewards/...``)
    on the validation rows; None when interrupted by a stop signal.

    Batched like training (same packing, same fused loss, same precision context), in
    eval mode and without gradients.  Several processes split each (global) batch like
    training and add up their sums; they stop together.
    """

    cfg = run.cfg
    lengths = [len(s["input_ids"]) for s in run.data.val]
    plan = plan_batches(lengths, cfg.train.micro_batch_size * run.dist.world_size, row_tokens(cfg),
                        cfg.data.packing, cfg.train.seed, 0, False)
    model = run.wrapped if run.wrapped is not None else run.model
    total = torch.zeros((), device=run.device)
    count = 0
    model.eval()
    try:
        with torch.no_grad():
            for rows in plan:
                if run.dist.any(stop.requested):
                    return None
                mine, masked = run.dist.local_rows(rows)
                batch = collate_rows(run, run.data.val, mine, masked)
                n = int(batch["pair_weight"].sum()) if "pair_weight" in batch else count_targets(batch["labels"])
                with run.precision.forward_context():
                    loss = run.loss_fn(model, to_device(batch, run.device), max(n, 1), cfg.train.fused_loss)
                total += loss.float() * n
                count += n
    finally:
        model.train()
    sums = take_metrics(run.loss_fn) or {}
    names = list(sums)
    values = torch.stack([total.double(), total.new_tensor(count, dtype=torch.float64),
                          *(sums[k].double() for k in names)])
    if run.dist.active:  # every rank's sums
        values = run.dist.sum(values)
    total, count, *rest = values.tolist()
    return {"eval_loss": total / max(count, 1), **means(dict(zip(names, rest)), "eval_")}


def _evaluate_and_log(run: Run, stop: StopRequest) -> None:
    result = evaluate(run, stop)
    if result is None:
        return  # interrupted: the caller checkpoints at this step boundary
    eval_loss = result["eval_loss"]
    run.last_eval_loss, run.last_eval_step = eval_loss, run.step
    run.metrics.append({"step": run.step, **{k: round(v, 6) for k, v in result.items()}})
    accuracy = result.get("eval_rewards/accuracies")
    log.info("step %d: eval loss %.4f%s", run.step, eval_loss,
             "" if accuracy is None else f", reward accuracy {accuracy:.3f}, margin {result['eval_rewards/margins']:.4f}")


def _preempt(run: Run, stop: StopRequest) -> None:
    if run.step == 0 and run.fresh:  # nothing learned yet: the fresh start is undone, no checkpoint needed
        raise Preempted(f"stopped by {stop.signal_name} before the first step finished; nothing was kept",
                        "run the same command again")
    path = save(run)
    by = stop.signal_name or "a stop signal to another process of this run"
    raise Preempted(
        f"stopped by {by} at step {run.step} of {run.total_steps}; checkpoint saved in {path}",
        "continue with the same command plus --resume",
    )
