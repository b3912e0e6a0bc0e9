"""Adapter inits on the 4-bit base: LoftQ, PiSSA, OLoRA and LoRA-GA (``lora.init``).

Each target module's 16-bit weight W is read from the source checkpoint (the weights the
loader quantised), in float32 on the training device:

* ``loftq``: A, B from the rank-r SVD of the NF4 error W - deq(NF4(W)), divided by the LoRA
  scale so that scale * B @ A is that low-rank part (LoftQ on an already-quantised base, the
  semantics of peft's ``replace_lora_weights_loftq``).  With ``loftq_iter`` > 1 the LoftQ
  alternation continues: the base becomes NF4(W - scale * B @ A) and the factors are refitted.
* ``pissa`` / ``olora`` / ``lora_ga``: A, B from peft's own per-layer init (SVD of W, QR of W,
  SVD of the estimated gradient of W) run on a float copy of W; the base becomes
  NF4(W - scale * B @ A), quantised like the loader quantises (same bitsandbytes call, from the
  same load dtype), so the model starts at W up to the NF4 error of the residual.

B and A are rounded to the adapter dtype before the residual is formed, so the residual is
exactly the complement of the adapter that trains.  DoRA magnitudes are recomputed afterwards.
The LoRA-GA gradient of each target weight is accumulated from forward hooks (input) and
output-gradient hooks (dL/dy): dL/dW = sum over tokens of dy^T x, in float32; with
``lora.loraga_passes`` > 1 the targets are split into groups and the samples re-run per group,
each group's factors taken before the next group's gradients are allocated (same init, the
memory of one group).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from torch import nn

from qlora_kit.core.config import LoraConfig
from qlora_kit.core.errors import ModelError
from qlora_kit.core.safetensors import read_source_index, source_files
from qlora_kit.variants import changes_base

log = logging.getLogger("qlora_kit")

PEFT_PREFIX = "base_model.model."


@dataclass
class InitReport:
    """What an init did: modules whose base changed, and how long it took."""

    init: str
    modules: list[str] = field(default_factory=list)
    changed_base: list[str] = field(default_factory=list)
    seconds: float = 0.0
    source: str = "16-bit source weights"

    def to_json(self) -> dict[str, Any]:
        return {"init": self.init, "modules": len(self.modules), "base_changed_modules": len(self.changed_base),
                "seconds": round(self.seconds, 2), "weights": self.source}


class SourceWeights:
    """Tensors of the base checkpoint, read one at a time (safetensors, no pickle)."""

    def __init__(self, source_dir: Path):
        self.index = {t.name: t.file for t in read_source_index(source_files(source_dir))}

    def get(self, module: nn.Module, name: str, device: torch.device) -> torch.Tensor | None:
        """float32 16-bit weight of the 4-bit ``module`` (HF module ``name``), or None when the checkpoint has no
        floating-point tensor of its shape (renamed, fused or pre-quantised weights)."""
        from safetensors import safe_open

        file = self.index.get(f"{name}.weight")
        if file is None:
            return None
        with safe_open(str(file), framework="pt") as fh:
            tensor = fh.get_tensor(f"{name}.weight")
        if not tensor.is_floating_point() or tuple(tensor.shape) != (module.out_features, module.in_features):
            return None
        return tensor.to(device=device, dtype=torch.float32)


def estimate_gradients(model: nn.Module, modules: dict[str, nn.Module], batches: Iterable[dict[str, Any]],
                       summed_loss: Callable[[dict[str, Any]], torch.Tensor], n_items: int) -> dict[str, torch.Tensor]:
    """dL/dW (float32, on each weight's device) of the 4-bit ``modules`` (name → layer), L the mean token loss.

    The base is frozen and quantised, so W has no gradient of its own: a forward hook keeps
    each target's input x and hooks the gradient of its output dy, and dy^T x is accumulated.
    ``summed_loss(batch)`` runs ``model`` on a batch and returns its *summed* token loss; the sum
    over ``batches`` is divided by ``n_items`` at the end, in float32 (so fp16 activations do not
    see gradients ``n_items`` times smaller).
    """
    grads = {n: torch.zeros(m.out_features, m.in_features, dtype=torch.float32, device=m.weight.device)
             for n, m in modules.items()}
    handles = [m.register_forward_hook(_capture(grads[n])) for n, m in modules.items()]
    was_training = model.training
    model.train()
    model.enable_input_require_grads()
    try:
        for batch in batches:
            with torch.enable_grad():
                summed_loss(batch).backward()
    finally:
        for h in handles:
            h.remove()
        model.disable_input_require_grads()
        model.train(was_training)
    for g in grads.values():
        g.div_(n_items)
    return grads


def split_passes(modules: dict[str, nn.Module], passes: int) -> list[list[str]]:
    """The names of ``modules`` (in model order) cut into at most ``passes`` contiguous groups of about equal size."""
    names = list(modules)
    sizes = [modules[n].out_features * modules[n].in_features for n in names]
    target = sum(sizes) / passes
    groups: list[list[str]] = [[]]
    used = 0
    for name, size in zip(names, sizes):
        if groups[-1] and used + size > target * 1.0001 and len(groups) < passes:
            groups.append([])
            used = 0
        groups[-1].append(name)
        used += size
    return groups


def loraga_factors(model: nn.Module, lora: LoraConfig, batches: list[dict[str, Any]],
                   summed_loss: Callable[[dict[str, Any]], torch.Tensor], n_items: int, source_dir: Path
                   ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """LoRA-GA's (A, B) for every adapted 4-bit module of the peft ``model``, by HF module name.

    The gradient is the base model's (adapters disabled while ``summed_loss`` runs), estimated
    in ``lora.loraga_passes`` groups; each group's factors are taken (peft's ``lora_ga_init`` on
    the 16-bit weight) before the next group's gradients exist.
    """
    bases = {name: layer.get_base_layer() for name, layer in lora_layers(model).items()}
    weights = SourceWeights(source_dir)
    factors = {}
    groups = split_passes(bases, lora.loraga_passes)
    for i, group in enumerate(groups):
        if len(groups) > 1:
            log.info("lora.init=lora_ga: gradient pass %d of %d (%d modules)", i + 1, len(groups), len(group))
        with model.disable_adapter():
            grads = estimate_gradients(model, {n: bases[n] for n in group}, batches, summed_loss, n_items)
        for name in group:
            w = weights.get(bases[name], name, grads[name].device)
            factors[name] = peft_factors(dequantised(bases[name]) if w is None else w, lora, grads.pop(name))
    return factors


def _capture(acc: torch.Tensor):
    def hook(_module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        if not (torch.is_grad_enabled() and output.requires_grad):
            return
        x = args[0].detach()

        def add(grad_out: torch.Tensor) -> None:
            acc.addmm_(grad_out.reshape(-1, grad_out.shape[-1]).float().T, x.reshape(-1, x.shape[-1]).float())

        # With non-reentrant checkpointing the layer runs twice; only the first output receives a gradient.
        output.register_hook(add)

    return hook


def peft_factors(weight: torch.Tensor, lora: LoraConfig, grad: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) from peft's per-layer init (pissa / olora / lora_ga) on a float32 copy of ``weight``."""
    from peft import LoraConfig as PeftLoraConfig
    from peft.tuners.lora.config import LoraGAConfig
    from peft.tuners.lora.layer import Linear as PeftLinear

    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device=weight.device, dtype=torch.float32)
    linear.weight.data = weight.clone()
    if grad is not None:
        linear._peft_loraga_grad = grad
    config = PeftLoraConfig(r=lora.r, lora_alpha=lora.alpha, use_rslora=lora.use_rslora, init_lora_weights=lora.init,
                            lora_ga_config=LoraGAConfig() if lora.init == "lora_ga" else None)
    layer = PeftLinear(linear, "default", config=config, r=lora.r, lora_alpha=lora.alpha)
    return layer.lora_A["default"].weight.detach(), layer.lora_B["default"].weight.detach()


def lowrank_factors(residual: torch.Tensor, r: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) with scale * B @ A = the best rank-r approximation of ``residual`` (LoftQ's SVD step)."""
    u, s, vh = torch.linalg.svd(residual, full_matrices=False)
    root = s[:r].sqrt() / scale**0.5
    return root.unsqueeze(1) * vh[:r], u[:, :r] * root


def dequantised(layer: nn.Module) -> torch.Tensor:
    """The float32 weight a bitsandbytes 4-bit layer computes with."""
    import bitsandbytes.functional as bnbf

    w = layer.weight
    return bnbf.dequantize_4bit(w.data, w.quant_state).float()


def requantise(layer: nn.Module, weight: torch.Tensor, load_dtype: torch.dtype) -> None:
    """Replace a 4-bit layer's weight by NF4(``weight``), quantised as the loader quantises (same settings)."""
    import bitsandbytes as bnb

    old = layer.weight  # Params4bit quantises in .to(device), like the loader
    new = bnb.nn.Params4bit(weight.to(dtype=load_dtype), requires_grad=False, quant_type=old.quant_type,
                            blocksize=old.blocksize, compress_statistics=old.compress_statistics,
                            quant_storage=old.quant_storage, module=layer)
    layer.weight = new.to(old.device)


def lora_layers(model: nn.Module) -> dict[str, nn.Module]:
    """peft LoRA layers on 4-bit bases, by HF module name."""
    import bitsandbytes as bnb
    from peft.tuners.lora import LoraLayer

    found = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and isinstance(module.get_base_layer(), bnb.nn.Linear4bit):
            found[name.removeprefix(PEFT_PREFIX)] = module
    return found


def initialise(model: nn.Module, lora: LoraConfig, source_dir: Path, load_dtype: torch.dtype,
               loraga: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None) -> InitReport:
    """Apply ``lora.init`` to every adapted 4-bit module of a peft model, in place.

    ``loraga``: LoRA-GA's factors per module (``loraga_factors``: the base model's gradient, adapters disabled).

    Raises:
        ModelError: r larger than a target matrix allows, or LoRA-GA factors are missing.
    """
    started = time.perf_counter()
    report = InitReport(lora.init)
    weights = SourceWeights(source_dir)
    layers = lora_layers(model)
    for i, (name, layer) in enumerate(layers.items()):
        _init_module(name, layer, lora, weights, load_dtype, loraga, report)
        if (i + 1) % 50 == 0:
            log.info("lora.init=%s: %d of %d modules", lora.init, i + 1, len(layers))
    report.seconds = time.perf_counter() - started
    log.info("lora.init=%s: %d modules in %.1f s%s", lora.init, len(report.modules), report.seconds,
             f", NF4 residual base of {len(report.changed_base)} modules" if report.changed_base else "")
    return report


@torch.no_grad()
def _init_module(name: str, layer: nn.Module, lora: LoraConfig, weights: SourceWeights, load_dtype: torch.dtype,
                 loraga: dict[str, tuple[torch.Tensor, torch.Tensor]] | None, report: InitReport) -> None:
    base = layer.get_base_layer()
    a_param, b_param = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    if lora.r > min(base.in_features, base.out_features):
        raise ModelError(f"lora.init={lora.init} needs lora.r <= min(in, out) of every target, but {name} is "
                         f"{base.out_features}x{base.in_features} and lora.r is {lora.r}",
                         "lower lora.r, or target other modules")
    device = a_param.device
    w = weights.get(base, name, device)
    if w is None:  # a renamed/fused/pre-quantised tensor: fall back to the weights the model holds
        w = dequantised(base)
        report.source = "dequantised NF4 weights (some 16-bit tensors not found)"
    scale = float(layer.scaling["default"])
    if lora.init == "loftq":
        a, b = _loftq(base, w, lora, scale, load_dtype, a_param.dtype)
    else:
        if lora.init == "lora_ga":
            if name not in (loraga or {}):
                raise ModelError(f"lora.init=lora_ga has no gradient estimate for {name}")
            a, b = loraga[name]
        else:
            a, b = peft_factors(w, lora)
        a, b = a.to(a_param.dtype), b.to(b_param.dtype)
        requantise(base, w - scale * (b.float() @ a.float()), load_dtype)
    a_param.data = a.to(a_param.dtype).contiguous()
    b_param.data = b.to(b_param.dtype).contiguous()
    if "default" in getattr(layer, "lora_magnitude_vector", {}):
        _reinit_dora(layer, scale)
    report.modules.append(name)
    if changes_base(lora):
        report.changed_base.append(name)


def _loftq(base: nn.Module, w: torch.Tensor, lora: LoraConfig, scale: float, load_dtype: torch.dtype,
           dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """LoftQ on the loaded NF4 base: fit the error, and with loftq_iter > 1 re-quantise and refit."""
    for step in range(lora.loftq_iter):
        a, b = lowrank_factors(w - dequantised(base), lora.r, scale)
        a, b = a.to(dtype), b.to(dtype)
        if step + 1 == lora.loftq_iter:
            return a, b
        requantise(base, w - scale * (b.float() @ a.float()), load_dtype)
    raise AssertionError("unreachable")


def _reinit_dora(layer: nn.Module, scale: float) -> None:
    """DoRA's magnitude = row norms of the (new) base + scale * B @ A, as peft computes it at creation."""
    magnitude = layer.lora_magnitude_vector["default"]
    dtype = magnitude.weight.dtype
    magnitude.update_layer(base_layer=layer.get_base_layer(), lora_A=layer.lora_A["default"].weight,
                           lora_B=layer.lora_B["default"].weight, scaling=scale)
    magnitude.weight.data = magnitude.weight.data.to(dtype)
