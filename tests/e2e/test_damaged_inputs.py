"""Damaged inputs end in one error: + fix: line, never a traceback (issue 20, item 11): a truncated base, a
config.json that does not match the weights, a damaged manifest.json or metrics.jsonl, train.log a directory."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import arithmetic_rows, run_cli, write_config, write_jsonl
from typer.testing import CliRunner

from qlora_kit.cli import app
from qlora_kit.core.errors import EXIT_USER_ERROR

pytestmark = pytest.mark.e2e

TRAIN = {"max_steps": 4, "save_steps": 2}


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, tiny_llama: Path) -> Path:
    """A finished 4-step run with checkpoints 2 and 4 (copied by each test)."""
    root = tmp_path_factory.mktemp("damaged")
    data = write_jsonl(root / "data.jsonl", arithmetic_rows(24))
    cfg = write_config(root / "cfg.yaml", tiny_llama, data, root / "run", train=TRAIN)
    proc = run_cli("train", str(cfg))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root / "run"


def _copy(run: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(run, tmp_path / "run"))


def _cli(*args: str):
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    return result


def _one_error(result, *fragments: str) -> None:
    assert result.exit_code == EXIT_USER_ERROR, result.output[-3000:]
    errors = [line for line in result.output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and any(line.startswith("fix: ") for line in result.output.splitlines()), result.output
    for fragment in fragments:
        assert fragment in result.output, result.output[-3000:]


def _flat(output: str) -> str:
    """Log lines as one line (the console wraps them)."""
    return " ".join(output.split())


def _resume(run: Path, steps: int):
    return _cli("train", run / "config.yaml", "--resume", "--set", f"output_dir={run}",
                "--set", f"train.max_steps={steps}")


def test_a_config_that_does_not_match_the_weights_is_refused_everywhere(trained: Path, tmp_path: Path,
                                                                        tiny_llama: Path) -> None:
    """transformers' 4-bit loader takes such weights without a word: train and generate ran on a wrong model."""
    base = Path(shutil.copytree(tiny_llama, tmp_path / "base"))
    config = json.loads((base / "config.json").read_text())
    config["intermediate_size"] *= 2
    (base / "config.json").write_text(json.dumps(config))
    data = write_jsonl(tmp_path / "data.jsonl", arithmetic_rows(24))
    fresh = _cli("train", write_config(tmp_path / "cfg.yaml", base, data, tmp_path / "fresh", train=TRAIN))
    _one_error(fresh, "config.json does not match the base's weights", "the config makes it")
    assert not (tmp_path / "fresh").exists()

    run = _copy(trained, tmp_path)  # a finished run whose base's config.json was edited afterwards
    shutil.copy(base / "config.json", tmp_path / "edited-config.json")
    base_of_run = Path(json.loads((run / "manifest.json").read_text())["base"]["source_dir"])
    moved = Path(shutil.copytree(base_of_run, tmp_path / "run-base"))
    shutil.copy(tmp_path / "edited-config.json", moved / "config.json")
    manifest = json.loads((run / "manifest.json").read_text())
    manifest["base"]["source_dir"] = str(moved)
    (run / "manifest.json").write_text(json.dumps(manifest))
    _one_error(_cli("generate", run, "hi", "--max-new-tokens", "2"), "config.json does not match")
    _one_error(_cli("export", run, "--out", tmp_path / "exp", "--no-verify"), "config.json does not match")
    assert not (tmp_path / "exp").exists()


def test_a_truncated_base_is_named_on_train_and_resume(trained: Path, tmp_path: Path, tiny_llama: Path) -> None:
    base = Path(shutil.copytree(tiny_llama, tmp_path / "base"))
    weights = base / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    data = write_jsonl(tmp_path / "data.jsonl", arithmetic_rows(24))
    fresh = _cli("train", write_config(tmp_path / "cfg.yaml", base, data, tmp_path / "fresh", train=TRAIN))
    _one_error(fresh, "model.safetensors has", "truncated", "download the model again")
    run = _copy(trained, tmp_path)
    resumed = _cli("train", run / "config.yaml", "--resume", "--set", f"output_dir={run}",
                   "--set", f"model.name_or_path={base}", "--set", "train.max_steps=6")
    _one_error(resumed, "model.safetensors has", "truncated")


@pytest.mark.parametrize("content", [b"\xff\xfe{not json", b"[1, 2]"])
def test_a_resume_rewrites_a_damaged_manifest(trained: Path, tmp_path: Path, content: bytes) -> None:
    run = _copy(trained, tmp_path)
    (run / "manifest.json").write_bytes(content)
    result = _resume(run, 6)
    assert result.exit_code == 0, result.output[-3000:]
    assert "is damaged" in _flat(result.output)
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["status"] == "completed" and manifest["base"]["fingerprint"]


def test_export_and_generate_refuse_a_manifest_of_the_wrong_shape(trained: Path, tmp_path: Path) -> None:
    run = _copy(trained, tmp_path)
    manifest = json.loads((run / "manifest.json").read_text())
    manifest["base"] = "x"
    (run / "manifest.json").write_text(json.dumps(manifest))
    _one_error(_cli("generate", run, "hi"), "manifest.json is damaged (its base is a JSON str, not an object)")
    _one_error(_cli("export", run, "--out", tmp_path / "exp"), "manifest.json is damaged")


@pytest.mark.parametrize("junk", [b"\xff\xfe\n", b"[1, 2]\n\"x\"\n"])
def test_broken_metrics_lines_do_not_stop_this_resume_or_the_next(trained: Path, tmp_path: Path,
                                                                  junk: bytes) -> None:
    run = _copy(trained, tmp_path)
    metrics = run / "metrics.jsonl"
    lines = metrics.read_bytes().splitlines(keepends=True)
    metrics.write_bytes(b"".join(lines[:2]) + junk + b"".join(lines[2:]))  # broken lines between good ones
    first = _resume(run, 6)
    assert first.exit_code == 0, first.output[-3000:]
    assert "line(s) that are not metric records" in _flat(first.output)
    records = [json.loads(line) for line in metrics.read_text(encoding="utf-8").splitlines()]
    assert [r["step"] for r in records if "loss" in r] == list(range(1, 7))
    second = _resume(run, 8)
    assert second.exit_code == 0 and "not metric records" not in second.output, second.output[-3000:]


def test_train_log_replaced_by_a_directory_refuses_the_resume(trained: Path, tmp_path: Path) -> None:
    run = _copy(trained, tmp_path)
    (run / "train.log").unlink()
    (run / "train.log").mkdir()
    before = sorted(str(p.relative_to(run)) for p in run.rglob("*"))
    _one_error(_resume(run, 6), "its train.log is a directory", f"move {run / 'train.log'} out of the way")
    assert sorted(str(p.relative_to(run)) for p in run.rglob("*")) == before
