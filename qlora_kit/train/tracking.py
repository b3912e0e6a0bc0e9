"""Experiment tracking (``train.report_to``) through accelerate's trackers: TensorBoard, wandb, MLflow, ...

What a tracker gets: every record ``metrics.jsonl`` gets, at the same step, with the same
keys (whatever the loop logs: loss, eval_loss, learning rate, grad norm, tokens/s, memory,
and any metric a later recipe adds); and once per tracked run the resolved config and the
memory plan.  Only the process that writes the run (rank 0) tracks.

- Missing packages are found before the model loads (:func:`check_installed`); a tracker
  that fails to start stops the run before its first step, with one line naming the fix.
- A tracker failing later is a warning and is dropped: metrics.jsonl keeps every value.
- ``--resume`` continues the same tracked run: its id is in ``manifest.json`` (``tracking``),
  and records the tracker already got (metrics.jsonl before the resume truncated it) are not
  sent again; a tracker added on resume first gets the records of the earlier sessions.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from qlora_kit.core.config import Config
from qlora_kit.core.errors import ConfigError, shorten
from qlora_kit.plan.estimate import estimate
from qlora_kit.plan.parallel import planning_for
from qlora_kit.plan.shape import load_shape_file
from qlora_kit.rundir import layout as rundir
from qlora_kit.rundir.manifest import write_manifest
from qlora_kit.train.state import Run

log = logging.getLogger("qlora_kit")

EXTRAS = ("tensorboard", "wandb", "mlflow")  # qlora-kit extras of the same name; [tracking] installs all three
PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow-skinny", "trackio": "trackio",
            "comet_ml": "comet-ml", "aim": "aim", "clearml": "clearml", "dvclive": "dvclive", "swanlab": "swanlab"}
PROJECT = "qlora-kit"  # wandb project / MLflow experiment / trackio project unless the backend's env var says otherwise

Key = tuple[int, frozenset[str]]


def install_hint(name: str) -> str:
    """The command that installs tracker ``name``."""
    if name in EXTRAS:
        return f'pip install "qlora-kit[{name}]" (all of tensorboard, wandb and mlflow: "qlora-kit[tracking]")'
    return f"pip install {PACKAGES.get(name, name)}"


def check_installed(names: list[str]) -> None:
    """Refuse, before anything loads, a tracker whose package is not installed (as accelerate sees it).

    Raises:
        ConfigError: naming the tracker and the package to install.
    """
    if not names:
        return
    from accelerate.tracking import get_available_trackers

    available = {str(t) for t in get_available_trackers()}
    for name in names:
        if name not in available:
            raise ConfigError(f"train.report_to: {name} is not installed", install_hint(name), key="train.report_to")


def tracking_dir(cfg: Config, out: Path) -> Path:
    """Where local trackers write: ``train.tracking_dir``, else ``OUTPUT_DIR/tracking``."""
    return Path(cfg.train.tracking_dir).expanduser() if cfg.train.tracking_dir else out / rundir.TRACKING


def run_name(cfg: Config, out: Path) -> str:
    """``train.run_name``, else the run directory's name."""
    return cfg.train.run_name or out.resolve().name


class Tracking:
    """The started trackers of a run; fed by ``metrics.jsonl``'s appends (:meth:`log`)."""

    def __init__(self, trackers: dict[str, Any], logged: dict[str, set[Key]]):
        self.trackers = trackers
        self.logged = logged  # per tracker: (step, keys) it already has (from earlier sessions of the run)

    def log(self, record: dict[str, Any], only: str | None = None) -> None:
        """Send one metrics record to every tracker (or ``only`` one) that does not have it yet.

        A tracker that fails is dropped with a warning.
        """
        step = int(record.get("step", 0))
        values = {k: v for k, v in record.items() if k != "step"}
        key = (step, frozenset(values))
        for name, tracker in list(self.trackers.items()):
            if (only is not None and name != only) or key in self.logged.get(name, ()):
                continue
            try:
                tracker.log(values, step=step)
            except Exception as exc:  # a tracker must never cost the run
                self._drop(name, f"failed at step {step} ({shorten(str(exc) or type(exc).__name__, 160)})")

    def close(self) -> None:
        """Finish every tracker (flush, close the run); failures are warnings."""
        for name, tracker in list(self.trackers.items()):
            try:
                tracker.finish()
            except Exception as exc:
                log.warning("report_to %s: finishing failed (%s); metrics.jsonl has every value", name,
                            shorten(str(exc), 160))
        self.trackers.clear()

    def _drop(self, name: str, why: str) -> None:
        log.warning("report_to %s %s: no longer logging to it; training goes on and metrics.jsonl has every value",
                    name, why)
        tracker = self.trackers.pop(name)
        try:
            tracker.finish()
        except Exception:
            pass


def start(run: Run, previous: list[dict[str, Any]]) -> Tracking | None:
    """Start ``train.report_to``'s trackers for ``run`` (rank 0), record their ids in the manifest.

    ``previous``: metrics.jsonl as an earlier session of this run left it (before the resume
    truncated it to the checkpoint's step); empty for a fresh run.

    Raises:
        ConfigError: a tracker did not start (naming it and the fix); the others are closed.
    """
    names = run.cfg.train.report_to
    if not names or not run.dist.is_main:
        return None
    before: dict[str, Any] = dict(run.manifest.get("tracking") or {})  # trackers earlier sessions started
    facts = dict(before)
    directory = tracking_dir(run.cfg, run.out)
    directory.mkdir(parents=True, exist_ok=True)
    tracking = Tracking({}, {})
    for name in names:
        try:
            tracking.trackers[name], facts[name] = _start_one(name, run_name(run.cfg, run.out), directory,
                                                              before.get(name) or {})
        except Exception as exc:
            tracking.close()
            raise _start_error(name, exc) from exc
    run.manifest["tracking"] = facts
    write_manifest(run.out / rundir.MANIFEST, run.manifest)
    kept = [r for r in previous if int(r.get("step", 0)) <= run.step]
    for name, tracker in list(tracking.trackers.items()):
        if name in before:  # the same tracked run: it has every record of the earlier sessions
            tracking.logged[name] = {_key(r) for r in previous}
            continue
        _store_config(name, tracker, run)
        for record in kept:  # new to this run: the earlier sessions' records first
            tracking.log(record, only=name)
    log.info("tracking: %s (local files in %s)", ", ".join(tracking.trackers), directory)
    return tracking


def _key(record: dict[str, Any]) -> Key:
    return int(record.get("step", 0)), frozenset(k for k in record if k != "step")


def _start_error(name: str, exc: BaseException) -> ConfigError:
    why = shorten(str(exc) or type(exc).__name__, 200)
    if isinstance(exc, ImportError):
        return ConfigError(f"train.report_to: {name} is not installed ({why})", install_hint(name),
                           key="train.report_to")
    return ConfigError(f"train.report_to: {name} did not start: {why}",
                       f"fix its settings (environment variables, login), or drop it from train.report_to; "
                       f"if it is missing a package: {install_hint(name)}", key="train.report_to")


def _start_one(name: str, title: str, directory: Path, recorded: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """An accelerate tracker, started, and the facts that let a resumed run continue it."""
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS

    cls = LOGGER_TYPE_TO_CLASS[name]
    if name == "tensorboard":
        tracker = cls(title, str(directory))
        tracker.start()
        return tracker, {"run_name": title, "dir": str(Path(tracker.logging_dir))}
    if name == "wandb":
        project = os.environ.get("WANDB_PROJECT") or recorded.get("project") or PROJECT
        resume = {"id": recorded["id"], "resume": "allow"} if recorded.get("id") else {}
        tracker = cls(project, name=title, dir=str(directory), **resume)
        tracker.start()
        return tracker, {"project": project, "id": tracker.run.id, "run_name": title}
    if name == "mlflow":
        return _start_mlflow(cls, title, directory, recorded)
    if name == "trackio":
        project = os.environ.get("TRACKIO_PROJECT") or recorded.get("project") or PROJECT
        tracker = cls(project, name=title, resume="allow")
        tracker.start()
        return tracker, {"project": project, "run_name": title}
    tracker = cls(title, str(directory)) if cls.requires_logging_directory else cls(title)
    tracker.start()
    return tracker, {"run_name": title}


def _start_mlflow(cls: Any, title: str, directory: Path, recorded: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """MLflow: the server or store of ``MLFLOW_TRACKING_URI``, else a file store in the tracking directory."""
    import mlflow

    uri = os.environ.get("MLFLOW_TRACKING_URI") or recorded.get("tracking_uri") or (directory / "mlruns").resolve().as_uri()
    if uri.startswith("file:"):
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 asks for a database unless told
    mlflow.set_tracking_uri(uri)
    experiment = os.environ.get("MLFLOW_EXPERIMENT_NAME") or recorded.get("experiment") or PROJECT
    tracker = cls(experiment_name=experiment, run_id=recorded.get("run_id"), run_name=title)
    tracker.start()
    return tracker, {"tracking_uri": uri, "experiment": experiment, "run_id": tracker.active_run.info.run_id,
                     "run_name": title}


def _store_config(name: str, tracker: Any, run: Run) -> None:
    """The resolved config and the memory plan, once per tracked run (a failure is a warning)."""
    try:
        tracker.store_init_configuration({**flat_config(run.cfg), **memory_plan(run)})
    except Exception as exc:
        log.warning("report_to %s: could not store the config (%s); metrics are still logged", name,
                    shorten(str(exc), 160))


def flat_config(cfg: Config) -> dict[str, Any]:
    """``section.key: value`` for every setting; lists and None as JSON text (what every tracker accepts)."""
    flat: dict[str, Any] = {}
    for section, values in cfg.model_dump(mode="json").items():
        items = values.items() if isinstance(values, dict) else [(None, values)]
        for key, value in items:
            name = f"{section}.{key}" if key is not None else section
            flat[name] = value if isinstance(value, (bool, int, float, str)) else json.dumps(value)
    return flat


def memory_plan(run: Run) -> dict[str, Any]:
    """``memory.*``: the memory settings the run uses and, when the planner knows the model, its prediction."""
    plan: dict[str, Any] = {f"memory.{k}": v if isinstance(v, (bool, int, float, str)) else json.dumps(v)
                            for k, v in (run.manifest.get("memory") or {}).items()}
    try:
        shape = load_shape_file(Path(run.manifest["base"]["source_dir"]) / "config.json")
        with planning_for(run.dist.parallel()):
            predicted = estimate(run.cfg, shape)
    except Exception as exc:  # the planner does not know every architecture: the settings alone then
        log.debug("memory plan for tracking unavailable: %s", exc)
        return plan
    plan["memory.predicted_peak_bytes"] = int(predicted.total_bytes)
    plan["memory.predicted_peak_phase"] = predicted.peak_phase
    plan.update({f"memory.predicted.{k}": int(v) for k, v in predicted.breakdown().items()})
    return plan
