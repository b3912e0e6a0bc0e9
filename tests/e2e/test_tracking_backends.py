"""train.report_to against the real backends on disk: what each tracker stored equals metrics.jsonl.

One tracked run (SIGTERM mid-run, then ``--resume``) logs to every backend installed here;
each backend's own files are read back with its own reader: TensorBoard's event
accumulator, MLflow's client on its file store, and wandb's offline transaction log
(``run-<id>.wandb``: wandb 0.2x ships no Python reader for it, so ``_wandb_records`` reads its
documented block format and parses the records with wandb's own protobuf classes).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import pytest
from conftest import RESUME_TRAIN, run_cli, train_until_sigterm, write_config


pytestmark = pytest.mark.e2e

BACKENDS = [name for name, module in (("tensorboard", "tensorboard"), ("wandb", "wandb"), ("mlflow", "mlflow"))
            if importlib.util.find_spec(module) is not None]
Series = dict[str, list[tuple[int, float]]]


def _env(root: Path) -> dict[str, str]:
    wandb_home = str(root / "wandb-home")
    return {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_CONFIG_DIR": wandb_home,
            "WANDB_CACHE_DIR": wandb_home, "WANDB_DATA_DIR": wandb_home}


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory: pytest.TempPathFactory, tiny_llama: Path, data_file: Path) -> dict[str, Any]:
    """A run tracked by every installed backend, stopped by SIGTERM after step 5 and resumed to the end."""
    if "tensorboard" not in BACKENDS:
        pytest.skip("tensorboard is not installed (the [test] extra installs it)")
    root = tmp_path_factory.mktemp("tracked")
    train = {**RESUME_TRAIN, "eval_steps": 4, "report_to": BACKENDS, "run_name": "tracked-run"}
    cfg = write_config(root / "cfg.yaml", tiny_llama, data_file, root / "run", train=train)
    env = _env(root)
    train_until_sigterm(cfg, root / "run", env=env, timeout=300)
    first = json.loads((root / "run/manifest.json").read_text())["tracking"]
    stopped_at = max(r["step"] for r in _metrics(root / "run"))
    resumed = run_cli("train", str(cfg), "--resume", env=env, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "report_to" not in resumed.stderr, resumed.stderr[-3000:]  # no tracker warning
    return {"run": root / "run", "first": first, "stopped_at": stopped_at,
            "manifest": json.loads((root / "run/manifest.json").read_text())}


def _metrics(run: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _expected(run: Path) -> Series:
    """metrics.jsonl as series: key -> [(step, value)] in file order."""
    series: Series = {}
    for record in _metrics(run):
        for key, value in record.items():
            if key != "step":
                series.setdefault(key, []).append((record["step"], float(value)))
    return series


def _assert_same(got: Series, want: Series, rel: float = 0.0) -> None:
    assert set(got) == set(want), (sorted(got), sorted(want))
    for key, points in want.items():
        assert [s for s, _ in got[key]] == [s for s, _ in points], f"{key}: steps differ (logged twice?)"
        for (step, a), (_, b) in zip(got[key], points):
            assert a == pytest.approx(b, rel=rel, abs=0.0), f"{key} at step {step}: tracker {a}, metrics.jsonl {b}"


def test_the_run_was_interrupted_and_kept_its_tracked_run(tracked_run: dict[str, Any]) -> None:
    assert 5 <= tracked_run["stopped_at"] < 16
    first, last = tracked_run["first"], tracked_run["manifest"]["tracking"]
    assert set(last) == set(BACKENDS)
    if "wandb" in BACKENDS:
        assert last["wandb"]["id"] == first["wandb"]["id"]
    if "mlflow" in BACKENDS:
        assert last["mlflow"]["run_id"] == first["mlflow"]["run_id"]
    steps = [r["step"] for r in _metrics(tracked_run["run"]) if "loss" in r]
    assert steps == list(range(1, 17))


def test_tensorboard_events_equal_metrics_jsonl(tracked_run: dict[str, Any]) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = Path(tracked_run["manifest"]["tracking"]["tensorboard"]["dir"])
    assert events == tracked_run["run"] / "tracking" / "tracked-run"
    acc = EventAccumulator(str(events), size_guidance={"scalars": 0})
    acc.Reload()
    got = {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
    _assert_same(got, _expected(tracked_run["run"]), rel=1e-6)  # event files hold float32
    stored = list(events.glob("*/hparams.yml"))
    assert len(stored) == 1, "the config is stored once per tracked run, not again on resume"
    assert "train.learning_rate" in stored[0].read_text() and "memory.optimizer" in stored[0].read_text()


@pytest.mark.skipif("mlflow" not in BACKENDS, reason="mlflow is not installed (pip install \"qlora-kit[mlflow]\")")
def test_mlflow_file_store_equals_metrics_jsonl(tracked_run: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 reads its file store only when told

    facts = tracked_run["manifest"]["tracking"]["mlflow"]
    assert facts["tracking_uri"] == (tracked_run["run"] / "tracking" / "mlruns").resolve().as_uri()
    client = MlflowClient(facts["tracking_uri"])
    run = client.get_run(facts["run_id"])
    want = _expected(tracked_run["run"])
    got = {key: [(m.step, m.value) for m in sorted(client.get_metric_history(facts["run_id"], key),
                                                   key=lambda m: (m.step, m.timestamp))]
           for key in run.data.metrics}
    _assert_same(got, want)
    assert run.data.params["train.learning_rate"] == "0.005" and "memory.optimizer" in run.data.params
    assert run.info.run_name == "tracked-run"


# --------------------------------------------------------------------------- wandb's offline files

_BLOCK = 32768
_HEADER = 7  # crc32 (4), length (2, little endian), type (1): leveldb's log format, as wandb writes it


def _wandb_records(path: Path) -> list[bytes]:
    """The records of a ``.wandb`` transaction log (a 7-byte file header, then leveldb log blocks)."""
    data = path.read_bytes()
    assert data[:4] == b":W&B", "not a wandb transaction log"
    records, pending, pos = [], b"", _HEADER
    while pos + _HEADER <= len(data):
        if _BLOCK - pos % _BLOCK < _HEADER:  # the rest of a block too short for a header is padding
            pos += _BLOCK - pos % _BLOCK
            continue
        length, kind = int.from_bytes(data[pos + 4: pos + 6], "little"), data[pos + 6]
        chunk = data[pos + _HEADER: pos + _HEADER + length]
        pos += _HEADER + length
        if kind == 0 and length == 0:
            continue
        pending = chunk if kind in (1, 2) else pending + chunk  # 1 full, 2 first, 3 middle, 4 last
        if kind in (1, 4):
            records.append(pending)
            pending = b""
    return records


def _wandb_history(tracking: Path, run_id: str) -> tuple[Series, list[str]]:
    """(history series, config keys) of every offline session of ``run_id`` (one directory per session)."""
    from wandb.proto import wandb_internal_pb2 as pb

    series: Series = {}
    config: list[str] = []
    files = sorted(tracking.glob(f"wandb/offline-run-*-{run_id}/run-{run_id}.wandb"))
    assert len(files) == 2, files  # the first session and the resumed one
    for path in files:
        for raw in _wandb_records(path):
            record = pb.Record()
            record.ParseFromString(raw)
            if record.WhichOneof("record_type") == "config":
                config += [item.key for item in record.config.update]
            if record.WhichOneof("record_type") != "history":
                continue
            row = {item.key or ".".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            step = record.history.step.num
            for key, value in row.items():
                if not key.startswith("_"):
                    series.setdefault(key, []).append((step, float(value)))
    return series, config


@pytest.mark.skipif("wandb" not in BACKENDS, reason="wandb is not installed (pip install \"qlora-kit[wandb]\")")
def test_wandb_offline_run_equals_metrics_jsonl(tracked_run: dict[str, Any]) -> None:
    facts = tracked_run["manifest"]["tracking"]["wandb"]
    got, config = _wandb_history(tracked_run["run"] / "tracking", facts["id"])
    _assert_same(_merge_rows(got), _expected(tracked_run["run"]))
    assert "train.learning_rate" in config and "memory.optimizer" in config


def _merge_rows(series: Series) -> Series:
    """wandb writes one history row per step: a step's train and eval records share it (same values, one row)."""
    return {key: sorted(points) for key, points in series.items()}
