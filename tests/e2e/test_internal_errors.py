"""An exception nobody foresaw ends as an internal error: one `error:` line with the phase and the
exception's first line, one `fix:` line naming where the traceback is, exit 70; `--debug` raises it.
A training run that fails so is left resumable from its last checkpoint."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from conftest import write_config
from typer.testing import CliRunner

from qlora_kit import cli
from qlora_kit.core.errors import EXIT_INTERNAL

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[2]
FIRST_LINE = "kthvalue(): selected number k out of range for dimension 0"


def _invoke(*args: str):
    return CliRunner().invoke(cli.app, list(args))


def _lines(text: str, prefix: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith(prefix)]


def _raise(*args, **kwargs):
    raise RuntimeError(FIRST_LINE + "\nsecond line of the message")


def test_exit_code_is_documented() -> None:
    assert EXIT_INTERNAL == 70
    table = (ROOT / "README.md").read_text().split("### Exit codes", 1)[1].split("\n\n", 2)[1]
    assert re.search(r"^\| 70 \| .*bug", table, flags=re.M), table


COMMANDS = {
    "export": ("qlora_kit.export.command.export_run", ["export", "run", "--out", "x"]),
    "generate": ("qlora_kit.commands.generate.generate_once", ["generate", "run", "hi"]),
    "plan": ("qlora_kit.plan.report.run_plan", ["plan", "c.yaml"]),
    "doctor": ("qlora_kit.commands.doctor.run_doctor", ["doctor"]),
    "demo": ("qlora_kit.commands.demo.run_demo", ["demo"]),
    "data": ("qlora_kit.commands.data.run_data", ["data", "c.yaml"]),
}


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_command_reports_an_internal_error(command: str, monkeypatch: pytest.MonkeyPatch) -> None:
    target, args = COMMANDS[command]
    monkeypatch.setattr(target, _raise)
    result = _invoke(*args)
    assert result.exit_code == EXIT_INTERNAL, result.output
    errors, fixes = _lines(result.stderr, "error:"), _lines(result.stderr, "fix:")
    assert errors == [f"error: internal error in {command}: RuntimeError: {FIRST_LINE}"], result.stderr
    assert len(fixes) == 1 and "bug" in fixes[0] and "--debug" in fixes[0]
    saved = Path(re.search(r"the traceback is in (\S+?);", fixes[0]).group(1))
    assert "Traceback" in saved.read_text() and "second line of the message" in saved.read_text()
    saved.unlink()
    debug = _invoke("--debug", *args)
    assert isinstance(debug.exception, RuntimeError) and debug.exit_code != EXIT_INTERNAL


def test_training_failure_names_the_step_and_stays_resumable(tmp_path: Path, tiny_llama: Path, data_file: Path,
                                                             monkeypatch: pytest.MonkeyPatch, one_thread) -> None:
    from qlora_kit.train import loop

    real = loop.forward_loss

    def forward(run, *args, **kwargs):
        if run.step == 4:  # after checkpoint-3
            _raise()
        return real(run, *args, **kwargs)

    cfg = write_config(tmp_path / "cfg.yaml", tiny_llama, data_file, tmp_path / "run")
    monkeypatch.setattr(loop, "forward_loss", forward)
    result = _invoke("train", str(cfg))
    assert result.exit_code == EXIT_INTERNAL, result.output
    errors, fixes = _lines(result.stderr, "error:"), _lines(result.stderr, "fix:")
    assert errors == [f"error: internal error in train (step 5 of 6): RuntimeError: {FIRST_LINE}"], result.stderr
    log = tmp_path / "run" / "train.log"
    assert len(fixes) == 1 and f"the traceback is in {log};" in fixes[0] and "--resume" in fixes[0]
    assert "Traceback" in log.read_text()
    assert json.loads((tmp_path / "run/manifest.json").read_text())["status"] == "failed"
    monkeypatch.setattr(loop, "forward_loss", real)
    resumed = _invoke("train", str(cfg), "--resume")
    assert resumed.exit_code == 0, resumed.output
    assert "resum" in resumed.stderr.lower() and (tmp_path / "run/adapter").is_dir()
