"""Peak memory of the training loss against sequence length: fused LM-head loss vs full logits (CPU).

Runs the real loss path of the training loop (``qlora_kit.ops.loss.causal_lm_loss``: backbone
forward, loss, backward) on a one-layer Llama with a **real vocabulary size** (128,256, as
Llama-3) and a small hidden size, so the loss dominates, for several sequence lengths, with
``fused_loss`` on (trl's fused LM head) and off (transformers' full-logits loss).  Memory is
measured with torch's profiler (``profile_memory=True``, ``export_memory_timeline``): the
peak of the step above what was allocated before it.  Half of each row carries labels
(assistant-only style); the lm_head is frozen, as in QLoRA.

    python benchmarks/loss_memory.py                          # T = 1K..16K fused, 1K..4K full logits
    python benchmarks/loss_memory.py --lengths 512 1024 --full-max 1024 --out /tmp/loss.json   # smoke

The full-logits path is measured only up to ``--full-max`` tokens (it needs ~1.5 GiB per 1K
tokens at this vocabulary); longer lengths are not run for it.  The JSON result (device,
versions, per-length peaks) goes to ``benchmarks/results/loss-memory-<UTC time>.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def build_model(vocab: int, hidden: int, fused: bool) -> torch.nn.Module:
    """A one-layer Llama, frozen except the final norm (so the loss back-propagates into the backbone)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from qlora_kit.ops.loss import add_fused_loss

    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    for p in model.parameters():
        p.requires_grad_(False)
    model.model.norm.weight.requires_grad_(True)
    if fused:
        add_fused_loss(model)
    model.train()
    return model


def measure(model: torch.nn.Module, length: int, fused: bool) -> dict[str, Any]:
    """Peak bytes above the baseline during one loss forward + backward at ``length`` tokens."""
    from qlora_kit.ops.loss import causal_lm_loss, count_targets

    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (1, length), generator=torch.Generator().manual_seed(length))
    labels = ids.clone()
    labels[0, : length // 2] = -100  # a masked prompt, then targets
    batch = {"input_ids": ids, "labels": labels}
    activities = [torch.profiler.ProfilerActivity.CPU]
    start = time.perf_counter()
    with torch.profiler.profile(activities=activities, profile_memory=True, record_shapes=True,
                                with_stack=True) as prof:
        loss = causal_lm_loss(model, batch, count_targets(labels), fused)
        loss.backward()
    seconds = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "timeline.json"
        prof.export_memory_timeline(str(path), device="cpu")
        _times, sizes = json.loads(path.read_text())
    totals = [sum(s) for s in sizes]
    peak = max(totals) - totals[0]
    model.zero_grad(set_to_none=True)
    return {"tokens": length, "fused_loss": fused, "peak_bytes": peak, "peak_gib": round(peak / 2**30, 3),
            "loss": round(loss.item(), 5), "seconds": round(seconds, 1)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    parser.add_argument("--full-max", type=int, default=4096, help="longest length run with full logits")
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    from qlora_kit.rundir.manifest import device_info, package_versions

    rows = []
    for fused in (True, False):
        model = build_model(args.vocab, args.hidden, fused)
        for length in args.lengths:
            if not fused and length > args.full_max:
                continue
            row = measure(model, length, fused)
            rows.append(row)
            print(json.dumps(row), flush=True)
    result = {
        "benchmark": "loss_memory",
        "what": "peak memory of one loss forward+backward (one-layer Llama, frozen lm_head), torch profiler "
                "memory timeline on CPU; fused = trl add_fused_lm_head, full = transformers ForCausalLMLoss",
        "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": device_info(torch.device("cpu")),
        "versions": package_versions(),
        "settings": {"vocab": args.vocab, "hidden": args.hidden, "labelled_fraction": 0.5,
                     "threads": args.threads, "dtype": "float32"},
        "rows": rows,
    }
    out = args.out or RESULTS / f"loss-memory-{datetime.now(timezone.utc).strftime('%Y%m%dT%H%M%SZ')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
