"""The MLP computed in sequence tiles, forward and backward.

At long sequence lengths the recomputed decoder layer's largest activations are the MLP's:
gate, activation and up, ``3 x T x intermediate`` values (14,336 wide on Llama-3-8B: 6.9
GB at 80K tokens in bf16), plus the LoRA inputs of gate/up/down when they are adapted.
:class:`TiledMLPFunction` runs the MLP tile by tile under ``no_grad`` in the forward pass
and keeps only its input; the backward pass recomputes one tile at a time with gradients
and back-propagates it at once, so one tile's intermediates are alive at any moment.
Adapter gradients (LoRA on gate/up/down, NF4 base included) accumulate into ``.grad``
during that per-tile backward.  The result equals the untiled MLP (the MLP is per-token),
up to floating-point summation order in the adapters' weight gradients.

The MLP is token-wise, so tiles can be cut anywhere along the sequence, packed rows
included.  Dropout inside the MLP (LoRA dropout) is replayed exactly: the RNG state of the
forward is restored for the recomputation.  Cost: one more MLP forward per step.

Wiring: :func:`tile_mlps` gives each decoder layer's ``mlp`` (dense MLPs only, class name
ending in ``MLP``) a tiled ``forward`` on the instance; parameter names, state dicts and
the adapters are unchanged.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any, Callable, Iterator

import torch
from torch import nn

log = logging.getLogger("qlora_kit")

MLP_TILE_TOKENS = 4096  # tokens per tile: 4096 x 14336 x 3 bf16 values = 336 MiB on Llama-3-8B


class TiledMLPFunction(torch.autograd.Function):
    """``forward_fn(x)`` over ``tile_tokens``-long slices of dim -2, recomputed per tile in the backward.

    ``params`` (the MLP's trainable parameters) are inputs only so that autograd calls the
    backward when nothing but the adapters needs a gradient; their gradients are
    accumulated into ``.grad`` by the per-tile backward, and None is returned for them.
    """

    @staticmethod
    def forward(ctx: Any, forward_fn: Callable[[torch.Tensor], torch.Tensor], tile_tokens: int, x: torch.Tensor,
                *params: torch.Tensor) -> torch.Tensor:
        ctx.forward_fn, ctx.tile_tokens, ctx.n_params = forward_fn, tile_tokens, len(params)
        ctx.rng = _rng_state(x.device)
        ctx.autocast = _autocast_state(x.device)
        ctx.save_for_backward(x)
        with torch.no_grad():
            return torch.cat([forward_fn(tile) for tile in x.detach().split(tile_tokens, dim=-2)], dim=-2)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        (x,) = ctx.saved_tensors
        needs_x = ctx.needs_input_grad[2]
        grad_x = torch.empty_like(x) if needs_x else None
        tiles = zip(x.detach().split(ctx.tile_tokens, dim=-2), grad_out.split(ctx.tile_tokens, dim=-2))
        with _restored_rng(x.device, ctx.rng), torch.enable_grad(), _autocast(x.device, ctx.autocast):
            start = 0
            for tile, grad_tile in tiles:
                tile = tile.requires_grad_(needs_x)
                out = ctx.forward_fn(tile)
                torch.autograd.backward(out, grad_tile)
                if grad_x is not None:
                    grad_x.narrow(-2, start, tile.shape[-2]).copy_(tile.grad)
                start += tile.shape[-2]
        return (None, None, grad_x) + (None,) * ctx.n_params


def tiled_forward(module: nn.Module, forward_fn: Callable[[torch.Tensor], torch.Tensor],
                  tile_tokens: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """A drop-in ``forward(x)`` for ``module`` that runs ``forward_fn`` in sequence tiles.

    The tile length is read from the module at each call (``_qlora_kit_tile_tokens``, set to
    ``tile_tokens`` here) so :func:`tile_length` can shorten it for the start-up check.
    """
    module._qlora_kit_tile_tokens = tile_tokens

    def forward(x: torch.Tensor) -> torch.Tensor:
        tile_tokens = module._qlora_kit_tile_tokens
        if x.shape[-2] <= tile_tokens:
            return forward_fn(x)
        params = [p for p in module.parameters() if p.requires_grad]
        if torch.is_grad_enabled() and (x.requires_grad or params):
            return TiledMLPFunction.apply(forward_fn, tile_tokens, x, *params)
        return torch.cat([forward_fn(tile) for tile in x.split(tile_tokens, dim=-2)], dim=-2)

    return forward


def tile_mlps(model: nn.Module, tile_tokens: int | None = None) -> int:
    """Give every dense decoder MLP (a child named ``mlp`` of class ``*MLP``) a tiled forward.

    ``tile_tokens`` defaults to :data:`MLP_TILE_TOKENS`.

    Returns the number of MLPs tiled (0 for architectures without one, e.g. mixtures of
    experts, which are logged and left as they are).
    """
    tile_tokens = tile_tokens or MLP_TILE_TOKENS
    count, skipped = 0, set()
    for name, module in model.named_modules():
        if not name.endswith(".mlp") and name != "mlp":
            continue
        if not type(module).__name__.endswith("MLP"):
            skipped.add(type(module).__name__)
            continue
        if getattr(module, "_qlora_kit_tiled", False):
            continue
        module._qlora_kit_untiled = module.forward
        module.forward = tiled_forward(module, module.forward, tile_tokens)
        module._qlora_kit_tiled = True
        count += 1
    if skipped:
        log.warning("tiled_mlp: %s blocks are not dense MLPs and stay untiled", ", ".join(sorted(skipped)))
    return count


def tiled_mlps(model: nn.Module) -> list[nn.Module]:
    """The MLPs :func:`tile_mlps` gave a tiled forward."""
    return [m for m in model.modules() if getattr(m, "_qlora_kit_tiled", False)]


def untile_mlps(model: nn.Module) -> int:
    """Give every tiled MLP its own forward back (the tiled MLP switched off for the run); returns how many."""
    mlps = tiled_mlps(model)
    for module in mlps:
        module.forward = module._qlora_kit_untiled
        del module._qlora_kit_untiled, module._qlora_kit_tile_tokens
        module._qlora_kit_tiled = False
    return len(mlps)


@contextlib.contextmanager
def untiled(model: nn.Module) -> Iterator[None]:
    """Run the block with the plain MLP forward (the reference the tiled MLP is checked against)."""
    mlps = tiled_mlps(model)
    tiled = [m.forward for m in mlps]
    for module in mlps:
        module.forward = module._qlora_kit_untiled
    try:
        yield
    finally:
        for module, forward in zip(mlps, tiled):
            module.forward = forward


@contextlib.contextmanager
def tile_length(model: nn.Module, tokens: int) -> Iterator[None]:
    """Run the block with tiles of ``tokens`` tokens, so that a short input is cut into several."""
    mlps = tiled_mlps(model)
    lengths = [m._qlora_kit_tile_tokens for m in mlps]
    for module in mlps:
        module._qlora_kit_tile_tokens = tokens
    try:
        yield
    finally:
        for module, length in zip(mlps, lengths):
            module._qlora_kit_tile_tokens = length


# --------------------------------------------------------------------------- RNG / autocast replay


def _rng_state(device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


@contextlib.contextmanager
def _restored_rng(device: torch.device, state: tuple[torch.Tensor, torch.Tensor | None]) -> Iterator[None]:
    """Run the block with the forward's RNG state; the global RNG is left as it was."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.set_rng_state(state[0])
        if state[1] is not None:
            torch.cuda.set_rng_state(state[1], device)
        yield


def _autocast_state(device: torch.device) -> tuple[bool, torch.dtype]:
    return torch.is_autocast_enabled(device.type), torch.get_autocast_dtype(device.type)


def _autocast(device: torch.device, state: tuple[bool, torch.dtype]) -> torch.autocast:
    return torch.autocast(device.type, dtype=state[1], enabled=state[0])
