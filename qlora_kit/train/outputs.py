"""Everything a run writes: its files at the start, checkpoints, the final adapter, the status."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any, Callable

import torch

from qlora_kit.core import diskspace
from qlora_kit.core.files import publish_dir
from qlora_kit.rundir import checkpoint as ckpt
from qlora_kit.rundir import integrity, target
from qlora_kit.rundir import layout as rundir
from qlora_kit.rundir.manifest import now_iso, write_manifest
from qlora_kit.rundir.metrics import plot_loss
from qlora_kit.train.guards import adapters_finite, raise_if_nonfinite
from qlora_kit.train.state import Run
from qlora_kit.variants import adalora
from qlora_kit.variants.residual import RESIDUAL_FILE

log = logging.getLogger("qlora_kit")


# Free-space estimates (core/diskspace.py adds its margin): the real sizes, plus these for what is not known yet.
SMALL_FILES_BYTES = 64 * 1024  # tokenizer_config.json, special_tokens_map.json, an adapter's README and config
CHECKPOINT_JSON_BYTES = 256 * 1024  # state.json (RNG states, scheduler, fingerprints, file list), optimizer.json
PLOT_BYTES = 256 * 1024  # loss.png


def begin(run: Run, start: target.Start) -> None:
    """Write the run's files, once every check passed: directory, config, tokenizer, data audit, manifest.

    Raises:
        DiskFullError: not enough space for the setup files, a checkpoint and the adapter.
    """
    fix = "free space on that disk, or set output_dir on another one"
    summary = json.dumps(run.data.summary.to_json(), indent=2, default=str)
    heldout = "".join(json.dumps(row) + "\n" for row in run.data.heldout)
    setup_bytes = (len(run.config_text.encode()) + len(summary.encode()) + len(heldout.encode())
                   + len(json.dumps(run.manifest, indent=2, default=str).encode()) + _tokenizer_bytes(run))
    needed = setup_bytes + _checkpoint_estimate(run) + _adapter_bytes(run) + SMALL_FILES_BYTES
    writers: dict[str, Callable[[Path], Any]] = {}
    if run.residual is not None:  # first: the manifest records its hash

        needed += run.residual.nbytes()
        writers[RESIDUAL_FILE] = lambda p: run.residual.write(p, run.manifest)
    diskspace.require_free(run.out, needed, "the run's files, a checkpoint and the adapter", fix)
    writers |= {
        rundir.CONFIG: lambda p: p.write_text(run.config_text),
        rundir.TOKENIZER: lambda p: run.tokenizer.save_pretrained(p),
        rundir.DATA_SUMMARY: lambda p: p.write_text(summary),
        rundir.HELDOUT: lambda p: p.write_text(heldout, encoding="utf-8"),
        rundir.MANIFEST: lambda p: p.write_text(json.dumps(run.manifest, indent=2, default=str)),
    }
    with diskspace.no_space_as_error(run.out, "the run's files", fix):
        target.begin(start)
        target.write_files(run.out, writers)
        if not start.fresh:
            run.metrics.truncate_after(run.step)


def _tokenizer_bytes(run: Run) -> int:
    """Bytes ``save_pretrained`` writes for the tokenizer: its serialised ``tokenizer.json``, the vocabulary files
    it copies from the base (e.g. ``tokenizer.model``) and the chat template."""
    backend = getattr(run.tokenizer, "backend_tokenizer", None)
    size = len(backend.to_str(pretty=True).encode()) if backend is not None else 0
    source = Path(str(run.manifest.get("base", {}).get("source_dir") or ""))
    for name in set((getattr(run.tokenizer, "vocab_files_names", None) or {}).values()) - {"tokenizer.json"}:
        if source.name and (source / name).is_file():
            size += (source / name).stat().st_size
    template = getattr(run.tokenizer, "chat_template", None)
    return size + (len(template.encode()) if isinstance(template, str) else 0)


def _checkpoint_estimate(run: Run) -> int:
    """Bytes the next checkpoint will take: the last one's size, else the adapter, two fp32 optimizer moments and
    the JSON state (RNG, scheduler, file list)."""
    latest = ckpt.latest_checkpoint(run.out)
    if latest is not None:
        return ckpt.checkpoint_bytes(latest)
    return _adapter_bytes(run) + 8 * sum(p.numel() for p in run.params) + len(run.config_text.encode()) \
        + CHECKPOINT_JSON_BYTES



def _adapter_bytes(run: Run) -> int:
    return sum(p.numel() * p.element_size() for p in run.params)


def save(run: Run) -> Path:
    """Checkpoint the current step, refusing to write non-finite weights; check free space first.

    Raises:
        NonFiniteLossError: a non-finite step happened since the last check.
        DiskFullError: not enough space for the checkpoint (nothing half-written is left).
    """
    name = f"{rundir.CHECKPOINT_PREFIX}{run.step}"
    if run.last_save_step == run.step:
        return run.out / name
    raise_if_nonfinite(run, run.dist.any(bool(run.nonfinite) or not adapters_finite(run)))
    state = {
        "micro_index": run.micro_index,
        "total_steps": run.total_steps,
        "skipped_steps": run.skipped_steps,
        "last_eval_step": run.last_eval_step,
        "last_train_loss": run.last_train_loss,
        "last_eval_loss": run.last_eval_loss,
        "log_window": run.window.to_state(),
        "data_fingerprint": run.data.fingerprint,
        "base_fingerprint": run.manifest["base"].get("fingerprint"),  # checked on --resume, manifest or not
        "saved_at": now_iso(),
    }
    if run.scaler is not None:
        state["grad_scaler"] = run.scaler.state_dict()

    state["variant"], variant_tensors = adalora.checkpoint_state(run.model)
    if run.dist.active:  # every rank's RNG (and FSDP optimizer shard) and the whole adapter, on rank 0
        state["distributed"] = run.dist.describe()
        ranks = run.dist.gather(run.dist.rank_state(run.optimizer))
        adapter = run.dist.adapter_state(run.wrapped, run.model)
    else:
        ranks, adapter = None, None
    # rank 0 writes; nobody moves on (or exits) before it has, and a failure there ends every rank
    with adalora.full_rank_state(run.model):
        path = run.dist.from_main(lambda: _write_checkpoint(run, name, state, ranks, adapter, variant_tensors))
    run.last_save_step = run.step
    log.info("saved %s", path.name)
    return path


def _write_checkpoint(run: Run, name: str, state: dict[str, Any], ranks: list[dict[str, Any]] | None,
                      adapter: dict[str, torch.Tensor] | None, variant_tensors: dict[str, torch.Tensor]) -> Path:
    """Write the checkpoint after checking free space, then prune old ones (the writing process only).

    Raises:
        DiskFullError: not enough space (nothing half-written is left).
    """
    fix = no_space_fix(run)
    diskspace.require_free(run.out, _checkpoint_estimate(run), name, fix)
    with diskspace.no_space_as_error(run.out, name, fix):
        path = ckpt.save_checkpoint(run.out, run.step, run.model, run.optimizer, run.scheduler, state,
                                    run.config_text, ranks, adapter, variant_tensors)
    ckpt.prune_checkpoints(run.out, run.cfg.train.save_total_limit)
    return path


def no_space_fix(run: Run) -> str:
    """What to do after a full disk stopped ``run``: a fresh run without a checkpoint is undone (nothing to resume)."""
    last = ckpt.latest_checkpoint(run.out)
    if last is None and run.fresh:
        return "free space on that disk, then run the same command again"
    return "free space on that disk, then run the same command with --resume" + (
        f" (it continues from {last.name})" if last else "")


def finish(run: Run) -> None:
    """Publish the final adapter (with its sizes and sha256 in the manifest), plot, mark the run completed.

    Several processes: every rank checks its weights and hands its share of the adapter over;
    rank 0 writes, and a failure there (a full disk) ends every rank.

    Raises:
        NonFiniteLossError: non-finite adapter weights.
        DiskFullError: not enough space for the adapter (no partial adapter is left).
    """
    if run.dist.any(not adapters_finite(run)):
        raise_if_nonfinite(run, True)

    ranks = adalora.ranks(run.model)
    if ranks is not None:
        run.manifest["lora"]["variant"]["ranks"] = ranks
        log.info("AdaLoRA kept %d of %d ranks (per module %d-%d)", ranks["total"], ranks["initial_total"],
                 ranks["min"], ranks["max"])
    adapter = run.dist.adapter_state(run.wrapped, run.model) if run.dist.active else None
    run.dist.from_main(lambda: _publish(run, adapter))
    log.info("done: adapter in %s", run.out / rundir.ADAPTER)
    log.info("next: qlora-kit generate %s \"your prompt\"  |  qlora-kit export %s --out %s-merged",
             run.out, run.out, run.out)


def _publish(run: Run, adapter: dict[str, torch.Tensor] | None) -> None:
    """Write the final adapter, the loss plot and the completed manifest (the writing process only)."""
    fix = "free space on that disk, then run the same command with --resume (it finishes from the last checkpoint)"
    needed = _adapter_bytes(run) + SMALL_FILES_BYTES + PLOT_BYTES + len(json.dumps(run.manifest, default=str))
    diskspace.require_free(run.out, needed, "the final adapter", fix)
    tmp = run.out / f".tmp-{rundir.ADAPTER}"
    try:
        with diskspace.no_space_as_error(run.out, "the final adapter", fix):
            ckpt.save_adapter(run.model, tmp, adapter)
            files = integrity.file_hashes(tmp)
            publish_dir(tmp, run.out / rundir.ADAPTER)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    run.manifest[rundir.ADAPTER_FILES] = files
    try:
        plot_loss(run.metrics.read(), run.out / rundir.LOSS_PLOT)
    except OSError as exc:  # the plot is a convenience: never fail a finished run over it
        log.warning("could not write %s: %s", rundir.LOSS_PLOT, exc)
    run.manifest["final_metrics"] = {"step": run.step, "train_loss": run.last_train_loss,
                                     "eval_loss": run.last_eval_loss, "skipped_steps": run.skipped_steps}
    with diskspace.no_space_as_error(run.out, rundir.MANIFEST, fix):
        set_status(run, "completed")


def set_status(run: Run, status: str, error: str | None = None) -> None:
    if not run.dist.is_main:
        return
    run.manifest["status"] = status
    run.manifest["end_time"] = now_iso()
    if error:
        run.manifest["error"] = error
    write_manifest(run.out / rundir.MANIFEST, run.manifest)
