"""Training benchmark: qlora-kit against the stock trl recipe and the classic tutorial recipe.

A randomly initialised bf16 model of a real shape (``--shape llama-3.1-8b`` or
``llama-2-7b``: the published config.json in ``qlora_kit/model_shapes``; ``tiny`` for CPU
smoke runs) is written to a temporary folder with a small local tokenizer (no hub access).
Three recipes train it on the same rows with the same LoRA settings (r, alpha, dropout,
targets), learning rate, micro-batch size and ``max_length``; everything else is each
recipe's own default:

* ``qlora-kit``: ``qlora_kit.train.recipe.run_training`` with its defaults (padding-free packing,
  fused loss on labelled positions, fp32 master adapters under bf16 autocast, ``auto``
  optimizer (fused fp32 AdamW when the plan has room, else 8-bit), checkpointing/offload/tiling resolved by the planner for ``--cap-gib``);
  ``qlora-kit-no-offload`` is the same with ``train.activation_offload=false``;
* ``stock``: trl ``SFTTrainer`` + ``SFTConfig`` defaults on a bitsandbytes NF4 model with a
  peft ``LoraConfig`` (no packing, padding, trl's fused LM head loss, its default optimizer;
  the loss path it took is recorded);
* ``classic``: what most tutorials run: NF4 via ``BitsAndBytesConfig``, peft
  ``prepare_model_for_kbit_training`` + ``get_peft_model``, transformers ``Trainer`` with
  ``DataCollatorForLanguageModeling``, ``paged_adamw_8bit``, bf16, and the model's own
  full-logits loss.

Data (``--mix``): ``chat`` rows with log-normal lengths (median ~400 tokens, tail cut at
``max_length``), so padding and packing show; ``full`` rows of at least ``max_length`` tokens.

The timed window is the same on every side: from the end of step ``--warmup-steps`` to the
end of the last step, each end taken after the step's logging (a device sync), so data
fetching, collation, the optimizer step and logging are inside it.  Per recipe and mix:
tokens/s (real tokens: padding excluded), peak ``max_memory_allocated``/``_reserved``, MFU
and HFU (see :func:`step_flops` for what is counted), and the losses.  A max-length search
(doubling, then bisection to 256 tokens; each trial a fresh process of 2 steps on full rows)
finds each recipe's longest trainable context under the cap.  qlora-kit's planner prediction
sits next to its measured peaks.

On CUDA every measurement runs in its own process with
``torch.cuda.set_per_process_memory_fraction`` allowing PyTorch's allocator ``--cap-gib``
minus what the CUDA context already holds (an emulated 24 GiB card on a larger one; paged
optimizer state lives outside the cap).  On CPU there is no cap: memory, MFU/HFU and the
search are null.  Results: JSON with device and versions (``--out``, default
``benchmarks/results/train-<shape>-<device>-<date>.json``).  Commands: benchmarks/README.md.
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
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO / "benchmarks" / "results"
REAL_SHAPES = ("llama-2-7b", "llama-3.1-8b")
RECIPES = ("qlora-kit", "qlora-kit-no-offload", "stock", "classic")
MIXES = ("chat", "full")
GiB = 1024**3
# bf16 dense tensor-core peak (TFLOP/s, no sparsity); first matching substring wins.
PEAK_TFLOPS = (
    ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.4), ("H200", 989.4), ("GH200", 989.4),
    ("A100", 312.0), ("L40S", 362.1), ("L40", 181.0), ("L4", 121.0), ("A10", 125.0),
    ("RTX 4090", 165.2), ("RTX 3090", 71.0), ("RTX A6000", 154.8),
)
TRIAL_STEPS = 2  # optimizer steps per max-length trial (the 2nd step has optimizer state resident)
LENGTH_GRANULARITY = 256
MAX_SEARCH_LEN = 131072  # Llama-3.1's context; bounds the synthetic rows too
CHAT_MEDIAN_TOKENS = 400  # log-normal chat lengths: median and sigma of log(length)
CHAT_SIGMA = 1.0
CHAT_MIN_TOKENS = 32


# --------------------------------------------------------------------------- settings


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options (see the module docstring)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", choices=(*REAL_SHAPES, "tiny"), default="tiny")
    p.add_argument("--steps", type=int, default=12, help="optimizer steps per recipe and mix (accumulation 1)")
    p.add_argument("--warmup-steps", type=int, default=2, help="steps before the timed window")
    p.add_argument("--seq-len", type=int, default=2048, help="max_length of every recipe")
    p.add_argument("--micro-batch-size", type=int, default=1,
                   help="rows per micro-batch (qlora-kit packs each row up to max_length tokens)")
    p.add_argument("--mix", default="chat,full", help="comma-separated: chat (log-normal lengths), full")
    p.add_argument("--cap-gib", type=float, default=24.0, help="memory cap on CUDA (ignored on CPU)")
    p.add_argument("--peak-tflops", type=float, default=None, help="device bf16 dense peak for MFU/HFU")
    p.add_argument("--recipes", default="qlora-kit,stock,classic", help="comma-separated subset of: "
                   + ",".join(RECIPES))
    p.add_argument("--search-recipes", default="qlora-kit,qlora-kit-no-offload,stock,classic",
                   help="recipes whose longest trainable context is searched")
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--lora-alpha", type=float, default=32.0)
    p.add_argument("--lora-dropout", type=float, default=0.05)
    p.add_argument("--targets", default="all-linear", choices=("all-linear", "attention"))
    p.add_argument("--learning-rate", type=float, default=2e-4)
    p.add_argument("--rows", type=int, default=None, help="chat rows to generate (default: enough for the steps)")
    p.add_argument("--max-len-search", choices=("auto", "on", "off"), default="auto",
                   help="search the longest sequence that fits the cap (auto: on CUDA only)")
    p.add_argument("--max-len-limit", type=int, default=None,
                   help=f"upper bound of the search (default: the model's context, at most {MAX_SEARCH_LEN})")
    p.add_argument("--workdir", type=Path, default=None, help="keep the model/data/runs here (default: a temp dir)")
    p.add_argument("--out", type=Path, default=None,
                   help="results JSON (default: benchmarks/results/train-<shape>-<device>-<date>.json)")
    p.add_argument("--child", type=Path, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    for option, allowed in (("recipes", RECIPES), ("search_recipes", RECIPES), ("mix", MIXES)):
        unknown = set(getattr(args, option).split(",")) - set(allowed)
        if unknown:
            p.error(f"--{option.replace('_', '-')}: unknown {sorted(unknown)}; choose from {allowed}")
    if args.warmup_steps < 1 or args.steps <= args.warmup_steps:
        p.error("--warmup-steps must be >= 1 and --steps larger (the timed window starts at the end of the warm-up)")
    return args


def bench_settings(args: argparse.Namespace, cuda: bool) -> dict[str, Any]:
    """The settings every recipe shares (recorded in the results)."""
    return {
        "shape": args.shape, "steps": args.steps, "warmup_steps": args.warmup_steps, "seq_len": args.seq_len,
        "micro_batch_size": args.micro_batch_size, "gradient_accumulation_steps": 1, "lora_r": args.lora_r,
        "lora_alpha": args.lora_alpha, "lora_dropout": args.lora_dropout, "target_modules": args.targets,
        "learning_rate": args.learning_rate, "compute_dtype": "bfloat16" if cuda else "float32",
        "attn_implementation": "sdpa", "quant": "nf4, double quant, blocksize 64",
        "cap_gib": args.cap_gib if cuda else None,
        "chat_mix": {"median_tokens": CHAT_MEDIAN_TOKENS, "sigma": CHAT_SIGMA, "min_tokens": CHAT_MIN_TOKENS,
                     "max_tokens": args.seq_len},
    }


# --------------------------------------------------------------------------- model and data


def shape_config(shape: str, tokenizer: Any) -> Any:
    """A transformers config of the requested shape, with the local tokenizer's special ids."""
    from transformers import AutoConfig

    from qlora_kit.model.tiny import tiny_config

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

    from qlora_kit.model.tiny import build_tokenizer

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


def tokens_per_word(tokenizer: Any) -> float:
    """Average tokens per word of the synthetic vocabulary (to size rows in tokens)."""
    from qlora_kit.model.tiny import _WORDS

    rng = random.Random(1)
    text = " ".join(rng.choices(_WORDS, k=2000))
    return len(tokenizer(text, add_special_tokens=False)["input_ids"]) / 2000


def chat_lengths(n: int, max_len: int, seed: int = 0) -> list[int]:
    """``n`` conversation lengths in tokens: log-normal (median CHAT_MEDIAN_TOKENS, sigma CHAT_SIGMA),
    clipped to [CHAT_MIN_TOKENS, max_len] (the tail is what would be truncated at max_length)."""
    rng = random.Random(seed)
    return [int(min(max_len, max(CHAT_MIN_TOKENS, rng.lognormvariate(math.log(CHAT_MEDIAN_TOKENS), CHAT_SIGMA))))
            for _ in range(n)]


def write_chat_rows(path: Path, lengths: list[int], words_per_token: float, seed: int = 0) -> Path:
    """One ``messages`` row per length: a user turn (~30 %) and an assistant reply (~70 %)."""
    from qlora_kit.model.tiny import _WORDS

    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as fh:
        for length in lengths:
            words = max(4, int(length * words_per_token))
            user = " ".join(rng.choices(_WORDS, k=max(2, words * 3 // 10)))
            reply = " ".join(rng.choices(_WORDS, k=max(2, words - words * 3 // 10)))
            fh.write(json.dumps({"messages": [{"role": "user", "content": user},
                                              {"role": "assistant", "content": reply}]}) + "\n")
    return path


def write_full_rows(path: Path, n_rows: int, seq_len: int, words_per_token: float = 1.5, seed: int = 0) -> Path:
    """Chat rows whose assistant turn is long enough to be truncated at ``seq_len`` tokens."""
    from qlora_kit.model.tiny import _WORDS

    rng = random.Random(seed)
    words = max(64, int(seq_len * max(words_per_token, 1.0) * 1.2))
    with open(path, "w", encoding="utf-8") as fh:
        for _ in range(n_rows):
            answer = " ".join(rng.choices(_WORDS, k=words))
            row = {"messages": [{"role": "user", "content": "write a long story"},
                                {"role": "assistant", "content": answer}]}
            fh.write(json.dumps(row) + "\n")
    return path


# --------------------------------------------------------------------------- what each step processed


def batch_stats(batch: dict[str, Any]) -> dict[str, Any]:
    """Tokens of one collated micro-batch: real (not padding), computed (padded shape), per-sample
    lengths (attention cost), rows, padded row length, and labelled tokens (after the shift)."""
    ids, labels = batch["input_ids"], batch["labels"]
    labelled = int((labels[..., 1:] != -100).sum())
    if "packed_seq_lens" in batch:  # qlora-kit's padding-free row
        lengths = [int(n) for n in batch["packed_seq_lens"]]
    elif "attention_mask" in batch and batch["attention_mask"] is not None:
        lengths = [int(n) for n in batch["attention_mask"].sum(dim=-1).tolist()]
    elif "position_ids" in batch:  # padding-free rows from another collator: a sample starts at position 0
        starts = (batch["position_ids"].reshape(-1) == 0).nonzero().reshape(-1).tolist() + [ids.numel()]
        lengths = [b - a for a, b in zip(starts, starts[1:])]
    else:
        lengths = [ids.shape[-1]] * (ids.numel() // ids.shape[-1])
    return {"real": sum(lengths), "computed": int(ids.numel()), "rows": int(ids.numel() // ids.shape[-1]),
            "row_length": int(ids.shape[-1]), "lengths": lengths, "labelled": labelled,
            "packed": "packed_seq_lens" in batch}


def counting(collate_fn: Callable[..., Any], sink: list[dict[str, Any]]) -> Callable[..., Any]:
    """``collate_fn`` that also appends :func:`batch_stats` of every batch it builds to ``sink``."""

    def collate(*args: Any, **kwargs: Any) -> Any:
        batch = collate_fn(*args, **kwargs)
        sink.append(batch_stats(batch))
        return batch

    return collate


# --------------------------------------------------------------------------- the recipes


def qlora_kit_config(job: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    """The qlora-kit YAML mapping for this job: the shared settings, qlora-kit's defaults otherwise."""
    s = job["settings"]
    train: dict[str, Any] = {
        "max_steps": job["steps"], "micro_batch_size": s["micro_batch_size"], "gradient_accumulation_steps": 1,
        "max_length": job["seq_len"], "learning_rate": s["learning_rate"], "warmup_steps": 0, "logging_steps": 1,
        "save_steps": job["steps"], "seed": 0,
    }
    if job["recipe"] == "qlora-kit-no-offload":
        train["activation_offload"] = False
    return {
        "model": {"name_or_path": job["model_dir"], "attn_implementation": "sdpa"},
        "lora": {"r": s["lora_r"], "alpha": s["lora_alpha"], "dropout": s["lora_dropout"],
                 "target_modules": s["target_modules"]},
        "data": {"path": job["data_path"], "val_fraction": 0.0, "shuffle": False},
        "train": train,
        "output_dir": str(run_dir),
    }


def resolve_for_cap(mapping: dict[str, Any], model_dir: str, cap_gib: float | None) -> dict[str, Any]:
    """``mapping`` with its ``auto`` memory settings resolved by the planner for the cap.

    ``train`` resolves them for the whole card; under an emulated smaller card (the cap) the
    benchmark asks the planner for that budget instead and writes the concrete values.
    """
    if cap_gib is None:
        return mapping
    from qlora_kit.core.config import validate
    from qlora_kit.plan.fit import resolve_auto
    from qlora_kit.plan.shape import load_shape_file

    resolved = resolve_auto(validate(mapping), load_shape_file(Path(model_dir) / "config.json"), int(cap_gib * GiB))
    keys = ("activation_offload", "checkpoint_every_n_layers", "tiled_mlp", "optimizer")
    return {**mapping, "train": {**mapping["train"], **{k: getattr(resolved.train, k) for k in keys}}}


def run_qlora_kit(job: dict[str, Any]) -> dict[str, Any]:
    """Train with ``qlora_kit.train.recipe.run_training``; step ends are taken when each step's metrics line is written."""
    import yaml

    from qlora_kit.rundir import metrics as qmetrics
    from qlora_kit.train import loop as qloop
    from qlora_kit.train.recipe import run_training

    work = Path(job["work"])
    tag = f"{job['recipe']}-{job['mix']}-{job['seq_len']}"
    run_dir = work / f"run-{tag}"
    mapping = resolve_for_cap(qlora_kit_config(job, run_dir), job["model_dir"], job["settings"]["cap_gib"])
    config_path = work / f"{tag}.yaml"
    config_path.write_text(yaml.safe_dump(mapping, sort_keys=False))
    stats: list[dict[str, Any]] = []
    stamps: list[float] = []
    collate, append = qloop.collate, qmetrics.MetricsLog.append

    def timed_append(self: Any, record: dict[str, Any]) -> None:
        append(self, record)
        if "loss" in record:
            stamps.append(_synced_clock())

    qloop.collate, qmetrics.MetricsLog.append = counting(collate, stats), timed_append
    start = time.perf_counter()
    try:
        run_training(config_path, [], resume=False, overwrite=True, skip_memory_check=True)
    finally:
        qloop.collate, qmetrics.MetricsLog.append = collate, append
    wall = time.perf_counter() - start
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    memory = json.loads((run_dir / "manifest.json").read_text()).get("memory", {})
    every = memory.get("checkpoint_every_n_layers", 1) if memory.get("gradient_checkpointing", True) else None
    fused = bool(memory.get("fused_loss", True))
    recipe = {
        "what": "qlora_kit.train.recipe.run_training (qlora-kit defaults; auto settings resolved for the cap)",
        "memory_settings": memory, "config_train": mapping["train"], "packing": memory.get("packing"),
        "loss_path": ("trl fused LM head via qlora_kit.ops.loss: " + ("labelled positions only (Triton)" if
                      fused_head_compacts() else "every position (no Triton here)")) if fused else "full logits",
        "checkpointed_layers": None if every is None else ("every", every),
        "lm_head_positions": "labelled" if fused and fused_head_compacts() else "all",
        "loss_recomputes_projection": fused,
        "tiled_mlp": bool(memory.get("tiled_mlp")),
    }
    return {"losses": [r["loss"] for r in records if "loss" in r], "stamps": stamps,
            "stats": stats[-job["steps"]:], "wall_seconds": wall, "recipe_info": recipe}


def load_4bit_model(job: dict[str, Any]) -> Any:
    """The NF4 (double quant) model both transformers recipes start from, as their docs show."""
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    cuda = torch.cuda.is_available()
    compute = torch.bfloat16 if cuda else torch.float32
    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=compute)
    return AutoModelForCausalLM.from_pretrained(job["model_dir"], quantization_config=bnb, dtype=compute,
                                                device_map={"": 0 if cuda else "cpu"}, attn_implementation="sdpa")


def lora_config(job: dict[str, Any]) -> Any:
    from peft import LoraConfig

    s = job["settings"]
    targets = "all-linear" if s["target_modules"] == "all-linear" else ["q_proj", "k_proj", "v_proj", "o_proj"]
    return LoraConfig(r=s["lora_r"], lora_alpha=s["lora_alpha"], lora_dropout=s["lora_dropout"],
                      target_modules=targets, task_type="CAUSAL_LM")


def common_arguments(job: dict[str, Any], name: str) -> dict[str, Any]:
    """TrainingArguments both transformers recipes share with qlora-kit (the rest stays default)."""
    import torch

    s, cuda = job["settings"], torch.cuda.is_available()
    return dict(output_dir=str(Path(job["work"]) / f"{name}-{job['mix']}-{job['seq_len']}"), max_steps=job["steps"],
                per_device_train_batch_size=s["micro_batch_size"], gradient_accumulation_steps=1,
                learning_rate=s["learning_rate"], warmup_steps=0, logging_steps=1, save_strategy="no",
                report_to="none", seed=0, bf16=cuda, use_cpu=not cuda, dataloader_num_workers=0, disable_tqdm=True)


def run_stock(job: dict[str, Any]) -> dict[str, Any]:
    """trl ``SFTTrainer`` with ``SFTConfig`` defaults (shared settings only) and a peft LoRA config."""
    from datasets import load_dataset
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    model = load_4bit_model(job)
    tokenizer = AutoTokenizer.from_pretrained(job["model_dir"])
    args = SFTConfig(**common_arguments(job, "stock"), max_length=job["seq_len"])
    stats: list[dict[str, Any]] = []
    timer = _step_clock()
    dataset = load_dataset("json", data_files=job["data_path"], split="train")
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                         peft_config=lora_config(job), callbacks=[timer])
    trainer.data_collator = counting(trainer.data_collator, stats)
    recipe = stock_recipe_info(trainer)
    start = time.perf_counter()
    trainer.train()
    return {"losses": [r["loss"] for r in trainer.state.log_history if "loss" in r], "stamps": timer.stamps,
            "stats": stats[:job["steps"]], "wall_seconds": time.perf_counter() - start, "recipe_info": recipe}


def fused_head_compacts() -> bool:
    """True where trl's fused LM head projects only labelled positions (a Triton device)."""
    import torch
    from transformers.utils import is_triton_available

    return torch.cuda.is_available() and is_triton_available()


def stock_recipe_info(trainer: Any) -> dict[str, Any]:
    """What trl's defaults chose: the loss path (fused LM head or full logits), packing, checkpointing, dtypes."""
    import trl

    base = trainer.model.get_base_model() if hasattr(trainer.model, "get_base_model") else trainer.model
    forward = getattr(base.forward, "__func__", base.forward)
    fused = getattr(getattr(forward, "__code__", None), "co_name", "") == "_fused_forward"
    plain_branch = trainer.compute_loss_func is None and trainer.label_smoother is None
    compact = fused_head_compacts()
    args = trainer.args
    adapter_dtypes = sorted({str(p.dtype).removeprefix("torch.") for p in trainer.model.parameters() if p.requires_grad})
    return {
        "what": f"trl {trl.__version__} SFTTrainer, SFTConfig defaults except the shared settings",
        "loss_path": ("trl fused LM head (trl.trainer.utils.add_fused_lm_head, ChunkedLogProbFunction): "
                      + ("labelled positions only (Triton)" if compact else "every position (no Triton here)"))
        if fused and plain_branch else "full logits (model's own loss)",
        "fused_lm_head": fused and plain_branch, "packing": bool(args.packing), "padding_free": bool(args.padding_free),
        "assistant_only_loss": bool(args.assistant_only_loss), "optimizer": str(args.optim),
        "gradient_checkpointing": bool(args.gradient_checkpointing),
        "gradient_checkpointing_kwargs": args.gradient_checkpointing_kwargs, "adapter_dtypes": adapter_dtypes,
        "checkpointed_layers": ("every", 1) if args.gradient_checkpointing else None,
        "lm_head_positions": ("labelled" if compact else "all") if fused and plain_branch else "all",
        "loss_recomputes_projection": fused and plain_branch, "tiled_mlp": False,
    }


def run_classic(job: dict[str, Any]) -> dict[str, Any]:
    """The tutorial recipe: NF4 + ``prepare_model_for_kbit_training`` + peft + ``Trainer``, full-logits loss."""
    from datasets import load_dataset
    from peft import get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoTokenizer, DataCollatorForLanguageModeling, Trainer, TrainingArguments

    model = prepare_model_for_kbit_training(load_4bit_model(job))
    model = get_peft_model(model, lora_config(job))
    tokenizer = AutoTokenizer.from_pretrained(job["model_dir"])

    def tokenize(row: dict[str, Any]) -> dict[str, Any]:
        text = tokenizer.apply_chat_template(row["messages"], tokenize=False)
        return tokenizer(text, truncation=True, max_length=job["seq_len"], add_special_tokens=False)

    dataset = load_dataset("json", data_files=job["data_path"], split="train")
    dataset = dataset.map(tokenize, remove_columns=dataset.column_names)
    import torch

    optim = "paged_adamw_8bit" if torch.cuda.is_available() else "adamw_torch"
    args = TrainingArguments(**common_arguments(job, "classic"), optim=optim)
    stats: list[dict[str, Any]] = []
    timer = _step_clock()
    collator = counting(DataCollatorForLanguageModeling(tokenizer, mlm=False), stats)
    trainer = Trainer(model=model, args=args, train_dataset=dataset, data_collator=collator, callbacks=[timer])
    recipe = {
        "what": "transformers Trainer + peft prepare_model_for_kbit_training + get_peft_model, "
                "DataCollatorForLanguageModeling (trains on every token), full-logits loss",
        "loss_path": "full logits (model's own loss)", "packing": False, "optimizer": optim,
        "gradient_checkpointing": bool(getattr(model, "is_gradient_checkpointing", False)),
        "adapter_dtypes": sorted({str(p.dtype).removeprefix("torch.") for p in model.parameters() if p.requires_grad}),
        "checkpointed_layers": ("every", 1) if getattr(model, "is_gradient_checkpointing", False) else None,
        "lm_head_positions": "all", "loss_recomputes_projection": False, "tiled_mlp": False,
    }
    start = time.perf_counter()
    trainer.train()
    return {"losses": [r["loss"] for r in trainer.state.log_history if "loss" in r], "stamps": timer.stamps,
            "stats": stats[:job["steps"]], "wall_seconds": time.perf_counter() - start, "recipe_info": recipe}


def _step_clock() -> Any:
    """A TrainerCallback taking each step's end after its logging (device synchronised)."""
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        def __init__(self) -> None:
            self.stamps: list[float] = []

        def on_log(self, args, state, control, logs=None, **kwargs):  # noqa: ANN001 - transformers' signature
            if logs and "loss" in logs:
                self.stamps.append(_synced_clock())

    return StepClock()


def _synced_clock() -> float:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter()


RUNNERS: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "qlora-kit": run_qlora_kit, "qlora-kit-no-offload": run_qlora_kit, "stock": run_stock, "classic": run_classic,
}


# --------------------------------------------------------------------------- one measurement


def measure(job: dict[str, Any]) -> dict[str, Any]:
    """Run one recipe on one mix at one length; never raises (errors and OOM are results)."""
    import torch

    if job["recipe"].startswith("qlora-kit"):  # its allocator setting, which must precede CUDA's start
        from qlora_kit.ops.allocator import configure_cuda_allocator

        configure_cuda_allocator()
    cuda = torch.cuda.is_available()
    if cuda:
        _apply_cap(job["settings"]["cap_gib"])
        torch.cuda.reset_peak_memory_stats()
    result: dict[str, Any] = {"recipe": job["recipe"], "mix": job["mix"], "seq_len": job["seq_len"], "status": "ok",
                              "alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF")}
    try:
        result.update(RUNNERS[job["recipe"]](job))
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
    job_path = work / f"job-{job['recipe']}-{job['mix']}-{job['seq_len']}.json"
    result_path = job_path.with_suffix(".result.json")
    result_path.unlink(missing_ok=True)
    job_path.write_text(json.dumps({**job, "result_path": str(result_path)}))
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", str(job_path)],
                          capture_output=True, text=True, timeout=4 * 3600)
    if result_path.exists():
        return json.loads(result_path.read_text())
    status = "oom" if _is_oom_text(proc.stderr) else "error"
    return {"recipe": job["recipe"], "mix": job["mix"], "seq_len": job["seq_len"], "status": status,
            "error": proc.stderr[-4000:], "peak_allocated_bytes": None, "peak_reserved_bytes": None}


def _is_oom_text(text: str) -> bool:
    return "out of memory" in text.lower() or "OutOfMemory" in text


def child_main(job_path: Path) -> int:
    """Entry point of an isolated measurement."""
    job = json.loads(job_path.read_text())
    result = measure(job)
    Path(job["result_path"]).write_text(json.dumps(result))
    return 0


# --------------------------------------------------------------------------- the timed window and FLOPs


def flop_model(model_dir: Path, r: int, targets: str) -> dict[str, int]:
    """Parameter counts the FLOP formulas use (from the model's config.json)."""
    from qlora_kit.plan.shape import linear_layers, load_shape_file, resolve_targets
    from qlora_kit.plan.terms import adapter_tensors

    shape = load_shape_file(model_dir / "config.json")
    layers = linear_layers(shape)
    lora_targets = resolve_targets(targets, shape)
    per_layer_lora = sum(adapter_tensors(shape, lora_targets, r, False)) // shape.num_layers
    mlp = [n for n, lin in layers.items() if lin.group.startswith("mlp")]
    return {
        "layers": shape.num_layers, "q_dim": shape.q_dim,
        "layer_matmul_params": sum(lin.numel for lin in layers.values()),
        "mlp_matmul_params": sum(layers[n].numel for n in mlp),
        "lm_head_params": shape.vocab_size * shape.hidden_size,
        "layer_lora_params": per_layer_lora,
        "mlp_lora_params": sum(adapter_tensors(shape, [t for t in lora_targets if t in mlp], r, False))
        // shape.num_layers,
    }


def step_flops(stat: dict[str, Any], fm: dict[str, int], recipe: dict[str, Any]) -> tuple[float, float]:
    """(model FLOPs, hardware FLOPs) of one micro-batch.

    Model FLOPs (MFU): what the model needs for the real (non-padding) tokens, whatever the
    recipe does: 4 FLOPs per frozen matmul parameter per token (forward + input gradient; a
    frozen base has no weight gradients), the lm_head included; 6 per LoRA parameter (forward,
    input and weight gradients); causal attention 6 * q_dim * l^2 per layer for a sample of
    length l (QK^T and PV forward, twice that backward).
    Hardware FLOPs (HFU): what the recipe ran: every computed position (padding included),
    attention over padded rows (packed rows: per sample), the forward of recomputed layers
    again, tiled MLPs' extra forward, and the lm_head where it projects (all positions with full
    logits; only labelled ones with a fused loss that selects them, whose backward projects
    them once more).
    """
    L, qd, head = fm["layers"], fm["q_dim"], fm["lm_head_params"]
    layer = fm["layer_matmul_params"]
    lora = fm["layer_lora_params"]
    real_sq = sum(n * n for n in stat["lengths"])
    model = stat["real"] * (4 * (L * layer + head) + 6 * L * lora) + 6 * L * qd * real_sq
    computed = stat["computed"]
    attn_sq = real_sq if stat["packed"] else stat["rows"] * stat["row_length"] ** 2
    hardware = computed * (4 * L * layer + 6 * L * lora) + 6 * L * qd * attn_sq
    ckpt = recipe.get("checkpointed_layers")
    if ckpt:
        from qlora_kit.ops.checkpointing import checkpointed_layers

        recomputed = len(checkpointed_layers(L, ckpt[1]))  # ceil(L / n), n possibly fractional
        hardware += recomputed * (computed * 2 * (layer + lora) + 2 * qd * attn_sq)
    if recipe.get("tiled_mlp") and computed > _mlp_tile_tokens():
        hardware += L * computed * 2 * (fm["mlp_matmul_params"] + fm["mlp_lora_params"])
    if recipe.get("lm_head_positions") == "labelled":
        hardware += stat["labelled"] * head * (6 if recipe.get("loss_recomputes_projection") else 4)
    else:
        hardware += computed * head * (6 if recipe.get("loss_recomputes_projection") else 4)
    return float(model), float(hardware)


def _mlp_tile_tokens() -> int:
    from qlora_kit.ops.tiled_mlp import MLP_TILE_TOKENS

    return MLP_TILE_TOKENS


def window_summary(result: dict[str, Any], warmup: int, fm: dict[str, int],
                   peak_tflops: float | None) -> dict[str, Any]:
    """Throughput over the timed window (end of step ``warmup`` → end of the last step)."""
    stamps, stats = result.get("stamps") or [], result.get("stats") or []
    steps = len(stats)
    if len(stamps) < steps or steps <= warmup:
        return {"window": None, "note": f"{len(stamps)} step ends for {steps} steps: no timed window"}
    timed = stats[warmup:steps]
    seconds = stamps[steps - 1] - stamps[warmup - 1]
    flops = [step_flops(s, fm, result["recipe_info"]) for s in timed]
    real = sum(s["real"] for s in timed)
    computed = sum(s["computed"] for s in timed)
    summary = {
        "window": {"steps": len(timed), "seconds": seconds, "from_step": warmup, "to_step": steps},
        "tokens_per_second": real / seconds,
        "computed_tokens_per_second": computed / seconds,
        "samples_per_second": sum(len(s["lengths"]) for s in timed) / seconds,
        "padding_fraction": 1 - real / computed if computed else 0.0,
        "labelled_fraction": sum(s["labelled"] for s in timed) / real if real else 0.0,
        "tokens_per_step": real / len(timed),
        "model_tflops_per_second": sum(m for m, _ in flops) / seconds / 1e12,
        "hardware_tflops_per_second": sum(h for _, h in flops) / seconds / 1e12,
    }
    summary["mfu"] = summary["model_tflops_per_second"] / peak_tflops if peak_tflops else None
    summary["hfu"] = summary["hardware_tflops_per_second"] / peak_tflops if peak_tflops else None
    return summary


# --------------------------------------------------------------------------- longest sequence


def find_max_seq_len(base_job: dict[str, Any], start: int, limit: int, isolate: bool) -> dict[str, Any]:
    """Longest multiple of 256 that trains TRIAL_STEPS steps without OOM (doubling, then bisection)."""
    trials: list[dict[str, Any]] = []

    def ok(length: int) -> bool:
        res = run_job({**base_job, "seq_len": length, "steps": TRIAL_STEPS}, isolate)
        trials.append({"seq_len": length, "status": res["status"], "peak_allocated_bytes": res.get(
            "peak_allocated_bytes"), "peak_reserved_bytes": res["peak_reserved_bytes"]})
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
        if good < limit and ok(_round_len(limit)):  # doubling jumped past the limit: try the limit itself
            good = _round_len(limit)
        else:
            bad = limit if good < limit else None
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


# --------------------------------------------------------------------------- planner, environment


def planner_prediction(job: dict[str, Any], seq_len: int) -> dict[str, Any] | None:
    """qlora-kit's planner for a qlora-kit job at ``seq_len`` (the settings it would resolve for the cap)."""
    if not job["recipe"].startswith("qlora-kit"):
        return None
    from qlora_kit.core.config import validate
    from qlora_kit.plan.estimate import estimate
    from qlora_kit.plan.shape import load_shape_file

    job = {**job, "seq_len": seq_len}
    mapping = resolve_for_cap(qlora_kit_config(job, Path(job["work"]) / "planned"), job["model_dir"],
                              job["settings"]["cap_gib"])
    plan = estimate(validate(mapping), load_shape_file(Path(job["model_dir"]) / "config.json"))
    return {"models": "qlora-kit recipe on CUDA (bf16 compute)", "settings": {
        k: mapping["train"].get(k) for k in ("activation_offload", "checkpoint_every_n_layers", "tiled_mlp", "optimizer")},
            "total_bytes": plan.total_bytes, "torch_allocated_peak_bytes": plan.torch_allocated_peak,
            "torch_reserved_peak_bytes": plan.torch_reserved_peak, "peak_phase": plan.peak_phase}


def planner_longest(job: dict[str, Any], model_dir: Path, cap_gib: float | None) -> dict[str, Any] | None:
    """The planner's longest max_length under the cap, with and without offload."""
    if cap_gib is None:
        return None
    from qlora_kit.core.config import validate
    from qlora_kit.plan.fit import max_length_that_fits
    from qlora_kit.plan.shape import load_shape_file

    cfg = validate(qlora_kit_config({**job, "recipe": "qlora-kit"}, Path(job["work"]) / "planned"))
    shape, budget = load_shape_file(model_dir / "config.json"), int(cap_gib * GiB)
    return {"without_offload": max_length_that_fits(cfg, shape, budget, offload=False),
            "with_offload": max_length_that_fits(cfg, shape, budget, offload=True)}


def detect_peak_tflops(device_name: str) -> float | None:
    """bf16 dense peak of a known GPU by name, else None."""
    for key, tflops in PEAK_TFLOPS:
        if key.lower() in device_name.lower():
            return tflops
    return None


def environment() -> tuple[dict[str, Any], dict[str, Any]]:
    """(device, versions) for the results file."""
    import torch

    from qlora_kit.rundir.manifest import package_versions

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


def summarise(result: dict[str, Any], warmup: int, fm: dict[str, int], peak_tflops: float | None,
              prediction: dict[str, Any] | None) -> dict[str, Any]:
    """The reported form of one measurement: window throughput, MFU/HFU, planner next to the peaks."""
    out = {k: v for k, v in result.items() if k not in ("stamps", "stats")}
    if result["status"] == "ok":
        out.update(window_summary(result, warmup, fm, peak_tflops))
    out["planner"] = prediction
    if prediction and result.get("peak_allocated_bytes"):
        out["measured_over_predicted_allocated"] = result["peak_allocated_bytes"] / prediction[
            "torch_allocated_peak_bytes"]
        out["measured_over_predicted_reserved"] = result["peak_reserved_bytes"] / prediction[
            "torch_reserved_peak_bytes"]
    return out


def run_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    """Build model and data, measure each recipe on each mix, search max lengths; return the results.

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


def prepare_data(args: argparse.Namespace, work: Path, model_dir: Path, limit: int) -> dict[str, Path]:
    """The rows of each mix (and full rows long enough for the max-length search)."""
    from transformers import AutoTokenizer

    wpt = 1 / tokens_per_word(AutoTokenizer.from_pretrained(model_dir))
    b = args.micro_batch_size
    chat_rows = args.rows or max(64, args.steps * b * math.ceil(args.seq_len / 300) + 16)
    return {
        "chat": write_chat_rows(work / "chat.jsonl", chat_lengths(chat_rows, args.seq_len), wpt),
        "full": write_full_rows(work / "full.jsonl", (args.steps + 2) * b, args.seq_len, wpt),
        "search": write_full_rows(work / "search.jsonl", (TRIAL_STEPS + 2) * b, limit, wpt),
    }


def measure_all(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Everything run_benchmark does inside its work folder."""
    import torch

    cuda = torch.cuda.is_available()
    settings = bench_settings(args, cuda)
    device, versions = environment()
    model_dir = build_model_dir(args.shape, work / f"model-{args.shape}", cuda)
    limit = _search_limit(args, model_dir)
    search = args.max_len_search == "on" or (args.max_len_search == "auto" and cuda)
    data = prepare_data(args, work, model_dir, limit if search else args.seq_len)
    fm = flop_model(model_dir, args.lora_r, args.targets)
    peak = args.peak_tflops or (detect_peak_tflops(device["name"]) if cuda else None)
    base = {"settings": settings, "model_dir": str(model_dir), "work": str(work), "steps": args.steps,
            "seq_len": args.seq_len}
    results: dict[str, dict[str, Any]] = {}
    for mix in args.mix.split(","):
        results[mix] = {}
        for recipe in args.recipes.split(","):
            job = {**base, "recipe": recipe, "mix": mix, "data_path": str(data[mix])}
            res = run_job(job, isolate=cuda)
            results[mix][recipe] = summarise(res, args.warmup_steps, fm, peak, planner_prediction(job, args.seq_len))
            _print_line(mix, recipe, results[mix][recipe])
    max_len: dict[str, Any] = {}
    if search:
        for recipe in args.search_recipes.split(","):
            job = {**base, "recipe": recipe, "mix": "full", "data_path": str(data["search"])}
            found = find_max_seq_len(job, args.seq_len, limit, isolate=cuda)
            found["planner_at_max"] = planner_prediction(job, found["max_seq_len"]) if found["max_seq_len"] else None
            max_len[recipe] = found
            print(f"longest context {recipe:22s} {found['max_seq_len']}")
    return {
        "benchmark": "train_bench", "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "device": device, "versions": versions, "settings": settings,
        "model": {"shape": args.shape, "config": json.loads((model_dir / "config.json").read_text()), **fm},
        "peak_tflops": peak, "flops": step_flops.__doc__.split("\n\n", 1)[1].strip(), "results": results,
        "max_seq_len": max_len if search else None,
        "planner_max_length_under_cap": planner_longest(base, model_dir, settings["cap_gib"]),
        "notes": _notes(cuda, peak, search),
    }


def _search_limit(args: argparse.Namespace, model_dir: Path) -> int:
    """Upper bound of the max-length search: --max-len-limit, else the model's context, at most MAX_SEARCH_LEN."""
    if args.max_len_limit:
        return args.max_len_limit
    config = json.loads((model_dir / "config.json").read_text())
    return min(int(config.get("max_position_embeddings") or MAX_SEARCH_LEN), MAX_SEARCH_LEN)


def _notes(cuda: bool, peak: float | None, search: bool) -> list[str]:
    notes = ["random weights of the real shape; losses are not meaningful, memory and speed are",
             "tokens_per_second counts real tokens (padding excluded) over the timed window",
             "each recipe keeps its own defaults: qlora-kit trains on assistant tokens only, stock (trl) and "
             "classic on every token; qlora-kit packs several chat samples per row, the others pad one per row"]
    if not cuda:
        notes.append("CPU run: no memory cap; peak memory, MFU/HFU and the max-length search are null "
                     "(a smoke test, not evidence for GPU claims)")
    elif peak is None:
        notes.append("unknown GPU: pass --peak-tflops for MFU/HFU")
    if cuda and not search:
        notes.append("max-length search skipped (--max-len-search off)")
    return notes


def default_out(shape: str, device: dict[str, Any]) -> Path:
    """benchmarks/results/train-<shape>-<GPU name, or "cpu">-<YYYYmmdd-HHMM>.json"""
    name = device["name"] if device["type"] == "cuda" else "cpu"
    slug = "".join(c if c.isalnum() else "-" for c in str(name).lower()).strip("-")[:40] or device["type"]
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M")
    return RESULTS_DIR / f"train-{shape}-{slug}-{stamp}.json"


def _print_line(mix: str, recipe: str, res: dict[str, Any]) -> None:
    mem = res.get("peak_reserved_bytes")
    print(f"{mix:5s} {recipe:22s} {res['status']:5s} tokens/s={_fmt(res.get('tokens_per_second'))} "
          f"peak_reserved={'n/a' if mem is None else f'{mem / GiB:.2f} GiB'} mfu={_fmt(res.get('mfu'), 3)} "
          f"hfu={_fmt(res.get('hfu'), 3)}", flush=True)


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
    print(f"results: {out}")
    failed = any(r["status"] == "error" for mix in report["results"].values() for r in mix.values())
    return 1 if failed else 0


def _fmt(value: float | None, digits: int = 1) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


if __name__ == "__main__":
    sys.exit(main())
