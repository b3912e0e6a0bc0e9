"""Messages (issue 20, item 15): a full disk on metrics.jsonl names the file and suggests --resume only when a
checkpoint is there to resume from."""

from __future__ import annotations

import builtins
import errno
import json
from pathlib import Path

import pytest
from conftest import arithmetic_rows, write_config, write_jsonl
from typer.testing import CliRunner

from qlora_kit.cli import app
from qlora_kit.core.errors import EXIT_NO_SPACE
from qlora_kit.rundir import metrics as metrics_module

pytestmark = pytest.mark.e2e


def _disk_full_on_metrics_line(monkeypatch: pytest.MonkeyPatch, line: int) -> None:
    """Appending the ``line``-th record to metrics.jsonl fails with ENOSPC (other files write normally)."""
    calls = {"n": 0}

    def fake_open(path, mode="r", *args, **kwargs):
        if Path(path).name == "metrics.jsonl" and mode == "a":
            calls["n"] += 1
            if calls["n"] >= line:
                raise OSError(errno.ENOSPC, "No space left on device")
        return builtins.open(path, mode, *args, **kwargs)

    monkeypatch.setattr(metrics_module, "open", fake_open, raising=False)


@pytest.mark.parametrize("line, resumable", [(1, False), (4, True)])
def test_a_full_disk_on_metrics_names_the_file_and_suggests_resume_only_when_possible(
        tmp_path: Path, tiny_llama: Path, monkeypatch: pytest.MonkeyPatch, line: int, resumable: bool) -> None:
    data = write_jsonl(tmp_path / "data.jsonl", arithmetic_rows(24))
    run = tmp_path / "run"
    cfg = write_config(tmp_path / "cfg.yaml", tiny_llama, data, run, train={"max_steps": 6, "save_steps": 2})
    _disk_full_on_metrics_line(monkeypatch, line)  # records: steps 1, 2, eval 2, 3, ...
    result = CliRunner().invoke(app, ["train", str(cfg)])
    assert result.exit_code == EXIT_NO_SPACE, result.output[-3000:]
    lines = result.output.splitlines()
    error = next(x for x in lines if x.startswith("error: "))
    fix = next(x for x in lines if x.startswith("fix: "))
    assert str(run / "metrics.jsonl") in error and "filled up" in error
    assert ("--resume" in fix) == resumable, fix
    assert run.exists() == resumable  # a fresh run without a checkpoint is undone: nothing to resume


def test_an_export_refused_by_the_lock_of_its_out_names_out(tmp_path: Path) -> None:
    from run_fixture import make_run

    from qlora_kit.rundir import lock as runlock

    run = make_run(tmp_path, "llama")
    out = tmp_path / "merged"
    with runlock.exclusive(out, "export (another one)"):
        result = CliRunner().invoke(app, ["export", str(run), "--out", str(out), "--no-verify"])
    assert result.exit_code == 2, result.output[-3000:]
    lines = result.output.splitlines()
    assert next(x for x in lines if x.startswith("error: ")).startswith(f"error: --out {out} is in use by another")
    assert next(x for x in lines if x.startswith("fix: ")).endswith("or choose another --out")


def _error_and_fix(result) -> tuple[str, str]:
    assert result.exit_code == 2, result.output[-3000:]
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    lines = result.output.splitlines()
    return next(x for x in lines if x.startswith("error: ")), next(x for x in lines if x.startswith("fix: "))


def test_a_bad_device_gets_a_fix(tmp_path: Path) -> None:
    error, fix = _error_and_fix(CliRunner().invoke(app, ["export", str(tmp_path / "run"), "--out", str(tmp_path / "o"),
                                                         "--device", "gpu0"]))
    assert error == "error: --device 'gpu0' is not cpu or cuda" and "--device cpu or --device cuda" in fix


def test_plan_with_zero_gpus_gets_a_fix(tmp_path: Path, tiny_llama: Path) -> None:
    cfg = write_config(tmp_path / "cfg.yaml", tiny_llama, tmp_path / "d.jsonl", tmp_path / "run")
    error, fix = _error_and_fix(CliRunner().invoke(app, ["plan", str(cfg), "--num-gpus", "0"]))
    assert "--num-gpus must be at least 1" in error and "--num-gpus 2" in fix


def test_a_damaged_base_tokenizer_gets_a_fix(tmp_path: Path, tiny_llama: Path) -> None:
    import shutil

    base = Path(shutil.copytree(tiny_llama, tmp_path / "base"))
    (base / "tokenizer.json").write_text('{"model": {"type": "BPE", "vocab": [1, 2')  # cut short
    data = write_jsonl(tmp_path / "data.jsonl", arithmetic_rows(8))
    cfg = write_config(tmp_path / "cfg.yaml", base, data, tmp_path / "run")
    error, fix = _error_and_fix(CliRunner().invoke(app, ["train", str(cfg)]))
    assert f"cannot load the tokenizer from {base}" in error and "tokenizer.json" in fix
    assert not (tmp_path / "run").exists()


def test_a_damaged_run_tokenizer_gets_a_fix_in_export(tmp_path: Path) -> None:
    from run_fixture import make_run

    run = make_run(tmp_path, "llama")
    (run / "tokenizer" / "tokenizer.json").write_text('{"model": {"type": "BPE", "vocab": [1, 2')
    error, fix = _error_and_fix(CliRunner().invoke(app, ["export", str(run), "--out", str(tmp_path / "o"),
                                                         "--no-verify"]))
    assert "cannot load the tokenizer in" in error and "--resume" in fix


@pytest.mark.parametrize("template, exception", [
    ("{{ raise_exception('only user and assistant roles are supported') }}",
     "TemplateError: only user and assistant roles are supported"),
    ("{% for m in messages %}{{ m.content | nosuchfilter }}{% endfor %}", "No filter named 'nosuchfilter'"),
])
def test_a_template_that_raises_on_every_row_is_a_template_problem(tmp_path: Path, tiny_llama: Path, template: str,
                                                                   exception: str) -> None:
    data = write_jsonl(tmp_path / "data.jsonl", arithmetic_rows(12))
    cfg = write_config(tmp_path / "cfg.yaml", tiny_llama, data, tmp_path / "run")
    override = f"model.chat_template={json.dumps(template)}"  # a JSON string is a YAML string
    error, fix = _error_and_fix(CliRunner().invoke(app, ["train", str(cfg), "--set", override]))
    assert error.startswith("error: the chat template raises on every row") and exception in error, error
    assert "malformed" not in error and "model.chat_template" in fix
