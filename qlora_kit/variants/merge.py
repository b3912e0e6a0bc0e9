"""What each adapter type adds to a base weight, read from the saved adapter (for the exporter).

Every supported adapter adds a product ``scale * left @ right`` to its module's weight, so the
exporter merges all of them with one in-place ``addmm`` (float32):

==========  ==================================  ===================================  ======================
peft type   left (out x k)                      right (k x in)                       scale
==========  ==================================  ===================================  ======================
LORA        B                                   A                                    alpha/r (alpha/sqrt(r))
ADALORA     B (rows pruned to rank_pattern)     A * E (singular values)              alpha / (init_r + 1e-5)
VERA        lambda_b * vera_B[:out]             lambda_d * vera_A[:, :in]            1
==========  ==================================  ===================================  ======================

(AdaLoRA divides by its ``ranknum``, which peft keeps at init_r also after pruning; DoRA's row
rescaling is applied by the exporter after the addition.)  The base the product is added to is
the dequantised NF4 weight, or the stored residual base of a base-changing init (residual.py).
"""

from __future__ import annotations

import re
from typing import Any

import torch

from qlora_kit.core.errors import ModelError

PREFIX = "base_model.model."
_PARTS = {
    "LORA": {".lora_A.weight": "A", ".lora_B.weight": "B", ".lora_magnitude_vector": "M",
             ".lora_magnitude_vector.weight": "M"},
    "ADALORA": {".lora_A": "A", ".lora_B": "B", ".lora_E": "E"},
    "VERA": {".vera_lambda_b": "lambda_b", ".vera_lambda_d": "lambda_d"},
}
_NAMES = {"LORA": "LoRA", "ADALORA": "AdaLoRA", "VERA": "VeRA"}
_REQUIRED = {"LORA": ("A", "B"), "ADALORA": ("A", "B", "E"), "VERA": ("lambda_b", "lambda_d")}
_VERA_SHARED = {"base_model.vera_A": "A", "base_model.vera_B": "B"}
# inits whose adapter only makes sense on the NF4 weights it was fitted to
NF4_BOUND_INITS = ("pissa", "olora", "lora_ga", "loftq")


def peft_type(config: dict[str, Any]) -> str:
    """``LORA``, ``ADALORA`` or ``VERA``.

    Raises:
        ModelError: another adapter type, or a VeRA adapter saved without its projections.
    """
    kind = str(config.get("peft_type", "LORA")).upper()
    if kind not in _PARTS:
        raise ModelError(f"adapter type {kind} is not merged by qlora-kit (LoRA, DoRA, AdaLoRA and VeRA are)")
    if kind == "VERA" and not config.get("save_projection", True):
        raise ModelError("this VeRA adapter was saved without its random projections (save_projection=false): "
                         "they cannot be rebuilt exactly, so it cannot be merged exactly")
    return kind


def parse_key(kind: str, key: str) -> tuple[str | None, str]:
    """(module, part) of an adapter tensor key; module is None for VeRA's shared projections.

    Raises:
        ModelError: a tensor this exporter does not understand.
    """
    if kind == "VERA" and key in _VERA_SHARED:
        return None, _VERA_SHARED[key]
    if not key.startswith(PREFIX):
        raise ModelError(f"adapter tensor {key!r} does not start with {PREFIX!r}: not a peft causal-LM adapter")
    rest = key[len(PREFIX):]
    for suffix, part in _PARTS[kind].items():
        if rest.endswith(suffix):
            return rest[: -len(suffix)], part
    raise ModelError(f"adapter tensor {key!r} is not a {_NAMES[kind]} factor this exporter merges (embedding adapters, "
                     "modules_to_save and biases are not merged)")


def index_adapter(config: dict[str, Any], shapes: dict[str, list[int]]) -> dict[str, tuple[dict[str, str], float]]:
    """Module → (part → tensor key, scale) for every adapted module of the adapter file.

    Raises:
        ModelError: an incomplete module, or ranks that disagree with the adapter config.
    """
    kind = peft_type(config)
    modules: dict[str, dict[str, str]] = {}
    shared: dict[str, str] = {}
    for key in shapes:
        module, part = parse_key(kind, key)
        if module is None:
            shared[part] = key
        else:
            modules.setdefault(module, {})[part] = key
    if kind == "VERA" and set(shared) != {"A", "B"}:
        raise ModelError("VeRA adapter file lacks its shared projections vera_A / vera_B")
    result = {}
    for module, keys in modules.items():
        missing = [p for p in _REQUIRED[kind] if p not in keys]
        if missing:
            raise ModelError(f"adapter module {module} lacks {', '.join(missing)}: the adapter file is incomplete")
        keys.update(shared)
        result[module] = (keys, module_scale(config, kind, module, {p: shapes[k] for p, k in keys.items()}))
    return result


def _pattern_value(patterns: dict[str, Any] | None, module: str, default: Any) -> Any:
    """peft's rank/alpha pattern lookup: a key matches when it is a dotted suffix of the module name."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def module_scale(config: dict[str, Any], kind: str, module: str, shapes: dict[str, list[int]]) -> float:
    """The factor peft multiplies ``left @ right`` with for ``module``.

    Raises:
        ModelError: the stored rank differs from the one the config implies.
    """
    if kind == "VERA":
        if shapes["A"][0] != shapes["lambda_d"][0]:
            raise ModelError(f"VeRA module {module}: lambda_d has {shapes['lambda_d'][0]} entries, vera_A "
                             f"rank {shapes['A'][0]}")
        return 1.0
    rank = shapes["A"][0]
    if kind == "ADALORA":
        pattern = (config.get("rank_pattern") or {}).get(f"{module}.lora_E")
        expected = sum(bool(x) for x in pattern) if pattern is not None else int(config["init_r"])
        if rank != expected:
            raise ModelError(f"AdaLoRA module {module} stores rank {rank}, its rank pattern says {expected}")
        alpha = float(config["lora_alpha"])
        if alpha <= 0:
            raise ModelError(f"AdaLoRA adapter with lora_alpha={alpha} is not merged (its scale depends on the rank)")
        return alpha / (float(config["init_r"]) + 1e-5)
    r = int(_pattern_value(config.get("rank_pattern"), module, config["r"]))
    alpha = float(_pattern_value(config.get("alpha_pattern"), module, config["lora_alpha"]))
    if r != rank:
        raise ModelError(f"adapter config says r={r} for {module} but its lora_A has rank {rank}")
    return alpha / r**0.5 if config.get("use_rslora") else alpha / r


def low_rank_pair(kind: str, factors: dict[str, torch.Tensor], shape: tuple[int, int] | torch.Size,
                  device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(left, right), float32 on ``device``, with delta W = scale * left @ right for a base weight of ``shape``.

    Raises:
        ModelError: factors that do not fit the base weight.
    """
    f = {k: v.to(device, torch.float32) for k, v in factors.items()}
    out_features, in_features = shape
    if kind == "VERA":
        a, b = f["A"], f["B"]
        if a.shape[1] < in_features or b.shape[0] < out_features or f["lambda_b"].shape[0] != out_features:
            raise ModelError(f"VeRA projections {tuple(b.shape)}/{tuple(a.shape)} and lambda_b "
                             f"{tuple(f['lambda_b'].shape)} do not fit a {out_features}x{in_features} weight")
        return f["lambda_b"].unsqueeze(1) * b[:out_features], f["lambda_d"].unsqueeze(1) * a[:, :in_features]
    left, right = f["B"], f["A"]
    if kind == "ADALORA":
        right = right * f["E"].reshape(-1, 1)
    if left.shape[0] != out_features or right.shape[1] != in_features or left.shape[1] != right.shape[0]:
        raise ModelError(f"adapter factors B{tuple(left.shape)}@A{tuple(right.shape)} do not fit a "
                         f"{out_features}x{in_features} weight")
    return left, right


def check_merge_base(lora: dict[str, Any], merge_base: str) -> None:
    """Refuse ``--merge-base original`` for inits fitted to the NF4 weights (``lora`` = manifest.json's section).

    Raises:
        ModelError: one line naming the init.
    """
    init = (lora.get("variant") or {}).get("init", "default")
    if merge_base == "original" and init in NF4_BOUND_INITS:
        raise ModelError(f"--merge-base original cannot be merged exactly for lora.init={init}: its adapter starts "
                         "as the complement of the NF4 base it was fitted to (the residual or the NF4 error), so "
                         "adding it to the 16-bit weights would count that part twice",
                         "export with the default --merge-base dequantized")
