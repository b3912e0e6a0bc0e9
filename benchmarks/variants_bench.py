"""LoRA variants benchmark: the same task and step count for each variant, measured.

Trains one config once per variant, each in a fresh process, through the real recipe
(``qlora_kit.train.recipe.run_training``: NF4 base, same data, order, steps, learning rate schedule),
then reloads the run (NF4 + adapter, plus the residual base of base-changing inits) and scores
greedy exact match on the run's held-out rows (``heldout.jsonl``: validation prompts and their
reference answers).  Default task: the CPU demo (``qlora_kit.commands.demo``: SmolLM2-135M-Instruct GGUF,
dates in words -> YYYY-MM-DD, 320 training rows, 40 held-out rows with unseen dates).

Variants and the only settings they change (``--set`` overrides on top of the config):

==========  =========================================================================
lora        (the config as is)
lora+       train.loraplus_lr_ratio=16 (LoRA+ paper's recommended ratio, 2^4)
dora        lora.use_dora=true
lora_ga     lora.init=lora_ga (gradient of 64 training rows)
loftq       lora.init=loftq
pissa       lora.init=pissa
olora       lora.init=olora
adalora     lora.type=adalora (r = initial rank, target_r 8 at the defaults)
vera        lora.type=vera, lora.r=256, train.learning_rate x10 (VeRA trains only scaling
            vectors; its paper uses r=256 and a ~10x larger learning rate than LoRA)
==========  =========================================================================

Recorded per variant: held-out exact match, final train loss (mean of the last logging
window) and eval loss, trainable parameters, seconds per optimizer step (pure step time from
metrics.jsonl: tokens / tokens-per-second summed over the logging windows; evaluation and
checkpointing excluded), the init's own time, and peak memory (CPU: the training process's
peak RSS from getrusage; CUDA: ``torch.cuda.max_memory_allocated``).  ``--export`` also
exports each run and records its verification.  Output: JSON (device, threads, load average,
versions, settings) and a Markdown table next to it.

Example (the committed CPU result):
    python benchmarks/variants_bench.py --out benchmarks/results/variants-cpu-demo-<date>.json --export \\
        --note "2 CPU cores shared with other jobs"
Any config:
    python benchmarks/variants_bench.py --config my.yaml --set train.max_steps=200 --variants lora,pissa
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
VARIANTS: dict[str, list[str]] = {
    "lora": [],
    "lora+": ["train.loraplus_lr_ratio=16"],
    "dora": ["lora.use_dora=true"],
    "lora_ga": ["lora.init=lora_ga"],
    "loftq": ["lora.init=loftq"],
    "pissa": ["lora.init=pissa"],
    "olora": ["lora.init=olora"],
    "adalora": ["lora.type=adalora"],
    "vera": ["lora.type=vera", "lora.r=256"],  # + learning rate x10, set in overrides_for
}
MAX_HELDOUT = 40


def overrides_for(variant: str, config: Path, base: list[str]) -> list[str]:
    """The ``--set`` overrides of one variant on top of the shared ones."""
    extra = list(VARIANTS[variant])
    if variant == "vera":
        from qlora_kit.core.config import load_config

        lr = load_config(config, base)[0].train.learning_rate
        extra.append(f"train.learning_rate={lr * 10:g}")
    return base + extra


# --------------------------------------------------------------------------- one variant (worker process)


def step_seconds(run_dir: Path) -> float | None:
    """Mean seconds per optimizer step over the logging windows of metrics.jsonl (eval/checkpoints excluded)."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "seconds_per_step" in r]
    if not train:
        return None
    seconds, last = 0.0, 0
    for r in train:
        seconds += r["seconds_per_step"] * (r["step"] - last)
        last = r["step"]
    return seconds / last


def heldout_rows(run_dir: Path, limit: int = MAX_HELDOUT) -> list[dict[str, Any]]:
    """The run's held-out rows as ``messages`` ending with the reference answer."""
    rows = []
    for line in (run_dir / "heldout.jsonl").read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        if row.get("messages") and row.get("reference") is not None:
            rows.append({"messages": row["messages"] + [{"role": "assistant", "content": row["reference"]}]})
    return rows[:limit]


def run_worker(variant: str, config: Path, overrides: list[str], run_dir: Path, export: bool, result: Path) -> None:
    """Train, measure and score one variant in this process; write its JSON to ``result``."""
    import torch

    from qlora_kit.commands.demo import exact_match
    from qlora_kit.inference.load import load_run_for_inference
    from qlora_kit.train.recipe import run_training

    started = time.perf_counter()
    run_training(config, overrides + [f"output_dir={json.dumps(str(run_dir))}"], overwrite=True,
                 skip_memory_check=True)
    train_wall = time.perf_counter() - started
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    peak_cuda = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None
    manifest = json.loads((run_dir / "manifest.json").read_text())
    model, tokenizer, _ = load_run_for_inference(run_dir)
    rows = heldout_rows(run_dir)
    score, examples = exact_match(model, tokenizer, rows)
    del model
    metrics = manifest["final_metrics"]
    variant_info = manifest["lora"]["variant"]
    out: dict[str, Any] = {
        "variant": variant,
        "overrides": overrides,
        "exact_match": score,
        "correct": sum(e["correct"] for e in examples),
        "heldout_rows": len(examples),
        "final_train_loss": metrics["train_loss"],
        "final_eval_loss": metrics["eval_loss"],
        "trainable_parameters": manifest["lora"]["trainable_parameters"],
        "steps": metrics["step"],
        "seconds_per_step": step_seconds(run_dir),
        "train_wall_seconds": round(train_wall, 1),
        "init_seconds": (variant_info.get("init_report") or {}).get("seconds"),
        "peak_rss_bytes": peak_rss,
        "peak_cuda_allocated_bytes": peak_cuda,
        "torch_threads": torch.get_num_threads(),
        "residual_base": manifest["lora"].get("residual_base"),
        "adalora_ranks": {k: v for k, v in (variant_info.get("ranks") or {}).items() if k != "per_module"} or None,
        "examples": examples[:3],
    }
    if export:
        out["export"] = export_and_verify(run_dir)
    result.write_text(json.dumps(out, indent=2) + "\n")


def export_and_verify(run_dir: Path) -> dict[str, Any]:
    """Export the run (fp16, dequantised merge) and return its verification summary."""
    from qlora_kit.export.command import export_run

    target = run_dir.with_name(run_dir.name + "-export")
    code = export_run(run_dir, target, overwrite=True, show_progress=False)
    report = json.loads((target / "export_report.json").read_text())
    ver = report["verification"]
    m = ver.get("vs_trained", {})
    return {"exit_code": code, "status": ver.get("status"), "rel_max": m.get("rel_max"),
            "rel_mean": m.get("rel_mean"), "greedy_exact": m.get("greedy_exact"),
            "greedy_total": m.get("greedy_total"), "merged_tensors": report["tensors"]["merged"],
            "residual_base_modules": report["adapter"].get("residual_base_modules")}


# --------------------------------------------------------------------------- the benchmark (parent process)


def demo_setup(workdir: Path, steps: int | None) -> tuple[Path, list[str]]:
    """The demo config and its overrides (data generated into ``workdir``; the GGUF converted once)."""
    from qlora_kit.commands.demo import demo_overrides, find_demo_config, make_demo_data
    from qlora_kit.core.config import load_config
    from qlora_kit.model.sources import resolve_source

    train_path, heldout_path = make_demo_data(workdir / "data")
    overrides = [o for o in demo_overrides(train_path, heldout_path, workdir, steps)
                 if not o.startswith("output_dir=")]  # each variant gets its own
    config = find_demo_config()
    resolve_source(load_config(config, overrides)[0].model)  # convert the GGUF once, outside the timings
    return config, overrides


def environment(note: str | None) -> dict[str, Any]:
    """Device, threads, load and versions."""
    import torch

    from qlora_kit.model.base import pick_device
    from qlora_kit.rundir.manifest import device_info, package_versions

    return {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "device": device_info(pick_device()),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_at_start": os.getloadavg(),
        "note": note,
        "versions": package_versions(),
    }


def markdown_table(results: list[dict[str, Any]]) -> str:
    """The results as a Markdown table."""
    head = ("| variant | held-out exact match | final train loss | final eval loss | trainable params | "
            "s/step | init s | peak memory |")
    lines = [head, "|" + "---|" * 8]
    for r in results:
        if r.get("error"):
            lines.append(f"| {r['variant']} | error: {r['error']} |" + " |" * 6)
            continue
        peak = r["peak_cuda_allocated_bytes"] or r["peak_rss_bytes"]
        kind = "GPU alloc" if r["peak_cuda_allocated_bytes"] else "RSS"
        sps = f"{r['seconds_per_step']:.2f}" if r["seconds_per_step"] else "n/a"
        lines.append(f"| {r['variant']} | {r['correct']}/{r['heldout_rows']} | {r['final_train_loss']:.4f} | "
                     f"{r['final_eval_loss']:.4f} | {r['trainable_parameters']:,} | {sps} | "
                     f"{r['init_seconds'] if r['init_seconds'] is not None else '-'} | "
                     f"{peak / 2**20:.0f} MiB {kind} |")
    return "\n".join(lines) + "\n"


def run_variant(variant: str, config: Path, overrides: list[str], workdir: Path, export: bool,
                threads: int | None) -> dict[str, Any]:
    """Run one variant in a fresh process; its result, or the error."""
    result = workdir / f"{variant}.json"
    result.unlink(missing_ok=True)
    cmd = [sys.executable, __file__, "--worker", variant, "--config", str(config), "--run-dir",
           str(workdir / f"run-{variant.replace('+', 'plus')}"), "--result", str(result)]
    cmd += [a for o in overrides_for(variant, config, overrides) for a in ("--set", o)]
    cmd += ["--export"] if export else []
    env = {**os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
    load_before = os.getloadavg()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0 or not result.is_file():
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {"variant": variant, "error": " | ".join(tail)}
    data = json.loads(result.read_text())
    data["load_average_before"], data["load_average_after"] = load_before, os.getloadavg()
    return data


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, help="a qlora-kit config (default: the CPU demo task)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="section.key=value")
    parser.add_argument("--steps", type=int, help="demo only: optimizer steps (default: the config's 40)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset")
    parser.add_argument("--workdir", type=Path, default=Path("variants-bench"))
    parser.add_argument("--out", type=Path, help="JSON result (the Markdown table is written beside it)")
    parser.add_argument("--export", action="store_true", help="also export and verify every run")
    parser.add_argument("--threads", type=int, help="OMP_NUM_THREADS for the workers")
    parser.add_argument("--note", help="free text stored with the result (e.g. machine sharing)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--run-dir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        run_worker(args.worker, args.config, args.overrides, args.run_dir, args.export, args.result)
        return 0
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
    args.workdir.mkdir(parents=True, exist_ok=True)
    if args.config is None:
        config, overrides = demo_setup(args.workdir.resolve(), args.steps)
        task = "CPU demo: SmolLM2-135M-Instruct GGUF, dates in words -> YYYY-MM-DD"
    else:
        config, overrides, task = args.config.resolve(), [], str(args.config)
    overrides += args.overrides
    report: dict[str, Any] = {"benchmark": "variants", "task": task, "config": str(config), "overrides": overrides,
                              "environment": environment(args.note), "results": []}
    for variant in variants:
        print(f"[variants_bench] {variant} ...", flush=True)
        report["results"].append(run_variant(variant, config, overrides, args.workdir.resolve(), args.export,
                                             args.threads))
        print(markdown_table(report["results"][-1:]).splitlines()[-1], flush=True)
    report["environment"]["load_average_at_end"] = os.getloadavg()
    table = markdown_table(report["results"])
    print(table)
    out = args.out or args.workdir / "variants.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    out.with_suffix(".md").write_text(f"Task: {task}\n\n{table}")
    return 1 if any(r.get("error") for r in report["results"]) else 0


if __name__ == "__main__":
    sys.exit(main())
