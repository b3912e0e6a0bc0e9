"""Several GPUs: what DDP and FSDP(-offload) change in one GPU's memory."""

from __future__ import annotations

import contextlib
import contextvars
import math
from dataclasses import dataclass
from typing import Any

from qlora_kit.plan.shape import ModelShape, linear_layers
from qlora_kit.plan.techniques import Techniques
from qlora_kit.plan.terms import adapter_components, nf4_bytes

STRATEGIES = ("ddp", "fsdp", "fsdp-offload")
FSDP_GATHERED_LAYERS = 2  # decoder layers unsharded at once: the one computing + the one prefetched


@dataclass(frozen=True)
class Parallel:
    """How many GPUs train together and how: ``ddp`` (whole model per GPU) or ``fsdp`` (sharded)."""

    gpus: int = 1
    strategy: str = "ddp"  # "ddp", "fsdp" or "fsdp-offload"

    @property
    def fsdp(self) -> bool:
        return self.strategy.startswith("fsdp")

    @property
    def single(self) -> bool:
        return self.gpus == 1 and not self.fsdp

    def label(self) -> str:
        names = {"ddp": "DDP", "fsdp": "FSDP", "fsdp-offload": "FSDP + CPU offload"}
        return "1 GPU" if self.single else f"{self.gpus} GPUs, {names[self.strategy]}, per GPU"


PARALLEL: contextvars.ContextVar[Parallel] = contextvars.ContextVar("qlora_kit_parallel", default=Parallel())


@contextlib.contextmanager
def planning_for(parallel: Parallel) -> Any:
    """Plan every estimate inside the block per GPU of ``parallel`` (resolve_auto, fits, suggest included)."""
    token = PARALLEL.set(parallel)
    try:
        yield parallel
    finally:
        PARALLEL.reset(token)


def parallel_components(shape: ModelShape, tech: "Techniques", numels: list[int], parallel: Parallel
                        ) -> tuple[dict[str, int], dict[str, int] | None, int]:
    """Per-GPU terms of a multi-GPU run: (static terms replacing the single-GPU ones, the load phase when it
    differs from one GPU's, host bytes per rank)."""
    lora = adapter_components(numels, tech)
    if not parallel.fsdp:
        return ({"ddp_gradient_buckets": lora["lora_gradients"]} if parallel.gpus > 1 else {}), None, 0
    n, s, h, L = parallel.gpus, tech.s, shape.hidden_size, shape.num_layers
    layers = linear_layers(shape).values()
    packed = sum(math.ceil(lin.numel / 2) for lin in layers)  # per decoder layer: the sharded 4-bit values
    constants = sum(nf4_bytes(lin.numel, tech.double_quant) - math.ceil(lin.numel / 2) for lin in layers)
    norms = 2 * h + (shape.q_dim + 2 * shape.kv_dim if shape.qkv_bias else 0) + (2 * shape.head_dim if shape.qk_norm
                                                                               else 0)
    root = shape.vocab_size * h * (1 if shape.tie_word_embeddings else 2) + h
    layer_bytes = packed + s * norms
    offload = parallel.strategy == "fsdp-offload"
    shards = {"nf4": L * packed // n, "norms": L * s * norms // n, **{k: v // n for k, v in lora.items()}}
    components = {
        "nf4_weights": L * constants + (0 if offload else shards["nf4"]),
        "weights_16bit": s * root + (0 if offload else shards["norms"]),
        "fsdp_gathered_layers": FSDP_GATHERED_LAYERS * layer_bytes,
        **{k: 0 if offload else shards[k] for k in lora},
    }
    if not offload:
        return components, None, 0
    # Offloaded: loaded on the CPU, each unit moved to the GPU only while FSDP shards it (distributed.load_device).
    load = {"nf4_weights": L * constants, "weights_16bit": s * root,
            "fsdp_gathered_layers": FSDP_GATHERED_LAYERS * layer_bytes}
    whole = L * (packed + constants + s * norms) + s * root  # the 4-bit model in host memory while loading
    return components, load, max(sum(shards.values()), whole)
