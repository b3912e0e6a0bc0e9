"""Resuming a run: what may change, and restoring the newest usable checkpoint."""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

from qlora_kit.core.config import Config, validate
from qlora_kit.core.errors import ConfigError, OutputError, short_repr
from qlora_kit.core.safe_yaml import read_yaml
from qlora_kit.model.fingerprint import check_base
from qlora_kit.rundir import checkpoint as ckpt
from qlora_kit.rundir import integrity, target
from qlora_kit.rundir import layout as rundir
from qlora_kit.rundir.manifest import now_iso, read_previous_manifest
from qlora_kit.train import distributed
from qlora_kit.train.state import LogWindow, Run
from qlora_kit.variants import adalora

log = logging.getLogger("qlora_kit")


# Settings that change the model, the data or their order: resuming across a change is refused.
RESUME_BREAKING = (
    "model.name_or_path", "model.revision", "model.quant_type", "model.double_quant", "model.chat_template",
    "lora.r", "lora.alpha", "lora.dropout", "lora.target_modules", "lora.use_rslora", "lora.use_dora",
    "lora.adapter_dtype",
    "lora.type", "lora.init", "lora.loraga_samples", "lora.loftq_iter", "lora.adalora_target_r",
    "lora.adalora_tinit_ratio", "lora.adalora_tfinal_ratio", "lora.adalora_delta_t", "lora.adalora_orth_reg_weight",
    "data.path", "data.val_path", "data.format", "data.split", "data.val_fraction", "data.val_max_rows",
    "data.train_on_inputs", "data.packing", "data.shuffle", "data.subset", "data.max_rows", "data.datasets",
    "data.default_system_prompt",
    "train.seed", "train.micro_batch_size", "train.gradient_accumulation_steps", "train.max_length",
    "train.optimizer", "train.loraplus_lr_ratio",
    "train.method", "train.beta", "train.dpo_loss", "model.adapter",
)
BASE_LOCATION = ("model.name_or_path", "model.revision")  # where the base is; its fingerprint says what it is
DATA_LOCATION = ("data.path", "data.val_path",  # where the data are; their sha256 says what they are
                 "data.datasets[*].path", "data.datasets[*].val_path")


def check_resume_compatible(checkpoint_dir: Path, cfg: Config, relocatable: tuple[str, ...] = ()) -> None:
    """Refuse to resume when settings that define the model or the data order changed.

    ``checkpoint_dir`` is a checkpoint, or the run directory itself when it has none yet.
    ``relocatable``: settings that say where the base or the data are, free to change because
    what they name is checked by content (:func:`relocatable_settings`).

    Raises:
        ConfigError: naming every changed setting with its old and new value.
    """
    old = validate(read_yaml(checkpoint_dir / "config.yaml"), origin=str(checkpoint_dir / "config.yaml"))
    old_flat, new_flat = _settings(old), _settings(cfg)
    entries = sorted(k for k in old_flat.keys() | new_flat.keys() if k.startswith("data.datasets["))
    breaking = [k for k in RESUME_BREAKING + tuple(entries) if k not in relocatable and _generic(k) not in relocatable]
    changed = [k for k in breaking if old_flat.get(k) != new_flat.get(k)]
    if changed:
        lines = "; ".join(f"{k}: {short_repr(old_flat.get(k), 60)} -> {short_repr(new_flat.get(k), 60)}"
                          for k in changed)
        raise ConfigError(
            f"cannot resume {checkpoint_dir.name}: the config changed in ways that break the run ({lines})",
            "restore those settings, or start a new run with --overwrite / another output_dir",
        )
    soft = [k for k in new_flat if k not in breaking and old_flat.get(k) != new_flat.get(k)]
    if soft:
        log.warning("resuming with changed settings: %s (the LR curve may differ from the first run)",
                    ", ".join(soft))


def _settings(cfg: Config) -> dict[str, Any]:
    """The config as dotted keys; ``lora.adalora_*`` only for AdaLoRA (other runs ignore them, whatever they hold)."""
    flat = _flatten(cfg.model_dump())
    if cfg.lora.type != "adalora":
        flat = {k: v for k, v in flat.items() if not k.startswith("lora.adalora_")}
    return flat


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Dotted keys; the entries of ``data.datasets`` as ``data.datasets[2].weight`` (and the list as its length)."""
    flat: dict[str, Any] = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            flat.update(_flatten(v, f"{prefix}{k}."))
        elif f"{prefix}{k}" == "data.datasets" and isinstance(v, list):
            flat["data.datasets"] = f"{len(v)} entries"
            for i, entry in enumerate(v, 1):
                flat.update(_flatten(entry, f"data.datasets[{i}]."))
        else:
            flat[f"{prefix}{k}"] = v
    return flat


def _generic(key: str) -> str:
    """``data.datasets[2].path`` → ``data.datasets[*].path``."""
    return re.sub(r"\[\d+\]", "[*]", key)


def check_same_ranks(resume_from: Path, dist: distributed.Dist) -> None:
    """Refuse to resume with another number of processes or another strategy than the checkpoint's.

    The data plan is the plan of the global batch (processes x micro_batch_size) and every
    rank's RNG (and, under FSDP, optimizer shard) is stored per rank: both change with the
    number of processes.

    Raises:
        ConfigError: naming both, and the launch that continues the run.
    """
    saved = ckpt.read_checkpoint_state(resume_from).get("distributed") or {"world_size": 1, "strategy": "single"}
    now = dist.describe() if dist.active else {"world_size": 1, "strategy": "single"}
    if (saved.get("world_size"), saved.get("strategy")) == (now["world_size"], now["strategy"]):
        return
    def name(d: dict[str, Any]) -> str:
        n = d.get("world_size", 1)
        return "1 process" if d.get("strategy") == "single" else f"{n} processes ({str(d.get('strategy')).upper()})"
    launch = ("qlora-kit train ... --resume (one process)" if saved.get("strategy") == "single" else
              f"the same launch with {saved.get('world_size')} processes"
              + (" and the FSDP accelerate config" if saved.get("strategy") == "fsdp" else ""))
    raise ConfigError(
        f"cannot resume {resume_from.name}: it was trained with {name(saved)}, this run has {name(now)} "
        "(the global batch, per-rank RNG and optimizer state depend on it)",
        f"continue with {launch}, or start a new run with --overwrite / another output_dir")


def relocatable_settings(out: Path, checkpoint: Path | None) -> tuple[str, ...]:
    """The location settings a resume may change: the base's when the run recorded its fingerprint
    (checked in ``setup``), the data's when ``checkpoint`` recorded the files' sha256 (checked by
    ``check_data_unchanged``). A moved base or data file then resumes; other content does not."""
    keys = BASE_LOCATION if recorded_base(out, checkpoint) is not None else ()
    try:
        data = ckpt.read_checkpoint_state(checkpoint).get("data_fingerprint") if checkpoint else None
    except integrity.CorruptCheckpoint:
        data = None
    if isinstance(data, dict) and data.get("sha256"):  # a hub dataset's sha256 covers its name: renaming still fails
        keys += DATA_LOCATION
    return keys


def recorded_base(out: Path, checkpoint: Path | None = None) -> Any:
    """The base fingerprint the run recorded: ``checkpoint``'s own (so deleting ``manifest.json`` does not skip
    the base check), else the one in ``out``'s manifest (older checkpoints); None when neither has one."""
    if checkpoint is not None:
        try:
            saved = ckpt.read_checkpoint_state(checkpoint).get("base_fingerprint")
        except integrity.CorruptCheckpoint:
            saved = None  # not resumed from: the recipe falls back to an older checkpoint, checked there
        if isinstance(saved, dict) and saved:
            return saved
    manifest = read_previous_manifest(out / rundir.MANIFEST)
    base = manifest.get("base") if isinstance(manifest, dict) else None
    return base.get("fingerprint") if isinstance(base, dict) else None


def recorded_memory(out: Path) -> dict[str, Any] | None:
    """The memory settings recorded in ``out``'s manifest (None for runs that predate them)."""
    manifest = read_previous_manifest(out / rundir.MANIFEST)
    memory = manifest.get("memory") if isinstance(manifest, dict) else None
    return memory if isinstance(memory, dict) else None


def check_data_unchanged(resume_from: Path, fingerprint: dict[str, Any]) -> None:
    try:
        old = ckpt.read_checkpoint_state(resume_from).get("data_fingerprint") or {}
    except integrity.CorruptCheckpoint:
        return  # checked again, with the fallback checkpoint, when it is restored

    for key in ("sha256", "val_sha256"):
        if old.get(key) != fingerprint.get(key):
            raise ConfigError(
                f"cannot resume {resume_from.name}: {_changed_sources(old, fingerprint)} changed since it was "
                f"written ({key} {str(old.get(key))[:12]} -> {str(fingerprint.get(key))[:12]})",
                "restore the original data, or start a new run with --overwrite / another output_dir",
            )


BASE_FIX = ("point model.name_or_path at the base the run was trained on (checked against the fingerprint "
             "its checkpoints and manifest.json recorded)")


def check_same_base(run: Run, checkpoint: Path) -> None:
    """Refuse a checkpoint whose recorded base fingerprint is not the base this run loaded.

    Raises:
        ModelError: naming the base and the run.
    """
    base = run.manifest["base"]
    check_base(Path(base["source_dir"]), recorded_base(run.out, checkpoint), run.out, base.get("fingerprint"),
               BASE_FIX)


def _changed_sources(old: dict[str, Any], new: dict[str, Any]) -> str:
    """Which source of several changed (``data.datasets[2] (/data/b.jsonl)``), else "the data file"."""
    before, now = old.get("sources"), new.get("sources")
    if not (isinstance(before, list) and isinstance(now, list) and len(before) == len(now)):
        return "the data file" if not now else "the data"
    names = [f"{n.get('key')} ({n.get('path')})" for o, n in zip(before, now) if isinstance(o, dict)
             and (o.get("sha256"), o.get("val_sha256")) != (n.get("sha256"), n.get("val_sha256"))]
    return ", ".join(names) or "the data"


def restore(run: Run, start: target.Start) -> None:
    """Load the newest checkpoint that verifies, parses and fits this model, in memory.

    A checkpoint that fails is named in the log and the one before it is tried; a run
    without any checkpoint yet (stopped before its first save) starts again from step 0.

    Raises:
        OutputError: there are checkpoints but none can be used.
        ConfigError: the data or config changed since the checkpoint that is used.
    """
    path, first = start.resume_from, start.resume_from
    while path is not None:
        try:
            if path != first:
                check_resume_compatible(path, run.cfg, relocatable_settings(run.out, path))
                check_data_unchanged(path, run.data.fingerprint)
                check_same_base(run, path)
            model = None if run.dist.fsdp else run.model  # FSDP: the adapter was loaded before sharding
            state = ckpt.load_checkpoint(path, model, run.optimizer, run.scheduler, rank=run.dist.rank)
            _restore_variant(run, path, state)
            break
        except integrity.CorruptCheckpoint as exc:
            log.warning("%s cannot be used (%s): trying the checkpoint before it", path.name, exc)
            start.corrupt.append((path, str(exc)))
            path, newer = target.newest_valid(run.out, below=ckpt.checkpoint_step(path))
            start.corrupt += newer
    start.resume_from = path
    if path is None:
        if start.corrupt:
            names = ", ".join(f"{p.name} ({reason})" for p, reason in start.corrupt[:3])
            raise OutputError(f"no checkpoint in {run.out} can be used, so there is nothing to resume from: {names}",
                              "start afresh with --overwrite (the old directory is moved aside)")
        log.info("%s has no checkpoint yet: training again from step 0", run.out)
        run.manifest["resumed"].append({"from": None, "at": now_iso()})
        return
    run.step, run.micro_index = state["step"], state["micro_index"]
    run.skipped_steps = state.get("skipped_steps", 0)
    run.last_save_step = run.step
    run.last_eval_step = state.get("last_eval_step", -1)
    run.window = LogWindow.from_state(state.get("log_window"), run.device)
    if run.scaler is not None and "grad_scaler" in state:
        run.scaler.load_state_dict(state["grad_scaler"])
    run.last_train_loss, run.last_eval_loss = _restored_losses(run, state)
    run.manifest["resumed"].append({"from": path.name, "at": now_iso()})
    log.info("resumed from %s: step %d of %d", path.name, run.step, run.total_steps)


def _restore_variant(run: Run, path: Path, state: dict[str, Any]) -> None:
    """A LoRA variant's own state from checkpoint ``path`` (AdaLoRA: rank budget, importance scores).

    Raises:
        ConfigError: AdaLoRA resumed with another step count than its rank budget was scheduled for.
    """

    if run.cfg.lora.type == "adalora" and state.get("total_steps") != run.total_steps:
        raise ConfigError(
            f"cannot resume {path.name}: lora.type=adalora scheduled its rank budget for "
            f"{state.get('total_steps')} steps, and train.max_steps / train.num_epochs now give {run.total_steps}",
            "restore train.max_steps / train.num_epochs, or start a new run",
        )
    adalora.restore_state(run.model, state.get("variant") or {}, ckpt.read_variant_tensors(path))


def _restored_losses(run: Run, state: dict[str, Any]) -> tuple[float | None, float | None]:
    """The last logged train/eval loss at the checkpoint (from its state, else from metrics.jsonl)."""
    train_loss, eval_loss = state.get("last_train_loss"), state.get("last_eval_loss")
    if train_loss is None or eval_loss is None:
        for record in run.metrics.read():
            if record.get("step", 0) <= run.step:
                train_loss = record.get("loss", train_loss) if "last_train_loss" not in state else train_loss
                eval_loss = record.get("eval_loss", eval_loss) if "last_eval_loss" not in state else eval_loss
    return train_loss, eval_loss
