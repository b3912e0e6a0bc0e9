"""Square brackets in what qlora-kit prints reach the terminal: rich must not read them as markup.

Every surface that prints through rich is fed text with brackets (the `[llamacpp]` extra, a
path like `runs/[exp1]`, `[bold]`) and must print it as given.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qlora_kit.core import logs

BRACKETED = "qlora-kit[llamacpp] runs/[exp1] [bold]x[/bold]"


def test_the_shared_console_prints_brackets(capsys: pytest.CaptureFixture[str]) -> None:
    logs.console().print(BRACKETED)
    logs.stdout_console().print(BRACKETED)
    captured = capsys.readouterr()
    assert BRACKETED in captured.err and BRACKETED in captured.out


def test_the_llamacpp_install_hint_is_the_readmes_command() -> None:
    from qlora_kit.export import llamacpp

    readme = (Path(__file__).resolve().parents[3] / "README.md").read_text()
    command = 'pip install -c constraints.txt -e ".[llamacpp]"'
    assert command in readme and command in llamacpp.INSTALL_HINT


def test_export_summary_keeps_the_install_hint(capsys: pytest.CaptureFixture[str]) -> None:
    from qlora_kit.export import llamacpp
    from qlora_kit.export.card import print_summary

    metrics = {"max_abs": 0.1, "rel_max": 0.01, "kl_mean": 1e-4, "top1_agreement": 1.0}
    report = {"format": "gguf", "gguf": {"quant": "q8_0", "file": "m.gguf"},
              "merge_base": "dequantized", "tensors": {"merged": 1, "dequantised_unmerged": 0, "copied": 2},
              "bytes_written": 10**6, "weights_wall_s": 1.0, "weights_peak_rss_bytes": 2**20,
              "rss_before_weights_bytes": 2**20, "eos_token_ids": [2],
              "verification": {"status": "passed", "prompts": 4, "next_token": metrics,
                               "greedy": {"greedy_exact": 4, "greedy_total": 4},
                               "llama_cpp": f"did not run: llama-cpp-python is not installed ({llamacpp.INSTALL_HINT})"}}
    print_summary(report, Path("out/[exp1]"))
    err = " ".join(capsys.readouterr().err.split())  # the table wraps long cells
    assert "out/[exp1]" in err and '".[llamacpp]"' in err.replace("│", "").replace("  ", " ")


def test_plan_prints_brackets_in_the_model_path(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    from qlora_kit.plan.report import run_plan

    model = tmp_path / "[exp1]"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({
        "model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 100, "max_position_embeddings": 512}))
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"model: {{name_or_path: '{model}'}}\ndata: {{path: d.jsonl}}\noutput_dir: o\n")
    monkeypatch.setattr("shutil.get_terminal_size", lambda *a: __import__("os").terminal_size((400, 50)))
    run_plan(cfg, [], gpu_memory=24)
    out = capsys.readouterr().out
    assert "[exp1]" in out and "predicted peak" in out and "fits" in out


def test_doctor_prints_brackets_in_fixes(capsys: pytest.CaptureFixture[str]) -> None:
    from qlora_kit.commands.doctor import FAIL, Check, print_checks

    print_checks([Check("gguf", FAIL, "missing [x]", "pip install -c constraints.txt -e \".[gguf]\"")])
    out = " ".join(capsys.readouterr().out.split())
    assert '-e ".[gguf]"' in out and "missing [x]" in out


def test_demo_result_prints_brackets(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from qlora_kit.commands.demo import print_result

    result = {"heldout_rows": 2, "correct_before": 0, "correct_after": 2, "train": {"steps": 3},
              "seconds": {"train": 1.0}, "passed": True, "min_gain": 0.2,
              "examples": [{"prompt": "p [a]", "reference": "[r]", "before": "[b]", "after": "[r]"}]}
    print_result(result, tmp_path / "[exp1]")
    out = capsys.readouterr().out
    assert all(text in out for text in ("p [a]", "[r]", "[b]", "[exp1]")) and "learned the task" in out
