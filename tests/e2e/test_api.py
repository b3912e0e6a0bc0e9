"""The Python API (qlora_kit/api.py): train, export and load through the commands' code paths, typed errors."""

from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import arithmetic_rows, write_jsonl
from typer.testing import CliRunner

import qlora_kit
from qlora_kit import api
from qlora_kit.cli import app
from qlora_kit.core.errors import (EXIT_NO_SPACE, EXIT_PREEMPTED, EXIT_VERIFY_FAILED, ConfigError, DiskFullError,
                                   ModelError, Preempted, QloraKitError, VerificationError)
from qlora_kit.export import command as export_command
from qlora_kit.train import recipe

pytestmark = pytest.mark.e2e


def _config(model: Path, data: Path, out: Path) -> dict[str, Any]:
    """A dict config with Path values, as a script would build it."""
    return {
        "model": {"name_or_path": model},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
        "data": {"path": data, "val_fraction": 0.1},
        "train": {"max_steps": 2, "micro_batch_size": 4, "gradient_accumulation_steps": 1, "max_length": 64,
                  "logging_steps": 1, "save_steps": 2, "warmup_steps": 0, "optimizer": "adamw_torch"},
        "output_dir": out,
    }


@pytest.fixture(scope="module")
def api_run(tmp_path_factory: pytest.TempPathFactory, tiny_llama: Path) -> tuple[api.TrainResult, dict[str, Any]]:
    """A run trained through ``qlora_kit.train`` in the main thread, with a handler of the caller's for SIGINT."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("api")
    cfg = _config(tiny_llama, write_jsonl(root / "rows.jsonl", arithmetic_rows(32)), root / "run")

    def mine(signum: int, frame: Any) -> None:
        raise AssertionError("the caller's handler must not run during the test")

    before = signal.signal(signal.SIGINT, mine)
    try:
        result = qlora_kit.train(cfg, overrides={"train.learning_rate": 5e-3})
        assert signal.getsignal(signal.SIGINT) is mine  # the caller's handler is back after the call
    finally:
        signal.signal(signal.SIGINT, before)
    return result, cfg


def test_train_returns_the_run_and_its_final_metrics(api_run: tuple[api.TrainResult, dict[str, Any]]) -> None:
    result, cfg = api_run
    assert result.run_dir == Path(cfg["output_dir"]).resolve() and result.status == "completed"
    assert result.metrics["step"] == 2 and result.metrics["train_loss"] > 0 and result.metrics["eval_loss"] > 0
    history = result.history()
    assert [r["step"] for r in history if "loss" in r] == [1, 2]
    assert history[-1] == {"step": 2, "eval_loss": pytest.approx(result.metrics["eval_loss"], abs=1e-5)}
    config_yaml = (result.run_dir / "config.yaml").read_text()
    assert "learning_rate: 0.005  # override --set" in config_yaml and "the config dict" in config_yaml
    assert os.fspath(result) == str(result.run_dir)


def test_export_and_load_give_a_model_ready_to_generate(api_run: tuple[api.TrainResult, dict[str, Any]],
                                                         tmp_path: Path) -> None:
    result, _ = api_run
    merged = qlora_kit.export(result, tmp_path / "merged", verify=False)
    assert merged.out == merged.model_path == (tmp_path / "merged").resolve()
    assert merged.verification == {"status": "skipped"} and (merged.out / "config.json").is_file()
    for source in (result, merged):
        model, tokenizer = qlora_kit.load(source, device="cpu")
        assert hasattr(model, "peft_config") == (source is result) and not model.training  # NF4 + adapter / merged
        end_of_turn = tokenizer.convert_tokens_to_ids("<|im_end|>")
        assert end_of_turn in model.generation_config.eos_token_id  # plain model.generate stops at the turn's end
        inputs = tokenizer.apply_chat_template([{"role": "user", "content": "2 + 3 ?"}], add_generation_prompt=True,
                                               return_dict=True, return_tensors="pt")
        reply = model.generate(**inputs, max_new_tokens=4, do_sample=False)
        assert reply.shape[1] > inputs["input_ids"].shape[1]


def test_a_gguf_export_names_its_file_and_loads(api_run: tuple[api.TrainResult, dict[str, Any]],
                                                tmp_path: Path) -> None:
    pytest.importorskip("gguf")
    result, _ = api_run
    exported = qlora_kit.export(result, tmp_path / "gguf", format="gguf", quant="f16", verify=False)
    assert exported.model_path == exported.out / "gguf-F16.gguf" and exported.model_path.is_file()
    assert exported.report["gguf"]["quant"] == "f16" and os.fspath(exported) == str(exported.model_path)
    model, tokenizer = qlora_kit.load(exported, device="cpu")
    assert not model.training and tokenizer.convert_tokens_to_ids("<|im_end|>") in model.generation_config.eos_token_id


def test_train_from_a_worker_thread_resumes_and_leaves_the_handlers(
        api_run: tuple[api.TrainResult, dict[str, Any]], tmp_path: Path) -> None:
    """No signal handler can be installed outside the main thread: the call works without one."""
    result, cfg = api_run
    run = shutil.copytree(result.run_dir, tmp_path / "run")
    before = (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM))
    outcome: dict[str, Any] = {}

    def work() -> None:
        try:
            outcome["result"] = qlora_kit.train({**cfg, "output_dir": run}, ["train.max_steps=3"], resume=True)
        except BaseException as exc:  # reported to the test below
            outcome["error"] = exc

    worker = threading.Thread(target=work)
    worker.start()
    worker.join(timeout=300)
    assert "error" not in outcome, outcome.get("error")
    assert outcome["result"].metrics["step"] == 3 and outcome["result"].status == "completed"
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before


def test_an_interrupt_saves_a_checkpoint_and_resume_continues(tiny_llama: Path, tmp_path: Path) -> None:
    """Interrupting the kernel / Ctrl-C in a script: SIGINT in the main thread, during the call."""
    cfg = _config(tiny_llama, write_jsonl(tmp_path / "rows.jsonl", arithmetic_rows(32)), tmp_path / "run")
    cfg["train"].update(max_steps=500, save_steps=1000, logging_steps=1)
    metrics = tmp_path / "run" / "metrics.jsonl"
    before = signal.getsignal(signal.SIGINT)

    def interrupt_after_the_first_step() -> None:
        for _ in range(1200):
            if metrics.is_file() and metrics.read_text().strip():
                if signal.getsignal(signal.SIGINT) is not before:  # only while the call's handler is installed
                    os.kill(os.getpid(), signal.SIGINT)
                return
            time.sleep(0.1)

    threading.Thread(target=interrupt_after_the_first_step, daemon=True).start()
    with pytest.raises(Preempted) as info:
        qlora_kit.train(cfg)
    assert info.value.exit_code == EXIT_PREEMPTED and signal.getsignal(signal.SIGINT) is before
    stopped = max(r["step"] for r in api.TrainResult(tmp_path / "run", {}, "").history())
    assert stopped < 500 and (tmp_path / "run" / f"checkpoint-{stopped}").is_dir()
    result = qlora_kit.train(cfg, {"train.max_steps": stopped + 1}, resume=True)
    assert result.status == "completed" and result.metrics["step"] == stopped + 1


def _cli_lines(*args: str) -> tuple[int, list[str]]:
    out = CliRunner().invoke(app, list(args))
    return out.exit_code, [line for line in out.output.splitlines() if line.startswith(("error: ", "fix: "))]


def _lines(exc: QloraKitError) -> list[str]:
    return [f"error: {exc.message}"] + ([f"fix: {exc.hint}"] if exc.hint else [])


def test_errors_are_the_clis_as_typed_exceptions(tmp_path: Path, tiny_llama: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as info:
        qlora_kit.train(missing)
    assert _cli_lines("train", str(missing)) == (info.value.exit_code, _lines(info.value))

    data = write_jsonl(tmp_path / "rows.jsonl", arithmetic_rows(8))
    with pytest.raises(ConfigError) as info:
        qlora_kit.train(_config(tiny_llama, data, tmp_path / "run"), overrides={"train.max_step": 3})
    assert "--set train.max_step=3: unknown key 'train.max_step' (did you mean 'max_steps'?)" in info.value.message
    assert not (tmp_path / "run").exists()

    with pytest.raises(ModelError) as info:
        qlora_kit.export(tmp_path / "no-run", tmp_path / "out")
    assert _cli_lines("export", str(tmp_path / "no-run"), "--out", str(tmp_path / "out"))[1] == _lines(info.value)
    with pytest.raises(ModelError):
        qlora_kit.load(tmp_path / "no-run")

    def full_disk(*args: Any, **kwargs: Any) -> Any:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp_path / "run" / "adapter"))

    monkeypatch.setattr(api, "train_command", full_disk)
    monkeypatch.setattr(recipe, "train_command", full_disk)
    with pytest.raises(DiskFullError) as info:
        qlora_kit.train(missing)
    assert info.value.exit_code == EXIT_NO_SPACE
    assert _cli_lines("train", str(missing)) == (EXIT_NO_SPACE, _lines(info.value))


def test_a_failed_verification_raises_with_the_report(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    report = {"verification": {"status": "failed", "failures": ["max |Δlogit| 3.1 > 0.5"]}}
    monkeypatch.setattr(export_command, "export_model", lambda *args, **kwargs: report)
    with pytest.raises(VerificationError) as info:
        qlora_kit.export(tmp_path / "run", tmp_path / "out")
    assert info.value.message == "verification failed: max |Δlogit| 3.1 > 0.5" and info.value.report is report
    assert info.value.exit_code == EXIT_VERIFY_FAILED
    assert export_command.export_run(tmp_path / "run", tmp_path / "out") == EXIT_VERIFY_FAILED


def test_import_stays_light_and_the_subpackages_stay_modules() -> None:
    code = (
        "import sys, types, qlora_kit\n"
        "assert 'torch' not in sys.modules and 'qlora_kit.api' not in sys.modules, 'import qlora_kit loaded torch'\n"
        "import qlora_kit.train.recipe as recipe\n"
        "from qlora_kit.export import hf\n"
        "assert callable(qlora_kit.train) and callable(qlora_kit.export) and callable(qlora_kit.load)\n"
        "assert isinstance(qlora_kit.train, types.ModuleType) and qlora_kit.train.recipe is recipe\n"
        "assert qlora_kit.export.hf is hf and qlora_kit.TrainResult.__module__ == 'qlora_kit.api'\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
