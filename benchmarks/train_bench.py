"""Training benchmark: qlora-kit vs the stock recipe on a random model of a real 7B/8B shape.

For ``--shape llama-2-7b`` or ``llama-3.1-8b`` (the published config.json files in
``qlora_kit/model_shapes``) a randomly initialised bf16 checkpoint of that exact shape is
written to a temporary folder (no hub access), with a small local tokenizer and synthetic
chat rows long enough to fill every row to ``--seq-len`` tokens.  Both recipes then train
it for ``--steps`` optimizer steps with the same LoRA settings, data, micro-batch,
sequence length, optimizer and learning rate:

* ``qlora-kit``: ``qlora_kit.train.run_training`` (NF4 + double quant, adapters in the
  compute dtype, non-reentrant checkpointing), metrics read from the run's metrics.jsonl;
* ``stock``: transformers ``BitsAndBytesConfig`` (NF4, double quant) +
  peft ``prepare_model_for_kbit_training`` (defaults) + ``LoraConfig`` + trl ``SFTTrainer``
  (``SFTConfig`` defaults for everything not listed above).

Reported per recipe: peak memory (``torch.cuda.max_memory_allocated`` / ``_reserved``),
tokens/s (median step time, the first step excluded), model FLOPs utilisation
(4*N_matmul + 6*N_lora FLOPs per token + causal attention 6*L*T*q_dim; no credit for
recomputation) against ``--peak-tflops`` or a known GPU's bf16 dense peak, the longest
sequence that fits under the cap (doubling, then bisection, each trial in a fresh
process), and qlora-kit's planner prediction next to each measured peak.

On CUDA every measurement runs in its own subprocess with
``torch.cuda.set_per_process_memory_fraction`` set so that PyTorch's allocator may use
``--cap-gib`` minus what the CUDA context already holds (the cap covers PyTorch's
allocator only; bitsandbytes' paged optimizer state lives outside it).  On CPU there is
no cap: memory figures and the max-length search are recorded as null.  ``--shape tiny``
runs the whole pipeline on CPU in seconds (CI: ``tests/test_train_bench.py``).

Example (one 80 GB H100, 24 GiB cap):
    python benchmarks/train_bench.py --shape llama-3.1-8b --steps 20 --seq-len 2048 --cap-gib 24 \
        --out benchmarks/results/llama-3.1-8b-h100.json
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO / "benchmarks" / "results"
REAL_SHAPES = ("llama-2-7b", "llama-3.1-8b")
RECIPES = ("qlora-kit", "stock")
GiB = 1024**3
# bf16 dense tensor-core peak (TFLOP/s, no sparsity); first matching substring wins.
PEAK_TFLOPS = (
    ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.4), ("H200", 989.4), ("GH200", 989.4),
    ("A100", 312.0), ("L40S", 362.1), ("L40", 181.0), ("L4", 121.0), ("A10", 125.0),
    ("RTX 4090", 165.2), ("RTX 3090", 71.0), ("RTX A6000", 154.8),
)
TRIAL_STEPS = 2  # optimizer steps per max-length trial (the 2nd step has optimizer state resident)
LENGTH_GRANULARITY = 256
MAX_SEARCH_LEN = 65536  # far beyond what a 7B QLoRA fits in 24 GiB; bounds the synthetic rows too


# --------------------------------------------------------------------------- settings


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options (see the module docstring)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", choices=(*REAL_SHAPES, "tiny"), default="tiny")
    p.add_argument("--steps", type=int, default=10, help="optimizer steps per recipe (gradient accumulation 1)")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--micro-batch-size", type=int, default=1)
    p.add_argument("--cap-gib", type=float, default=24.0, help="memory cap on CUDA (ignored on CPU)")
    p.add_argument("--peak-tflops", type=float, default=None, help="device bf16 dense peak for MFU")
    p.add_argument("--recipes", default="qlora-kit,stock", help="comma-separated subset of: " + ",".join(RECIPES))
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--lora-alpha", type=float, default=32.0)
    p.add_argument("--lora-dropout", type=float, default=0.05)
    p.add_argument("--targets", default="all-linear", choices=("all-linear", "attention"))
    p.add_argument("--learning-rate", type=float, default=2e-4)
    p.add_argument("--max-len-search", choices=("auto", "on", "off"), default="auto",
                   help="search the longest sequence that fits the cap (auto: on CUDA only)")
    p.add_argument("--max-len-limit", type=int, default=None, help="upper bound of the search (default: model context)")
    p.add_argument("--workdir", type=Path, default=None, help="keep the model/data/runs here (default: a temp dir)")
    p.add_argument("--out", type=Path, default=None,
                   help="results JSON (default: benchmarks/results/<shape>-<device>-<date>.json)")
    p.add_argument("--child", type=Path, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    unknown = set(args.recipes.split(",")) - set(RECIPES)
    if unknown:
        p.error(f"unknown recipes {sorted(unknown)}; choose from {RECIPES}")
    return args


def bench_settings(args: argparse.Namespace, cuda: bool) -> dict[str, Any]:
    """The settings both recipes share (recorded in the results)."""
    return {
        "shape": args.shape, "steps": args.steps, "seq_len": args.seq_len, "micro_batch_size": args.micro_batch_size,
        "gradient_accumulation_steps": 1, "lora_r": args.lora_r, "lora_alpha": args.lora_alpha,
        "lora_dropout": args.lora_dropout, "target_modules": args.targets, "learning_rate": args.learning_rate,
        "optimizer": "paged_adamw_8bit" if cuda else "adamw_torch",
        "compute_dtype": "bfloat16" if cuda else "float32", "gradient_checkpointing": True,
        "attn_implementation": "sdpa", "quant": "nf4, double quant, blocksize 64",
        "cap_gib": args.cap_gib if cuda else None,
    }


# --------------------------------------------------------------------------- model and data


def shape_config(shape: str, tokenizer: Any) -> Any:
    """A transformers config of the requested shape, with the local tokenizer's special ids."""
    from transformers import AutoConfig

    from qlora_kit.tiny import tiny_config

    ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id)
    if shape == "tiny":
        return tiny_config("llama", vocab_size=len(tokenizer), **ids)
    raw = json.loads((REPO / "qlora_kit" / "model_shapes" / f"{shape}.json").read_text())
    raw.update(ids)
    model_type = raw.pop("model_type")
    for key in ("architectures", "transformers_version", "torch_dtype", "_name_or_path"):
        raw.pop(key, None)
    return AutoConfig.for_model(model_type, **raw)


def build_model_dir(shape: str, out: Path, cuda: bool, seed: int = 0) -> Path:
    """Write tokenizer + config + random weights (bf16 on CUDA machines, fp32 for tiny) to ``out``."""
    import torch
    from transformers import AutoModelForCausalLM

    from qlora_kit.tiny import build_tokenizer

    if (out / ".complete").exists():
        return out
    tokenizer = build_tokenizer(out)
    config = shape_config(shape, tokenizer)
    dtype = torch.bfloat16 if shape != "tiny" else torch.float32
    config.torch_dtype = dtype
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    names = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
    if getattr(config, "tie_word_embeddings", False):
        names.pop("lm_head.weight", None)
    write_random_weights(names, out, dtype, "cuda" if cuda else "cpu", seed)
    config.save_pretrained(out)
    skeleton.generation_config.save_pretrained(out)
    (out / ".complete").write_text(shape)
    return out


def write_random_weights(shapes: dict[str, tuple[int, ...]], out: Path, dtype: Any, device: str, seed: int,
                         shard_bytes: int = 2 * GiB) -> None:
    """Random N(0, 0.02) matrices, ones for norm weights, zeros for biases, as sharded safetensors."""
    import torch
    from safetensors.torch import save_file

    gen = torch.Generator(device=device).manual_seed(seed)
    shards: list[dict[str, Any]] = [{}]
    size = 0
    for name, shape in shapes.items():
        if name.endswith("norm.weight"):
            tensor = torch.ones(shape, dtype=dtype)
        elif name.endswith(".bias"):
            tensor = torch.zeros(shape, dtype=dtype)
        else:
            tensor = (torch.randn(shape, generator=gen, device=device, dtype=torch.float32) * 0.02).to(dtype).cpu()
        nbytes = tensor.numel() * tensor.element_size()
        if size and size + nbytes > shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    index: dict[str, str] = {}
    for i, shard in enumerate(shards):
        fname = "model.safetensors" if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out / fname), metadata={"format": "pt"})
        index.update({k: fname for k in shard})
    if len(shards) > 1:
        total = sum(t.numel() * t.element_size() for s in shards for t in s.values())
        (out / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": index}, indent=1))


def write_rows(path: Path, n_rows: int, seq_len: int, seed: int = 0) -> Path:
    """Chat rows whose assistant turn is long enough to be truncated at ``seq_len`` tokens."""
    from qlora_kit.tiny import _WORDS

    rng = random.Random(seed)
    words = max(64, int(seq_len * 1.5))
    with open(path, "w", encoding="utf-8") as fh:
        for _ in range(n_rows):
            answer = " ".join(rng.choices(_WORDS, k=words))
            row = {"messages": [{"role": "user", "content": "write a long story"},
                                {"role": "assistant", "content": answer}]}
            fh.write(json.dumps(row) + "\n")
    return path


# --------------------------------------------------------------------------- the two recipes


def qlora_kit_config(job: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    """The qlora-kit YAML mapping for this job (also what the planner predicts)."""
    s = job["settings"]
    return {
        "model": {"name_or_path": job["model_dir"], "compute_dtype": "auto", "attn_implementation": "sdpa"},
        "lora": {"r": s["lora_r"], "alpha": s["lora_alpha"], "dropout": s["lora_dropout"],
                 "target_modules": s["target_modules"]},
        "data": {"path": job["data_path"], "val_fraction": 0.05, "val_max_rows": 2, "shuffle": False},
        "train": {"max_steps": job["steps"], "micro_batch_size": s["micro_batch_size"],
                  "gradient_accumulation_steps": 1, "max_length": job["seq_len"], "optimizer": s["optimizer"],
                  "learning_rate": s["learning_rate"], "warmup_steps": 0, "logging_steps": 1,
                  "save_steps": job["steps"], "gradient_checkpointing": True, "seed": 0},
        "output_dir": str(run_dir),
    }


def run_qlora_kit(job: dict[str, Any]) -> dict[str, Any]:
    """Train with qlora-kit's own path; step times from its metrics.jsonl."""
    import yaml

    from qlora_kit.train import run_training

    work = Path(job["work"])
    run_dir = work / f"qlora-kit-run-{job['seq_len']}"
    config_path = work / f"qlora-kit-{job['seq_len']}.yaml"
    config_path.write_text(yaml.safe_dump(qlora_kit_config(job, run_dir), sort_keys=False))
    start = time.perf_counter()
    run_training(config_path, [], resume=False, overwrite=True, skip_memory_check=True)
    wall = time.perf_counter() - start
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steps = [r for r in records if "loss" in r]
    rates = [r["tokens_per_second"] for r in steps if r.get("tokens_per_second")]
    return {"losses": [r["loss"] for r in steps], "tokens_per_second": _steady(rates), "wall_seconds": wall,
            "metrics_peak_allocated": max((r.get("peak_memory_allocated", 0) for r in steps), default=None) or None,
            "metrics_peak_reserved": max((r.get("peak_memory_reserved", 0) for r in steps), default=None) or None}


def run_stock(job: dict[str, Any]) -> dict[str, Any]:
    """transformers + peft + bitsandbytes + trl with their defaults (same settings as qlora-kit)."""
    import torch
    from datasets import load_dataset
    from peft import LoraConfig, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
    from trl import SFTConfig, SFTTrainer

    s, cuda = job["settings"], torch.cuda.is_available()
    compute = torch.bfloat16 if cuda else torch.float32
    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=compute)
    model = AutoModelForCausalLM.from_pretrained(job["model_dir"], quantization_config=bnb,
                                                 device_map={"": 0 if cuda else "cpu"}, attn_implementation="sdpa")
    model = prepare_model_for_kbit_training(model)
    tokenizer = AutoTokenizer.from_pretrained(job["model_dir"])
    peft_config = LoraConfig(r=s["lora_r"], lora_alpha=s["lora_alpha"], lora_dropout=s["lora_dropout"],
                             target_modules=_stock_targets(s["target_modules"]), task_type="CAUSAL_LM")
    args = SFTConfig(
        output_dir=str(Path(job["work"]) / f"stock-run-{job['seq_len']}"), max_steps=job["steps"],
        per_device_train_batch_size=s["micro_batch_size"], gradient_accumulation_steps=1,
        max_length=job["seq_len"], learning_rate=s["learning_rate"], warmup_steps=0, optim=s["optimizer"],
        logging_steps=1, save_strategy="no", eval_strategy="no", report_to="none", seed=0,
        bf16=cuda, use_cpu=not cuda, dataloader_num_workers=0, disable_tqdm=True,
    )
    timer = _step_timer()
    dataset = load_dataset("json", data_files=job["data_path"], split="train")
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                         peft_config=peft_config, callbacks=[timer])
    start = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - start
    tokens = s["micro_batch_size"] * job["seq_len"]
    rates = [tokens / t for t in timer.durations]
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    return {"losses": losses, "tokens_per_second": _steady(rates), "wall_seconds": wall}


def _stock_targets(targets: str) -> str | list[str]:
    return "all-linear" if targets == "all-linear" else ["q_proj", "k_proj", "v_proj", "o_proj"]


def _step_timer() -> Any:
    """A TrainerCallback recording each optimizer step's wall time (device synchronised)."""
    import torch
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self) -> None:
            self.durations: list[float] = []
            self._start = 0.0

        def on_step_begin(self, args, state, control, **kwargs):  # noqa: ANN001 - transformers' signature
            _sync(torch)
            self._start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001
            _sync(torch)
            self.durations.append(time.perf_counter() - self._start)

    return StepTimer()


def _sync(torch: Any) -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _steady(rates: list[float]) -> float | None:
    """Median rate without the first step (allocation and kernel warm-up)."""
    usable = rates[1:] if len(rates) > 1 else rates
    return float(statistics.median(usable)) if usable else None


# --------------------------------------------------------------------------- one measurement


def measure(job: dict[str, Any]) -> dict[str, Any]:
    """Run one recipe at one sequence length; never raises (errors and OOM are results)."""
    import torch

    cuda = torch.cuda.is_available()
    if cuda:
        _apply_cap(job["settings"]["cap_gib"])
        torch.cuda.reset_peak_memory_stats()
    runner = run_qlora_kit if job["recipe"] == "qlora-kit" else run_stock
    result: dict[str, Any] = {"recipe": job["recipe"], "seq_len": job["seq_len"], "status": "ok"}
    try:
        result.update(runner(job))
    except Exception as exc:  # OOM in any of its wrappings, or a real failure to report
        result["status"] = "oom" if _is_oom(exc) else "error"
        result["error"] = f"{type(exc).__name__}: {str(exc)[:2000]}"
        if result["status"] == "error":
            result["traceback"] = traceback.format_exc()[-4000:]
    result["peak_allocated_bytes"] = int(torch.cuda.max_memory_allocated()) if cuda else None
    result["peak_reserved_bytes"] = int(torch.cuda.max_memory_reserved()) if cuda else None
    return result


def _apply_cap(cap_gib: float) -> None:
    """Let PyTorch's allocator use cap minus what the CUDA context already holds."""
    import torch

    torch.cuda.init()
    free, total = torch.cuda.mem_get_info()
    allowed = max(0, int(cap_gib * GiB) - (total - free))
    torch.cuda.set_per_process_memory_fraction(min(1.0, allowed / total))


def _is_oom(exc: BaseException) -> bool:
    text = f"{type(exc).__name__} {exc}"
    return "OutOfMemory" in text or "out of memory" in text.lower()


def run_job(job: dict[str, Any], isolate: bool) -> dict[str, Any]:
    """Measure in a fresh process (CUDA: clean peak statistics and cap) or in this one (CPU)."""
    if not isolate:
        return measure(job)
    work = Path(job["work"])
    job_path = work / f"job-{job['recipe']}-{job['seq_len']}.json"
    result_path = job_path.with_suffix(".result.json")
    job_path.write_text(json.dumps({**job, "result_path": str(result_path)}))
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", str(job_path)],
                          capture_output=True, text=True, timeout=4 * 3600)
    if result_path.exists():
        return json.loads(result_path.read_text())
    return {"recipe": job["recipe"], "seq_len": job["seq_len"], "status": "oom" if _is_oom_text(proc.stderr) else
            "error", "error": proc.stderr[-4000:], "peak_allocated_bytes": None, "peak_reserved_bytes": None}


def _is_oom_text(text: str) -> bool:
    return "out of memory" in text.lower() or "OutOfMemory" in text


def child_main(job_path: Path) -> int:
    """Entry point of an isolated measurement."""
    job = json.loads(job_path.read_text())
    result = measure(job)
    Path(job["result_path"]).write_text(json.dumps(result))
    return 0


# --------------------------------------------------------------------------- longest sequence


def find_max_seq_len(base_job: dict[str, Any], start: int, limit: int, isolate: bool) -> dict[str, Any]:
    """Longest multiple of 256 that trains TRIAL_STEPS steps without OOM (doubling, then bisection)."""
    trials: list[dict[str, Any]] = []

    def ok(length: int) -> bool:
        res = run_job({**base_job, "seq_len": length, "steps": TRIAL_STEPS}, isolate)
        trials.append({"seq_len": length, "status": res["status"], "peak_reserved_bytes": res["peak_reserved_bytes"]})
        if res["status"] == "error":
            raise RuntimeError(f"max-length trial at {length} failed: {res.get('error')}")
        return res["status"] == "ok"

    good, bad = 0, None
    length = _round_len(start)
    while length <= limit:
        if not ok(length):
            bad = length
            break
        good, length = length, length * 2
    if bad is None:
        return {"max_seq_len": good, "capped_by_limit": True, "limit": limit, "trials": trials}
    while bad - good > LENGTH_GRANULARITY:
        mid = _round_len((good + bad) // 2)
        if mid in (good, bad):
            break
        good, bad = (mid, bad) if ok(mid) else (good, mid)
    return {"max_seq_len": good or None, "capped_by_limit": False, "limit": limit, "trials": trials}


def _round_len(n: int) -> int:
    return max(LENGTH_GRANULARITY, n // LENGTH_GRANULARITY * LENGTH_GRANULARITY)


# --------------------------------------------------------------------------- planner, FLOPs, environment


def planner_prediction(job: dict[str, Any], seq_len: int) -> dict[str, Any]:
    """qlora-kit's planner for the qlora-kit config at ``seq_len`` (and its longest fitting length)."""
    from qlora_kit.config import validate
    from qlora_kit.plan import GiB as PLAN_GIB
    from qlora_kit.plan import estimate, load_shape_file, max_length_that_fits

    cfg = validate(qlora_kit_config({**job, "seq_len": seq_len}, Path(job["work"]) / "planned"))
    shape = load_shape_file(Path(job["model_dir"]) / "config.json")
    plan = estimate(cfg, shape)
    cap = job["settings"]["cap_gib"]
    return {
        "models": "qlora-kit recipe (bf16 compute on CUDA)",
        "total_bytes": plan.total_bytes, "torch_allocated_peak_bytes": plan.torch_allocated_peak,
        "torch_reserved_peak_bytes": plan.torch_reserved_peak, "peak_phase": plan.peak_phase,
        "max_length_that_fits_cap": max_length_that_fits(cfg, shape, int(cap * PLAN_GIB)) if cap else None,
    }


def flops_per_token(model_dir: Path, seq_len: int, r: int, targets: str) -> dict[str, float]:
    """Model FLOPs per trained token: 4*N_matmul (frozen base) + 6*N_lora + causal attention."""
    from qlora_kit.plan import adapter_tensors, linear_layers, load_shape_file, resolve_targets

    shape = load_shape_file(model_dir / "config.json")
    n_matmul = shape.num_layers * sum(lin.numel for lin in linear_layers(shape).values())
    n_matmul += shape.vocab_size * shape.hidden_size  # lm_head
    n_lora = sum(adapter_tensors(shape, resolve_targets(targets, shape), r, False))
    attention = 6 * shape.num_layers * seq_len * shape.q_dim
    return {"n_matmul": n_matmul, "n_lora": n_lora, "flops_per_token": 4 * n_matmul + 6 * n_lora + attention}


def detect_peak_tflops(device_name: str) -> float | None:
    """bf16 dense peak of a known GPU by name, else None."""
    for key, tflops in PEAK_TFLOPS:
        if key.lower() in device_name.lower():
            return tflops
    return None


def environment() -> tuple[dict[str, Any], dict[str, Any]]:
    """(device, versions) for the results file."""
    import torch

    from qlora_kit.manifest import package_versions

    versions = package_versions()
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        device = {"type": "cuda", "name": props.name, "total_memory_bytes": int(props.total_memory),
                  "capability": f"{props.major}.{props.minor}", "driver": _driver_version()}
    else:
        device = {"type": "cpu", "name": platform.processor() or platform.machine(), "cores": os.cpu_count()}
    return device, versions


def _driver_version() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=15, check=True).stdout
        return out.splitlines()[0].strip() or None
    except (OSError, subprocess.SubprocessError, IndexError):
        return None


# --------------------------------------------------------------------------- orchestration


def summarise(result: dict[str, Any], flops: dict[str, float], peak_tflops: float | None,
              prediction: dict[str, Any] | None) -> dict[str, Any]:
    """Add MFU and the planner's numbers (with measured/predicted ratios) to one measurement."""
    rate = result.get("tokens_per_second")
    result["mfu"] = (rate * flops["flops_per_token"] / (peak_tflops * 1e12)) if rate and peak_tflops else None
    result["planner"] = prediction
    if prediction and result.get("peak_allocated_bytes"):
        result["measured_over_predicted_allocated"] = (
            result["peak_allocated_bytes"] / prediction["torch_allocated_peak_bytes"])
        result["measured_over_predicted_reserved"] = (
            result["peak_reserved_bytes"] / prediction["torch_reserved_peak_bytes"])
    return result


def run_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    """Build model and data, measure each recipe, search max lengths; return the results mapping.

    A temporary work folder (model, data, runs) is deleted afterwards unless --workdir is given.
    """
    owned = args.workdir is None
    work = Path(tempfile.mkdtemp(prefix="qlora-bench-")) if owned else args.workdir
    work.mkdir(parents=True, exist_ok=True)
    try:
        report = measure_all(args, work)
    finally:
        if owned:
            shutil.rmtree(work, ignore_errors=True)
    report["workdir"] = None if owned else str(work)
    return report


def measure_all(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Everything run_benchmark does inside its work folder."""
    import torch

    cuda = torch.cuda.is_available()
    settings = bench_settings(args, cuda)
    device, versions = environment()
    model_dir = build_model_dir(args.shape, work / f"model-{args.shape}", cuda)
    limit = _search_limit(args, model_dir)
    n_rows = max(8, (args.steps + TRIAL_STEPS) * args.micro_batch_size * 2)
    data_path = write_rows(work / "rows.jsonl", n_rows, max(limit, args.seq_len))
    flops = flops_per_token(model_dir, args.seq_len, args.lora_r, args.targets)
    peak = args.peak_tflops or (detect_peak_tflops(device["name"]) if cuda else None)
    base = {"settings": settings, "model_dir": str(model_dir), "data_path": str(data_path), "work": str(work),
            "steps": args.steps, "seq_len": args.seq_len}
    search = args.max_len_search == "on" or (args.max_len_search == "auto" and cuda)
    prediction = planner_prediction(base, args.seq_len)
    results, max_len = {}, {}
    for recipe in args.recipes.split(","):
        res = run_job({**base, "recipe": recipe}, isolate=cuda)
        results[recipe] = summarise(res, flops, peak, prediction)
        if search and res["status"] in ("ok", "oom"):
            start = args.seq_len * 2 if res["status"] == "ok" else args.seq_len // 2
            max_len[recipe] = find_max_seq_len({**base, "recipe": recipe}, start, limit, isolate=cuda)
            found = max_len[recipe]["max_seq_len"]
            max_len[recipe]["planner_at_max"] = planner_prediction(base, found) if found else None
    return {
        "benchmark": "train_bench", "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "device": device, "versions": versions, "settings": settings,
        "model": {"shape": args.shape, "config": json.loads((model_dir / "config.json").read_text()), **flops},
        "peak_tflops": peak, "results": results,
        "max_seq_len": max_len if search else None,
        "planner_max_length_that_fits_cap": prediction["max_length_that_fits_cap"],
        "notes": _notes(cuda, peak, search),
    }


def _search_limit(args: argparse.Namespace, model_dir: Path) -> int:
    """Upper bound of the max-length search: --max-len-limit, else the model's context, at most 64K."""
    if args.max_len_limit:
        return args.max_len_limit
    config = json.loads((model_dir / "config.json").read_text())
    return min(int(config.get("max_position_embeddings") or MAX_SEARCH_LEN), MAX_SEARCH_LEN)


def _notes(cuda: bool, peak: float | None, search: bool) -> list[str]:
    notes = ["random weights of the real shape; losses are not meaningful, memory and speed are"]
    if not cuda:
        notes.append("CPU run: no memory cap, peak memory, MFU and max-length search are null (smoke test only)")
    elif peak is None:
        notes.append("unknown GPU: pass --peak-tflops for MFU")
    if cuda and not search:
        notes.append("max-length search skipped (--max-len-search off)")
    return notes


def default_out(shape: str, device: dict[str, Any]) -> Path:
    """benchmarks/results/<shape>-<device>-<YYYYmmdd-HHMM>.json"""
    slug = "".join(c if c.isalnum() else "-" for c in str(device["name"]).lower()).strip("-")[:40] or device["type"]
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M")
    return RESULTS_DIR / f"{shape}-{slug}-{stamp}.json"


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; exit 1 when a recipe failed (OOM at the chosen length counts as a result)."""
    args = parse_args(argv)
    if args.child is not None:
        return child_main(args.child)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    report = run_benchmark(args)
    out = args.out or default_out(args.shape, report["device"])
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    for recipe, res in report["results"].items():
        mem = res.get("peak_reserved_bytes")
        print(f"{recipe:10s} {res['status']:5s} tokens/s={_fmt(res.get('tokens_per_second'))} "
              f"peak_reserved={'n/a' if mem is None else f'{mem / GiB:.2f} GiB'} mfu={_fmt(res.get('mfu'), 3)}")
    print(f"results: {out}")
    return 1 if any(r["status"] == "error" for r in report["results"].values()) else 0


def _fmt(value: float | None, digits: int = 1) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


if __name__ == "__main__":
    sys.exit(main())
