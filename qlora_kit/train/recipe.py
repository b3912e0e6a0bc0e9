"""`qlora-kit train`: lock the run, build it in memory, write its files, train, publish.

A refused or failed start changes nothing (``rundir.start``); a fresh run that fails before
its first checkpoint is undone; every other failure leaves the manifest
``failed``/``preempted`` and the run resumable.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Iterator

import torch

from qlora_kit.core import diskspace, logs
from qlora_kit.core.config import (
    CONFIG_DICT,
    Config,
    ConfigSource,
    Overrides,
    attribute_origin,
    dump_config,
    load_config,
)
from qlora_kit.core.errors import (
    NonFiniteLossError,
    OutOfMemoryError,
    OutputError,
    Preempted,
    QloraKitError,
    note,
    phase,
)
from qlora_kit.core.files import write_json_in_place
from qlora_kit.core.signals import StopNow, StopRequest
from qlora_kit.data.sources import source_specs
from qlora_kit.ops.allocator import configure_cuda_allocator
from qlora_kit.plan.estimate import estimate
from qlora_kit.plan.fit import suggest
from qlora_kit.plan.shape import load_shape_file
from qlora_kit.plan.terms import GiB
from qlora_kit.rundir import checkpoint as ckpt
from qlora_kit.rundir import finished, target
from qlora_kit.rundir import layout as rundir
from qlora_kit.rundir import lock as runlock
from qlora_kit.rundir.manifest import package_versions, read_previous_manifest
from qlora_kit.rundir.start_adapter import adopt_start_adapter
from qlora_kit.train import distributed, tracking
from qlora_kit.train.loop import train
from qlora_kit.train.outputs import begin, finish, set_status
from qlora_kit.train.resume import check_resume_compatible, relocatable_settings
from qlora_kit.train.setup import setup
from qlora_kit.train.state import Run

log = logging.getLogger("qlora_kit")


def run_training(
    config_path: ConfigSource,
    overrides: Overrides,
    resume: bool = False,
    overwrite: bool = False,
    skip_memory_check: bool = False,
) -> int:
    """``qlora-kit train``: returns 0, or raises a QloraKitError with a documented exit code (see :func:`train_run`)."""
    train_run(config_path, overrides, resume=resume, overwrite=overwrite, skip_memory_check=skip_memory_check)
    return 0


def train_command(config: ConfigSource, overrides: Overrides, *, resume: bool = False, overwrite: bool = False,
                  skip_memory_check: bool = False) -> Path:
    """``qlora-kit train`` and ``qlora_kit.train()``: one process, or one rank of ``accelerate launch`` / ``torchrun``.

    Returns the run directory; raises a QloraKitError with a documented exit code.
    """
    with distributed.session():
        return train_run(config, overrides, resume=resume, overwrite=overwrite, skip_memory_check=skip_memory_check)


def train_run(config: ConfigSource, overrides: Overrides, *, resume: bool = False, overwrite: bool = False,
              skip_memory_check: bool = False) -> Path:
    """Train the run a config (a YAML file or a mapping) describes; return its directory (``output_dir``).

    Order (see target.py): lock ``output_dir`` → check and inspect it (no writes) → build
    everything in memory (a refusal or SIGTERM here changes nothing) → write the run's files
    → train → publish the adapter.  A fresh run that fails before its first checkpoint
    removes what it created; every other failure leaves the manifest ``failed``/``preempted``.
    """

    configure_cuda_allocator()  # before anything touches CUDA
    dist = distributed.current()
    cfg, sources = load_config(config, overrides)
    cfg, sources = adopt_start_adapter(cfg, sources)  # model.adapter: the start run's LoRA shape
    try:
        dist.from_main(lambda: tracking.check_installed(cfg.train.report_to))  # before anything loads
    except QloraKitError as exc:
        attribute_origin(exc, sources)
        raise
    out = Path(cfg.output_dir).expanduser()
    _check_target(out, cfg, config, overwrite)  # read-only: refuse "/", home, ... before locking beside them
    check_writable(out)
    header = f"{_command_line(config, overrides, resume, overwrite)} (qlora-kit {package_versions().get('qlora-kit')})"
    try:
        with _run_log(out, header, dist) as file_log, \
                StopRequest(immediate=True, echo_window=2.0 if dist.active else 0.0) as stop, _lock(out, dist):
            _run_locked(cfg, sources, out, resume, overwrite, skip_memory_check, stop, file_log)
    except StopNow as exc:  # only raised before anything was written
        raise Preempted(f"stopped by {exc.signal_name} before training started; nothing was written",
                        "run the same command again") from None
    return out


def _command_line(config: ConfigSource, overrides: Overrides, resume: bool, overwrite: bool) -> str:
    """The command as typed (train.log's first line); a config given as a mapping is named, not printed."""
    items = [f"{k}={v}" for k, v in overrides.items()] if isinstance(overrides, Mapping) else list(overrides or [])
    where = CONFIG_DICT if isinstance(config, Mapping) else str(config)
    return " ".join(["qlora-kit train", where, *(f"--set {o}" for o in items)]
                    + (["--resume"] if resume else []) + (["--overwrite"] if overwrite else []))


def _run_log(out: Path, header: str, dist: distributed.Dist) -> contextlib.AbstractContextManager[Any]:
    """OUTPUT_DIR/train.log, written by the process that writes the run (rank 0; the others stay quiet)."""
    return logs.run_log(out / rundir.TRAIN_LOG, header) if dist.is_main else contextlib.nullcontext(None)


@contextlib.contextmanager
def _lock(out: Path, dist: distributed.Dist) -> Iterator[None]:
    """One writer per run: the process that writes (rank 0) holds ``output_dir``'s lock; a refusal reaches every rank."""
    with contextlib.ExitStack() as stack:
        def take() -> None:
            stack.enter_context(runlock.exclusive(out, "train"))

        dist.from_main(take)  # rank 0 holds the lock; a refusal there (RunInUseError) reaches every rank
        yield


def _run_locked(cfg: Config, sources: dict[str, str], out: Path, resume: bool, overwrite: bool,
                skip_memory_check: bool, stop: StopRequest, file_log: logs.RunLog | None) -> int:
    """The recipe, with ``output_dir`` locked: inspect → setup (in memory) → begin → train → finish.

    ``file_log`` holds the log lines until :func:`begin` has written the run's directory, then
    writes them, and every later one, to ``OUTPUT_DIR/train.log``.  Several processes: rank 0
    inspects and writes; every rank trains; failures agreed by all ranks end them together.
    """
    dist = distributed.current()
    if dist.is_main:
        warn_if_validation_elsewhere(cfg, sources)
    start = dist.from_main(lambda: target.inspect(out, resume, overwrite))
    if not start.fresh:
        check_resume_compatible(start.resume_from or out, cfg, relocatable_settings(out, start.resume_from))
    try:
        with phase("train (loading the model and the data)"):
            run = setup(cfg, dump_config(cfg, sources), out, start, skip_memory_check)
    except BaseException as exc:
        attribute_origin(exc, sources)
        raise
    if run.step >= run.total_steps and _already_complete(out):
        log.info("%s is already complete (%d of %d steps); raise train.max_steps with --set to train further",
                 out, run.step, run.total_steps)
        return 0
    stop.defer()
    previous = run.metrics.read() if dist.is_main and not start.fresh and cfg.train.report_to else []
    tracked: list[tracking.Tracking] = []
    try:
        dist.from_main(lambda: begin(run, start))
        if file_log is not None:
            file_log.open()
        dist.from_main(lambda: _start_tracking(run, previous, tracked))
        with phase(lambda: f"train (step {run.step + 1} of {run.total_steps})"):
            train(run, stop)
        with phase("train (saving the adapter)"):
            finish(run)
    except BaseException as exc:
        for tracker in tracked:  # before a fresh start is undone: its files may be in the run directory
            tracker.close()
        if dist.is_main:
            _fail(run, start, exc)
            note(exc, "after", _what_is_left(run.out))
        if isinstance(exc, Preempted | NonFiniteLossError) and dist.active:
            dist.barrier()  # agreed by every rank at a step boundary: they leave together
        if dist.active:
            _release_wrapper(run)
        if isinstance(exc, torch.cuda.OutOfMemoryError):
            raise _oom_error(run, exc) from exc
        raise
    finally:
        for tracker in tracked:
            tracker.close()
    return 0


def _start_tracking(run: Run, previous: list[dict[str, Any]], started: list[tracking.Tracking]) -> None:
    """Start ``train.report_to``'s trackers (rank 0) and feed them what metrics.jsonl gets from now on."""
    tracker = tracking.start(run, previous)
    if tracker is not None:
        run.metrics.listeners.append(tracker.log)
        started.append(tracker)


def _release_wrapper(run: Run) -> None:
    """Free the DDP/FSDP wrapper now, while its process group exists.

    The exception's traceback keeps ``run`` alive until the interpreter exits; a wrapper torn
    down then, after ``destroy_process_group``, can abort the process (SIGABRT).
    """
    import gc

    run.wrapped = None
    gc.collect()


def _check_target(out: Path, cfg: Config, config: ConfigSource, overwrite: bool) -> None:
    """Refuse output directories that must never be written or moved aside (see target.check_target).

    Raises:
        OutputError: a dangerous target, naming what it would clobber.
    """
    protected = {} if isinstance(config, Mapping) else {"the config file": Path(config)}
    for spec in source_specs(cfg.data):
        where = "" if spec.key == "data.path" else f" of {spec.key}"
        protected[f"the data file{where}"] = Path(spec.path)
        if spec.val_path:
            protected[f"the validation file{where}"] = Path(spec.val_path)
    if cfg.data.val_path:
        protected["the validation file"] = Path(cfg.data.val_path)
    if Path(cfg.model.name_or_path).expanduser().exists():
        protected["the model"] = Path(cfg.model.name_or_path)
    if cfg.model.adapter is not None:
        protected["the run of model.adapter"] = Path(cfg.model.adapter)
    target.check_target(out, overwrite, protected)


def _already_complete(out: Path) -> bool:
    """The run finished and its adapter is intact (a damaged adapter is republished from the last checkpoint)."""
    manifest = read_previous_manifest(out / rundir.MANIFEST)
    if manifest.get("status") != "completed" or not (out / rundir.ADAPTER).is_dir():
        return False
    try:
        finished.check_adapter(out / rundir.ADAPTER, manifest.get(rundir.ADAPTER_FILES))
    except QloraKitError as exc:
        log.warning("%s: publishing the adapter again from the last checkpoint", exc.message)
        return False
    return True


def _what_is_left(out: Path) -> str:
    """How to go on after a failure, for an internal error's ``fix:`` line ("" when that cannot be told)."""
    try:
        checkpoints = ckpt.list_checkpoints(out)
    except OSError:
        return ""
    if checkpoints:
        return f"the same command with --resume continues from {checkpoints[-1][1].name}"
    return f"nothing of the run was kept in {out}"


def _fail(run: "Run", start: target.Start, exc: BaseException) -> None:
    """Record a failure: undo a fresh start without checkpoints, else mark the manifest failed/preempted."""
    if not start.begun:
        return  # nothing was written
    if start.fresh and not ckpt.list_checkpoints(run.out):
        target.undo(start)
        return
    if isinstance(exc, Preempted):
        status, error = "preempted", None
    elif isinstance(exc, KeyboardInterrupt):
        status, error = "preempted", "aborted by a second Ctrl-C (the last checkpoint is intact)"
    elif isinstance(exc, torch.cuda.OutOfMemoryError):
        status, error = "failed", "CUDA out of memory"
    elif (peer := distributed.translate_failure(exc) if run.dist.active else None) is not None:
        status, error = "failed", peer.message  # another rank failed first: its reason, not the collective's
    else:
        message = exc.message if isinstance(exc, QloraKitError) else str(exc)
        status, error = "failed", f"{type(exc).__name__}: {message.splitlines()[0][:300] if message else ''}"
    try:
        try:
            set_status(run, status, error)
        except OSError as write_exc:
            if not diskspace.is_no_space(write_exc):
                raise
            write_json_in_place(run.out / rundir.MANIFEST, run.manifest)  # no room for a new file
    except OSError as write_exc:  # never hide the original failure behind this one
        log.warning("could not mark %s %s: %s", run.out / rundir.MANIFEST, status, write_exc)


def check_writable(out: Path) -> None:
    """Refuse an output_dir this user cannot write (e.g. a root-owned bind mount in a container).

    Raises:
        OutputError: ``out``, or the folder it would be created in, is not writable.
    """
    where = out
    while not where.exists() and where != where.parent:
        where = where.parent
    if os.access(where, os.W_OK | os.X_OK):
        return
    whom = f"uid {os.getuid()}" if hasattr(os, "getuid") else "this user"
    raise OutputError(
        f"output_dir {out} is not writable by {whom} ({where} is not)",
        "choose a writable output_dir or fix the folder's owner/permissions; in docker, run as the owner of the "
        "mounted folder: docker run --user $(id -u):$(id -g) ...",
    )


def warn_if_validation_elsewhere(cfg: Config, sources: dict[str, str]) -> None:
    """Say when validation rows come from another file than ``data.path`` (a leftover ``val_path`` is easy to miss).

    They feed the eval loss, the held-out prompts the export is checked on and the model card.
    """
    if cfg.data.val_path is None or Path(cfg.data.val_path).expanduser() == Path(cfg.data.path or "").expanduser():
        return
    origin = sources.get("data.val_path", "config")
    rows_of = "data.path" if cfg.data.datasets is None else "every source"
    instead = "" if origin == "override --set" else f"; `--set data.val_path=null` holds out rows of {rows_of} instead"
    log.warning("validation rows come from data.val_path %s (%s), not from %s: the eval loss, the export "
                "check and the model card use them%s", cfg.data.val_path, origin,
                f"data.path {cfg.data.path}" if cfg.data.datasets is None else "data.datasets", instead)


def _oom_error(run: Run, exc: BaseException) -> OutOfMemoryError:
    """Turn a CUDA OOM into the knob to turn, with what the planner predicted for this config."""
    knobs = ("lower train.micro_batch_size or train.max_length (raise gradient_accumulation_steps to keep the "
             "batch); `qlora-kit plan CONFIG` shows what fits")
    predicted = ""
    try:

        shape = load_shape_file(Path(run.manifest["base"]["source_dir"]) / "config.json")
        predicted = f"; the planner predicted {estimate(run.cfg, shape).total_bytes / GiB:.1f} GiB for this config"
        if run.device.type == "cuda":
            knobs = suggest(run.cfg, shape, torch.cuda.get_device_properties(run.device).total_memory)
    except Exception as plan_exc:  # the planner is advisory here; never hide the OOM behind it
        log.debug("memory planner failed: %s", plan_exc)
    return OutOfMemoryError(f"CUDA out of memory at step {run.step + 1}{predicted}", knobs)
