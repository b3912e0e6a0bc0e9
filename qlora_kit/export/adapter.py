"""The trained adapter as the exporter reads it: factors per target module, and each module's scale.

LoRA (rsLoRA, DoRA), AdaLoRA and VeRA adapters are understood (``qlora_kit.variants.merge``
knows each type's keys and scale).  Tensors are indexed here and read lazily (one module at a
time) by ``merge``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qlora_kit.core.errors import ModelError
from qlora_kit.variants import merge

# adapter_config.json options that change the math in ways this exporter does not merge.
_UNSUPPORTED_ADAPTER_OPTIONS = ("lora_bias", "modules_to_save", "trainable_token_indices", "target_parameters",
                                "layer_replication", "use_qalora", "use_bdlora", "alora_invocation_tokens",
                                "fan_in_fan_out", "arrow_config", "kasa_config", "monteclora_config")


@dataclass
class ModuleAdapter:
    """Adapter factors of one target module (tensors are read lazily from the adapter file)."""

    module: str
    keys: dict[str, str] = field(default_factory=dict)  # part (A/B/M/E/lambda_b/...) -> adapter tensor key
    scale: float = 0.0
    kind: str = "LORA"  # peft type: LORA, ADALORA, VERA (qlora_kit.variants.merge)


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
        ModelError: an unreadable config, missing weights, an adapter type or option this
            exporter cannot merge, or a tensor it does not understand.
    """
    from safetensors import safe_open

    try:
        config = json.loads((adapter_dir / "adapter_config.json").read_text())
    except (OSError, ValueError) as exc:
        raise ModelError(f"{adapter_dir / 'adapter_config.json'} is not readable JSON",
                         "restore the adapter, or resume the training to rewrite it") from exc
    if not isinstance(config, dict):
        raise ModelError(f"{adapter_dir / 'adapter_config.json'} is not a JSON object", "restore the adapter")
    weights = adapter_dir / "adapter_model.safetensors"
    if not weights.is_file():
        raise ModelError(f"{weights} is missing (pickle adapter_model.bin is not read)",
                         "re-save the adapter with safe_serialization=True")
    kind = merge.peft_type(config)
    check_adapter_config(config)
    with safe_open(str(weights), framework="pt") as fh:
        shapes = {k: fh.get_slice(k).get_shape() for k in fh.keys()}
    modules: dict[str, ModuleAdapter] = {}
    for module, (keys, scale) in merge.index_adapter(config, shapes).items():
        if config.get("use_dora") and "M" not in keys:
            raise ModelError(f"DoRA adapter module {module} has no magnitude vector")
        modules[module] = ModuleAdapter(module, keys, scale, kind)
    return Adapter(weights, config, modules)


def check_adapter_config(config: dict[str, Any]) -> None:
    """Refuse options whose math the merge does not implement (adapter types: ``variants.merge.peft_type``).

    Raises:
        ModelError: an unsupported option is set.
    """
    used = [k for k in _UNSUPPORTED_ADAPTER_OPTIONS if config.get(k) not in (None, False, [], {}, "")]
    if used:
        raise ModelError(f"adapter uses {', '.join(used)}, which the exporter does not merge",
                         "train without these options, or load the adapter with peft instead of exporting")
