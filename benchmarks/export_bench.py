"""Export benchmark: wall time and peak resident memory of `qlora-kit export` against checkpoint size.

Builds a synthetic Llama-shaped bfloat16 checkpoint of about ``--size-gb`` on disk (random
weights, written shard by shard), a run directory around it as `qlora-kit train` writes it
(NF4 quant spec, a LoRA adapter on the attention projections, tokenizer, manifest), then runs
the real CLI in a child process and measures it from outside (``getrusage`` of the child)
and from inside (the RSS the exporter samples while merging, in ``export_report.json``).

    python benchmarks/export_bench.py --size-gb 3              # a few GB, the number to quote
    python benchmarks/export_bench.py --size-gb 0.05 --verify  # CI smoke scale

The JSON result (machine, versions, sizes, times, memory) goes to
``benchmarks/results/export-<size>gb-<UTC time>.json`` unless ``--output`` says otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).resolve().parent / "results"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


# --------------------------------------------------------------------------- synthetic checkpoint


def pick_shape(size_gb: float) -> dict[str, int]:
    """A Llama shape whose bfloat16 weights take about ``size_gb`` GB (Llama-2-7B's layers from 10 GB on)."""
    if size_gb >= 10:
        shape = {"hidden_size": 4096, "intermediate_size": 11008, "vocab_size": 32000, "num_attention_heads": 32,
                 "num_key_value_heads": 32}
    elif size_gb >= 1:
        shape = {"hidden_size": 2048, "intermediate_size": 5632, "vocab_size": 32000, "num_attention_heads": 16,
                 "num_key_value_heads": 4}
    else:
        shape = {"hidden_size": 512, "intermediate_size": 1408, "vocab_size": 4096, "num_attention_heads": 8,
                 "num_key_value_heads": 4}
    h, i, v = shape["hidden_size"], shape["intermediate_size"], shape["vocab_size"]
    kv = h * shape["num_key_value_heads"] // shape["num_attention_heads"]
    per_layer = 2 * h * h + 2 * h * kv + 3 * h * i + 2 * h
    fixed = 2 * v * h + h
    shape["num_hidden_layers"] = max(1, round((size_gb * 1e9 / 2 - fixed) / per_layer))
    return shape


def layer_tensors(index: int, shape: dict[str, int], gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Random bfloat16 weights of one decoder layer."""
    h, i = shape["hidden_size"], shape["intermediate_size"]
    kv = h * shape["num_key_value_heads"] // shape["num_attention_heads"]
    p = f"model.layers.{index}."
    dims = {"self_attn.q_proj": (h, h), "self_attn.k_proj": (kv, h), "self_attn.v_proj": (kv, h),
            "self_attn.o_proj": (h, h), "mlp.gate_proj": (i, h), "mlp.up_proj": (i, h), "mlp.down_proj": (h, i)}
    out = {f"{p}{name}.weight": _randn(d, gen) for name, d in dims.items()}
    out[f"{p}input_layernorm.weight"] = torch.ones(h, dtype=torch.bfloat16)
    out[f"{p}post_attention_layernorm.weight"] = torch.ones(h, dtype=torch.bfloat16)
    return out


def _randn(shape: tuple[int, ...], gen: torch.Generator, std: float = 0.02) -> torch.Tensor:
    return torch.randn(shape, generator=gen, dtype=torch.float32).mul_(std).to(torch.bfloat16)


def write_checkpoint(base: Path, shape: dict[str, int], shard_bytes: int) -> list[Path]:
    """Write config, tokenizer and sharded safetensors, holding at most one shard in memory."""
    from transformers import GenerationConfig, LlamaConfig

    from qlora_kit.model.tiny import build_tokenizer

    tok = build_tokenizer(base)
    config = LlamaConfig(**shape, max_position_embeddings=2048, tie_word_embeddings=False, dtype="bfloat16",
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    config.save_pretrained(base)
    GenerationConfig(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id).save_pretrained(base)
    gen = torch.Generator().manual_seed(0)
    groups = [lambda: {"model.embed_tokens.weight": _randn((shape["vocab_size"], shape["hidden_size"]), gen)}]
    groups += [lambda i=i: layer_tensors(i, shape, gen) for i in range(shape["num_hidden_layers"])]
    groups += [lambda: {"model.norm.weight": torch.ones(shape["hidden_size"], dtype=torch.bfloat16),
                        "lm_head.weight": _randn((shape["vocab_size"], shape["hidden_size"]), gen)}]
    shards: list[dict[str, torch.Tensor]] = [{}]
    files: list[Path] = []
    weight_map: dict[str, str] = {}
    for make in groups:
        tensors = make()
        if shards[-1] and _nbytes(shards[-1]) + _nbytes(tensors) > shard_bytes:
            files.append(_flush(base, shards[-1], len(files), weight_map))
            shards[-1] = {}
        shards[-1].update(tensors)
    files.append(_flush(base, shards[-1], len(files), weight_map))
    final = []
    for n, path in enumerate(files):
        name = f"model-{n + 1:05d}-of-{len(files):05d}.safetensors"
        path.rename(base / name)
        final.append(base / name)
        weight_map.update({k: name for k, v in weight_map.items() if v == path.name})
    total = sum(p.stat().st_size for p in final)
    (base / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                  "weight_map": weight_map}, indent=1))
    return final


def _nbytes(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


def _flush(base: Path, tensors: dict[str, torch.Tensor], n: int, weight_map: dict[str, str]) -> Path:
    from safetensors.torch import save_file

    path = base / f"part-{n}.safetensors"
    save_file(tensors, str(path), metadata={"format": "pt"})
    weight_map.update({k: path.name for k in tensors})
    return path


# --------------------------------------------------------------------------- run directory


def write_run(run: Path, base: Path, shape: dict[str, int], rank: int = 16) -> None:
    """A finished run as `qlora-kit train` writes it: adapter, tokenizer, config, manifest, held-out rows."""
    from peft import LoraConfig
    from safetensors.torch import save_file
    from transformers import AutoTokenizer

    from qlora_kit.core.config import dump_config, validate

    h = shape["hidden_size"]
    kv = h * shape["num_key_value_heads"] // shape["num_attention_heads"]
    outs = {"q_proj": h, "k_proj": kv, "v_proj": kv, "o_proj": h}
    gen = torch.Generator().manual_seed(1)
    adapter = {}
    for layer in range(shape["num_hidden_layers"]):
        for name, out_dim in outs.items():
            key = f"base_model.model.model.layers.{layer}.self_attn.{name}"
            adapter[f"{key}.lora_A.weight"] = torch.randn(rank, h, generator=gen).mul_(0.02)
            adapter[f"{key}.lora_B.weight"] = torch.randn(out_dim, rank, generator=gen).mul_(0.002)
    (run / "adapter").mkdir(parents=True)
    save_file(adapter, str(run / "adapter" / "adapter_model.safetensors"), metadata={"format": "pt"})
    LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS, task_type="CAUSAL_LM").save_pretrained(
        run / "adapter")
    AutoTokenizer.from_pretrained(base).save_pretrained(run / "tokenizer")
    data = run.parent / "data.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"},
                                             {"role": "assistant", "content": "hello"}]}) + "\n")
    cfg = validate({"model": {"name_or_path": str(base)}, "lora": {"r": rank, "alpha": 2 * rank},
                    "data": {"path": str(data)}, "output_dir": str(run)})
    (run / "config.yaml").write_text(dump_config(cfg))
    rows = [{"messages": [{"role": "user", "content": q}], "reference": "the answer is one"}
            for q in ("what is 2 + 3 ?", "say hello to the user", "tell me about the sun")]
    (run / "heldout.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    manifest = {
        "qlora_kit_version": "0.1.0", "status": "completed", "versions": versions(),
        "device": {"type": "cpu", "name": "synthetic", "total_memory_bytes": 0},
        "base": {"name_or_path": str(base), "source_dir": str(base), "revision": None},
        "quant": {"quant_type": "nf4", "double_quant": True, "blocksize": 64, "compute_dtype": "bfloat16",
                  "load_dtype": "bfloat16", "quant_storage": "uint8"},
        "data": {"path": str(data), "sha256": None, "val_path": None, "val_sha256": None, "format": "messages"},
        "lora": {"target_modules": TARGETS, "trainable_parameters": sum(t.numel() for t in adapter.values())},
        "start_time": None, "end_time": None, "final_metrics": {},
    }
    (run / "manifest.json").write_text(json.dumps(manifest, indent=2))


# --------------------------------------------------------------------------- measuring


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {"python": platform.python_version()}
    for pkg in ("torch", "transformers", "peft", "bitsandbytes", "safetensors", "qlora-kit"):
        try:
            found[pkg] = version(pkg)
        except PackageNotFoundError:
            found[pkg] = "missing"
    return found


def machine() -> dict[str, Any]:
    import psutil

    cpu = platform.processor()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"platform": platform.platform(), "cpu": cpu, "cores": os.cpu_count(),
            "ram_bytes": psutil.virtual_memory().total, "gpu": gpu, "load_avg_1m": os.getloadavg()[0]}


_CHILD = """
import atexit, os, sys
def _dump_hwm():
    status = open("/proc/self/status").read().split("\\n")
    hwm = next(line for line in status if line.startswith("VmHWM"))
    open(os.environ["QLORA_KIT_BENCH_HWM"], "w").write(hwm.split()[1])
atexit.register(_dump_hwm)
"""


def run_child(code: str, args: list[str], env: dict[str, str], workdir: Path) -> tuple[int, float, int, str]:
    """Run ``python -c code args`` and return (exit code, wall seconds, its peak RSS in bytes, output tail).

    The peak is the child's own VmHWM, read at its exit: ``getrusage(RUSAGE_CHILDREN)`` would
    also count the RSS this (benchmark) process had when it forked the child.
    """
    hwm_file = workdir / "child-vmhwm.txt"
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", _CHILD + code, *args], capture_output=True, text=True,
                          env={**env, "QLORA_KIT_BENCH_HWM": str(hwm_file)})
    wall = time.perf_counter() - start
    peak = int(hwm_file.read_text()) * 1024 if hwm_file.exists() else -1
    return done.returncode, wall, peak, (done.stdout + done.stderr)[-3000:]


def import_baseline(env: dict[str, str], workdir: Path) -> int:
    """Peak RSS of a child that only imports what the exporter imports (the floor under any export)."""
    code = "import torch, transformers, bitsandbytes, safetensors, peft, qlora_kit.export, qlora_kit.export.verify\n"
    _, _, peak, _ = run_child(code, [], env, workdir)
    return peak


def benchmark(size_gb: float, shard_gb: float, dtype: str, verify: bool, workdir: Path) -> dict[str, Any]:
    """Build, export, measure; return the result record."""
    base, run, out = workdir / "base", workdir / "run", workdir / "export"
    base.mkdir(parents=True)
    host = machine()
    shape = pick_shape(size_gb)
    started = time.perf_counter()
    files = write_checkpoint(base, shape, int(shard_gb * 1e9))
    write_run(run, base, shape)
    build_s = time.perf_counter() - started
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    baseline = import_baseline(env, workdir)
    cli = "import sys\nfrom qlora_kit.cli import main\nsys.argv[0] = 'qlora-kit'\nmain()\n"
    args = ["export", str(run), "--out", str(out), "--dtype", dtype] + ([] if verify else ["--no-verify"])
    code, wall, peak, tail = run_child(cli, args, env, workdir)
    if code != 0:
        raise SystemExit(f"export failed with exit status {code}:\n{tail}")
    report = json.loads((out / "export_report.json").read_text())
    source_bytes = sum(p.stat().st_size for p in files)
    largest_source = max(p.stat().st_size for p in files)
    largest_shard = largest_source  # output shards are written tensor by tensor, so their size costs no memory
    weights_growth = report["weights_peak_rss_bytes"] - report["rss_before_weights_bytes"]
    return {
        "benchmark": "export", "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": host, "versions": versions(),
        "settings": {"size_gb": size_gb, "source_shard_gb": shard_gb, "dtype": dtype, "verify": verify,
                     "merge_base": "dequantized", "shape": shape, "lora": {"r": 16, "targets": TARGETS},
                     "torch_threads_env": os.environ.get("OMP_NUM_THREADS"), "device": report["compute_device"]},
        "checkpoint": {"bytes": source_bytes, "files": len(files), "largest_shard_bytes": largest_source,
                       "parameters": source_bytes // 2, "build_s": round(build_s, 1)},
        "export": {"wall_s": round(wall, 2), "weights_wall_s": report["weights_wall_s"],
                   "throughput_gb_per_s": round(source_bytes / 1e9 / report["weights_wall_s"], 3),
                   "bytes_written": report["bytes_written"], "output_shards": len(report["shards"]),
                   "largest_output_shard_bytes": report["largest_shard_bytes"],
                   "largest_tensor_fp32_bytes": report["largest_tensor_fp32_bytes"],
                   "verification": report["verification"].get("status")},
        "memory": {"peak_rss_bytes": peak, "import_baseline_rss_bytes": baseline,
                   "peak_rss_over_checkpoint": round(peak / source_bytes, 3),
                   "peak_rss_over_largest_shard": round(peak / largest_shard, 3),
                   "above_baseline_over_largest_shard": round((peak - baseline) / largest_shard, 3),
                   "merge_phase_peak_rss_bytes": report["weights_peak_rss_bytes"],
                   "merge_phase_growth_bytes": weights_growth,
                   "merge_phase_growth_over_largest_shard": round(weights_growth / largest_shard, 3)},
        "load_avg_1m_after": os.getloadavg()[0],
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-gb", type=float, default=3.0, help="Synthetic checkpoint size (bfloat16), GB.")
    parser.add_argument("--shard-gb", type=float, default=None, help="Source shard size, GB (default: size/4, ≤2).")
    parser.add_argument("--dtype", default="float16", choices=["float16", "bfloat16"])
    parser.add_argument("--verify", action="store_true", help="Also run export verification (slow at GB scale).")
    parser.add_argument("--workdir", type=Path, default=None, help="Where to build (default: a temp dir).")
    parser.add_argument("--keep", action="store_true", help="Keep the synthetic checkpoint and export.")
    parser.add_argument("--output", type=Path, default=None, help="Result JSON path.")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    shard_gb = args.shard_gb or min(2.0, max(args.size_gb / 4, 0.005))
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="qlora-kit-export-bench-"))
    try:
        result = benchmark(args.size_gb, shard_gb, args.dtype, args.verify, workdir)
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    output = args.output or RESULTS / f"export-{args.size_gb:g}gb-{stamp}.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=2) + "\n")
    mem, exp = result["memory"], result["export"]
    print(f"checkpoint {result['checkpoint']['bytes'] / 1e9:.2f} GB in {result['checkpoint']['files']} shards "
          f"(largest {result['checkpoint']['largest_shard_bytes'] / 1e9:.2f} GB): export {exp['wall_s']:.1f} s "
          f"({exp['throughput_gb_per_s']} GB/s merging), peak RSS {mem['peak_rss_bytes'] / 2**30:.2f} GiB "
          f"= {mem['peak_rss_over_largest_shard']}x the largest shard, {mem['peak_rss_over_checkpoint']}x the "
          f"checkpoint (imports alone {mem['import_baseline_rss_bytes'] / 2**30:.2f} GiB; above that "
          f"{mem['above_baseline_over_largest_shard']}x the largest shard) → {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
