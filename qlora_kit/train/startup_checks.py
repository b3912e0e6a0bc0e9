"""The start-up check of a run: each of qlora-kit's own paths in use, against the library path, before step 1.

On a slice of the first micro-batch (:data:`CHECK_TOKENS` tokens, packed or padded as in
training: the last tokens of its samples, where the answers are), the real model runs one
forward and backward per path (``ops.selfcheck.compare_paths``):

======================  ==============================================================
path                    compared with
======================  ==============================================================
``packed_attention``    per-sample SDPA where it runs the varlen flash kernel (CUDA);
                        transformers' eager attention with its block-diagonal mask
                        where it already runs per-sample SDPA (CPU)
``fused_loss``          full logits (the model's own loss)
``tiled_mlp``           the plain MLP (tiles of :data:`CHECK_TILE_TOKENS` in the check)
``activation_offload``  plain checkpointing (every saved input offloaded in the check)
``checkpoint_layout``   every decoder layer checkpointed
======================  ==============================================================

A path that differs beyond the dtype's tolerance or raises (anything but out-of-memory) is
switched off for the run — the model goes on the library path, the config records it — with
one warning line naming it and the measured difference.  If the run no longer fits the GPU
then, it stops with exit 4 and both predictions.  Several processes agree: a path switched
off on any rank is switched off on every rank.  The outcome is returned for the manifest
(``startup_checks``); ``train.startup_checks: false`` skips it all.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import time
from pathlib import Path as FilePath
from typing import Any, Callable, Sequence

import torch

from qlora_kit.core.config import Config
from qlora_kit.core.errors import ModelError, OutOfMemoryError
from qlora_kit.data.batching import collate
from qlora_kit.data.preference import CHOSEN_LENGTH, split_pair
from qlora_kit.data.encode import IGNORE_INDEX
from qlora_kit.ops import checkpointing, packing, tiled_mlp
from qlora_kit.ops.loss import causal_lm_loss, count_targets
from qlora_kit.ops.offload import disable_offload, offload_of, offloading_everything, without_offload
from qlora_kit.ops.selfcheck import (
    FP16_BACKWARD_SCALE,
    NOT_APPLICABLE,
    PASSED,
    SWITCHED_OFF,
    UNCHECKED,
    Outcome,
    Path,
    compare_paths,
    is_oom,
    tolerance_for,
)
from qlora_kit.plan.fit import predicted_need, suggest
from qlora_kit.plan.parallel import planning_for
from qlora_kit.plan.shape import load_shape_file
from qlora_kit.plan.terms import CUDA_CONTEXT_BYTES, GiB
from qlora_kit.train import distributed
from qlora_kit.train.order import epoch_plan

log = logging.getLogger("qlora_kit")

CHECK_TOKENS = 256  # tokens of the first micro-batch the check runs on
CHECK_TILE_TOKENS = 64  # MLP tile length during the check, so its few hundred tokens make several tiles
PATH_NAMES = ("packed_attention", "fused_loss", "tiled_mlp", "activation_offload", "checkpoint_layout")
REPORT_HINT = "if it happens again on this card, report it (README: First run on a new GPU)"


def run_startup_checks(cfg: Config, model: Any, data: Any, pad_id: int, precision: Any, source: FilePath,
                       skip_memory_check: bool = False) -> tuple[Config, dict[str, Any]]:
    """Check every path of ours the run uses; return the config without the failed ones, and the record.

    ``model`` is the unwrapped model (DDP/FSDP wrap it afterwards), on the training device.

    Raises:
        OutOfMemoryError: out of memory during the check, or the run no longer fits the GPU once a
            failed path is switched off (memory-saving paths).
    """
    if not cfg.train.startup_checks:
        log.info("start-up check: skipped (train.startup_checks=false)")
        return cfg, {"ran": False, "reason": "train.startup_checks=false"}
    dist = distributed.current()
    started = time.perf_counter()
    with dist.together():  # no collective inside: an error on any rank ends every rank, reported once
        batch = check_batch(data.train, epoch_plan(cfg, data, 0)[0], pad_id, cfg.data.packing)
        outcomes = _local_outcomes(cfg, model, batch, precision)
    outcomes = _agree(outcomes, dist)
    failed = [o for o in outcomes if o.status == SWITCHED_OFF]
    checked = cfg
    if failed:
        cfg = switch_off(cfg, model, [o.name for o in failed], precision)
    seconds = time.perf_counter() - started
    _log_outcomes(outcomes, int(batch["input_ids"].numel()), seconds, precision.compute_dtype)
    if failed and precision.device.type == "cuda" and not skip_memory_check:
        with dist.together():
            _check_still_fits(checked, cfg, source, precision.device, [o.name for o in failed])
    return cfg, {
        "ran": True, "seconds": round(seconds, 3), "tokens": int(batch["input_ids"].numel()),
        "samples": _sample_count(batch), "compute_dtype": str(precision.compute_dtype).removeprefix("torch."),
        "tolerance": tolerance_for(precision.compute_dtype).to_json(),
        "paths": {o.name: o.to_json() for o in outcomes},
    }


def _local_outcomes(cfg: Config, model: Any, batch: dict[str, Any], precision: Any) -> list[Outcome]:
    """This process's outcome for every name of :data:`PATH_NAMES`, in that order."""
    paths, skipped = custom_paths(cfg, model, precision)
    batch = {k: v.to(precision.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    n_items = max(1, count_targets(batch["labels"]))

    def loss_fn(fused: bool) -> torch.Tensor:
        with precision.forward_context():
            return causal_lm_loss(model, batch, n_items, fused)

    scale = FP16_BACKWARD_SCALE if precision.compute_dtype == torch.float16 else 1.0
    try:
        found = compare_paths(model, loss_fn, paths, precision.compute_dtype, scale)
    except Exception as exc:
        if not is_oom(exc):
            raise
        raise OutOfMemoryError(
            f"out of memory during the start-up check ({int(batch['input_ids'].numel())} tokens): this run has no "
            f"room to spare on this GPU", "lower train.max_length or train.micro_batch_size (`qlora-kit plan CONFIG` "
            "shows what fits), or set train.startup_checks=false") from exc
    by_name = {o.name: o for o in [*found, *skipped]}
    if precision.device.type == "cuda":
        torch.cuda.empty_cache()
    return [by_name[name] for name in PATH_NAMES]


def custom_paths(cfg: Config, model: Any, precision: Any) -> tuple[list[Path], list[Outcome]]:
    """The paths of ours ``model`` runs (as :class:`Path`), and the others as NOT_APPLICABLE outcomes with why."""
    paths: list[Path] = []
    skipped: list[Outcome] = []

    def skip(name: str, reason: str) -> None:
        skipped.append(Outcome(name, NOT_APPLICABLE, reason=reason))

    attention = model.config._attn_implementation
    if packing.uses_packed_attention(model):
        reference = attention_reference(model, precision)
        paths.append(Path("packed_attention", lambda: packing.attention_as(model, reference),
                          "per-sample SDPA" if reference == packing.PER_SAMPLE_NAME else "eager attention (mask)"))
    else:
        skip("packed_attention", f"attention is transformers' {attention}")
    if cfg.train.fused_loss:
        paths.append(Path("fused_loss", contextlib.nullcontext, "full logits", fused_loss=True))
    else:
        skip("fused_loss", "train.fused_loss=false")
    if tiled_mlp.tiled_mlps(model):
        paths.append(Path("tiled_mlp", lambda: tiled_mlp.untiled(model), "the plain MLP",
                          active=lambda: tiled_mlp.tile_length(model, CHECK_TILE_TOKENS)))
    else:
        skip("tiled_mlp", "train.tiled_mlp=false" if not cfg.train.tiled_mlp else "no dense MLP to tile")
    if offload_of(model) is not None:
        paths.append(Path("activation_offload", lambda: without_offload(model), "plain checkpointing",
                          active=lambda: offloading_everything(model)))
    else:
        skip("activation_offload", "train.activation_offload=false" if not cfg.train.activation_offload
             else "nothing to offload on CPU")
    layout, layers = checkpointing.layout(model), checkpointing.checkpointable_layers(model)
    if layout and len(layout) < len(layers):
        paths.append(Path("checkpoint_layout", lambda: checkpointing.every_layer_checkpointed(model),
                          "every layer checkpointed"))
    else:
        skip("checkpoint_layout", "every decoder layer is checkpointed" if layout
             else "train.gradient_checkpointing=false")
    return paths, skipped


def attention_reference(model: Any, precision: Any) -> str:
    """The attention implementation the packed attention of ``model`` is checked against (and falls back to)."""
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return packing.reference_attention(precision.device, precision.compute_dtype, head_dim)


def switch_off(cfg: Config, model: Any, names: Sequence[str], precision: Any) -> Config:
    """Put ``model`` on the library path for each path in ``names``; the config that now describes the run."""
    cfg = cfg.model_copy(deep=True)
    for name in names:
        _SWITCH_OFF[name](cfg, model, precision)
    return cfg


def _attention_off(cfg: Config, model: Any, precision: Any) -> None:
    reference = attention_reference(model, precision)
    model.set_attn_implementation(reference)
    if reference == "eager":
        cfg.model.attn_implementation = "eager"


def _fused_loss_off(cfg: Config, model: Any, precision: Any) -> None:
    cfg.train.fused_loss = False


def _tiled_mlp_off(cfg: Config, model: Any, precision: Any) -> None:
    tiled_mlp.untile_mlps(model)
    cfg.train.tiled_mlp = False


def _offload_off(cfg: Config, model: Any, precision: Any) -> None:
    disable_offload(model)
    cfg.train.activation_offload = False


def _layout_off(cfg: Config, model: Any, precision: Any) -> None:
    checkpointing.set_checkpointed_layers(model, 1)
    cfg.train.checkpoint_every_n_layers = 1


_SWITCH_OFF: dict[str, Callable[[Config, Any, Any], None]] = {
    "packed_attention": _attention_off, "fused_loss": _fused_loss_off, "tiled_mlp": _tiled_mlp_off,
    "activation_offload": _offload_off, "checkpoint_layout": _layout_off,
}


def _agree(outcomes: list[Outcome], dist: distributed.Dist) -> list[Outcome]:
    """Every rank's outcomes, with a path switched off wherever any rank switched it off (one all-reduce per path)."""
    agreed = []
    for outcome in outcomes:  # PATH_NAMES order on every rank
        here = outcome.status == SWITCHED_OFF
        if dist.any(here) and not here:
            outcome = Outcome(outcome.name, SWITCHED_OFF, outcome.reference, outcome.loss_diff, outcome.grad_diff,
                              reason="another process of this run measured a difference or an error")
        agreed.append(outcome)
    return agreed


def check_batch(samples: Sequence[Any], rows: Sequence[Sequence[int]], pad_id: int, packed: bool,
                tokens: int = CHECK_TOKENS) -> dict[str, Any]:
    """The check's input: ``tokens`` tokens of the micro-batch ``rows``, packed or right-padded as in training
    (a preference pair gives its two sides as two sequences).

    The samples are cut into pieces of at most ``tokens // 2`` tokens from their ends (where
    answers carry labels), taken in turn from every sample — the last piece of each first —
    so a packed row holds at least two samples whenever the micro-batch does (or one long
    sample cut in two).  Each piece starts its own sample (positions from 0, first label
    ignored).  When no piece carries a label, every token does (the check needs a loss).
    """
    picked = [samples[i] for row in rows for i in row]
    sequences = [side for s in picked for side in (split_pair(s) if CHOSEN_LENGTH in s else [(s["input_ids"], s["labels"])])]
    pieces = slice_pieces(sequences, tokens)
    if not any(label != IGNORE_INDEX for _, labels in pieces for label in labels):
        pieces = [(ids, [IGNORE_INDEX, *ids[1:]]) for ids, _ in pieces]
    if packed:
        return packing.pack_batch(pieces)
    as_samples = [{"input_ids": ids, "labels": labels} for ids, labels in pieces]
    return collate(as_samples, [[i] for i in range(len(pieces))], pad_id, tokens, packing=False)


def slice_pieces(samples: Sequence[tuple[list[int], list[int]]], tokens: int) -> list[tuple[list[int], list[int]]]:
    """(ids, labels) pieces of ``samples`` totalling at most ``tokens`` (see :func:`check_batch`)."""
    half = max(2, tokens // 2)
    chunks = [[(ids[max(0, end - half):end], labels[max(0, end - half):end]) for end in range(len(ids), 0, -half)]
              for ids, labels in samples if ids]
    pieces, room = [], tokens
    for chunk in itertools.chain.from_iterable(itertools.zip_longest(*chunks)):
        if chunk is None or room < 2:
            continue
        ids, labels = chunk[0][-room:], chunk[1][-room:]
        if len(ids) < 2 and pieces:
            continue
        pieces.append((list(ids), [IGNORE_INDEX, *labels[1:]]))
        room -= len(ids)
    return pieces


def _sample_count(batch: dict[str, Any]) -> int:
    lengths = batch.get("packed_seq_lens")
    return len(lengths) if lengths is not None else int(batch["input_ids"].shape[0])


def _log_outcomes(outcomes: list[Outcome], tokens: int, seconds: float, dtype: torch.dtype) -> None:
    """One info line with every result; one warning line per path switched off (or left unchecked)."""
    ran = [o for o in outcomes if o.status in (PASSED, SWITCHED_OFF)]
    listed = "; ".join(f"{o.name} {o.status.replace('_', ' ')} ({o.summary()})" for o in ran) or "nothing to check"
    name = str(dtype).removeprefix("torch.")
    log.info("start-up check of %d path(s) on %d tokens of the first batch (%s) in %.2f s: %s", len(ran), tokens,
             name, seconds, listed)
    tol = tolerance_for(dtype)
    for o in outcomes:
        if o.status == UNCHECKED:
            log.warning("start-up check: %s left on, unchecked: %s", o.name, o.reason)
        if o.status != SWITCHED_OFF:
            continue
        if o.error:
            why = f"it raised {o.error}"
        elif o.loss_diff is None:
            why = o.reason
        else:
            why = (f"it differs from {o.reference} by {o.loss_diff:.2e} in the loss and {o.grad_diff:.2e} in the "
                   f"gradients ({o.worst_gradient}; tolerance {tol.loss:g} / {tol.gradients:g} for {name})")
        log.warning("start-up check: %s switched off for this run: %s; training with %s instead; %s", o.name, why,
                    o.reference, REPORT_HINT)


def _check_still_fits(before: Config, after: Config, source: FilePath, device: torch.device,
                      names: list[str]) -> None:
    """Stop (exit 4) when the run without the switched-off paths is predicted not to fit this GPU.

    Raises:
        OutOfMemoryError: with the prediction with and without them, and what is free.
    """
    try:
        shape = load_shape_file(FilePath(source) / "config.json")
    except ModelError as exc:  # an architecture the planner cannot model: train without the check
        log.warning("memory re-check after the start-up check skipped: %s", exc.message)
        return
    with planning_for(distributed.current().parallel()):
        need_before, available = predicted_need(before, shape, device)
        need_after, _ = predicted_need(after, shape, device)
        if need_after <= available:
            log.info("memory plan without %s: ~%.1f GiB predicted peak, %.1f GiB free", ", ".join(names),
                     need_after / GiB, available / GiB)
            return
        fix = suggest(after, shape, available + CUDA_CONTEXT_BYTES)
    raise OutOfMemoryError(
        f"the start-up check switched off {', '.join(names)} (it does not compute what the library does on "
        f"{torch.cuda.get_device_name(device)}); without it this run is predicted to need {need_after / GiB:.1f} GiB "
        f"of GPU memory at its peak ({need_before / GiB:.1f} GiB with it), but {available / GiB:.1f} GiB is free",
        f"{fix}; {REPORT_HINT}")
