"""Gradient checkpointing: which decoder layers recompute their activations."""

from __future__ import annotations

import contextlib
import logging
import math
from typing import Iterator

from torch import nn

log = logging.getLogger("qlora_kit")


def checkpointed_layers(num_layers: int, every_n: float) -> list[int]:
    """The decoder layers checkpointed when every ``every_n``-th is: ``ceil(L / n)`` layers spread evenly.

    An integer n gives transformers' own layout (layers 0, n, 2n, ...); a fractional one (what
    ``auto`` may choose, e.g. 32/19 for 19 of 32 layers) fills the gap between n = 1 (all) and n = 2 (half).
    """
    return [i for i in range(num_layers) if i == 0 or math.floor(i / every_n) > math.floor((i - 1) / every_n)]


def every_n_for(num_layers: int, count: int) -> float:
    """The every-n that checkpoints ``count`` of ``num_layers`` layers: an int when one does, else L / count
    rounded to 4 decimals (kept readable in logs and manifests; nudged until it gives exactly ``count``)."""
    whole = math.ceil(num_layers / count)
    if len(checkpointed_layers(num_layers, whole)) == count:
        return whole
    n = round(num_layers / count, 4)
    while len(checkpointed_layers(num_layers, n)) > count:
        n = round(n + 1e-4, 4)
    while len(checkpointed_layers(num_layers, n)) < count:
        n = round(n - 1e-4, 4)
    return n


def enable_gradient_checkpointing(model: nn.Module, every_n_layers: float = 1) -> None:
    """Non-reentrant activation checkpointing of every ``every_n_layers``-th decoder layer (transformers'
    ``activation_checkpointing_enable``; adapters get gradients without an input-grad hook), no KV cache."""
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    chosen, total = len(set_checkpointed_layers(model, every_n_layers)), len(checkpointable_layers(model))
    if chosen < total:
        log.info("activation checkpointing: %d of %d decoder layers (the other %d keep their activations: "
                 "not recomputed)", chosen, total, total - chosen)
    model.config.use_cache = False


def checkpointable_layers(model: nn.Module) -> list[nn.Module]:
    """The decoder layers transformers can checkpoint (``GradientCheckpointingLayer``), in its order."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


def set_checkpointed_layers(model: nn.Module, every_n_layers: float) -> list[int]:
    """Checkpoint exactly the decoder layers of :func:`qlora_kit.plan.checkpointed_layers` (what the planner
    counted); return them.

    transformers numbers its checkpointable layers (``GradientCheckpointingLayer``) in module order and
    takes only integer steps; its per-layer ``gradient_checkpointing`` switch is set here the same way for
    a fractional n too (an integer n gives transformers' own layout).
    """

    layers = checkpointable_layers(model)
    chosen = checkpointed_layers(len(layers), every_n_layers)
    for i, layer in enumerate(layers):
        layer.gradient_checkpointing = i in chosen
    return chosen


def layout(model: nn.Module) -> list[int]:
    """The decoder layers checkpointed now (indices in :func:`checkpointable_layers` order)."""
    return [i for i, layer in enumerate(checkpointable_layers(model)) if layer.gradient_checkpointing]


@contextlib.contextmanager
def every_layer_checkpointed(model: nn.Module) -> Iterator[None]:
    """Run the block with every decoder layer checkpointed (the reference a sparser layout is checked against)."""
    layers = checkpointable_layers(model)
    before = [layer.gradient_checkpointing for layer in layers]
    for layer in layers:
        layer.gradient_checkpointing = True
    try:
        yield
    finally:
        for layer, value in zip(layers, before):
            layer.gradient_checkpointing = value
