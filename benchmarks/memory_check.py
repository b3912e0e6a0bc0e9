"""The planner against measured memory: one real training step on CPU, component by component.

Builds a model with a **real vocabulary** (128,256, Llama-3's; one case uses a small one) and a
small hidden size,
runs qlora-kit's own training step (``train.builders.build_model`` → the loop's ``forward_loss``/``backward``/``clip_gradients``: NF4 base,
fp32 LoRA adapters under bf16 autocast, fused loss, padding-free packing, checkpointing,
tiled MLP when asked) on one packed row of long samples, and records every allocation of
the step with torch's profiler (``profile_memory=True``: the CPU allocator's own records,
temporaries inside kernels included).  Module hooks drop markers into the same timeline,
so the memory can be read per window:

* ``checkpoint_per_layer``: what one checkpointed decoder layer leaves behind in the
  forward pass (its input kept for the backward + autocast's 16-bit adapter copies);
* ``loss``: the peak from the end of the backbone's forward to the end of the loss's
  backward, above what was alive when it started (the fused loss's tiles and copies);
* ``recomputed_layer``: the peak of the last decoder layer's backward (recomputation +
  backward) above what was alive when it started;
* ``loss_phase`` / ``backward_phase`` / ``step``: absolute peaks (the parameters,
  gradients and optimizer state alive before the step, plus the step's allocations).

Each is compared with :func:`qlora_kit.plan.estimate.estimate` for the same config (``device="cpu"``:
the CPU's loss fold, per-sample attention and dropout masks) and the number of labelled
tokens.  Compute is bf16 with fp32 adapters, as on a GPU, so the autograd graph is the one
the GPU runs except for the attention kernel and the loss fold.

    python benchmarks/memory_check.py                       # the CPU cases, JSON to benchmarks/results/
    python benchmarks/memory_check.py --cases small --out /tmp/check.json
    python benchmarks/memory_check.py --device cuda         # on a GPU: flash attention, Triton loss, offload
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from qlora_kit.ops import checkpointing
from qlora_kit.plan import estimate, techniques, terms
from qlora_kit.plan import shape as plan_shape

RESULTS = Path(__file__).resolve().parent / "results"
VOCAB = 128256
TOLERANCE = 0.15


@dataclass(frozen=True)
class Case:
    """One measured configuration: model shape, row layout and memory techniques."""

    name: str
    tokens: int = 1024  # one packed row
    samples: int = 4
    labelled_per_sample: int = 64  # the reply at the end of each sample carries the labels
    vocab: int = VOCAB
    hidden: int = 64
    intermediate: int = 224
    layers: int = 3
    heads: int = 4
    kv_heads: int = 2
    r: int = 8
    dropout: float = 0.05
    targets: str = "all-linear"
    tiled_mlp: bool = False
    every_n: float = 1  # fractional: plan.checkpointed_layers spreads ceil(layers / n) checkpoints
    offload: bool = False  # CUDA only (a no-op on CPU)
    compute_dtype: str = "bfloat16"
    method: str = "sft"  # dpo: ``samples`` preference pairs (chosen + rejected) in the row, and the reference pass
    notes: list[str] = field(default_factory=list)

    @property
    def labelled(self) -> int:
        return self.samples * self.labelled_per_sample


CASES = {
    "small": Case("small"),
    "no-dropout": Case("no-dropout", dropout=0.0),
    "every-2": Case("every-2", layers=5, every_n=2),
    "three-of-four": Case("three-of-four", layers=4, every_n=checkpointing.every_n_for(4, 3)),  # layers 0, 2, 3 checkpointed
    # 16K tokens, the MLP in 4K tiles: the post-attention RMSNorm's backward becomes the layer's peak.  A small
    # vocabulary keeps the CPU's loss tiles (every position is scored on CPU) from hiding the layer.
    "long-tiled": Case("long-tiled", tokens=16384, labelled_per_sample=256, tiled_mlp=True, vocab=8192),
    # The same with the real vocabulary: ~4 GiB of fp32 loss tiles on CPU.
    "long-real-vocab": Case("long-real-vocab", tokens=16384, labelled_per_sample=256, tiled_mlp=True),
    # CUDA only: checkpointed inputs in pinned host memory, two on the GPU at a time.
    "offload": Case("offload", tokens=16384, labelled_per_sample=256, tiled_mlp=True, offload=True),
    # DPO: 4 pairs (8 sequences of 128 tokens) in one packed row; a reference forward without gradients first.
    "dpo": Case("dpo", samples=4, labelled_per_sample=32, method="dpo"),
}
DEFAULT_CASES = {"cpu": ("small", "no-dropout", "every-2", "three-of-four", "long-tiled", "long-real-vocab", "dpo"),
                 "cuda": ("small", "no-dropout", "every-2", "three-of-four", "long-tiled", "long-real-vocab",
                          "offload", "dpo")}


# --------------------------------------------------------------------------- model, config, batch


def build_model_dir(case: Case, root: Path) -> Path:
    """A random Llama of the case's shape with the real vocabulary (saved once per shape)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    out = root / f"llama-{case.vocab}-{case.hidden}-{case.intermediate}-{case.layers}-{case.heads}-{case.kv_heads}"
    if (out / "config.json").is_file():
        return out
    config = LlamaConfig(vocab_size=case.vocab, hidden_size=case.hidden, intermediate_size=case.intermediate,
                         num_hidden_layers=case.layers, num_attention_heads=case.heads,
                         num_key_value_heads=case.kv_heads, max_position_embeddings=131072,
                         tie_word_embeddings=False)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(out)
    return out


def case_config(case: Case, model_dir: Path) -> Any:
    """The qlora-kit config of a case (every memory setting concrete)."""
    from qlora_kit.core.config import validate

    return validate({
        "model": {"name_or_path": str(model_dir), "compute_dtype": case.compute_dtype},
        "lora": {"r": case.r, "alpha": 2 * case.r, "dropout": case.dropout, "target_modules": case.targets},
        "data": {"path": "unused.jsonl", "packing": True},
        # a pair's two sequences share a packed row of 2 x max_length tokens
        "train": {"method": case.method, "max_length": case.tokens // (1 if case.method == "sft" else 2),
                  "micro_batch_size": 1, "gradient_accumulation_steps": 1,
                  "fused_loss": True, "tiled_mlp": case.tiled_mlp, "activation_offload": case.offload,
                  "checkpoint_every_n_layers": case.every_n, "optimizer": "adamw_8bit"},
        "output_dir": "unused",
    })


def packed_row(case: Case, seed: int) -> dict[str, Any]:
    """One padding-free row of ``case.samples`` samples whose last tokens carry labels (DPO: that many pairs)."""
    from qlora_kit.data.preference import CHOSEN_LENGTH, collate_pairs
    from qlora_kit.ops.packing import pack_batch

    gen = torch.Generator().manual_seed(seed)
    sides = 1 if case.method == "sft" else 2
    n = case.tokens // (case.samples * sides)
    pieces = []
    for _ in range(case.samples * sides):
        ids = torch.randint(0, case.vocab, (n,), generator=gen).tolist()
        pieces.append((ids, [-100] * (n - case.labelled_per_sample) + ids[n - case.labelled_per_sample:]))
    if sides == 1:
        return pack_batch(pieces)
    pairs = [{"input_ids": c[0] + r[0], "labels": c[1] + r[1], CHOSEN_LENGTH: [n]}
             for c, r in zip(pieces[0::2], pieces[1::2])]
    return collate_pairs(pairs, [list(range(case.samples))], 0, packing=True)


# --------------------------------------------------------------------------- measuring


def measure(case: Case, model_dir: Path, device_type: str = "cpu") -> dict[str, Any]:
    """Run one warm-up step, then profile one training step; return the measured windows (bytes)."""
    from qlora_kit.ops.loss import causal_lm_loss, count_targets
    from qlora_kit.ops.precision import resolve_precision
    from qlora_kit.train import distributed
    from qlora_kit.train.builders import build_model, build_optimizer
    from qlora_kit.train.loop import backward, clip_gradients, forward_loss
    from qlora_kit.train.preference import PreferenceLoss

    def train_step(run: Any, batch: dict[str, Any]) -> None:
        """The training loop's step on one micro-batch: forward and loss, backward, clipping."""
        items = case.samples if case.method != "sft" else max(1, count_targets(batch["labels"]))
        backward(run, forward_loss(run, run.model, batch, items))
        clip_gradients(run, run.model)

    cfg = case_config(case, model_dir)
    device = torch.device(device_type)
    precision = resolve_precision(getattr(torch, case.compute_dtype), cfg.lora.adapter_dtype, device)
    torch.manual_seed(0)
    model = build_model(cfg, model_dir, precision)  # offload too, on CUDA
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(cfg, params, device)
    loss_fn = PreferenceLoss(cfg.train, model) if case.method != "sft" else causal_lm_loss
    run = SimpleNamespace(device=device, precision=precision, model=model, cfg=cfg, scaler=None,
                          optimizer=optimizer, params=params, wrapped=None, dist=distributed.SINGLE, loss_fn=loss_fn)
    train_step(run, packed_row(case, 0))  # warm-up: gradients and optimizer state exist afterwards,
    optimizer.step()  # as in every later micro-batch of a run (gradient accumulation keeps them)
    optimizer.zero_grad(set_to_none=False)
    batch = packed_row(case, 1)
    baseline = live_bytes(model, optimizer)
    add_markers(model)
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
        torch.cuda.synchronize()
    profiler = torch.profiler.profile(activities=activities, profile_memory=True)
    with profiler:
        train_step(run, batch)
        if device.type == "cuda":
            torch.cuda.synchronize()
    timeline = Timeline.from_profiler(profiler, device.type)
    return windows(timeline, baseline, case)


def live_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Bytes of the distinct storages of parameters, buffers, gradients and optimizer state."""
    storages: dict[int, int] = {}
    tensors = [*model.parameters(), *model.buffers()]
    tensors += [p.grad for p in model.parameters() if p.grad is not None]
    tensors += [v for state in optimizer.state.values() for v in state.values() if isinstance(v, torch.Tensor)]
    tensors += [t for p in model.parameters() for t in quant_state_tensors(getattr(p, "quant_state", None))]
    for t in tensors:
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


def quant_state_tensors(state: Any) -> list[torch.Tensor]:
    """The absmax/code/offset tensors of a bitsandbytes QuantState (nested state included)."""
    if state is None:
        return []
    found = [v for v in vars(state).values() if isinstance(v, torch.Tensor)]
    return found + quant_state_tensors(getattr(state, "state2", None))


def add_markers(model: torch.nn.Module) -> None:
    """Module hooks that put named markers into the profiler's timeline."""
    base = model.get_base_model().model

    def marker(name: str) -> Any:
        def hook(*_: Any) -> None:
            with torch.profiler.record_function(f"MARK:{name}"):
                pass
        return hook

    base.embed_tokens.register_forward_pre_hook(marker("forward"))
    for i, layer in enumerate(base.layers):
        layer.register_forward_pre_hook(marker(f"layer{i}_forward"))
        layer.register_forward_hook(marker(f"layer{i}_forward_end"))
    base.norm.register_forward_hook(marker("backbone_end"))
    base.norm.register_full_backward_pre_hook(marker("loss_backward_end"))
    base.layers[-1].register_full_backward_pre_hook(marker("last_layer_backward"))
    base.layers[-1].register_full_backward_hook(marker("last_layer_backward_end"))


@dataclass
class Timeline:
    """Allocator bytes in use after each event (relative to the start), and where each marker fell."""

    in_use: list[int]
    marks: dict[str, int]  # first occurrence of each marker: index into in_use
    repeats: dict[str, list[int]] = field(default_factory=dict)  # every occurrence (DPO: reference, then policy)

    @classmethod
    def from_profiler(cls, profiler: Any, device_type: str = "cpu") -> "Timeline":
        kind = torch.autograd.DeviceType.CUDA if device_type == "cuda" else torch.autograd.DeviceType.CPU
        events = []
        for e in profiler.profiler.kineto_results.events():
            if e.name() == "[memory]" and e.device_type() == kind:
                events.append((e.start_ns(), 0, e.nbytes()))
            elif e.name().startswith("MARK:"):
                events.append((e.start_ns(), 1, e.name()[5:]))
        events.sort(key=lambda ev: (ev[0], ev[1]))
        in_use, marks, repeats, current = [], {}, {}, 0
        for _, kind, value in events:
            if kind == 0:
                current += value
            else:
                marks.setdefault(value, len(in_use))
                repeats.setdefault(value, []).append(len(in_use))
            in_use.append(current)
        return cls(in_use, marks, repeats)

    def index(self, mark: str, occurrence: int = 0) -> int:
        return self.repeats[mark][occurrence] if occurrence else self.marks[mark]

    def at(self, mark: str, occurrence: int = 0) -> int:
        return self.in_use[self.index(mark, occurrence)]

    def peak(self, start: str | None = None, end: str | None = None, occurrence: int = 0) -> int:
        """Peak from ``start`` (its ``occurrence``-th time) to ``end`` (its first time after that)."""
        lo = self.index(start, occurrence) if start else 0
        hi = next(i for i in self.repeats[end] if i >= lo) + 1 if end else len(self.in_use)
        return max(self.in_use[lo:hi])


def windows(tl: Timeline, baseline: int, case: Case) -> dict[str, Any]:
    """The measured quantities the planner is compared with (bytes).

    DPO runs the model twice: the reference forward (no gradients) first, so the policy's windows
    are the second occurrence of the forward markers (``k``).
    """
    k = 0 if case.method == "sft" else 1
    per_layer = [tl.at(f"layer{i}_forward_end", k) - tl.at(f"layer{i}_forward", k) for i in range(case.layers)]
    layout = checkpointing.checkpointed_layers(case.layers, case.every_n)
    checkpointed = [per_layer[i] for i in range(case.layers) if i in layout]
    kept_whole = [per_layer[i] for i in range(case.layers) if i not in layout]
    measured = {
        "checkpoint_per_layer": sum(checkpointed) / len(checkpointed),
        "non_checkpointed_layer": sum(kept_whole) / len(kept_whole) if kept_whole else None,
        "loss": tl.peak("backbone_end", "loss_backward_end", k) - tl.at("backbone_end", k),
        "recomputed_layer": tl.peak("last_layer_backward", "last_layer_backward_end") - tl.at("last_layer_backward"),
        "static": baseline,
        "loss_phase": baseline + tl.peak("forward", "loss_backward_end", k),
        "backward_phase": baseline + tl.peak("loss_backward_end"),
        "step": baseline + tl.peak(),
    }
    if k:
        measured["reference_phase"] = baseline + max(tl.in_use[: tl.index("forward", 1)])
    return measured


# --------------------------------------------------------------------------- predicting


def predict(case: Case, model_dir: Path, device_type: str = "cpu") -> dict[str, Any]:
    """The planner's numbers for the same windows (bytes), from the config and shape alone."""
    cfg = case_config(case, model_dir)
    shape = plan_shape.load_shape_file(model_dir / "config.json")
    est = estimate.estimate(cfg, shape, device=device_type, labelled_tokens=case.labelled)
    tech = techniques.techniques(cfg, shape, device_type)
    n, s, h = case.tokens, tech.s, shape.hidden_size
    numels = terms.adapter_tensors(shape, list(tech.targets), tech.r, tech.dora)
    copies_per_layer = s * sum(numels) // shape.num_layers if tech.autocast else 0
    loss_phase, backward_phase = est.phases["loss"], est.phases["backward"]
    rows = 1 if case.method == "sft" else 2  # the estimate's sequences; one packed row holds them all
    stage = {k: backward_phase.get(k, 0) for k in ("layer_recompute", "backward_working", "dequant_buffer")}
    layer_full = sum(terms.layer_saved_bytes(shape, tech, 1, n)) if case.every_n > 1 else None
    static = sum(loss_phase[k] for k in ("nf4_weights", "weights_16bit", "lora_parameters", "lora_gradients",
                                         "optimizer_state"))
    return {
        # offloaded inputs leave the GPU once copied: not compared (the phase peaks are)
        "checkpoint_per_layer": None if tech.offload else s * h * n + copies_per_layer,
        "non_checkpointed_layer": layer_full + copies_per_layer if layer_full is not None else None,
        # the backbone's output (s*H per token) already exists when the window starts
        "loss": estimate.fused_loss_bytes(shape, tech, rows, n // rows, case.labelled) - s * h * n,
        # the gradient arriving at the layer already exists when its backward starts
        "recomputed_layer": sum(stage.values()) - s * h * n,
        "static": static,
        "loss_phase": sum(loss_phase.values()),
        "backward_phase": sum(backward_phase.values()),
        "step": est.allocated_peak,
        "backward_stage": est.stage,
        "reference_phase": sum(est.phases["reference"].values()) if "reference" in est.phases else None,
    }


def compare(case: Case, root: Path, device_type: str = "cpu") -> dict[str, Any]:
    """Measure and predict one case; rows of (measured, predicted, ratio, within tolerance)."""
    model_dir = build_model_dir(case, root)
    measured, predicted = measure(case, model_dir, device_type), predict(case, model_dir, device_type)
    rows = {}
    for key, value in measured.items():
        want = predicted.get(key)
        if value is None or want is None:
            continue
        ratio = want / value if value else float("inf")
        rows[key] = {"measured_bytes": int(value), "predicted_bytes": int(want), "predicted_over_measured":
                     round(ratio, 4), "within_tolerance": abs(ratio - 1) <= TOLERANCE}
    return {"case": asdict(case), "device": device_type, "backward_stage": predicted["backward_stage"],
            "components": rows}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--cases", nargs="+", default=None, choices=sorted(CASES),
                        help="default: every case that runs on --device")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    from qlora_kit.rundir.manifest import device_info, package_versions

    results = []
    with tempfile.TemporaryDirectory(prefix="qlora-memcheck-") as tmp:
        for name in args.cases or DEFAULT_CASES[args.device]:
            result = compare(CASES[name], Path(tmp), args.device)
            results.append(result)
            print_case(result)
    report = {
        "benchmark": "memory_check",
        "what": f"qlora_kit.plan.estimate.estimate(device='{args.device}') vs the {args.device.upper()} allocator's records of "
                "one real training step (torch profiler, profile_memory=True); bf16 autocast, fp32 adapters",
        "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": device_info(torch.device(args.device)),
        "versions": package_versions(),
        "tolerance": TOLERANCE,
        "results": results,
    }
    out = args.out or RESULTS / f"memory-check-{args.device}-{datetime.now(timezone.utc).strftime('%Y%m%dT%H%M%SZ')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")
    return 0 if all(r["within_tolerance"] for res in results for r in res["components"].values()) else 1


def print_case(result: dict[str, Any]) -> None:
    """One table per case: component, measured, predicted, ratio."""
    print(f"== {result['case']['name']} (backward peak stage: {result['backward_stage']})")
    for key, row in result["components"].items():
        flag = "" if row["within_tolerance"] else "  <-- outside tolerance"
        print(f"  {key:24s} measured {row['measured_bytes'] / 2**20:9.2f} MiB  predicted "
              f"{row['predicted_bytes'] / 2**20:9.2f} MiB  ratio {row['predicted_over_measured']:.3f}{flag}")


if __name__ == "__main__":
    sys.exit(main())
