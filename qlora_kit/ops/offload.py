"""Activation offload: checkpointed layer inputs in pinned host memory, copied on a side stream.

With gradient checkpointing every decoder layer keeps one tensor for the backward pass,
its input (``T x hidden`` values: 256 KiB per token on Llama-3.1-8B, 20 GiB at 80K tokens).
:class:`ActivationOffload` is a pair of ``saved_tensors_hooks`` placed around each
checkpointed layer (:func:`offloading_checkpoint`), where they see exactly the inputs the
non-reentrant checkpoint saves (everything the layer saves inside is already handled by
the checkpoint itself):

- forward (``pack``): the side stream waits for the compute stream, copies the input into
  pinned host memory without blocking, and the device block is released once the copy is
  done (``record_stream``): the compute stream never waits;
- backward (``unpack``): the layer being recomputed gets its input back (already on the
  device when prefetched), and the copy of the *previous* layer's input starts at once on
  the side stream, so it overlaps with this layer's recomputation and backward.

Device memory held for checkpoints: the input of the layer being recomputed plus one
prefetched input, instead of one per layer.  transformers'
``activation_checkpointing_enable(offload=True)`` (torch's ``save_on_cpu``) copies
synchronously on the compute stream in both directions; this is the overlapped version.

On CPU the same bookkeeping runs with plain copies and no streams (``ActivationOffload(
torch.device("cpu"))``), which is what the CPU tests exercise; training on CPU never
offloads (activations are already in host memory).
"""

from __future__ import annotations

import contextlib
import logging
import weakref
from collections import Counter
from typing import Any, Callable, Iterator

import torch
from torch import nn

from qlora_kit.ops.checkpointing import set_checkpointed_layers

log = logging.getLogger("qlora_kit")

MIN_OFFLOAD_BYTES = 1 << 20  # smaller saved tensors stay where they are (copy overhead > gain)


class _Offloaded:
    """A saved tensor living in host memory, and its device copy once fetched."""

    __slots__ = ("host", "device", "index", "fetched", "fetch_done", "__weakref__")

    def __init__(self, host: torch.Tensor, device: torch.device, index: int):
        self.host = host
        self.device = device
        self.index = index
        self.fetched: torch.Tensor | None = None
        self.fetch_done: Any = None  # torch.cuda.Event on CUDA


class ActivationOffload:
    """``pack``/``unpack`` hooks that keep saved tensors in host memory between forward and backward.

    Args:
        device: where the activations live; CUDA gets a side stream and pinned buffers.
        min_bytes: tensors smaller than this are not offloaded.
        prefetch: fetch the previous layer's input while the current one is recomputed.
    """

    def __init__(self, device: torch.device, min_bytes: int = MIN_OFFLOAD_BYTES, prefetch: bool = True):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.stream = torch.cuda.Stream(self.device) if self.cuda else None
        self.min_bytes = min_bytes
        self.prefetch = prefetch
        self.items: list[weakref.ReferenceType[_Offloaded]] = []
        self.backward_started = False
        self.stats: Counter[str] = Counter()

    # ------------------------------------------------------------------ hooks

    def pack(self, tensor: torch.Tensor) -> Any:
        """Start the copy of ``tensor`` to host memory; return a handle (or the tensor itself if kept)."""
        if not self._worth_offloading(tensor):
            return tensor
        if self.backward_started:  # the first save of a new forward pass: a new sequence of layers
            self.items.clear()
            self.backward_started = False
        host = torch.empty_like(tensor, device="cpu", pin_memory=self.cuda)
        with self._side_stream(wait_for_compute=True):
            host.copy_(tensor, non_blocking=self.cuda)
        if self.cuda:
            tensor.record_stream(self.stream)  # the device block is reused only after the copy
        item = _Offloaded(host, tensor.device, len(self.items))
        self.items.append(weakref.ref(item))
        self.stats["offloaded"] += 1
        self.stats["offloaded_bytes"] += tensor.numel() * tensor.element_size()
        return item

    def unpack(self, item: Any) -> torch.Tensor:
        """The saved tensor back on its device; starts fetching the one needed next."""
        if not isinstance(item, _Offloaded):
            return item
        self.backward_started = True
        if item.fetched is None:
            self._fetch(item)
            self.stats["fetched_on_demand"] += 1
        else:
            self.stats["prefetched"] += 1
        tensor, done = item.fetched, item.fetch_done
        item.fetched = item.fetch_done = None
        if self.cuda:
            compute = torch.cuda.current_stream(self.device)
            compute.wait_event(done)
            tensor.record_stream(compute)
        if self.prefetch:
            self._prefetch_before(item.index)
        return tensor

    # ------------------------------------------------------------------ helpers

    def _worth_offloading(self, tensor: torch.Tensor) -> bool:
        if isinstance(tensor, nn.Parameter) or tensor.device.type != self.device.type:
            return False
        return tensor.numel() * tensor.element_size() >= self.min_bytes

    def _fetch(self, item: _Offloaded) -> None:
        """Queue the host-to-device copy of ``item`` on the side stream (plain copy on CPU)."""
        with self._side_stream(wait_for_compute=False):
            device_copy = torch.empty_like(item.host, device=item.device)
            device_copy.copy_(item.host, non_blocking=self.cuda)
            item.fetch_done = self.stream.record_event() if self.cuda else None
        item.fetched = device_copy

    def _prefetch_before(self, index: int) -> None:
        """Fetch the nearest earlier item still alive (the next layer the backward reaches)."""
        for k in range(index - 1, -1, -1):
            earlier = self.items[k]()
            if earlier is not None:
                if earlier.fetched is None:
                    self._fetch(earlier)
                return

    @contextlib.contextmanager
    def _side_stream(self, wait_for_compute: bool) -> Iterator[None]:
        if not self.cuda:
            yield
            return
        if wait_for_compute:
            self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):
            yield


def offloading_checkpoint(offload: ActivationOffload, **checkpoint_kwargs: Any) -> Callable[..., Any]:
    """A gradient-checkpointing function whose saved layer inputs go through ``offload``."""
    from torch.utils.checkpoint import checkpoint

    kwargs = {"use_reentrant": False, **checkpoint_kwargs}

    def checkpoint_offloaded(function: Callable[..., Any], *args: Any, **call_kwargs: Any) -> Any:
        with torch.autograd.graph.saved_tensors_hooks(offload.pack, offload.unpack):
            return checkpoint(function, *args, **kwargs, **call_kwargs)

    return checkpoint_offloaded


def enable_offload(model: nn.Module, offload: ActivationOffload, every_n_layers: float = 1) -> None:
    """Make ``model``'s checkpointed decoder layers offload their inputs through ``offload``.

    Uses transformers' own switch for the checkpointing function
    (``_set_gradient_checkpointing(gradient_checkpointing_func=...)``, what
    ``activation_checkpointing_enable`` calls); checkpointing must already be enabled. The same
    layers stay checkpointed (``model.set_checkpointed_layers``, also for a fractional n).
    """

    base = _base(model)
    plain = checkpoint_functions(base)
    base._set_gradient_checkpointing(enable=True, gradient_checkpointing_func=offloading_checkpoint(offload))
    set_checkpointed_layers(base, every_n_layers)
    base._qlora_kit_offload = (offload, plain)


def offload_of(model: nn.Module) -> ActivationOffload | None:
    """The :class:`ActivationOffload` :func:`enable_offload` gave ``model`` (None when it has none)."""
    found = getattr(_base(model), "_qlora_kit_offload", None)
    return found[0] if found else None


def disable_offload(model: nn.Module) -> None:
    """Give the checkpointed layers back the checkpointing function they had before :func:`enable_offload`."""
    base = _base(model)
    _, plain = base.__dict__.pop("_qlora_kit_offload")
    _set_checkpoint_functions(plain)


@contextlib.contextmanager
def without_offload(model: nn.Module) -> Iterator[None]:
    """Run the block with plain checkpointing (the reference offload is checked against)."""
    base = _base(model)
    _, plain = base._qlora_kit_offload
    offloaded = checkpoint_functions(base)
    _set_checkpoint_functions(plain)
    try:
        yield
    finally:
        _set_checkpoint_functions(offloaded)


@contextlib.contextmanager
def offloading_everything(model: nn.Module) -> Iterator[ActivationOffload]:
    """Run the block with every saved layer input offloaded, however small (a short check input is too)."""
    offload = offload_of(model)
    if offload is None:
        raise ValueError("this model does not offload activations")
    before, offload.min_bytes = offload.min_bytes, 0
    try:
        yield offload
    finally:
        offload.min_bytes = before


def checkpoint_functions(model: nn.Module) -> list[tuple[nn.Module, Any]]:
    """(module, its checkpointing function) for every module transformers gave one."""
    return [(m, m._gradient_checkpointing_func) for m in model.modules() if hasattr(m, "_gradient_checkpointing_func")]


def _set_checkpoint_functions(functions: list[tuple[nn.Module, Any]]) -> None:
    for module, function in functions:
        module._gradient_checkpointing_func = function


def _base(model: nn.Module) -> nn.Module:
    return model.get_base_model() if hasattr(model, "get_base_model") else model
