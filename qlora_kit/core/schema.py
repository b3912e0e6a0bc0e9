"""The config schema: one pydantic model per section (model, lora, data, train) and the whole ``Config``.

Field descriptions are the reference documentation of every key; cross-field rules live in the
validators.  Reading, overriding, validating and writing a config is ``core/config.py``.
"""

from __future__ import annotations

import difflib
import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from qlora_kit.core.errors import short_repr

DataFormat = Literal["auto", "messages", "sharegpt", "alpaca", "prompt_completion", "text", "preference"]
AdapterType = Literal["lora", "adalora", "vera"]
AdapterInit = Literal["default", "lora_ga", "loftq", "pissa", "olora"]
# Chat templates qlora-kit ships (qlora_kit/model/chat_templates/<name>.jinja), for models without one.
CHAT_TEMPLATE_NAMES = ("chatml", "llama3", "mistral")
Method = Literal["sft", "dpo", "orpo"]
DpoLoss = Literal["sigmoid", "ipo", "hinge"]
DEFAULT_BETA = 0.1  # trl's DPOConfig.beta and ORPOConfig.beta
# accelerate's tracker names (accelerate.tracking.LOGGER_TYPE_TO_CLASS; a test keeps them equal)
TRACKERS = ("tensorboard", "wandb", "mlflow", "trackio", "comet_ml", "aim", "clearml", "dvclive", "swanlab", "none")


def closest(name: str, choices: list[str]) -> str:
    """" (did you mean 'x'?)" for the closest of ``choices``, else the valid choices."""
    match = difflib.get_close_matches(name, choices, n=1, cutoff=0.5)
    return f" (did you mean {match[0]!r}?)" if match else f" (valid: {', '.join(sorted(choices))})"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=False, validate_assignment=True, allow_inf_nan=False)


class ModelConfig(_Section):
    """The base model and how it is quantised."""

    name_or_path: str = Field(description="Hub id, local HF model directory, or a local .gguf file.")
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit).")
    trust_remote_code: bool = Field(False, description="Run model code from the hub repo. Off unless you trust it.")
    chat_template: str | None = Field(
        None,
        description="The chat template: a name qlora-kit ships (chatml, llama3, mistral; all render tools) or a "
                    "Jinja template; overrides the tokenizer's. Needed for chat rows on a base model without one.",
    )
    compute_dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto", description="auto: bf16 on CUDA (fp16 on cards without bf16), float32 on CPU."
    )
    quant_type: Literal["nf4", "fp4"] = Field("nf4", description="4-bit data type of the frozen base.")
    double_quant: bool = Field(True, description="Quantise the quantisation constants too (~0.4 bit/param saved).")
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = Field("sdpa")
    adapter: str | None = Field(
        None,
        description="Start from the adapter of a finished qlora-kit run (its output_dir), e.g. an SFT run before "
        "train.method=dpo. Its base fingerprint must match model.name_or_path; its LoRA shape is used.",
    )

    @field_validator("chat_template")
    @classmethod
    def _template_name_or_jinja(cls, value: str | None) -> str | None:
        if value is None or value in CHAT_TEMPLATE_NAMES or "{{" in value or "{%" in value:
            return value
        if not value.strip():
            raise ValueError("is empty: name a template (" + ", ".join(CHAT_TEMPLATE_NAMES) + ") or give a Jinja one")
        match = difflib.get_close_matches(value.strip().lower(), CHAT_TEMPLATE_NAMES, n=1, cutoff=0.5)
        mean = f"did you mean {match[0]!r}? " if match else ""
        raise ValueError(f"is neither a template name qlora-kit ships nor a Jinja template ({mean}names: "
                         + ", ".join(CHAT_TEMPLATE_NAMES) + ")")


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
    adalora_target_r: int | None = Field(
        None, gt=0, description="adalora: average rank per module at the end, below r (the start); default r // 2."
    )
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

    def _resolve_adalora_target(self) -> None:
        """AdaLoRA prunes from r down to adalora_target_r: it must be below r (peft's allocator fails otherwise)."""
        if self.r < 2:
            raise ValueError(f"lora.type=adalora needs lora.r of at least 2 (it prunes ranks from r down to "
                             f"lora.adalora_target_r), got lora.r={self.r}")
        if self.adalora_target_r is None:
            self.__dict__["adalora_target_r"] = self.r // 2  # no re-validation: the value is in range by construction
        elif self.adalora_target_r >= self.r:
            raise ValueError(f"lora.adalora_target_r ({self.adalora_target_r}) must be below lora.r ({self.r}, the "
                             f"initial rank of lora.type=adalora): AdaLoRA prunes ranks from r down to it")

    @model_validator(mode="after")
    def _check_variant(self) -> "LoraConfig":
        if self.type != "lora":
            for name, used in (("lora.use_dora=true", self.use_dora), ("lora.use_rslora=true", self.use_rslora),
                               (f"lora.init={self.init}", self.init != "default")):
                if used:
                    raise ValueError(f"lora.type={self.type} cannot be combined with {name}; "
                                     f"use lora.type=lora for it, or drop it")
        if self.type == "adalora":
            self._resolve_adalora_target()
        if self.type == "adalora" and self.adalora_tinit_ratio + self.adalora_tfinal_ratio >= 1.0:
            raise ValueError(f"lora.adalora_tinit_ratio ({self.adalora_tinit_ratio}) + lora.adalora_tfinal_ratio "
                             f"({self.adalora_tfinal_ratio}) must be below 1: no steps are left to reallocate ranks")
        return self


class DatasetConfig(_Section):
    """One entry of ``data.datasets``: a source read, audited and split on its own, then mixed by weight."""

    path: str = Field(description="Local .jsonl/.json/.parquet/.csv file, or a hub dataset name.")
    format: DataFormat | None = Field(None, description="Row format of this source (default: data.format).")
    split: str | None = Field(None, description="Hub split (default: data.split).")
    subset: str | None = Field(None, description="Hub dataset configuration name (load_dataset's `name`).")
    weight: float | None = Field(
        None, gt=0, le=1000,
        description="Times each training row of this source is used per epoch: 2 doubles it, 0.5 keeps a seeded "
                    "half (default 1).",
    )
    max_rows: int | None = Field(None, gt=0, description="Use at most this many rows (a seeded random choice).")
    val_path: str | None = Field(None, description="Validation file of this source; else a split of its rows.")


class DataConfig(_Section):
    """Where the training rows come from and how they become tokens."""

    path: str | None = Field(
        None, description="Local .jsonl/.json/.parquet/.csv file, or a hub dataset name (or data.datasets)."
    )
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
    subset: str | None = Field(None, description="Hub dataset configuration name of data.path.")
    max_rows: int | None = Field(None, gt=0, description="Use at most this many rows of data.path (seeded choice).")
    datasets: list[DatasetConfig] | None = Field(
        None,
        description="Several sources instead of data.path: each with path, format, split, subset, weight or "
                    "max_rows, val_path; each audited on its own, validation rows from every one.",
    )
    default_system_prompt: str = Field(
        "keep",
        description="Rows without a system turn: keep (the template's default system prompt, if it has one), drop "
                    "(an empty system turn instead of the default), or a text to use as their system prompt.",
    )

    @model_validator(mode="after")
    def _one_kind_of_source(self) -> "DataConfig":
        if self.path is not None and self.datasets is not None:
            raise ValueError("data.path and data.datasets are both set: use data.path for one source or "
                             "data.datasets for several (move data.path into the list)")
        if self.path is None and self.datasets is None:
            raise ValueError("data.path or data.datasets is required (the training rows)")
        if self.datasets is None:
            return self
        if not self.datasets:
            raise ValueError("data.datasets is an empty list; give at least one entry with a path")
        given = [k for k in ("subset", "max_rows") if getattr(self, k) is not None]
        if given:
            raise ValueError(f"data.{given[0]} applies to data.path; with data.datasets set it per entry")
        if self.val_path is not None and any(d.val_path for d in self.datasets):
            raise ValueError("data.val_path (validation for every source) and a per-entry val_path are both set; "
                             "keep one of them")
        seen: dict[tuple[Any, ...], int] = {}
        for i, d in enumerate(self.datasets, 1):
            key = (d.path, d.split or self.split, d.subset)
            if key in seen:
                raise ValueError(f"data.datasets[{seen[key]}] and data.datasets[{i}] are the same source "
                                 f"({short_repr(d.path, 60)}); give it once, with a weight")
            seen[key] = i
        return self

    @field_validator("default_system_prompt")
    @classmethod
    def _keep_drop_or_text(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("is empty: use keep, drop, or the system prompt's text")
        return value


class TrainConfig(_Section):
    """The training loop: SFT, or preference tuning (DPO, ORPO)."""

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
    startup_checks: bool = Field(
        True,
        description="Before step 1, compare each of qlora-kit's own paths in use (packed attention, fused loss, "
                    "tiled MLP, activation offload, sparse checkpoint layout) with the library path on a slice of the "
                    "first batch; one that differs or raises is switched off for the run. false: skip the check.",
    )
    method: Method = Field(
        "sft",
        description="sft: next-token loss on the replies; dpo / orpo: preference tuning on prompt/chosen/rejected "
        "rows (data.format preference).",
    )
    beta: float = Field(
        DEFAULT_BETA, gt=0, le=100,
        description="dpo: strength of the KL penalty to the reference (IPO's tau); orpo: weight of the odds-ratio "
        "term (lambda). 0.1 as in trl.",
    )
    dpo_loss: DpoLoss = Field(
        "sigmoid",
        description="dpo's loss (trl's loss_type): sigmoid (DPO), ipo (IPO, length-normalised as in trl), hinge (SLiC).",
    )
    report_to: list[str] = Field(
        default_factory=list,
        description="Experiment trackers (accelerate's names: tensorboard, wandb, mlflow, trackio, comet_ml, aim, "
                    "clearml, dvclive, swanlab); default none. They get every value metrics.jsonl gets.",
    )
    run_name: str | None = Field(None, description="Name of the tracked run (default: output_dir's name).")
    tracking_dir: str | None = Field(
        None, description="Where local trackers (TensorBoard, wandb offline, MLflow files) write; "
                          "default OUTPUT_DIR/tracking.",
    )

    @field_validator("report_to", mode="before")
    @classmethod
    def _tracker_names(cls, value: Any) -> Any:
        if value is None or value == "none":
            return []
        names = [value] if isinstance(value, str) else value
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise ValueError("must be a tracker name or a list of them, e.g. [tensorboard]")
        unknown = [n for n in names if n not in TRACKERS]
        if unknown:
            raise ValueError(f"unknown tracker {unknown[0]!r}{closest(unknown[0], list(TRACKERS))}")
        return list(dict.fromkeys(n for n in names if n != "none"))

    @model_validator(mode="after")
    def _check_method(self) -> "TrainConfig":
        # compared with the defaults, not with the keys given: a run's config.yaml lists every key
        if self.method == "sft" and self.beta != DEFAULT_BETA:
            raise ValueError("train.beta applies to train.method dpo or orpo; set train.method, or drop train.beta")
        if self.method != "dpo" and self.dpo_loss != "sigmoid":
            raise ValueError(f"train.dpo_loss applies to train.method=dpo (this run is {self.method}); "
                             "set train.method=dpo, or drop train.dpo_loss")
        return self

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
    def _check_preference(self) -> "Config":
        preference = self.train.method != "sft"
        if self.data.format == "preference" and not preference:
            raise ValueError("data.format=preference rows train with train.method dpo or orpo (this run is sft); "
                             "set train.method")
        if preference and self.data.format not in ("auto", "preference"):
            raise ValueError(f"train.method={self.train.method} trains on prompt/chosen/rejected rows: set "
                             f"data.format to preference or auto (it is {self.data.format})")
        if preference and self.data.train_on_inputs:
            raise ValueError(f"data.train_on_inputs does not apply to train.method={self.train.method}: the loss is "
                             "on the chosen and rejected completions only; drop it")
        if preference and self.lora.init == "lora_ga":
            raise ValueError("lora.init=lora_ga estimates its init from the SFT loss; it is not available with "
                             f"train.method={self.train.method}: use another lora.init")
        if self.train.method == "dpo" and self.lora.init != "default":
            raise ValueError(f"lora.init={self.lora.init} starts with a non-zero adapter, so the reference (the adapter "
                             "switched off) would not be the starting model: train.method=dpo needs lora.init=default")
        if self.model.adapter is not None and self.lora.init != "default":
            raise ValueError(f"lora.init={self.lora.init} initialises new adapters; model.adapter starts from a trained "
                             "one: drop one of them")
        return self

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
