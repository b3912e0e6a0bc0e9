"""Fabricate a trained run directory exactly as ``qlora-kit train`` writes it (for export/generate tests).

The base is a tiny random model loaded through ``model.load_quantized_base`` (NF4, CPU
float32), adapters come from ``model.attach_lora`` and are then set to random non-zero
values so that the adapter really changes the outputs.  Layout follows ``qlora_kit/rundir/layout.py`` and
the manifest schema in docs/CONTRACTS.md.
"""

from __future__ import annotations

import json
import platform
import random
import shutil
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from qlora_kit.core.config import dump_config, validate
from qlora_kit.export.card import REPORT
from qlora_kit.model.base import load_quantized_base, load_tokenizer, quant_spec
from qlora_kit.model.lora import attach_lora
from qlora_kit.model.tiny import build_tiny_model
from qlora_kit.rundir import layout as rundir

QUESTIONS = [
    "what is 2 + 3 ?", "say hello to the user", "write one sentence about water", "what is 7 + 1 ?",
    "name three things in a house", "tell me about the sun", "how many days in a week ?", "is 9 - 4 = 5 ?",
    "give an example word", "what time is it ?", "which is bigger , 3 or 8 ?", "say something kind",
]


def build_base(out_dir: Path, arch: str = "llama", seed: int = 0, max_shard_size: str | None = None,
               **overrides: Any) -> Path:
    """A tiny random base model; re-saved in several safetensors shards when ``max_shard_size`` is set."""
    path = build_tiny_model(out_dir, arch, seed=seed, **overrides)
    if max_shard_size:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        (path / "model.safetensors").unlink()
        model.save_pretrained(path, max_shard_size=max_shard_size)
    return path


def heldout_rows(n: int, seed: int = 0) -> list[dict[str, Any]]:
    """Held-out rows as training writes them: prompt turns without the answer, plus the reference answer."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        question = QUESTIONS[i % len(QUESTIONS)]
        answer = " ".join(rng.choices(["the", "answer", "is", "one", "two", "water", "day", "good"], k=6))
        rows.append({"messages": [{"role": "user", "content": question}], "reference": answer})
    return rows


def randomize_adapter(peft_model: torch.nn.Module, seed: int, a_std: float = 0.1, b_std: float = 0.03) -> None:
    """Give every LoRA A/B (and DoRA magnitude) a seeded random, non-zero value."""
    gen = torch.Generator().manual_seed(seed)
    for name, param in peft_model.named_parameters():
        if "lora_A" in name:
            param.data = torch.randn(param.shape, generator=gen, dtype=torch.float32).mul_(a_std).to(param.dtype)
        elif "lora_B" in name:
            param.data = torch.randn(param.shape, generator=gen, dtype=torch.float32).mul_(b_std).to(param.dtype)
        elif "lora_magnitude_vector" in name:
            noise = 1.0 + 0.1 * torch.randn(param.shape, generator=gen, dtype=torch.float32)
            param.data = (param.data.float() * noise).to(param.dtype)


def make_run(
    root: Path,
    arch: str = "llama",
    *,
    base: Path | None = None,
    lora: dict[str, Any] | None = None,
    n_heldout: int = 6,
    seed: int = 0,
    model_overrides: dict[str, Any] | None = None,
    max_shard_size: str | None = None,
) -> Path:
    """Write ``root/run`` (and ``root/base`` unless ``base`` is given); return the run directory."""
    root.mkdir(parents=True, exist_ok=True)
    source = base or build_base(root / "base", arch, seed=seed, max_shard_size=max_shard_size,
                                **(model_overrides or {}))
    run = root / "run"
    run.mkdir()
    data = root / "data.jsonl"
    rows = [{"messages": r["messages"] + [{"role": "assistant", "content": r["reference"]}]}
            for r in heldout_rows(40, seed)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = validate({
        "model": {"name_or_path": str(source)},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0, **(lora or {})},
        "data": {"path": str(data), "val_fraction": 0.1},
        "train": {"max_steps": 4, "micro_batch_size": 2, "gradient_accumulation_steps": 1, "max_length": 64,
                  "optimizer": "adamw_torch", "warmup_steps": 0},
        "output_dir": str(run),
    })
    device = torch.device("cpu")
    model = load_quantized_base(source, cfg.model, torch.float32, device)
    spec = quant_spec(model, cfg.model, torch.float32)
    peft_model = attach_lora(model, cfg.lora, torch.float32, gradient_checkpointing=False)
    randomize_adapter(peft_model, seed + 1)
    peft_model.save_pretrained(run / rundir.ADAPTER)
    load_tokenizer(source, cfg.model).save_pretrained(run / rundir.TOKENIZER)
    (run / rundir.CONFIG).write_text(dump_config(cfg))
    write_manifest(run, cfg, source, spec.to_json(), data, peft_model)
    held = heldout_rows(n_heldout, seed + 2)
    (run / rundir.HELDOUT).write_text("".join(json.dumps(r) + "\n" for r in held))
    return run


def write_manifest(run: Path, cfg: Any, source: Path, quant: dict[str, Any], data: Path,
                   peft_model: torch.nn.Module) -> None:
    """manifest.json per docs/CONTRACTS.md, as a completed CPU run."""
    import hashlib

    import bitsandbytes
    import peft
    import transformers

    now = datetime.now(timezone.utc).isoformat()
    trainable = sum(p.numel() for n, p in peft_model.named_parameters() if "lora_" in n)
    targets = sorted(peft_model.peft_config["default"].target_modules)
    manifest = {
        "qlora_kit_version": "0.1.0",
        "status": "completed",
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__, "peft": peft.__version__,
                     "bitsandbytes": bitsandbytes.__version__},
        "device": {"type": "cpu", "name": platform.processor() or "cpu", "total_memory_bytes": 0},
        "base": {"name_or_path": cfg.model.name_or_path, "source_dir": str(Path(source).resolve()), "revision": None},
        "quant": quant,
        "data": {"path": str(data), "sha256": hashlib.sha256(data.read_bytes()).hexdigest(), "val_path": None,
                 "val_sha256": None, "format": "messages"},
        "lora": {"target_modules": targets, "trainable_parameters": trainable},
        "start_time": now,
        "end_time": now,
        "final_metrics": {"step": 4, "train_loss": 1.234, "eval_loss": 1.456},
    }
    (run / rundir.MANIFEST).write_text(json.dumps(manifest, indent=2))


def other_weights(base: Path, dest: Path) -> Path:
    """A copy of ``base`` with the same files, shapes and sizes but other weights (another revision, say)."""
    from transformers import AutoModelForCausalLM

    shutil.copytree(base, dest)
    model = AutoModelForCausalLM.from_pretrained(base)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    model.save_pretrained(dest)
    assert {p.name: p.stat().st_size for p in dest.glob("*.safetensors")} == \
        {p.name: p.stat().st_size for p in base.glob("*.safetensors")}
    return dest


def read_report(out: Path) -> dict:
    return json.loads((out / REPORT).read_text())


def staging_leftovers(target: Path) -> list[Path]:
    return list(target.parent.glob(f".{target.name}.partial-*"))


ENV_1_THREAD = {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
