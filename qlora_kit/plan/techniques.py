"""Which memory techniques a config uses, with "auto" settings at their conservative choice."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from qlora_kit.core.config import Config
from qlora_kit.plan.shape import ModelShape, resolve_targets


@dataclass(frozen=True)
class Techniques:
    """The memory-relevant choices of one run, concrete (no ``"auto"``), as ``train`` applies them."""

    device: str  # "cuda" or "cpu": which kernels run (loss fold, attention, dropout masks)
    s: int  # bytes per activation value: the compute dtype
    adapter_bytes: int  # bytes per adapter weight and per adapter gradient (the master copy)
    autocast: bool  # 16-bit compute with fp32 adapters: autocast caches 16-bit adapter copies
    attention: str  # "flash" (CUDA, 16-bit), "sdpa_cpu" (per-sample SDPA), "math" (T*T scores)
    packed: bool
    fused_loss: bool
    checkpointing: bool
    every_n: float  # checkpoint every n-th decoder layer (n may be fractional: see checkpointed_layers)
    offload: bool
    tiled_mlp: bool
    optimizer: str
    targets: tuple[str, ...]
    r: int
    dropout: bool
    dora: bool
    double_quant: bool
    lora_type: str = "lora"  # lora | adalora | vera

    @property
    def mask_bytes(self) -> int:
        """Bytes per value of a dropout mask: bool from CUDA's fused dropout; CPU multiplies by a noise tensor."""
        return 1 if self.device == "cuda" else self.s


def compute_bytes(compute_dtype: str, device: str = "cuda") -> int:
    """Bytes per value of the compute dtype ('auto' = bf16/fp16 on CUDA, fp32 on CPU)."""
    if compute_dtype == "float32" or (compute_dtype == "auto" and device != "cuda"):
        return 4
    return 2


def techniques(cfg: Config, shape: ModelShape, device: str = "cuda") -> Techniques:
    """What ``train`` does with ``cfg`` on ``device``; ``"auto"`` values count as their conservative choice.

    Raises:
        ModelError: LoRA targets that this architecture does not have.
    """
    t = conservative_settings(cfg).train
    s = compute_bytes(cfg.model.compute_dtype, device)
    adapter = 4 if cfg.lora.adapter_dtype == "float32" or cfg.model.compute_dtype == "float16" else s
    if cfg.model.attn_implementation == "eager":
        attention = "eager"
    elif device != "cuda":
        attention = "sdpa_cpu"
    else:
        attention = "flash" if s == 2 else "math"  # flash kernels need 16-bit inputs
    every_n = t.checkpoint_every_n_layers
    return Techniques(
        device=device, s=s, adapter_bytes=adapter, autocast=s == 2 and adapter == 4, attention=attention,
        packed=cfg.data.packing, fused_loss=t.fused_loss, checkpointing=t.gradient_checkpointing,
        every_n=every_n, offload=bool(t.activation_offload) and t.gradient_checkpointing and device == "cuda",
        tiled_mlp=bool(t.tiled_mlp), optimizer=t.optimizer,
        targets=tuple(resolve_targets(cfg.lora.target_modules, shape)), r=cfg.lora.r,
        dropout=cfg.lora.dropout > 0, dora=cfg.lora.use_dora, double_quant=cfg.model.double_quant,
        lora_type=cfg.lora.type,
    )


def fill_auto(cfg: Config, **choices: Any) -> Config:
    """A copy of ``cfg`` whose ``train`` settings still at ``"auto"`` take the given values."""
    copy = cfg.model_copy(deep=True)
    for key, value in choices.items():
        if getattr(copy.train, key) == "auto":
            setattr(copy.train, key, value)
    return copy


def conservative_settings(cfg: Config) -> Config:
    """``"auto"`` made concrete without a plan: offload off, every layer checkpointed, MLP untiled,
    non-paged 8-bit AdamW (used when the model's shape cannot be planned)."""
    return fill_auto(cfg, activation_offload=False, checkpoint_every_n_layers=1, tiled_mlp=False,
                      optimizer="adamw_8bit")
