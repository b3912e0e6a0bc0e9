"""LoRA adapters on the 4-bit base: which modules, and attaching them."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from qlora_kit.core.config import LoraConfig
from qlora_kit.core.errors import ModelError
from qlora_kit.ops.checkpointing import enable_gradient_checkpointing
from qlora_kit.variants import cast_frozen_adapter_state, peft_config


def linear_module_names(model: nn.Module) -> list[str]:
    """Leaf names of all linear layers (4-bit or not) except the output head."""
    names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    names.discard("lm_head")
    return sorted(names)


def attention_module_names(model: nn.Module) -> list[str]:
    """Leaf names of the linear layers inside attention blocks, whatever the architecture.

    Found structurally (children of modules whose class name contains ``Attention``), so
    Llama/Mistral/Qwen2/Gemma (q/k/v/o_proj), Phi-3 (qkv_proj, o_proj) and others work
    without a table of names.
    """
    names: set[str] = set()
    for module in model.modules():
        if "attention" not in type(module).__name__.lower():
            continue
        for child_name, child in module.named_children():
            if isinstance(child, nn.Linear):
                names.add(child_name)
    return sorted(names)


def resolve_target_modules(model: nn.Module, spec: str | list[str]) -> list[str] | str:
    """Turn ``lora.target_modules`` into names peft accepts.

    Raises:
        ModelError: requested names are not linear layers of this model (candidates listed).
    """
    candidates = linear_module_names(model)
    if spec == "all-linear":
        return candidates
    if spec == "attention":
        found = attention_module_names(model)
        if not found:
            raise ModelError(
                "could not find attention projections in this architecture",
                f"set lora.target_modules to some of: {', '.join(candidates)}",
            )
        return found
    missing = [name for name in spec if name not in candidates]
    if missing:
        raise ModelError(
            f"lora.target_modules {missing} are not linear layers of this model",
            f"choose from: {', '.join(candidates)} (or 'attention' / 'all-linear')",
        )
    return list(spec)


def attach_lora(model: nn.Module, cfg: LoraConfig, adapter_dtype: torch.dtype, gradient_checkpointing: bool,
                every_n_layers: float = 1, total_steps: int | None = None):
    """Add trainable adapters (``lora.type``: LoRA, AdaLoRA or VeRA, at peft's default init) in ``adapter_dtype``.

    The default LoRA init has B = 0, so the model starts unchanged; ``lora.init`` is applied
    afterwards by ``qlora_kit.variants.init``.  AdaLoRA needs ``total_steps`` (its rank budget
    schedule).  With ``gradient_checkpointing``, every ``every_n_layers``-th decoder layer is
    checkpointed (:func:`enable_gradient_checkpointing`).
    """
    from peft import get_peft_model

    targets = resolve_target_modules(model, cfg.target_modules)
    if gradient_checkpointing:
        enable_gradient_checkpointing(model, every_n_layers)
    peft_model = get_peft_model(model, peft_config(cfg, targets, total_steps), autocast_adapter_dtype=False)
    for p in peft_model.parameters():
        if p.requires_grad:
            p.data = p.data.to(adapter_dtype)
    cast_frozen_adapter_state(peft_model, adapter_dtype)
    return peft_model


def load_start_adapter(model: nn.Module, directory: Path, adapter_dtype: torch.dtype, reference: str | None) -> None:
    """Start the trainable adapter ("default") from a trained one; with ``reference``, also attach a frozen copy
    under that name (DPO's reference policy when it starts from this adapter).

    Raises:
        ModelError: the adapter's weights do not fit the attached adapters (another shape or base).
    """
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    weights = load_file(directory / "adapter_model.safetensors")
    device = next(p.device for p in model.parameters() if p.requires_grad)
    expected = {k for k, p in model.named_parameters() if p.requires_grad}
    try:
        result = set_peft_model_state_dict(model, {k: v.to(device) for k, v in weights.items()})
    except (ValueError, KeyError, RuntimeError) as exc:
        raise ModelError(f"the adapter in {directory} does not fit this model ({str(exc).splitlines()[0][:200]})",
                         "point model.adapter at a run trained on this base model", key="model.adapter") from exc
    missing = [k for k in result.missing_keys if k in expected]
    if result.unexpected_keys or missing:
        raise ModelError(f"the adapter in {directory} does not fit this model (unexpected "
                         f"{result.unexpected_keys[:3]}, missing {missing[:3]})",
                         "point model.adapter at a run trained on this base model", key="model.adapter")
    if reference is None:
        return
    model.load_adapter(str(directory), adapter_name=reference, is_trainable=False)
    for name, p in model.named_parameters():
        if f".{reference}." in name:
            p.data = p.data.to(adapter_dtype)
    model.set_adapter("default")


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; 4-bit weights count as their logical size."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = 0
    for p in model.parameters():
        total += p.numel() * 2 if p.dtype == torch.uint8 else p.numel()
    return trainable, total
