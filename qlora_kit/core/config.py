"""The one typed config schema: YAML file (or the same tree as a dict) + ``--set section.key=value`` overrides.

Every problem in a config is reported at once (unknown keys with the closest valid
name, wrong types, out-of-range values, contradictory settings).  The resolved config
is saved next to every output with where each value came from (file, override,
default), so a run directory always says exactly what ran.
"""

from __future__ import annotations

import copy
import difflib
import math
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from qlora_kit.core.errors import ConfigError, QloraKitError, short_repr, shorten
from qlora_kit.core.safe_yaml import MAX_CONFIG_BYTES, parse_yaml, read_yaml

DataFormat = Literal["auto", "messages", "sharegpt", "alpaca", "prompt_completion", "text"]
AdapterType = Literal["lora", "adalora", "vera"]
AdapterInit = Literal["default", "lora_ga", "loftq", "pissa", "olora"]
# A YAML file, or the same tree as a mapping (the Python API); overrides as ``--set`` strings or a mapping.
ConfigSource = Union[str, Path, Mapping[str, Any]]
Overrides = Union[list[str], tuple[str, ...], Mapping[str, Any], None]
CONFIG_DICT = "the config dict"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=False, validate_assignment=True, allow_inf_nan=False)


class ModelConfig(_Section):
    """The base model and how it is quantised."""

    name_or_path: str = Field(description="Hub id, local HF model directory, or a local .gguf file.")
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit).")
    trust_remote_code: bool = Field(False, description="Run model code from the hub repo. Off unless you trust it.")
    chat_template: str | None = Field(None, description="Jinja chat template overriding the tokenizer's.")
    compute_dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto", description="auto: bf16 on CUDA (fp16 on cards without bf16), float32 on CPU."
    )
    quant_type: Literal["nf4", "fp4"] = Field("nf4", description="4-bit data type of the frozen base.")
    double_quant: bool = Field(True, description="Quantise the quantisation constants too (~0.4 bit/param saved).")
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = Field("sdpa")


class LoraConfig(_Section):
    """The LoRA adapters attached to the frozen 4-bit base."""

    r: int = Field(16, gt=0, le=1024, description="Adapter rank.")
    alpha: float = Field(32, gt=0, description="Scaling numerator: scale = alpha / r (alpha / sqrt(r) with rslora).")
    dropout: float = Field(0.05, ge=0.0, lt=1.0, description="Dropout on adapter inputs (costs activation memory).")
    target_modules: Literal["attention", "all-linear"] | list[str] = Field(
        "attention",
        description="'attention' (q/k/v/o projections, found per architecture), 'all-linear', or module names.",
    )
    use_rslora: bool = Field(False, description="Rank-stabilised scaling alpha/sqrt(r).")
    use_dora: bool = Field(False, description="Weight-decomposed LoRA (DoRA). Slower, more memory.")
    adapter_dtype: Literal["float32", "bfloat16"] = Field(
        "float32",
        description="Adapter weights (the optimizer's master copy). float32 keeps small updates that bf16 would "
                    "round away; compute stays in the 16-bit compute dtype on CUDA (autocast), so activations "
                    "do not grow.",
    )
    type: AdapterType = Field(
        "lora",
        description="lora; adalora (rank budget reallocated during training, r is the initial rank); "
        "vera (shared frozen random matrices, trainable scaling vectors; r is their rank, 256 is typical).",
    )
    init: AdapterInit = Field(
        "default",
        description="default (B = 0); loftq (adapter starts as the low-rank part of the NF4 error); "
        "pissa / olora (adapter = principal part of W, the NF4 base holds the residual); "
        "lora_ga (adapter from the SVD of the first gradients, the base holds the residual).",
    )
    loraga_samples: int = Field(64, gt=0, description="lora_ga: training rows whose averaged gradient sets the init.")
    loraga_passes: int = Field(
        1, ge=1, le=64,
        description="lora_ga: estimate the fp32 gradients of the target weights in this many groups, re-running the "
        "samples for each (less memory, same init); `qlora-kit plan` says when one pass does not fit.",
    )
    loftq_iter: int = Field(
        1, ge=1, le=32,
        description="loftq: alternating steps; 1 keeps the NF4 base as loaded, more re-quantise its residual.",
    )
    adalora_target_r: int = Field(8, gt=0, description="adalora: average rank per module at the end (r is the start).")
    adalora_tinit_ratio: float = Field(0.1, ge=0.0, lt=1.0, description="adalora: fraction of steps before pruning.")
    adalora_tfinal_ratio: float = Field(
        0.2, ge=0.0, lt=1.0, description="adalora: fraction of final steps trained at the final ranks."
    )
    adalora_delta_t: int = Field(1, gt=0, description="adalora: steps between two budget reallocations.")
    adalora_orth_reg_weight: float = Field(
        0.5, ge=0.0, description="adalora: weight of the orthogonality penalty (once per optimizer step)."
    )

    @model_validator(mode="after")
    def _non_empty_targets(self) -> "LoraConfig":
        if isinstance(self.target_modules, list) and not self.target_modules:
            raise ValueError("lora.target_modules is an empty list; use 'attention', 'all-linear' or module names")
        return self

    @model_validator(mode="after")
    def _check_variant(self) -> "LoraConfig":
        if self.type != "lora":
            for name, used in (("lora.use_dora=true", self.use_dora), ("lora.use_rslora=true", self.use_rslora),
                               (f"lora.init={self.init}", self.init != "default")):
                if used:
                    raise ValueError(f"lora.type={self.type} cannot be combined with {name}; "
                                     f"use lora.type=lora for it, or drop it")
        if self.type == "adalora" and self.adalora_target_r > self.r:
            raise ValueError(f"lora.adalora_target_r ({self.adalora_target_r}) must not exceed lora.r "
                             f"({self.r}, the initial rank of lora.type=adalora)")
        if self.type == "adalora" and self.adalora_tinit_ratio + self.adalora_tfinal_ratio >= 1.0:
            raise ValueError(f"lora.adalora_tinit_ratio ({self.adalora_tinit_ratio}) + lora.adalora_tfinal_ratio "
                             f"({self.adalora_tfinal_ratio}) must be below 1: no steps are left to reallocate ranks")
        return self


class DataConfig(_Section):
    """Where the training rows come from and how they become tokens."""

    path: str = Field(description="Local .jsonl/.json/.parquet/.csv file, or a hub dataset name.")
    format: DataFormat = Field("auto", description="Row format; auto-detected from the first rows when 'auto'.")
    split: str = Field("train", description="Split to read from a hub dataset.")
    val_path: str | None = Field(None, description="Separate validation file; else a split of `path`.")
    val_fraction: float = Field(0.05, ge=0.0, lt=1.0, description="Fraction of rows held out for validation.")
    val_max_rows: int = Field(200, ge=0, description="Cap on held-out rows (eval cost).")
    train_on_inputs: bool = Field(False, description="Also train on prompt/user/system tokens (default: assistant only).")
    packing: bool = Field(
        True,
        description="Padding-free packing: samples concatenated, no padding and no T*T mask; samples never attend "
                    "to each other. false: one sample per row, right-padded.",
    )
    shuffle: bool = Field(True, description="Shuffle rows each epoch (seeded by train.seed).")
    max_bad_fraction: float = Field(
        0.01, ge=0.0, le=1.0, description="Abort when more than this fraction of rows is malformed."
    )


class TrainConfig(_Section):
    """The SFT loop."""

    max_steps: int | None = Field(None, gt=0, description="Optimizer steps; when unset, num_epochs decides.")
    num_epochs: float = Field(1.0, gt=0, description="Used when max_steps is unset.")
    learning_rate: float = Field(2e-4, gt=0, lt=1.0)
    lr_scheduler: Literal["cosine", "linear", "constant"] = Field("cosine")
    warmup_steps: int | None = Field(None, ge=0, description="Overrides warmup_ratio when set.")
    warmup_ratio: float = Field(0.03, ge=0.0, lt=1.0)
    micro_batch_size: int = Field(1, gt=0)
    gradient_accumulation_steps: int = Field(8, gt=0)
    max_length: int = Field(2048, ge=16, description="Tokens per row; longer samples are truncated.")
    optimizer: Literal["auto", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit", "adamw_torch"] = Field(
        "auto",
        description="auto: torch's fused AdamW (fp32 states, no host sync) when the plan has spare memory for "
                    "it, else bitsandbytes 8-bit AdamW (its step synchronises the GPU once per parameter), "
                    "paged only when paging makes the run fit.",
    )
    weight_decay: float = Field(0.0, ge=0.0)
    loraplus_lr_ratio: float | None = Field(
        None, ge=1.0, description="LoRA+: learning rate of B (and 1-D adapter vectors) = this x learning_rate.",
    )
    max_grad_norm: float = Field(1.0, ge=0.0, description="Gradient clipping; 0 disables.")
    gradient_checkpointing: bool = Field(True, description="Non-reentrant activation checkpointing.")
    checkpoint_every_n_layers: Literal["auto"] | int | float = Field(
        "auto",
        description="1: checkpoint every decoder layer; n: only every n-th, ceil(L/n) layers spread evenly (the "
                    "others keep their activations: faster, more memory; n may be fractional, e.g. 1.6842 for 19 "
                    "of 32). auto: the planner picks the fewest checkpointed layers that fit.",
    )
    activation_offload: Literal["auto"] | bool = Field(
        "auto",
        description="Checkpointed layer inputs go to pinned host memory on a side CUDA stream and are prefetched "
                    "ahead of the backward. auto: on only when the run would not fit otherwise. No-op on CPU.",
    )
    tiled_mlp: Literal["auto"] | bool = Field(
        "auto",
        description="Compute the MLP in sequence tiles, forward and backward (the recomputed layer keeps one "
                    "tile of MLP intermediates). auto: on when the planner says it is needed (long sequences).",
    )
    fused_loss: bool = Field(
        True,
        description="Loss fused with the lm_head projection, tiled over labelled positions: no [tokens x vocab] "
                    "logits. false: the plain full-logits path (reference).",
    )
    logging_steps: int = Field(10, gt=0)
    eval_steps: int | None = Field(None, gt=0, description="Evaluate every N steps (default: save_steps).")
    save_steps: int = Field(100, gt=0, description="Checkpoint every N optimizer steps (and at the end).")
    save_total_limit: int = Field(2, gt=0, description="Checkpoints kept (oldest deleted first).")
    on_nonfinite: Literal["stop", "skip"] = Field(
        "stop", description="stop: end the run on NaN/inf (no host sync); skip: drop that step (one sync/step)."
    )
    seed: int = Field(42, ge=0, le=2**32 - 1, description="Seeds python, numpy and torch (numpy needs < 2**32).")

    @model_validator(mode="after")
    def _check_warmup(self) -> "TrainConfig":
        if self.max_steps is not None and self.warmup_steps is not None and self.warmup_steps >= self.max_steps:
            raise ValueError(
                f"train.warmup_steps ({self.warmup_steps}) must be smaller than train.max_steps ({self.max_steps})"
            )
        return self

    @field_validator("checkpoint_every_n_layers", mode="before")
    @classmethod
    def _auto_or_layers(cls, value: Any) -> Any:
        number = isinstance(value, int | float) and not isinstance(value, bool)
        if value == "auto" or (number and math.isfinite(value) and value >= 1):
            return value
        raise ValueError("must be 'auto' or a number >= 1 (1: every layer, 2: every second, 1.5: two of three)")

    @field_validator("activation_offload", "tiled_mlp", mode="before")
    @classmethod
    def _auto_or_bool(cls, value: Any) -> Any:
        if value == "auto" or isinstance(value, bool):
            return value
        raise ValueError("must be 'auto', true or false")

    @model_validator(mode="after")
    def _check_offload(self) -> "TrainConfig":
        if self.activation_offload is True and not self.gradient_checkpointing:
            raise ValueError("train.activation_offload=true moves the checkpointed layer inputs to the host: "
                             "it needs train.gradient_checkpointing=true")
        return self


class Config(_Section):
    """A whole qlora-kit run."""

    model: ModelConfig
    lora: LoraConfig = Field(default_factory=LoraConfig)
    data: DataConfig
    train: TrainConfig = Field(default_factory=TrainConfig)
    output_dir: str = Field(description="Run directory: adapter, checkpoints, metrics, manifest.")

    @model_validator(mode="after")
    def _check_loraplus(self) -> "Config":
        if self.train.loraplus_lr_ratio is not None and self.lora.type == "vera":
            raise ValueError("train.loraplus_lr_ratio cannot be combined with lora.type=vera: every VeRA parameter is "
                             "a 1-D scaling vector, so LoRA+ would raise them all; drop one of them")
        return self


SECTIONS: dict[str, type[BaseModel]] = {
    "model": ModelConfig,
    "lora": LoraConfig,
    "data": DataConfig,
    "train": TrainConfig,
}


def parse_override(item: str) -> tuple[list[str], Any]:
    """Split ``section.key=value`` into a key path and a YAML-parsed value."""
    shown = short_repr(item)
    if "=" not in item:
        raise ConfigError(f"--set {shown} is not of the form section.key=value", "e.g. --set train.max_steps=100")
    key, _, value = item.partition("=")
    keys = [k for k in key.strip().split(".") if k]
    if not keys:
        raise ConfigError(f"--set {shown} has an empty key", "e.g. --set train.max_steps=100")
    if len(item) > MAX_CONFIG_BYTES:
        raise ConfigError(f"--set {shown} is longer than {MAX_CONFIG_BYTES // 1024} KiB", "put the value in the file")
    parsed = parse_yaml(value, f"--set {short_repr(key, 60)}", "quote the value or fix its YAML") \
        if value.strip() else ""
    return keys, parsed


def _apply_override(raw: dict[str, Any], keys: list[str], value: Any) -> None:
    node = raw
    for k in keys[:-1]:
        child = node.get(k)
        if child is None:
            child = node[k] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"--set {short_repr('.'.join(keys))}: {short_repr(k)} is not a section",
                              "e.g. --set train.max_steps=100")
        node = child
    node[keys[-1]] = value


def _closest(name: str, choices: list[str]) -> str:
    match = difflib.get_close_matches(name, choices, n=1, cutoff=0.5)
    return f" (did you mean {match[0]!r}?)" if match else f" (valid: {', '.join(sorted(choices))})"


def _owners(name: str, skip: str | None = None) -> list[str]:
    """``section.name`` for every section (other than ``skip``) that has a field called ``name``."""
    return [f"{sec}.{name}" for sec, model in SECTIONS.items() if sec != skip and name in model.model_fields]


def _suggest(name: str, section: str | None) -> str:
    """The suggestion after an unknown key: a section key for a bare or misplaced one, else the closest name."""
    owners = _owners(name, skip=section)
    if owners:
        return f" (did you mean {' or '.join(repr(o) for o in owners)}?)"
    if section is None:
        return _closest(name, list(SECTIONS) + ["output_dir"])
    return _closest(name, list(SECTIONS[section].model_fields))


def _unknown_key_problems(raw: dict[str, Any]) -> list[tuple[str, str]]:
    problems = []
    top = list(SECTIONS) + ["output_dir"]
    for key, value in raw.items():
        if key not in top:
            problems.append((str(key)[:200], f"unknown key {short_repr(key)}{_suggest(str(key)[:100], None)}"))
        elif key in SECTIONS and isinstance(value, dict):
            fields = list(SECTIONS[key].model_fields)
            for sub in value:
                if sub not in fields:
                    problems.append((f"{key}.{sub}"[:200], f"unknown key {short_repr(f'{key}.{sub}')}{_suggest(str(sub)[:100], key)}"))
    return problems


def _format_validation_error(exc: ValidationError) -> list[tuple[str, str]]:
    problems = []
    for err in exc.errors():
        if err["type"] == "extra_forbidden":
            continue  # reported with a suggestion by _unknown_key_problems
        loc = ".".join(str(p)[:60] for p in err["loc"]
                       if not str(p).startswith(("function-after", "literal[", "list[")))
        msg = shorten(err["msg"].removeprefix("Value error, "), 300)
        got = err.get("input")
        shown = "" if err["type"] == "missing" or isinstance(got, dict) else f" (got {short_repr(got)})"
        problems.append((loc, f"{loc or 'config'}: {msg}{shown}"))
    return problems


def _where(key: str, origin: str, overrides: dict[str, str]) -> str:
    """Where the value of ``key`` came from: its ``--set`` argument, else the config file."""
    if key in overrides:
        return f"--set {overrides[key]}"
    inside = [item for k, item in overrides.items() if not key or k.startswith(key + ".")]
    return f"{origin} with --set {', '.join(inside)}" if inside else origin


def validate(raw: dict[str, Any], origin: str = "config", overrides: dict[str, str] | None = None) -> Config:
    """Build a Config from a raw mapping, listing every problem at once, each with where it came from.

    ``overrides`` maps a dotted key to the ``--set`` argument that gave it, so a problem in an
    override is reported as one (``--set max_steps=30: unknown key ...``), not as one of the file.

    Raises:
        ConfigError: with one line per problem.
    """
    overrides = overrides or {}
    problems = _unknown_key_problems(raw)
    try:
        cfg = Config.model_validate(raw)
    except ValidationError as exc:
        problems += _format_validation_error(exc)
        cfg = None
    found = list(dict.fromkeys((_where(key, origin, overrides), text) for key, text in problems))
    if not found:
        assert cfg is not None
        return cfg
    from_set = {where.startswith("--set ") for where, _ in found}
    hint = ("correct the --set argument (--set section.key=value, e.g. --set train.max_steps=100)" if from_set == {True}
            else f"correct it in {origin} (or override it with --set section.key=value)" if from_set == {False}
            else f"correct them in {origin} and in the --set arguments")
    if len(found) == 1:
        raise ConfigError(f"{found[0][0]}: {found[0][1]}", _exact_fix(found[0], overrides) or hint)
    header = {frozenset({False}): origin, frozenset({True}): "--set"}.get(frozenset(from_set), f"{origin} and --set")
    listed = "\n  - ".join(text if where == origin else f"{where}: {text}" for where, text in found)
    raise ConfigError(f"{header}: {len(found)} problems:\n  - {listed}", hint)


def _exact_fix(problem: tuple[str, str], overrides: dict[str, str]) -> str | None:
    """``--set train.max_steps=30`` for ``--set max_steps=30``: the one fix when a --set key has one owner."""
    where, text = problem
    owners = re.findall(r"did you mean '(\w+\.\w+)'\?\)$", text)
    if not where.startswith("--set ") or len(owners) != 1:
        return None
    value = where.removeprefix("--set ").partition("=")[2]
    return f"--set {owners[0]}={value}"


def attribute_origin(exc: BaseException, sources: dict[str, str]) -> None:
    """Add to the fix of an error about a config value (an error whose ``key`` is set) where that value came from.

    E.g. ``fix: check data.val_path; it is set in configs/x.yaml (edit it there or override it with
    --set data.val_path=...)``: the user sees whether to fix the file or the ``--set`` argument.
    """
    key = getattr(exc, "key", None)
    if not isinstance(exc, QloraKitError) or not key:
        return
    origin = sources.get(key, "default")
    if origin == "override --set":
        said = f"it was given with --set {key}=..."
    elif origin.startswith("file "):
        said = f"it is set in {origin.removeprefix('file ')} (edit it there or override it with --set {key}=...)"
    elif origin == CONFIG_DICT:
        said = f"it is set in {CONFIG_DICT} (change it there or override {key})"
    else:
        said = f"it is the default (set it in the config or with --set {key}=...)"
    exc.hint = f"{exc.hint}; {said}" if exc.hint else f"{key}: {said}"


def load_config(path: ConfigSource, overrides: Overrides = None) -> tuple[Config, dict[str, str]]:
    """Load, override and validate a config; return it with each value's origin.

    ``path`` is a YAML file or a mapping of the same sections; ``overrides`` are ``--set``
    strings (``section.key=value``, the value read as YAML) or a mapping of dotted keys to
    values (taken as they are).  Relative paths in ``data.path``, ``data.val_path``,
    ``output_dir`` and a local ``model.name_or_path`` are taken relative to the current
    directory (as a user typing the command expects), not to the config file.
    """
    if isinstance(path, Mapping):
        raw, origin, label = _plain(copy.deepcopy(dict(path))), CONFIG_DICT, CONFIG_DICT
    else:
        raw, origin, label = read_yaml(path), str(path), f"file {path}"
    sources = {k: label for k in _leaf_keys(raw)}
    given: dict[str, str] = {}  # dotted key -> the --set argument that gave it
    for item, (keys, value) in _parsed_overrides(overrides):
        _apply_override(raw, keys, value)
        sources[".".join(keys)] = "override --set"
        given[".".join(keys)] = item
    cfg = validate(raw, origin=origin, overrides=given)
    for key in _leaf_keys(cfg.model_dump()):
        sources.setdefault(key, "default")
    return cfg, sources


def _parsed_overrides(overrides: Overrides) -> list[tuple[str, tuple[list[str], Any]]]:
    """(the ``--set`` text shown in messages, (key path, value)) for each override."""
    if not isinstance(overrides, Mapping):
        return [(item, parse_override(item)) for item in overrides or []]
    parsed = []
    for key, value in overrides.items():
        item = f"{key}={value}"
        keys = [k for k in str(key).strip().split(".") if k]
        if not keys:
            raise ConfigError(f"--set {short_repr(item)} has an empty key", "e.g. --set train.max_steps=100")
        parsed.append((item, (keys, _plain(copy.deepcopy(value)))))
    return parsed


def _plain(value: Any) -> Any:
    """``value`` with paths (``pathlib.Path``, any ``os.PathLike``) as strings, as a YAML file would give them."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return os.fspath(value) if isinstance(value, os.PathLike) else value


def _leaf_keys(tree: dict[str, Any], prefix: str = "") -> list[str]:
    keys = []
    for k, v in tree.items():
        name = f"{prefix}{k}"
        if isinstance(v, dict) and k in SECTIONS and not prefix:
            keys += _leaf_keys(v, f"{name}.")
        else:
            keys.append(name)
    return keys


def dump_config(cfg: Config, sources: dict[str, str] | None = None) -> str:
    """YAML text of the resolved config, each value annotated with its origin."""
    data = cfg.model_dump(mode="json")
    lines = ["# Resolved qlora-kit config: every value, with where it came from."]
    for key, value in data.items():
        if isinstance(value, dict):
            lines.append(f"{key}:")
            for sub, subval in value.items():
                origin = (sources or {}).get(f"{key}.{sub}", "")
                text = yaml.safe_dump({sub: subval}, default_flow_style=True, width=10**6).strip()[1:-1]
                lines.append(f"  {text}" + (f"  # {origin}" if origin else ""))
        else:
            origin = (sources or {}).get(key, "")
            text = yaml.safe_dump({key: value}, default_flow_style=True, width=10**6).strip()[1:-1]
            lines.append(text + (f"  # {origin}" if origin else ""))
    return "\n".join(lines) + "\n"
