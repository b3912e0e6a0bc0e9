"""Every bad input: one-line error naming problem and fix, non-zero exit, no traceback, nothing clobbered."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable

import pytest
import torch
import yaml
from conftest import arithmetic_rows, write_config, write_jsonl
from typer.testing import CliRunner

from qlora_kit.cli import app
from qlora_kit.core.errors import EXIT_OOM, EXIT_USER_ERROR

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory, tiny_llama: Path) -> Path:
    root = tmp_path_factory.mktemp("bad")
    write_jsonl(root / "good.jsonl", arithmetic_rows(20))
    no_template = root / "no-template-model"
    shutil.copytree(tiny_llama, no_template)
    tok_cfg = json.loads((no_template / "tokenizer_config.json").read_text())
    tok_cfg.pop("chat_template", None)
    (no_template / "tokenizer_config.json").write_text(json.dumps(tok_cfg))
    (no_template / "chat_template.jinja").unlink(missing_ok=True)
    return root


def case_config(ws: Path, model: Path, name: str, data: Path | None = None, **sections) -> Path:
    return write_config(ws / f"{name}.yaml", model, data or ws / "good.jsonl", ws / f"out-{name}", **sections)


def _yaml_syntax(ws: Path, model: Path) -> list[str]:
    (ws / "syntax.yaml").write_text("model:\n  name_or_path: x\n  bad: [1,\ndata: {}\n")
    return ["train", str(ws / "syntax.yaml")]


def _unknown_key(ws: Path, model: Path) -> list[str]:
    path = case_config(ws, model, "unknown")
    raw = yaml.safe_load(path.read_text())
    raw["train"]["max_step"] = 3
    path.write_text(yaml.safe_dump(raw))
    return ["train", str(path)]


def _bad_rows(ws: Path, model: Path) -> list[str]:
    rows = arithmetic_rows(20)
    rows[3] = {"messages": "nope"}
    rows[7] = {"messages": [{"role": "user"}]}
    return ["train", str(case_config(ws, model, "badrows", write_jsonl(ws / "badrows.jsonl", rows)))]


ALIAS_BOMB = "".join(
    f"{name}: &{name} [" + ", ".join([f"*{prev}"] * 9 if prev else ["x"] * 9) + "]\n"
    for prev, name in zip([None, *"abcdefgh"], "abcdefghi")
)


def _yaml_file(name: str, text: str, command: str = "train") -> Callable[[Path, Path], list[str]]:
    def make(ws: Path, model: Path) -> list[str]:
        path = case_config(ws, model, name)
        raw = yaml.safe_load(path.read_text())
        body = yaml.safe_dump({k: v for k, v in raw.items() if k != "lora"})
        (ws / f"{name}.yaml").write_text(text + body)
        return [command, str(ws / f"{name}.yaml")]
    return make


def _pickle_only_base(ws: Path, model: Path) -> list[str]:
    base = ws / "pickle-base"
    if not base.exists():
        shutil.copytree(model, base)
        (base / "model.safetensors").unlink()
        (base / "pytorch_model.bin").write_bytes(b"\x80\x04cposix\nsystem\n...never unpickled")
    return ["train", str(case_config(ws, base, "pickle"))]


def _gemma2_with_sdpa(ws: Path, model: Path) -> list[str]:
    from qlora_kit.model.tiny import build_tiny_model

    base = ws / "gemma2-base"
    if not base.exists():
        build_tiny_model(base, "gemma2")
    return ["train", str(case_config(ws, base, "g2")), "--set", "model.attn_implementation=sdpa"]


def _dangling_output(ws: Path, model: Path) -> list[str]:
    link = ws / "out-dangling"
    if not link.is_symlink():
        link.symlink_to(ws / "nowhere")
    return ["train", str(case_config(ws, model, "dangling")), "--set", f"output_dir={link}"]


def _overwrite_data_dir(ws: Path, model: Path) -> list[str]:
    data = write_jsonl(ws / "datadir" / "rows.jsonl", arithmetic_rows(20))
    return ["train", str(case_config(ws, model, "ddir", data)), "--set", f"output_dir={data.parent}", "--overwrite"]


def _overwrite_data_parent(ws: Path, model: Path) -> list[str]:
    data = write_jsonl(ws / "nested" / "deeper" / "rows.jsonl", arithmetic_rows(20))
    return ["train", str(case_config(ws, model, "dpar", data)), "--set", f"output_dir={ws / 'nested'}", "--overwrite"]


def _finished_run(ws: Path) -> Path:
    """A finished run (built once), whose manifest records the adapter's sizes and sha256 like train does."""
    from run_fixture import make_run

    from qlora_kit.rundir import layout as rundir
    from qlora_kit.rundir.integrity import file_hashes

    root = ws / "finished"
    if not (root / "run").exists():
        run = make_run(root, "llama")
        manifest = json.loads((run / rundir.MANIFEST).read_text())
        manifest[rundir.ADAPTER_FILES] = file_hashes(run / rundir.ADAPTER)
        (run / rundir.MANIFEST).write_text(json.dumps(manifest))
    return root / "run"


def _damaged_run(damage: str, command: str) -> Callable[[Path, Path], list[str]]:
    def make(ws: Path, model: Path) -> list[str]:
        run = ws / f"damaged-{damage}-{command}"
        if not run.exists():
            shutil.copytree(_finished_run(ws), run)
            weights = run / "adapter" / "adapter_model.safetensors"
            if damage == "manifest":
                (run / "manifest.json").write_bytes(b"\x00\xff{not json")
            elif damage == "truncated adapter":
                weights.write_bytes(weights.read_bytes()[:-100])
            elif damage == "flipped byte":  # header intact: only the sha256 can tell
                data = bytearray(weights.read_bytes())
                data[-5] ^= 0xFF
                weights.write_bytes(bytes(data))
        if command == "export":
            return ["export", str(run), "--out", str(ws / f"exp-{damage}")]
        return ["generate", str(run), "hello"]
    return make


def _data_file(name: str, text: str) -> Callable[[Path, Path], list[str]]:
    def make(ws: Path, model: Path) -> list[str]:
        (ws / name).write_text(text)
        return ["train", str(case_config(ws, model, name.replace(".", "-"), ws / name))]
    return make


CASES: dict[str, tuple[Callable[[Path, Path], list[str]], list[str]]] = {
    "missing config": (lambda ws, m: ["train", str(ws / "nope.yaml")], ["does not exist"]),
    "unreadable config (a directory)": (lambda ws, m: ["train", str(ws)], ["is a directory"]),
    "yaml syntax error": (_yaml_syntax, ["YAML syntax error", "line 5"]),
    "unknown key": (_unknown_key, ["unknown key 'train.max_step'", "did you mean 'max_steps'"]),
    "wrong type": (lambda ws, m: ["train", str(case_config(ws, m, "wt")), "--set", "train.learning_rate=fast"],
                   ["train.learning_rate", "valid number"]),
    "out of range": (lambda ws, m: ["train", str(case_config(ws, m, "oor")), "--set", "lora.dropout=1.5"],
                     ["lora.dropout", "less than 1"]),
    "model path not found": (lambda ws, m: ["train", str(case_config(ws, ws / "no-model", "mp"))],
                             ["model path", "does not exist"]),
    "hub id unreachable": (lambda ws, m: ["train", str(case_config(ws, "nobody/no-such-model", "hub"))],
                           ["nobody/no-such-model"]),
    "lora targets not in model": (
        lambda ws, m: ["train", str(case_config(ws, m, "tg", lora={"target_modules": ["query", "value"]}))],
        ["['query', 'value'] are not linear layers", "q_proj"]),
    "tokenizer without chat template": (
        lambda ws, m: ["train", str(case_config(ws, ws / "no-template-model", "nt"))], ["no chat template"]),
    "data file missing": (lambda ws, m: ["train", str(case_config(ws, m, "dm", ws / "missing.jsonl"))],
                          ["missing.jsonl does not exist"]),
    "validation file missing, named with where it was set": (
        lambda ws, m: ["train", str(write_config(ws / "vm.yaml", m, ws / "good.jsonl", ws / "out-vm",
                                                 data={"val_path": "left-over/heldout.jsonl"}))],
        ["left-over/heldout.jsonl does not exist (relative to the current directory", "check data.val_path",
         "vm.yaml"]),
    "bare key in --set": (lambda ws, m: ["train", str(case_config(ws, m, "bk")), "--set", "max_steps=30"],
                          ["--set max_steps=30: unknown key 'max_steps' (did you mean 'train.max_steps'?)",
                           "fix: --set train.max_steps=30"]),
    "data file empty": (_data_file("empty.jsonl", ""), ["is empty"]),
    "invalid jsonl": (_data_file("broken.jsonl", '{"messages": []}\n{"messages": [oops\n'),
                      ["line 2: not valid JSON"]),
    "rows missing the format's fields": (_data_file("fields.jsonl", '{"foo": 1}\n' * 5),
                                         ["cannot detect the data format", "['foo']"]),
    "format does not match rows": (
        lambda ws, m: ["train", str(case_config(ws, m, "fm")), "--set", "data.format=alpaca"],
        ["needs fields ['instruction', 'output']", "have fields ['messages']"]),
    "too many bad rows": (_bad_rows, ["2 of 20 rows", "line 4", "line 8", "max_bad_fraction"]),
    "all rows truncated to zero trainable tokens": (
        lambda ws, m: ["train", str(case_config(ws, m, "tr", train={"max_length": 16}))],
        ["all 20 rows were truncated to zero trainable tokens"]),
    "export of a missing run": (lambda ws, m: ["export", str(ws / "norun"), "--out", str(ws / "exp")],
                                ["norun"]),
    # issue 9: inputs that used to hang, exhaust memory or end in a traceback
    "yaml alias bomb in lora.target_modules": (_yaml_file("bomb", ALIAS_BOMB + "lora: {target_modules: *i}\n"),
                                               ["expands to more than 20,000 values"]),
    "yaml alias bomb as train.max_steps (plan)": (
        _yaml_file("bomb2", ALIAS_BOMB.replace("train", "t"), "plan"), ["expands to more than 20,000 values"]),
    "yaml nested 100k deep": (_yaml_file("deep", "x: " + "[" * 100_000 + "]" * 100_000 + "\n"),
                              ["nests deeper than 32 levels"]),
    "recursive yaml alias": (_yaml_file("recursive", "x: &r [*r]\n"), ["recursive YAML alias"]),
    "seed beyond 2**32": (lambda ws, m: ["train", str(case_config(ws, m, "seed")), "--set",
                                         "train.seed=99999999999999999999999"],
                          ["train.seed", "less than or equal to 4294967295"]),
    "integer of 5000 digits": (lambda ws, m: ["train", str(case_config(ws, m, "digits")), "--set",
                                              "train.max_steps=" + "9" * 5000], ["more than 4300 digits"]),
    "huge value echoed in an error": (lambda ws, m: ["train", str(case_config(ws, m, "echo")), "--set",
                                                     "lora.target_modules=" + "x" * 200_000],
                                      ["lora.target_modules", "xxx..."]),
    "infinite num_epochs": (lambda ws, m: ["train", str(case_config(ws, m, "inf")), "--set", "train.num_epochs=.inf"],
                            ["train.num_epochs", "finite number"]),
    "plan --gpu-memory nan": (lambda ws, m: ["plan", str(case_config(ws, m, "pn")), "--gpu-memory", "nan"],
                              ["--gpu-memory must be a positive number of GiB, got nan"]),
    "plan --gpu-memory inf": (lambda ws, m: ["plan", str(case_config(ws, m, "pi")), "--gpu-memory", "inf"],
                              ["--gpu-memory must be a positive number of GiB, got inf"]),
    "100k-deep JSON in a data row": (
        _data_file("deep.jsonl", json.dumps(arithmetic_rows(1)[0]) + "\n" + "[" * 100_000 + "]" * 100_000 + "\n"),
        ["line 2: nests JSON too deeply"]),
    "pickle-only pytorch_model.bin base": (_pickle_only_base, ["only pickle weights (pytorch_model.bin)",
                                                               "does not unpickle"]),
    "attention the architecture lacks (Gemma-2 with sdpa)": (
        _gemma2_with_sdpa, ["Gemma2ForCausalLM", "has no sdpa attention", "fix: set model.attn_implementation: eager"]),
    "dangling symlink as output_dir": (_dangling_output, ["is a symlink to", "which does not exist"]),
    "output_dir=/ --overwrite": (lambda ws, m: ["train", str(case_config(ws, m, "root")), "--set", "output_dir=/",
                                                "--overwrite"], ["is the filesystem root"]),
    "output_dir=~/ --overwrite": (lambda ws, m: ["train", str(case_config(ws, m, "home")), "--set", "output_dir=~/",
                                                "--overwrite"], ["is your home directory"]),
    "--overwrite onto the data's directory": (_overwrite_data_dir, ["--overwrite would move", "the data file"]),
    "--overwrite onto a parent of the data": (_overwrite_data_parent, ["--overwrite would move", "the data file"]),
    "--overwrite onto the current directory": (
        lambda ws, m: ["train", str(case_config(ws, m, "cwd")), "--set", f"output_dir={Path.cwd()}", "--overwrite"],
        ["holds the current directory"]),
    "export of a run with a damaged manifest": (_damaged_run("manifest", "export"), ["manifest.json is damaged"]),
    "generate on a run with a damaged manifest": (_damaged_run("manifest", "generate"), ["manifest.json is damaged"]),
    "export of a run with a truncated adapter": (_damaged_run("truncated adapter", "export"),
                                                 ["adapter", "is damaged", "truncated"]),
    "generate on a run with a truncated adapter": (_damaged_run("truncated adapter", "generate"),
                                                   ["adapter", "is damaged", "truncated"]),
    "export of a run whose adapter changed on disk": (_damaged_run("flipped byte", "export"),
                                                      ["does not match its sha256"]),
    "generate on a run whose adapter changed on disk": (_damaged_run("flipped byte", "generate"),
                                                        ["does not match its sha256"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_gives_one_clear_line(case: str, workspace: Path, tiny_llama: Path) -> None:
    make, expected = CASES[case]
    args = make(workspace, tiny_llama)
    before = sorted(p.name for p in workspace.iterdir())
    result = CliRunner().invoke(app, args)
    assert result.exit_code == EXIT_USER_ERROR, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    error_line = next(line for line in result.output.splitlines() if line.startswith("error: "))
    for fragment in expected:
        assert fragment in result.output, f"{fragment!r} not in: {result.output[-1500:]}"
    assert any(line.startswith("fix: ") for line in result.output.splitlines()), result.output
    assert len(error_line) < 400
    after = sorted(p.name for p in workspace.iterdir())
    assert not [name for name in after if name.startswith("out-") and name not in before], "left an output dir"
    assert not [name for name in after if name.endswith(".lock") and name not in before], "left a lock file"


def test_cuda_oom_names_the_knobs(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from qlora_kit.train import recipe as qtrain

    def boom(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(qtrain, "train_command", boom)
    result = CliRunner().invoke(app, ["train", str(tmp_path / "cfg.yaml")])
    assert result.exit_code == EXIT_OOM
    assert "error: CUDA out of memory" in result.output and "micro_batch_size" in result.output


def test_debug_shows_the_traceback(workspace: Path) -> None:
    result = CliRunner().invoke(app, ["--debug", "train", str(workspace / "nope.yaml")])
    assert result.exit_code != 0 and result.exception is not None and not isinstance(result.exception, SystemExit)


def test_trust_remote_code_is_off_by_default(workspace: Path, tiny_llama: Path) -> None:
    from qlora_kit.core.config import load_config

    cfg, _ = load_config(case_config(workspace, tiny_llama, "trc"))
    assert cfg.model.trust_remote_code is False


def test_oom_during_training_reports_the_plan(tmp_path: Path, tiny_llama: Path) -> None:
    from types import SimpleNamespace

    from qlora_kit.core.config import load_config
    from qlora_kit.train.recipe import _oom_error

    cfg, _ = load_config(case_config(tmp_path, tiny_llama, "oom"))
    run = SimpleNamespace(cfg=cfg, step=6, device=torch.device("cpu"),
                          manifest={"base": {"source_dir": str(tiny_llama)}})
    err = _oom_error(run, torch.cuda.OutOfMemoryError("CUDA out of memory"))
    assert err.exit_code == EXIT_OOM
    assert "CUDA out of memory at step 7; the planner predicted" in err.message and "GiB" in err.message
    assert "micro_batch_size" in err.hint


@pytest.mark.parametrize("target", ["run", "run/adapter", "run/tokenizer"])
def test_export_onto_the_run_itself_is_refused(tmp_path: Path, target: str) -> None:
    from run_fixture import make_run

    run = make_run(tmp_path, "llama")
    before = sorted(str(p.relative_to(run)) for p in run.rglob("*"))
    result = CliRunner().invoke(app, ["export", str(run), "--out", str(tmp_path / target)])
    assert result.exit_code == EXIT_USER_ERROR, result.output
    assert result.output.startswith("error: ") and "fix: " in result.output and "Traceback" not in result.output
    assert sorted(str(p.relative_to(run)) for p in run.rglob("*")) == before
