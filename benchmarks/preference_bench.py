"""Preference tuning benchmark: qlora-kit's DPO against trl's own DPOTrainer, same data, same steps, measured.

Task (generated here, seeded): the date task of ``qlora-kit demo`` as preference pairs.  The
prompt is the demo's system instruction ("Reply with the date only, written as YYYY-MM-DD.")
and a date in words; **chosen** is the ISO answer, **rejected** the same date in another
format (US ``MM/DD/YYYY``, or the date in words again, as the untuned model tends to echo it).
Held-out pairs use dates that never occur in the training pairs.

Both trainers start from the same NF4 base (``qlora_kit.model.base.load_quantized_base``, the
demo's SmolLM2-135M-Instruct GGUF converted once) with the same LoRA (r, alpha, attention
projections, no dropout), beta, loss (sigmoid), learning rate, schedule (cosine, same warmup),
AdamW (torch), pairs per optimizer step (``micro_batch_size`` pairs, no accumulation; qlora-kit
with ``data.packing=false`` so a micro-batch holds exactly that many pairs), steps and
``max_length``; each draws its own shuffled order.  Every trainer runs in its own process:

- ``qlora-kit``: ``qlora-kit train`` with ``configs/smollm2-135m_qlora_cpu.yaml`` and
  ``train.method=dpo`` (its reference: the adapter switched off, in the same step);
- ``trl``: ``trl.DPOTrainer`` with ``DPOConfig`` defaults otherwise (padded batches, trl's fused
  LM head, reference = adapter disabled through peft), the same LoRA via ``peft_config``.

Then one evaluation process loads the NF4 base once with both adapters and measures, on the
held-out pairs, for the base (before) and each trained adapter (after):

- **reward accuracy** (trl's ``rewards/accuracies``): the fraction of pairs whose implicit
  reward ``beta * (log p_policy - log p_reference)`` is higher for chosen than for rejected
  (the reference: the base; before training every reward is 0, so it is 0), and the mean margin;
- **preference accuracy**: the fraction of pairs the model itself gives the chosen completion a
  higher log-probability (also meaningful before training);
- **greedy exact match**: the greedy reply equals the ISO answer (``qlora_kit.commands.demo.exact_match``).

Log-probabilities are scored on the completion as the chat template delimits the assistant turn
(its text and end-of-turn marker: ``qlora_kit.data.preference``'s rendering), for all three models.

    python benchmarks/preference_bench.py --threads 1 --out benchmarks/results/preference-cpu-demo-<date>.json
    python benchmarks/preference_bench.py --model tiny --steps 3 --train-pairs 24 --heldout 8   # smoke run
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import random
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "smollm2-135m_qlora_cpu.yaml"
BETA = 0.1


# --------------------------------------------------------------------------- data


def pair_rows(n_train: int, n_heldout: int, seed: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Preference rows (trl's conversational layout) of the demo's date task; held-out dates are unseen."""
    from qlora_kit.commands.demo import SYSTEM_PROMPT, sample_dates, spell_date

    rng = random.Random(seed)
    rows = []
    for day in sample_dates(rng, n_train + n_heldout):
        style = rng.randrange(4)
        words = spell_date(day, style)
        wrong = f"{day.month:02d}/{day.day:02d}/{day.year}" if rng.random() < 0.5 else words
        rows.append({"prompt": [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": words}],
                     "chosen": [{"role": "assistant", "content": day.isoformat()}],
                     "rejected": [{"role": "assistant", "content": wrong}]})
    return rows[:n_train], rows[n_train:]


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


# --------------------------------------------------------------------------- trainers (each in its own process)


def settings(args: argparse.Namespace) -> dict[str, Any]:
    """The hyperparameters both trainers share."""
    return {"steps": args.steps, "pairs_per_step": args.pairs_per_step, "learning_rate": args.learning_rate,
            "warmup_steps": args.warmup_steps, "lr_scheduler": "cosine", "beta": BETA, "loss": "sigmoid",
            "lora_r": 16, "lora_alpha": 32, "lora_dropout": 0.0, "max_length": args.max_length, "seed": args.seed,
            "optimizer": "adamw_torch (fp32 states)"}


def qlora_kit_overrides(s: dict[str, Any], model: str, data: Path, val: Path, out: Path) -> list[str]:
    return [f"model.name_or_path={json.dumps(model)}", f"data.path={json.dumps(str(data))}",
            f"data.val_path={json.dumps(str(val))}", f"output_dir={json.dumps(str(out))}", "data.packing=false",
            "train.method=dpo", f"train.beta={s['beta']}", f"train.max_steps={s['steps']}",
            f"train.micro_batch_size={s['pairs_per_step']}", "train.gradient_accumulation_steps=1",
            f"train.learning_rate={s['learning_rate']}", f"train.warmup_steps={s['warmup_steps']}",
            f"train.max_length={s['max_length']}", f"train.seed={s['seed']}", f"train.eval_steps={s['steps']}",
            f"train.save_steps={s['steps']}", "train.logging_steps=1", "lora.dropout=0.0",
            f"lora.r={s['lora_r']}", f"lora.alpha={s['lora_alpha']}"]


def run_qlora_kit(s: dict[str, Any], model: str, data: Path, val: Path, out: Path, threads: int) -> dict[str, Any]:
    """``qlora-kit train`` in a subprocess; its wall time, peak RSS and metrics."""
    cmd = [sys.executable, "-m", "qlora_kit.cli", "train", str(CONFIG)]
    for item in qlora_kit_overrides(s, model, data, val, out):
        cmd += ["--set", item]
    return _timed(cmd, threads, out.parent / "qlora-kit.log") | {"metrics": _read_metrics(out / "metrics.jsonl")}


def run_trl(s: dict[str, Any], model: str, data: Path, out: Path, threads: int) -> dict[str, Any]:
    """This script's ``--trl-worker`` in a subprocess."""
    spec = json.dumps({"settings": s, "model": model, "data": str(data), "out": str(out), "threads": threads})
    result = _timed([sys.executable, __file__, "--trl-worker", spec], threads, out.parent / "trl.log")
    worker = json.loads((out / "worker.json").read_text()) if (out / "worker.json").is_file() else {}
    return result | worker


def trl_worker(spec: dict[str, Any]) -> None:
    """Train with trl's DPOTrainer on the NF4 base qlora-kit loads; save the adapter and trl's logs."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from trl import DPOConfig, DPOTrainer

    from qlora_kit.core.config import ModelConfig
    from qlora_kit.model.base import load_quantized_base, load_tokenizer
    from qlora_kit.model.lora import attention_module_names
    from qlora_kit.model.sources import resolve_source

    torch.set_num_threads(spec["threads"])
    s, out = spec["settings"], Path(spec["out"])
    cfg = ModelConfig(name_or_path=spec["model"])
    source = resolve_source(cfg)
    model = load_quantized_base(source, cfg, torch.float32, torch.device("cpu"))
    tokenizer = load_tokenizer(source, cfg)
    rows = [json.loads(line) for line in Path(spec["data"]).read_text().splitlines() if line.strip()]
    args = DPOConfig(output_dir=str(out / "trainer"), max_steps=s["steps"], per_device_train_batch_size=s["pairs_per_step"],
                     gradient_accumulation_steps=1, learning_rate=s["learning_rate"], lr_scheduler_type="cosine",
                     warmup_steps=s["warmup_steps"], beta=s["beta"], loss_type=["sigmoid"], max_length=s["max_length"],
                     optim="adamw_torch", weight_decay=0.0, max_grad_norm=1.0, seed=s["seed"], logging_steps=1,
                     save_strategy="no", report_to=[], use_cpu=True, bf16=False, fp16=False,
                     dataloader_num_workers=0, gradient_checkpointing=True)
    lora = LoraConfig(r=s["lora_r"], lora_alpha=s["lora_alpha"], lora_dropout=s["lora_dropout"],
                      target_modules=attention_module_names(model), task_type="CAUSAL_LM")
    trainer = DPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                         peft_config=lora)
    started = time.perf_counter()
    trainer.train()
    train_s = time.perf_counter() - started
    trainer.model.save_pretrained(out / "adapter")
    (out / "worker.json").write_text(json.dumps({"train_s": round(train_s, 2), "log_history": trainer.state.log_history,
                                                 "trl_version": __import__("trl").__version__}, indent=1))


def _timed(cmd: list[str], threads: int, log: Path) -> dict[str, Any]:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    started = time.perf_counter()
    with log.open("w") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:4])} failed with exit code {proc.returncode}; see {log}")
    rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # the largest child so far
    return {"wall_s": round(wall, 2), "peak_rss_bytes_max_child_so_far": rss}


def _read_metrics(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# --------------------------------------------------------------------------- evaluation


def evaluate(model_name: str, adapters: dict[str, Path], heldout: list[dict[str, Any]], max_length: int,
             threads: int) -> dict[str, Any]:
    """Reward / preference accuracy and greedy exact match of the base and each adapter on the held-out pairs."""
    import torch
    from peft import PeftModel

    from qlora_kit.commands.demo import exact_match
    from qlora_kit.core.config import ModelConfig
    from qlora_kit.model.base import load_quantized_base, load_tokenizer
    from qlora_kit.model.sources import resolve_source

    torch.set_num_threads(threads)
    cfg = ModelConfig(name_or_path=model_name)
    source = resolve_source(cfg)
    tokenizer = load_tokenizer(source, cfg)
    base = load_quantized_base(source, cfg, torch.float32, torch.device("cpu"))
    names = list(adapters)
    model = PeftModel.from_pretrained(base, adapters[names[0]], adapter_name=names[0], is_trainable=False)
    for name in names[1:]:
        model.load_adapter(str(adapters[name]), adapter_name=name, is_trainable=False)
    model.eval()
    batches = _heldout_batches(heldout, tokenizer, max_length)
    exact_rows = [{"messages": r["prompt"] + r["chosen"]} for r in heldout]
    with model.disable_adapter():
        reference = _pair_logps(model, batches)
        before_em, before_examples = exact_match(model, tokenizer, exact_rows)
    results = {"before": _scores(reference, reference) | {"exact_match": before_em,
                                                           "examples": before_examples[:5]}}
    for name in names:
        model.set_adapter(name)
        policy = _pair_logps(model, batches)
        em, examples = exact_match(model, tokenizer, exact_rows)
        results[name] = _scores(policy, reference) | {"exact_match": em, "examples": examples[:5]}
    return results


def _heldout_batches(rows: list[dict[str, Any]], tokenizer: Any, max_length: int) -> list[dict[str, Any]]:
    """The held-out pairs as qlora-kit renders and collates them (padded, 8 pairs a batch)."""
    from qlora_kit.data.labels import ChatSpans
    from qlora_kit.data.pairs import parse_pair
    from qlora_kit.data.preference import collate_pairs, encode_pairs

    pairs = [parse_pair(i, row, True) for i, row in enumerate(rows, 1)]
    encoded, bad = encode_pairs(pairs, tokenizer, max_length, ChatSpans(tokenizer))
    samples = [e.sample for e in encoded]
    if bad or any(s is None for s in samples):
        raise SystemExit(f"held-out pairs did not encode: {bad or [e.dropped for e in encoded]}")
    return [collate_pairs(samples, [[i] for i in range(k, min(k + 8, len(samples)))], tokenizer.pad_token_id, False)
            for k in range(0, len(samples), 8)]


def _pair_logps(model: Any, batches: list[dict[str, Any]]) -> tuple[list[float], list[float]]:
    """Summed completion log-probabilities (chosen, rejected) per pair, full logits, no gradients."""
    import torch

    from qlora_kit.data.preference import PAIR_KEYS
    from qlora_kit.ops.preference_loss import sequence_logps, token_logps

    chosen, rejected = [], []
    with torch.no_grad():
        for batch in batches:
            inputs = {k: v for k, v in batch.items() if k not in PAIR_KEYS}
            n = batch["pair_weight"].numel()
            sums, _ = sequence_logps(token_logps(model, inputs, fused=False), inputs["labels"],
                                     batch["sequence_index"], 2 * n)
            chosen += sums[:n].tolist()
            rejected += sums[n:].tolist()
    return chosen, rejected


def _scores(policy: tuple[list[float], list[float]], reference: tuple[list[float], list[float]]) -> dict[str, Any]:
    pc, pr = policy
    rc, rr = reference
    margins = [BETA * ((a - c) - (b - d)) for a, b, c, d in zip(pc, pr, rc, rr)]
    n = max(len(pc), 1)
    return {"reward_accuracy": sum(m > 0 for m in margins) / n, "reward_margin": sum(margins) / n,
            "preference_accuracy": sum(a > b for a, b in zip(pc, pr)) / n,
            "logps_chosen": sum(pc) / n, "logps_rejected": sum(pr) / n}


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trl-worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--model", default="smollm2-demo", help="smollm2-demo, a model directory, or 'tiny'")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--pairs-per-step", type=int, default=8)
    parser.add_argument("--train-pairs", type=int, default=320)
    parser.add_argument("--heldout", type=int, default=40)
    parser.add_argument("--learning-rate", type=float, default=5e-4)
    parser.add_argument("--warmup-steps", type=int, default=3)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--note", default="")
    args = parser.parse_args(argv)
    if args.trl_worker:
        trl_worker(json.loads(args.trl_worker))
        return 0
    import tempfile

    from qlora_kit.rundir.manifest import device_info, package_versions

    work = args.workdir or Path(tempfile.mkdtemp(prefix="qlora-pref-bench-"))
    model = args.model
    if model == "tiny":
        from qlora_kit.model.tiny import build_tiny_model

        model = str(build_tiny_model(work / "tiny-model", "llama"))
    train_rows, heldout = pair_rows(args.train_pairs, args.heldout, args.seed)
    data, val = write_jsonl(work / "data" / "train.jsonl", train_rows), write_jsonl(work / "data" / "heldout.jsonl",
                                                                                   heldout)
    s = settings(args)
    load_before = os.getloadavg()
    print(f"qlora-kit DPO ({args.steps} steps) ...", flush=True)
    ours = run_qlora_kit(s, model, data, val, work / "qlora-kit-run", args.threads)
    print(f"  {ours['wall_s']} s; trl DPOTrainer ...", flush=True)
    theirs = run_trl(s, model, data, work / "trl-run", args.threads)
    print(f"  {theirs['wall_s']} s; evaluating ...", flush=True)
    scores = evaluate(model, {"qlora-kit": work / "qlora-kit-run" / "adapter", "trl": work / "trl-run" / "adapter"},
                      heldout, args.max_length, args.threads)
    report = {
        "benchmark": "preference_bench",
        "what": "qlora-kit train.method=dpo vs trl DPOTrainer on the same NF4 base, data, LoRA and steps; held-out "
                "reward accuracy, preference accuracy and greedy exact match before and after",
        "time": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "model": args.model, "task": "date in words -> YYYY-MM-DD; chosen ISO, rejected MM/DD/YYYY or the words",
        "train_pairs": args.train_pairs, "heldout_pairs": args.heldout, "settings": s, "threads": args.threads,
        "load_average_before": load_before, "load_average_after": os.getloadavg(), "note": args.note,
        "device": device_info(__import__("torch").device("cpu")), "versions": package_versions(),
        "train": {"qlora-kit": _train_summary(ours, qlora=True), "trl": _train_summary(theirs, qlora=False)},
        "heldout": scores,
    }
    out = args.out or work / "preference-bench.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print_table(report)
    print(f"wrote {out}")
    return 0


def _train_summary(result: dict[str, Any], qlora: bool) -> dict[str, Any]:
    """Wall time, seconds per step and the last logged loss / reward metrics of one trainer."""
    if qlora:
        train = [m for m in result["metrics"] if "loss" in m]
        evals = [m for m in result["metrics"] if "eval_loss" in m]
        last = train[-1] if train else {}
        return {"wall_s": result["wall_s"], "seconds_per_step": round(sum(m["seconds_per_step"] for m in train)
                                                                      / max(len(train), 1), 3),
                "first_loss": train[0]["loss"] if train else None, "last": last, "eval": evals[-1] if evals else None}
    logs = [m for m in result.get("log_history", []) if "loss" in m]
    return {"wall_s": result["wall_s"], "train_s": result.get("train_s"),
            "seconds_per_step": round(result.get("train_s", 0) / max(len(logs), 1), 3),
            "first_loss": logs[0]["loss"] if logs else None, "last": logs[-1] if logs else {},
            "trl_version": result.get("trl_version")}


def print_table(report: dict[str, Any]) -> None:
    h = report["heldout"]
    print(f"{'':12s} {'reward acc':>10s} {'margin':>8s} {'pref acc':>8s} {'exact':>6s}")
    for name, row in h.items():
        print(f"{name:12s} {row['reward_accuracy']:10.3f} {row['reward_margin']:8.3f} "
              f"{row['preference_accuracy']:8.3f} {row['exact_match']:6.3f}")
    for name, t in report["train"].items():
        print(f"{name}: {t['wall_s']} s wall, {t['seconds_per_step']} s/step")


if __name__ == "__main__":
    sys.exit(main())
