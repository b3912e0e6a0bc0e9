"""The trained adapter as the exporter reads it: LoRA factors per target module, and each module's scale.

Tensors are indexed here and read lazily (one module at a time) by ``merge``.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qlora_kit.errors import ModelError

_ADAPTER_PREFIX = "base_model.model."
_ADAPTER_PARTS = {".lora_A.weight": "A", ".lora_B.weight": "B", ".lora_magnitude_vector": "M",
                  ".lora_magnitude_vector.weight": "M"}
# adapter_config.json options that change the math in ways this exporter does not merge.
_UNSUPPORTED_ADAPTER_OPTIONS = ("lora_bias", "modules_to_save", "trainable_token_indices", "target_parameters",
                                "layer_replication", "use_qalora", "use_bdlora", "alora_invocation_tokens",
                                "fan_in_fan_out", "arrow_config", "kasa_config", "monteclora_config")


@dataclass
class ModuleAdapter:
    """LoRA factors of one target module (tensors are read lazily from the adapter file)."""

    module: str
    keys: dict[str, str] = field(default_factory=dict)  # part (A/B/M) -> adapter tensor key
    scale: float = 0.0


@dataclass
class Adapter:
    """The trained adapter: per-module factors, scaling and the file they live in."""

    path: Path
    config: dict[str, Any]
    modules: dict[str, ModuleAdapter]

    @property
    def use_dora(self) -> bool:
        return bool(self.config.get("use_dora"))


def read_adapter(adapter_dir: Path) -> Adapter:
    """Index ``adapter_model.safetensors`` by target module and compute each module's scale.

    Raises:
        ModelError: missing weights, a non-LoRA adapter, an option this exporter cannot merge,
            or a tensor it does not understand.
    """
    from safetensors import safe_open

    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    weights = adapter_dir / "adapter_model.safetensors"
    if not weights.is_file():
        raise ModelError(f"{weights} is missing (pickle adapter_model.bin is not read)",
                         "re-save the adapter with safe_serialization=True")
    check_adapter_config(config)
    modules: dict[str, ModuleAdapter] = {}
    with safe_open(str(weights), framework="pt") as fh:
        keys = list(fh.keys())
        shapes = {k: fh.get_slice(k).get_shape() for k in keys}
    for key in keys:
        module, part = parse_adapter_key(key)
        modules.setdefault(module, ModuleAdapter(module)).keys[part] = key
    for mod in modules.values():
        if "A" not in mod.keys or "B" not in mod.keys:
            raise ModelError(f"adapter module {mod.module} lacks lora_A or lora_B: the adapter file is incomplete")
        if config.get("use_dora") and "M" not in mod.keys:
            raise ModelError(f"DoRA adapter module {mod.module} has no magnitude vector")
        mod.scale = module_scale(config, mod.module, shapes[mod.keys["A"]][0])
    return Adapter(weights, config, modules)


def check_adapter_config(config: dict[str, Any]) -> None:
    """Refuse adapter types and options whose math the merge does not implement.

    Raises:
        ModelError: not a LoRA adapter, or an unsupported option is set.
    """
    if config.get("peft_type", "LORA") != "LORA":
        raise ModelError(f"adapter type {config.get('peft_type')} is not LoRA: only LoRA/DoRA adapters are merged")
    used = [k for k in _UNSUPPORTED_ADAPTER_OPTIONS if config.get(k) not in (None, False, [], {}, "")]
    if used:
        raise ModelError(f"adapter uses {', '.join(used)}, which the exporter does not merge",
                         "train without these options, or load the adapter with peft instead of exporting")


def parse_adapter_key(key: str) -> tuple[str, str]:
    """``base_model.model.<module>.lora_A.weight`` → (module, "A").

    Raises:
        ModelError: the key is not a LoRA A/B/magnitude tensor of a causal-LM adapter.
    """
    if not key.startswith(_ADAPTER_PREFIX):
        raise ModelError(f"adapter tensor {key!r} does not start with {_ADAPTER_PREFIX!r}: "
                         "not a peft causal-LM adapter")
    rest = key[len(_ADAPTER_PREFIX):]
    for suffix, part in _ADAPTER_PARTS.items():
        if rest.endswith(suffix):
            return rest[: -len(suffix)], part
    raise ModelError(f"adapter tensor {key!r} is not a LoRA A/B/magnitude weight (embedding LoRA, "
                     "modules_to_save and biases are not merged)")


def _pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    """peft's rank/alpha pattern lookup: a key matches when it is a dotted suffix of the module name."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def module_scale(config: dict[str, Any], module: str, rank_in_file: int) -> float:
    """alpha / r (alpha / sqrt(r) with rsLoRA), honouring rank_pattern / alpha_pattern.

    Raises:
        ModelError: the configured rank differs from the rank stored in the file.
    """
    r = int(_pattern_value(config.get("rank_pattern"), module, config["r"]))
    alpha = float(_pattern_value(config.get("alpha_pattern"), module, config["lora_alpha"]))
    if r != rank_in_file:
        raise ModelError(f"adapter config says r={r} for {module} but its lora_A has rank {rank_in_file}")
    return alpha / r**0.5 if config.get("use_rslora") else alpha / r
