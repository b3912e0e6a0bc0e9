"""The one typed config schema: YAML file + ``--set section.key=value`` overrides.

Every problem in a config is reported at once (unknown keys with the closest valid
name, wrong types, out-of-range values, contradictory settings).  The resolved config
is saved next to every output with where each value came from (file, override,
default), so a run directory always says exactly what ran.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from qlora_kit.errors import ConfigError

DataFormat = Literal["auto", "messages", "sharegpt", "alpaca", "prompt_completion", "text"]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=False, validate_assignment=True)


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

    @model_validator(mode="after")
    def _non_empty_targets(self) -> "LoraConfig":
        if isinstance(self.target_modules, list) and not self.target_modules:
            raise ValueError("lora.target_modules is an empty list; use 'attention', 'all-linear' or module names")
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
        description="auto: bitsandbytes 8-bit AdamW, paged only when the planner says the state is large enough "
                    "to matter. adamw_8bit: non-paged (no per-step host sync).",
    )
    weight_decay: float = Field(0.0, ge=0.0)
    max_grad_norm: float = Field(1.0, ge=0.0, description="Gradient clipping; 0 disables.")
    gradient_checkpointing: bool = Field(True, description="Non-reentrant activation checkpointing.")
    checkpoint_every_n_layers: Literal["auto"] | int = Field(
        "auto",
        description="1: checkpoint every decoder layer; n: only every n-th (the others keep their activations: "
                    "faster, more memory). auto: the planner picks the largest n that fits.",
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
    seed: int = Field(42, ge=0)

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
        if value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
            return value
        raise ValueError("must be 'auto' or an integer >= 1")

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


SECTIONS: dict[str, type[BaseModel]] = {
    "model": ModelConfig,
    "lora": LoraConfig,
    "data": DataConfig,
    "train": TrainConfig,
}


# --------------------------------------------------------------------------- loading


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping; raise ConfigError with the line for syntax errors.

    Raises:
        ConfigError: missing/unreadable file, YAML syntax error, or a top level that is not a mapping.
    """
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"config file {p} does not exist", "check the path (configs/ has ready examples)")
    if p.is_dir():
        raise ConfigError(f"config path {p} is a directory, not a YAML file", "pass the .yaml file itself")
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read config {p}: {exc}", "check the file's permissions and encoding") from exc
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"YAML syntax error in {p}{where}: {problem}", "fix the YAML at that line") from exc
    if raw is None:
        raise ConfigError(f"config file {p} is empty", "start from one of the files in configs/")
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {p} must be a mapping of sections, got {type(raw).__name__}")
    return raw


def parse_override(item: str) -> tuple[list[str], Any]:
    """Split ``section.key=value`` into a key path and a YAML-parsed value."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r} is not of the form section.key=value", "e.g. --set train.max_steps=100")
    key, _, value = item.partition("=")
    keys = [k for k in key.strip().split(".") if k]
    if not keys:
        raise ConfigError(f"--set {item!r} has an empty key", "e.g. --set train.max_steps=100")
    try:
        parsed = yaml.safe_load(value) if value.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {item!r}: value is not valid YAML ({exc})") from exc
    return keys, parsed


def _apply_override(raw: dict[str, Any], keys: list[str], value: Any) -> None:
    node = raw
    for k in keys[:-1]:
        child = node.get(k)
        if child is None:
            child = node[k] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"--set {'.'.join(keys)}: {k!r} is not a section")
        node = child
    node[keys[-1]] = value


def _closest(name: str, choices: list[str]) -> str:
    match = difflib.get_close_matches(name, choices, n=1, cutoff=0.5)
    return f" (did you mean {match[0]!r}?)" if match else f" (valid: {', '.join(sorted(choices))})"


def _unknown_key_problems(raw: dict[str, Any]) -> list[str]:
    problems = []
    top = list(SECTIONS) + ["output_dir"]
    for key, value in raw.items():
        if key not in top:
            problems.append(f"unknown key {key!r}{_closest(str(key), top)}")
        elif key in SECTIONS and isinstance(value, dict):
            fields = list(SECTIONS[key].model_fields)
            for sub in value:
                if sub not in fields:
                    problems.append(f"unknown key '{key}.{sub}'{_closest(str(sub), fields)}")
    return problems


def _format_validation_error(exc: ValidationError) -> list[str]:
    problems = []
    for err in exc.errors():
        if err["type"] == "extra_forbidden":
            continue  # reported with a suggestion by _unknown_key_problems
        loc = ".".join(str(p) for p in err["loc"] if not str(p).startswith(("function-after", "literal[", "list[")))
        msg = err["msg"].removeprefix("Value error, ")
        got = err.get("input")
        shown = "" if err["type"] == "missing" or isinstance(got, dict) else f" (got {got!r})"
        problems.append(f"{loc or 'config'}: {msg}{shown}")
    return problems


def validate(raw: dict[str, Any], origin: str = "config") -> Config:
    """Build a Config from a raw mapping, listing every problem at once.

    Raises:
        ConfigError: with one line per problem.
    """
    problems = _unknown_key_problems(raw)
    try:
        cfg = Config.model_validate(raw)
    except ValidationError as exc:
        problems += _format_validation_error(exc)
        cfg = None
    unique = list(dict.fromkeys(problems))
    if len(unique) == 1:
        raise ConfigError(f"{origin}: {unique[0]}", "correct it in the file or with --set section.key=value")
    if unique:
        listed = "\n  - ".join(unique)
        raise ConfigError(f"{origin}: {len(unique)} problems:\n  - {listed}",
                          "correct them in the file or with --set section.key=value")
    assert cfg is not None
    return cfg


def load_config(path: str | Path, overrides: list[str] | None = None) -> tuple[Config, dict[str, str]]:
    """Load, override and validate a config; return it with each value's origin.

    Relative paths in ``data.path``, ``data.val_path``, ``output_dir`` and a local
    ``model.name_or_path`` are taken relative to the current directory (as a user
    typing the command expects), not to the config file.
    """
    raw = read_yaml(path)
    sources = {k: f"file {path}" for k in _leaf_keys(raw)}
    for item in overrides or []:
        keys, value = parse_override(item)
        _apply_override(raw, keys, value)
        sources[".".join(keys)] = "override --set"
    cfg = validate(raw, origin=str(path))
    for key in _leaf_keys(cfg.model_dump()):
        sources.setdefault(key, "default")
    return cfg, sources


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
