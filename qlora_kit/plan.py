"""Predict the peak GPU memory of a QLoRA run from the model's ``config.json`` alone.

No weights are loaded: the shape (hidden size, layers, heads, vocabulary, ...) comes from
a local model directory, a ``.gguf`` file's metadata, a built-in copy of the published
``config.json`` for well-known hub ids (``qlora_kit/model_shapes``; works offline), or the
hub (``config.json`` only).  ``train`` calls :func:`check_fits` before loading on CUDA.

Notation: B micro-batch, T max_length, H hidden, I intermediate, L layers, V vocabulary,
qd = heads*head_dim, kvd = kv_heads*head_dim, r LoRA rank, s bytes of the compute dtype
(2 for bf16/fp16 — "auto" assumes a CUDA card — 4 for fp32), a = s (adapters and their
gradients are kept in the compute dtype, as ``train`` does).

Assumptions (each is one term of the breakdown):

* ``nf4_weights``: every decoder linear layer in 4 bit: n/2 bytes + one absmax per 64
  values, stored as 1 byte with double quantisation (plus one fp32 constant per 256
  absmax values), or fp32 without it.  Per-tensor code tables/offsets (< 2 KiB per
  matrix) are left to the fragmentation margin.
* ``weights_16bit``: embeddings, lm_head (unless tied), RMSNorm weights and q/k/v biases
  (Qwen2) stay in the compute dtype.
* ``lora_parameters`` / ``lora_gradients``: r*(in+out) per adapted matrix (+out for DoRA),
  ``a`` bytes each; gradients are counted as resident (gradient accumulation keeps them).
* ``optimizer_state``: bitsandbytes 8-bit AdamW: 2 bytes/param + two fp32 absmax per 256
  values, fp32 states (8 bytes/param) for tensors under 4096 values; 32-bit paged AdamW:
  8 bytes/param; torch AdamW: 2*a bytes/param.  Paged states (tensors of >= 1e5 values)
  live in CUDA managed memory: counted here, invisible to ``torch.cuda.max_memory_allocated``.
* ``checkpoints``: non-reentrant gradient checkpointing keeps each layer's input, s*H per
  token per layer (without checkpointing every layer keeps its full activation set).
* ``layer_recompute``: the activations one decoder layer saves when it is recomputed in
  the backward pass, per token: two fp32 RMSNorm inputs (8H); q, k, v and the attention
  output (s*(2qd + 2kvd), k/v widened to qd when GQA heads must be repeated: sdpa with a
  mask, or eager); SwiGLU gate, activation and up (3*s*I); the inputs each LoRA adapter
  saves — one shared copy per input when dropout is 0, but a separate dropout output plus
  a 1-byte mask per adapted module when dropout > 0 (peft keeps them); r*s per adapter.
  Attention with sdpa/flash keeps no T*T score matrix; when a mask is materialised
  (micro-batch > 1 or packing with sdpa) SDPA holds a B*T*T additive mask in the compute
  dtype; eager attention holds B*heads*T*T*(8+2s) bytes of scores/probabilities/grads.
* ``attention_mask``: the B*T*T boolean mask kept for the whole step when materialised
  (compute dtype for eager; none for flash_attention_2).
* ``backward_working``: gradients of the MLP intermediates and of the residual stream
  alive at once during a layer's backward: s*(3I + 2H) per token.
* ``dequant_buffer``: bitsandbytes dequantises one 4-bit matrix at a time to the compute
  dtype for the matmul (largest matrix, s bytes/value).
* ``logits_and_loss``: logits in the compute dtype (B*T*V*s) plus the fp32 loss: the
  log-softmax output and, during its backward, the incoming and outgoing fp32 gradients
  (3 * 4 bytes) — often the largest term for 128K vocabularies.  The training step keeps
  only the loss of the model output, so the logits are gone once the loss's backward has
  run and do not count in the ``backward`` phase.  ``final_norm``: the
  fp32 input of the final RMSNorm (4H per token).
* ``quantisation_buffer`` (load phase): a 16-bit matrix and its fp32 absmax while it is
  being quantised at load time.
* LoRA variants: AdaLoRA adds r singular values per module and keeps three importance
  tensors per parameter (``adalora_importance``); VeRA trains out + r values per module and
  holds the shared frozen projections (``vera_projections``); a non-default ``lora.init`` adds
  an ``init`` phase (see ``_init_phase``: LoRA-GA's float32 gradients of every target weight
  are the large one).
* The peak is the largest of the phases: ``load``, ``init`` (non-default ``lora.init``),
  ``loss`` (end of the forward pass) and ``backward`` (recompute of the last layer).
  ``fragmentation_margin``: 10 % of that peak for the caching allocator's rounding and
  fragmentation; ``cuda_context``: 500 MiB
  for the CUDA context, cuBLAS and bitsandbytes kernels (outside PyTorch's allocator).

Mixture-of-experts models are not modelled and are refused.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from qlora_kit.config import Config, ModelConfig, load_config
from qlora_kit.errors import EXIT_OOM, ConfigError, ModelError, OutOfMemoryError

log = logging.getLogger("qlora_kit")

KiB, MiB, GiB = 1024, 1024**2, 1024**3
NF4_BLOCK = 64  # values per first-level absmax
NESTED_BLOCK = 256  # first-level absmax values per fp32 second-level constant
OPT8_MIN_NUMEL = 4096  # bitsandbytes keeps fp32 states for smaller tensors (min_8bit_size)
OPT8_BLOCK = 256  # values per fp32 absmax in 8-bit optimizer states
PAGED_MIN_NUMEL = 100_000  # bitsandbytes pages only state buffers at least this large
LOSS_FP32_BYTES = 12  # fp32 log-probs + fp32 gradient in + fp32 gradient out, per logit
CUDA_CONTEXT_BYTES = 500 * MiB
FRAGMENTATION_DIVISOR = 10  # margin = peak // 10
DEFAULT_GPU_GIB = 24.0
LENGTH_STEP = 64  # max_length_that_fits is a multiple of this
MAX_SEARCH_LENGTH = 1 << 20
MAX_SEARCH_BATCH = 4096
INIT_WORK_FACTOR = 5  # float32 copies of one matrix alive during a loftq/pissa/olora init

SHAPES_DIR = Path(__file__).parent / "model_shapes"
# Hub ids (lower case) whose published config.json ships in model_shapes/ (architecture only:
# chat/instruct variants share the base model's shape).
BUILTIN_IDS = {
    "meta-llama/llama-2-7b-hf": "llama-2-7b",
    "meta-llama/llama-2-7b-chat-hf": "llama-2-7b",
    "meta-llama/llama-3.1-8b": "llama-3.1-8b",
    "meta-llama/llama-3.1-8b-instruct": "llama-3.1-8b",
    "meta-llama/meta-llama-3.1-8b": "llama-3.1-8b",
    "meta-llama/meta-llama-3.1-8b-instruct": "llama-3.1-8b",
    "mistralai/mistral-7b-v0.3": "mistral-7b-v0.3",
    "mistralai/mistral-7b-instruct-v0.3": "mistral-7b-v0.3",
    "qwen/qwen2.5-7b": "qwen2.5-7b",
    "qwen/qwen2.5-7b-instruct": "qwen2.5-7b",
}
_QKV_BIAS_TYPES = {"qwen2"}
_QK_NORM_TYPES = {"qwen3"}
_FUSED_TYPES = {"phi3"}  # qkv_proj and gate_up_proj


# --------------------------------------------------------------------------- model shape


@dataclass(frozen=True)
class ModelShape:
    """The architecture numbers the planner needs, read from a config.json (or GGUF)."""

    model_type: str
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    tie_word_embeddings: bool = False
    max_position_embeddings: int | None = None
    qkv_bias: bool = False
    qk_norm: bool = False
    source: str = ""

    @property
    def q_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim


@dataclass(frozen=True)
class Linear:
    """One decoder-layer linear layer: input/output features and which activation feeds it."""

    in_features: int
    out_features: int
    group: str  # attn_in | attn_out | mlp_in | mlp_out

    @property
    def numel(self) -> int:
        return self.in_features * self.out_features


def shape_from_config(config: dict[str, Any], source: str = "") -> ModelShape:
    """Build a ModelShape from a config.json mapping.

    Raises:
        ModelError: a required field is missing, or the model is a mixture of experts.
    """
    if isinstance(config.get("text_config"), dict) and "hidden_size" not in config:
        config = config["text_config"]
    if config.get("num_local_experts") or config.get("num_experts"):
        raise ModelError(f"{source or 'this model'} is a mixture-of-experts model, which the planner does not model",
                         "use --skip-memory-check with train, and watch memory yourself")
    missing = [k for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                           "vocab_size") if not config.get(k)]
    if missing:
        raise ModelError(f"{source or 'config.json'} lacks {', '.join(missing)}: cannot plan memory",
                         "point model.name_or_path at a decoder-only causal LM (Llama, Mistral, Qwen2, Gemma, Phi-3)")
    model_type = str(config.get("model_type", "llama"))
    heads = int(config["num_attention_heads"])
    hidden = int(config["hidden_size"])
    return ModelShape(
        model_type=model_type,
        hidden_size=hidden,
        intermediate_size=int(config["intermediate_size"]),
        num_layers=int(config["num_hidden_layers"]),
        num_heads=heads,
        num_kv_heads=int(config.get("num_key_value_heads") or heads),
        head_dim=int(config.get("head_dim") or hidden // heads),
        vocab_size=int(config["vocab_size"]),
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        max_position_embeddings=config.get("max_position_embeddings"),
        qkv_bias=bool(config.get("attention_bias", model_type in _QKV_BIAS_TYPES)),
        qk_norm=model_type in _QK_NORM_TYPES,
        source=source,
    )


def load_shape_file(path: str | Path) -> ModelShape:
    """Read a config.json file.

    Raises:
        ModelError: unreadable or invalid JSON, or missing fields.
    """
    p = Path(path)
    try:
        config = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelError(f"cannot read {p}: {exc}") from exc
    return shape_from_config(config, source=str(p))


def builtin_shape_name(name_or_path: str) -> str | None:
    """The model_shapes/ file stem for a known hub id, else None."""
    return BUILTIN_IDS.get(name_or_path.strip().lower())


def load_builtin_shape(stem: str) -> ModelShape:
    """Load ``model_shapes/<stem>.json`` (e.g. ``llama-3.1-8b``).

    Raises:
        ModelError: no such built-in shape.
    """
    path = SHAPES_DIR / f"{stem}.json"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in SHAPES_DIR.glob("*.json")))
        raise ModelError(f"no built-in model shape {stem!r}", f"choose one of: {known}")
    return load_shape_file(path)


def read_shape(model: ModelConfig) -> ModelShape:
    """Find the shape of ``model.name_or_path`` without loading weights.

    Order: ``.gguf`` metadata, a local directory (or config.json file), a built-in shape
    for a known hub id (no network), then ``config.json`` from the hub.

    Raises:
        ModelError: nothing found, or the hub cannot be reached for an unknown id.
    """
    name = model.name_or_path
    path = Path(name).expanduser()
    if name.lower().endswith(".gguf"):
        return shape_from_gguf(path)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelError(f"{path} has no config.json", "point model.name_or_path at a Hugging Face model directory")
        return load_shape_file(path / "config.json")
    if path.is_file() and path.name == "config.json":
        return load_shape_file(path)
    stem = builtin_shape_name(name)
    if stem is not None:
        return load_builtin_shape(stem)
    from qlora_kit.model import HUB_ID

    if not HUB_ID.match(name):
        raise ModelError(f"model {name!r} not found: not a local path and not a hub id (org/name)")
    return _shape_from_hub(name, model.revision)


def _shape_from_hub(repo_id: str, revision: str | None) -> ModelShape:
    try:
        from huggingface_hub import hf_hub_download

        local = hf_hub_download(repo_id, "config.json", revision=revision)
    except Exception as exc:  # offline, not found, gated, network: all mean "no config.json"
        raise ModelError(
            f"cannot get config.json of {repo_id!r} from the hub ({type(exc).__name__}: {str(exc).splitlines()[0]})",
            "go online once (or log in for gated models), or point model.name_or_path at a local directory "
            f"with its config.json; built-in shapes exist for: {', '.join(sorted(BUILTIN_IDS))}",
        ) from exc
    return load_shape_file(local)


def shape_from_gguf(path: Path) -> ModelShape:
    """Read the architecture from a GGUF file's metadata (tensor data is never read).

    Raises:
        ModelError: missing file, gguf package absent, or metadata incomplete.
    """
    if not path.is_file():
        raise ModelError(f"GGUF file {path} not found", "check model.name_or_path")
    try:
        from gguf import GGUFReader
    except ImportError as exc:
        raise ModelError("reading .gguf files needs the gguf package", "pip install 'qlora-kit[gguf]'") from exc
    try:
        reader = GGUFReader(str(path))
    except Exception as exc:  # malformed files raise many types
        raise ModelError(f"cannot read GGUF {path}: {exc}") from exc
    return shape_from_config(_gguf_to_config(reader), source=str(path))


def _gguf_value(reader: Any, key: str) -> Any:
    fld = reader.fields.get(key)
    return None if fld is None else fld.contents()


def _gguf_to_config(reader: Any) -> dict[str, Any]:
    arch = _gguf_value(reader, "general.architecture") or "llama"
    tensors = {t.name: t for t in reader.tensors}
    vocab = _gguf_value(reader, f"{arch}.vocab_size")
    if vocab is None and "tokenizer.ggml.tokens" in reader.fields:
        vocab = len(reader.fields["tokenizer.ggml.tokens"].data)
    if vocab is None and "token_embd.weight" in tensors:
        vocab = int(tensors["token_embd.weight"].shape[-1])
    return {
        "model_type": arch,
        "hidden_size": _gguf_value(reader, f"{arch}.embedding_length"),
        "intermediate_size": _gguf_value(reader, f"{arch}.feed_forward_length"),
        "num_hidden_layers": _gguf_value(reader, f"{arch}.block_count"),
        "num_attention_heads": _gguf_value(reader, f"{arch}.attention.head_count"),
        "num_key_value_heads": _gguf_value(reader, f"{arch}.attention.head_count_kv"),
        "head_dim": _gguf_value(reader, f"{arch}.attention.key_length"),
        "vocab_size": vocab,
        "max_position_embeddings": _gguf_value(reader, f"{arch}.context_length"),
        "tie_word_embeddings": "output.weight" not in tensors,
    }


# --------------------------------------------------------------------------- linear layers and LoRA


def linear_layers(shape: ModelShape) -> dict[str, Linear]:
    """The quantised linear layers of one decoder layer, by module name."""
    h, i, qd, kvd = shape.hidden_size, shape.intermediate_size, shape.q_dim, shape.kv_dim
    if shape.model_type in _FUSED_TYPES:
        return {
            "qkv_proj": Linear(h, qd + 2 * kvd, "attn_in"),
            "o_proj": Linear(qd, h, "attn_out"),
            "gate_up_proj": Linear(h, 2 * i, "mlp_in"),
            "down_proj": Linear(i, h, "mlp_out"),
        }
    return {
        "q_proj": Linear(h, qd, "attn_in"),
        "k_proj": Linear(h, kvd, "attn_in"),
        "v_proj": Linear(h, kvd, "attn_in"),
        "o_proj": Linear(qd, h, "attn_out"),
        "gate_proj": Linear(h, i, "mlp_in"),
        "up_proj": Linear(h, i, "mlp_in"),
        "down_proj": Linear(i, h, "mlp_out"),
    }


def resolve_targets(spec: str | list[str], shape: ModelShape) -> list[str]:
    """Module names adapted by LoRA for ``lora.target_modules``.

    Raises:
        ModelError: a named module is not a linear layer of this architecture.
    """
    layers = linear_layers(shape)
    if spec == "all-linear":
        return list(layers)
    if spec == "attention":
        return [n for n, lin in layers.items() if lin.group.startswith("attn")]
    unknown = [n for n in spec if n not in layers]
    if unknown:
        raise ModelError(f"lora.target_modules {unknown} are not linear layers of a {shape.model_type} model",
                         f"choose from: {', '.join(layers)} (or 'attention' / 'all-linear')")
    return list(spec)


def nf4_bytes(numel: int, double_quant: bool = True) -> int:
    """Bytes of one matrix in bitsandbytes 4-bit (NF4/FP4), blocksize 64."""
    blocks = math.ceil(numel / NF4_BLOCK)
    data = math.ceil(numel / 2)
    if double_quant:
        return data + blocks + 4 * math.ceil(blocks / NESTED_BLOCK)
    return data + 4 * blocks


def adapter_tensors(shape: ModelShape, targets: list[str], r: int, dora: bool) -> list[int]:
    """Element counts of every trainable tensor (A, B, DoRA magnitude) in the whole model."""
    layers = linear_layers(shape)
    per_layer: list[int] = []
    for name in targets:
        lin = layers[name]
        per_layer += [r * lin.in_features, lin.out_features * r]
        if dora:
            per_layer.append(lin.out_features)
    return per_layer * shape.num_layers


def variant_tensors(shape: ModelShape, targets: list[str], lora: Any) -> tuple[list[int], int]:
    """(element counts of every trainable tensor, elements of frozen adapter state) for ``lora.type``.

    LoRA: A, B (+ DoRA magnitude).  AdaLoRA: A, B and the singular values E (r each) per module.
    VeRA: lambda_b (out) and lambda_d (r) per module, plus the shared frozen projections
    vera_A (r x largest in) and vera_B (largest out x r).
    """
    if lora.type == "lora":
        return adapter_tensors(shape, targets, lora.r, lora.use_dora), 0
    layers = linear_layers(shape)
    per_layer: list[int] = []
    for name in targets:
        lin = layers[name]
        if lora.type == "adalora":
            per_layer += [lora.r * lin.in_features, lin.out_features * lora.r, lora.r]
        else:
            per_layer += [lin.out_features, lora.r]
    frozen = 0
    if lora.type == "vera":
        frozen = lora.r * (max(layers[n].in_features for n in targets) + max(layers[n].out_features for n in targets))
    return per_layer * shape.num_layers, frozen


def optimizer_bytes(numels: list[int], optimizer: str, adapter_bytes: int) -> tuple[int, int]:
    """(total, paged) optimizer-state bytes for tensors of the given sizes."""
    total = paged = 0
    for n in numels:
        if optimizer == "adamw_torch":
            total += 2 * adapter_bytes * n
            continue
        if optimizer == "paged_adamw_8bit" and n >= OPT8_MIN_NUMEL:
            state = 2 * n
            absmax = 2 * 4 * math.ceil(n / OPT8_BLOCK)
        else:
            state, absmax = 8 * n, 0
        total += state + absmax
        if n >= PAGED_MIN_NUMEL:
            paged += state
    return total, paged


# --------------------------------------------------------------------------- the estimate


@dataclass
class MemoryPlan:
    """Predicted memory of one configuration: components per phase, in bytes."""

    shape: ModelShape
    micro_batch_size: int
    max_length: int
    compute_dtype: str
    targets: list[str]
    trainable_parameters: int
    phases: dict[str, dict[str, int]]
    paged_optimizer_bytes: int
    weights_bytes: int
    peak_phase: str = ""
    allocated_peak: int = 0
    fragmentation: int = 0
    cuda_context: int = CUDA_CONTEXT_BYTES

    def __post_init__(self) -> None:
        sums = {name: sum(parts.values()) for name, parts in self.phases.items()}
        self.peak_phase = max(sums, key=lambda k: sums[k])
        self.allocated_peak = sums[self.peak_phase]
        self.fragmentation = self.allocated_peak // FRAGMENTATION_DIVISOR

    @property
    def total_bytes(self) -> int:
        """Predicted GPU memory in use at the peak (what nvidia-smi would show)."""
        return self.allocated_peak + self.fragmentation + self.cuda_context

    @property
    def torch_allocated_peak(self) -> int:
        """Predicted ``torch.cuda.max_memory_allocated`` (paged optimizer state excluded)."""
        paged = self.paged_optimizer_bytes if "optimizer_state" in self.phases[self.peak_phase] else 0
        return self.allocated_peak - paged

    @property
    def torch_reserved_peak(self) -> int:
        """Predicted ``torch.cuda.max_memory_reserved``."""
        return self.torch_allocated_peak + self.fragmentation

    def breakdown(self) -> dict[str, int]:
        """Components at the peak phase, plus fragmentation margin and CUDA context."""
        return {**self.phases[self.peak_phase], "fragmentation_margin": self.fragmentation,
                "cuda_context": self.cuda_context}

    def phase_totals(self) -> dict[str, int]:
        """Total bytes of each phase (load, init, loss, backward)."""
        return {name: sum(parts.values()) for name, parts in self.phases.items()}


def compute_bytes(compute_dtype: str) -> int:
    """Bytes per value of the compute dtype ('auto' = bf16 on CUDA, fp16 where bf16 is missing)."""
    return 4 if compute_dtype == "float32" else 2


def _mask_mode(cfg: Config, batch: int) -> str:
    """'none', 'sdpa' (bool mask + per-layer additive copy) or 'eager' (float mask + T*T scores)."""
    attn = cfg.model.attn_implementation
    if attn == "eager":
        return "eager"
    if attn == "sdpa" and (batch > 1 or cfg.data.packing):
        return "sdpa"
    return "none"


def layer_saved_per_token(shape: ModelShape, cfg: Config, targets: list[str], kv_width: int) -> int:
    """Bytes per token one decoder layer saves for its backward pass (T*T terms excluded)."""
    s = compute_bytes(cfg.model.compute_dtype)
    h, i, qd = shape.hidden_size, shape.intermediate_size, shape.q_dim
    total = 2 * 4 * h  # fp32 inputs of the two RMSNorms
    total += s * (qd + 2 * kv_width) + s * qd  # q, k, v into attention, attention output
    total += 3 * s * i  # gate (SiLU input), SiLU output, up
    if shape.qk_norm:
        total += 4 * (qd + shape.kv_dim)
    return total + lora_saved_per_token(shape, cfg, targets)


def lora_saved_per_token(shape: ModelShape, cfg: Config, targets: list[str]) -> int:
    """Bytes per token the adapters save: their inputs (dropout copies) and r-wide middles."""
    s = compute_bytes(cfg.model.compute_dtype)
    layers = linear_layers(shape)
    dropout = cfg.lora.dropout > 0
    by_group: dict[str, list[int]] = {}
    for name in targets:
        by_group.setdefault(layers[name].group, []).append(layers[name].in_features)
    total = 0
    for widths in by_group.values():
        total += sum((s + 1) * w for w in widths) if dropout else s * widths[0]
    total += len(targets) * s * cfg.lora.r
    if cfg.lora.type == "vera":  # lambda_d * (x A) kept beside x A, and (.)B kept for lambda_b
        total += sum(s * (cfg.lora.r + layers[n].out_features) for n in targets)
    if cfg.lora.use_dora:
        total += sum(s * layers[n].out_features for n in targets)  # base output kept for the magnitude
    return total


def attention_quadratic(shape: ModelShape, cfg: Config, batch: int, length: int) -> tuple[int, int]:
    """(mask kept all step, per-layer T*T bytes during recompute) for this attention setup."""
    s = compute_bytes(cfg.model.compute_dtype)
    mode = _mask_mode(cfg, batch)
    square = batch * length * length
    if mode == "eager":
        return square * s, square * shape.num_heads * (8 + 2 * s)
    if mode == "sdpa":
        return square, square * s
    return 0, 0


def estimate(cfg: Config, shape: ModelShape, micro_batch_size: int | None = None,
             max_length: int | None = None) -> MemoryPlan:
    """Predict the memory of ``cfg`` on ``shape`` (optionally at another micro-batch/length).

    Raises:
        ModelError: LoRA targets that this architecture does not have.
    """
    batch = micro_batch_size or cfg.train.micro_batch_size
    length = max_length or cfg.train.max_length
    s = compute_bytes(cfg.model.compute_dtype)
    targets = resolve_targets(cfg.lora.target_modules, shape)
    weights = _weight_components(shape, cfg)
    adapters = _adapter_components(shape, cfg, targets)
    dynamic = _activation_phases(shape, cfg, targets, batch, length)
    max_linear = max(lin.numel for lin in linear_layers(shape).values())
    load = {**weights, "quantisation_buffer": max_linear * s + 4 * math.ceil(max_linear / NF4_BLOCK)}
    phases = {
        "load": load,
        "loss": {**weights, **adapters, **dynamic["loss"]},
        "backward": {**weights, **adapters, **dynamic["backward"]},
    }
    init = _init_phase(shape, cfg, targets, batch, length)
    if init:
        phases["init"] = {**weights, **init}
    numels, _ = variant_tensors(shape, targets, cfg.lora)
    _, paged = optimizer_bytes(numels, cfg.train.optimizer, s)
    plan = MemoryPlan(
        shape=shape, micro_batch_size=batch, max_length=length,
        compute_dtype="float32" if s == 4 else ("bfloat16" if cfg.model.compute_dtype == "auto"
                                                else cfg.model.compute_dtype),
        targets=targets, trainable_parameters=sum(numels), phases=phases, paged_optimizer_bytes=paged,
        weights_bytes=sum(weights.values()),
    )
    return plan


def _weight_components(shape: ModelShape, cfg: Config) -> dict[str, int]:
    s = compute_bytes(cfg.model.compute_dtype)
    layers = linear_layers(shape)
    nf4 = shape.num_layers * sum(nf4_bytes(lin.numel, cfg.model.double_quant) for lin in layers.values())
    h, L = shape.hidden_size, shape.num_layers
    params16 = shape.vocab_size * h * (1 if shape.tie_word_embeddings else 2) + (2 * L + 1) * h
    if shape.qkv_bias:
        params16 += L * (shape.q_dim + 2 * shape.kv_dim)
    if shape.qk_norm:
        params16 += L * 2 * shape.head_dim
    return {"nf4_weights": nf4, "weights_16bit": params16 * s}


def _adapter_components(shape: ModelShape, cfg: Config, targets: list[str]) -> dict[str, int]:
    a = compute_bytes(cfg.model.compute_dtype)
    numels, frozen = variant_tensors(shape, targets, cfg.lora)
    opt, _ = optimizer_bytes(numels, cfg.train.optimizer, a)
    n = sum(numels)
    parts = {"lora_parameters": n * a, "lora_gradients": n * a, "optimizer_state": opt}
    if frozen:
        parts["vera_projections"] = frozen * a
    if cfg.lora.type == "adalora":
        parts["adalora_importance"] = 3 * n * a  # RankAllocator: score, its average and its uncertainty
    return parts


def _init_phase(shape: ModelShape, cfg: Config, targets: list[str], batch: int, length: int) -> dict[str, int]:
    """Memory of ``lora.init`` beyond the weights (empty for the default init).

    lora_ga: a float32 gradient per target weight, the inputs each target's hook keeps until its
    backward, and one forward/backward pass without adapters (the larger of the loss and
    backward working sets).  loftq / pissa / olora: the adapters, plus the float32 working set
    of one matrix's SVD/QR and residual (W, residual, U, Vh, product: ``INIT_WORK_FACTOR`` x
    the largest target, 4 bytes each) and its 4-bit replacement.
    """
    if cfg.lora.init == "default":
        return {}
    layers = linear_layers(shape)
    largest = max(layers[n].numel for n in targets)
    if cfg.lora.init == "lora_ga":
        s = compute_bytes(cfg.model.compute_dtype)
        tokens = batch * length
        widths = {layers[n].group: layers[n].in_features for n in targets}
        dynamic = _activation_phases(shape, cfg, targets, batch, length)
        working = max(sum(dynamic["loss"].values()), sum(dynamic["backward"].values()))
        return {"loraga_gradients": _per_pass(4 * sum(layers[n].numel for n in targets), shape, cfg, 4 * largest),
                "loraga_inputs": _per_pass(s * tokens * sum(widths.values()), shape, cfg, 0),
                "loraga_forward_backward": working}
    adapters = _adapter_components(shape, cfg, targets)["lora_parameters"]
    return {"lora_parameters": adapters, "init_working": INIT_WORK_FACTOR * 4 * largest + nf4_bytes(largest)}


def _activation_phases(shape: ModelShape, cfg: Config, targets: list[str], batch: int,
                       length: int) -> dict[str, dict[str, int]]:
    s = compute_bytes(cfg.model.compute_dtype)
    h, i, v, L = shape.hidden_size, shape.intermediate_size, shape.vocab_size, shape.num_layers
    tokens = batch * length
    mode = _mask_mode(cfg, batch)
    repeat_kv = mode != "none" and shape.num_kv_heads < shape.num_heads
    kv_width = shape.q_dim if repeat_kv else shape.kv_dim
    mask, per_layer_square = attention_quadratic(shape, cfg, batch, length)
    layer = layer_saved_per_token(shape, cfg, targets, kv_width) * tokens + per_layer_square
    max_linear = max(lin.numel for lin in linear_layers(shape).values())
    dequant = max_linear * s * (3 if cfg.lora.use_dora else 1)
    working = s * (3 * i + 2 * h) * tokens
    if cfg.train.gradient_checkpointing:
        stored = {"checkpoints": L * s * h * tokens}
        recompute = {"layer_recompute": layer}
    else:
        stored = {"layer_activations": L * layer}
        recompute = {}
    common = {**stored, "attention_mask": mask}
    loss = {**common, "final_norm": 4 * h * tokens, "logits_and_loss": (s + LOSS_FP32_BYTES) * v * tokens}
    backward = {**common, **recompute, "backward_working": working, "dequant_buffer": dequant}
    return {"loss": loss, "backward": backward}


def _per_pass(per_layer: int, shape: ModelShape, cfg: Config, slack: int) -> int:
    """Bytes of one LoRA-GA gradient pass: the targets are cut into ``lora.loraga_passes`` contiguous groups of
    about equal size, so one group holds total/passes plus at most one layer (and one matrix, ``slack``)."""
    total = per_layer * shape.num_layers
    passes = cfg.lora.loraga_passes
    return total if passes == 1 else min(total, total // passes + per_layer + slack)


# --------------------------------------------------------------------------- what fits


def fits(cfg: Config, shape: ModelShape, budget: int, micro_batch_size: int | None = None,
         max_length: int | None = None) -> bool:
    """True when the predicted total is within ``budget`` bytes."""
    return estimate(cfg, shape, micro_batch_size, max_length).total_bytes <= budget


def max_length_that_fits(cfg: Config, shape: ModelShape, budget: int) -> int | None:
    """Largest max_length (a multiple of 64, up to the model's context) that fits; None if none does."""
    limit = min(shape.max_position_embeddings or MAX_SEARCH_LENGTH, MAX_SEARCH_LENGTH)
    return _largest(lambda k: fits(cfg, shape, budget, max_length=k * LENGTH_STEP), 1, limit // LENGTH_STEP,
                    scale=LENGTH_STEP)


def micro_batch_size_that_fits(cfg: Config, shape: ModelShape, budget: int) -> int | None:
    """Largest micro_batch_size at the configured max_length that fits; None if 1 does not."""
    return _largest(lambda b: fits(cfg, shape, budget, micro_batch_size=b), 1, MAX_SEARCH_BATCH)


def _largest(ok: Any, lo: int, hi: int, scale: int = 1) -> int | None:
    """Bisection for the largest k in [lo, hi] with ok(k), assuming ok is monotone decreasing."""
    if hi < lo or not ok(lo):
        return None
    if ok(hi):
        return hi * scale
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if ok(mid) else (lo, mid)
    return lo * scale


def suggest(cfg: Config, shape: ModelShape, budget: int) -> str:
    """The knob(s) to turn so that the run fits ``budget``; every option offered is checked to fit."""
    t, b, accum = cfg.train, cfg.train.micro_batch_size, cfg.train.gradient_accumulation_steps
    options = []
    length = max_length_that_fits(cfg, shape, budget)
    if length is not None and length < t.max_length:
        options.append(f"--set train.max_length={length} (the longest that fits)")
    batch = micro_batch_size_that_fits(cfg, shape, budget)
    if batch is not None and batch < b:
        options.append(f"--set train.micro_batch_size={batch} "
                       f"--set train.gradient_accumulation_steps={accum * math.ceil(b / batch)}")
    elif b > 1:
        single = _variant(cfg, "train", micro_batch_size=1)
        length1 = max_length_that_fits(single, shape, budget)
        if length1 is not None and length1 > (length or 0):
            options.append(f"--set train.micro_batch_size=1 --set train.gradient_accumulation_steps={accum * b} "
                           f"--set train.max_length={min(length1, t.max_length)}")
    knobs = [
        ("train", {"gradient_checkpointing": True}, "--set train.gradient_checkpointing=true"),
        ("lora", {"dropout": 0.0}, "--set lora.dropout=0 (no per-adapter dropout copies)"),
    ]
    if cfg.lora.init == "lora_ga":  # its fp32 gradient of every target weight, not the activations, is the peak
        passes = _largest(lambda k: not fits(_variant(cfg, "lora", loraga_passes=k), shape, budget), 1, 64)
        if passes is not None and passes < 64 and passes + 1 > cfg.lora.loraga_passes:
            options.append(f"--set lora.loraga_passes={passes + 1} (LoRA-GA's gradients estimated in "
                           f"{passes + 1} groups, the samples re-run for each)")
        knobs += [("lora", {"target_modules": "attention"},
                   "--set lora.target_modules=attention (LoRA-GA keeps a float32 gradient of every target weight)"),
                  ("lora", {"init": "default"}, "--set lora.init=default")]
    for section, change, text in knobs:
        if getattr(getattr(cfg, section), next(iter(change))) != next(iter(change.values())) and fits(
                _variant(cfg, section, **change), shape, budget):
            options.append(text)
    if not options:
        smallest = estimate(_variant(cfg, "train", micro_batch_size=1, max_length=256), shape).total_bytes
        return (f"even micro_batch_size=1 at max_length=256 needs {smallest / GiB:.1f} GiB: "
                "use a card with more memory, or a smaller model")
    return "; or ".join(options)


def _variant(cfg: Config, section: str, **values: Any) -> Config:
    """A copy of ``cfg`` with some values of one section changed."""
    copy = cfg.model_copy(deep=True)
    for key, value in values.items():
        setattr(getattr(copy, section), key, value)
    return copy


# --------------------------------------------------------------------------- train's pre-flight


def check_fits(cfg: Config, source_dir: Path, device: Any) -> None:
    """Refuse a run predicted not to fit in the free memory of ``device`` (CUDA only).

    Raises:
        OutOfMemoryError: predicted peak above the free memory, with the knob to turn.
        ModelError: ``source_dir`` has no readable config.json.
    """
    import torch

    dev = torch.device(device)
    if dev.type != "cuda":
        return
    shape = load_shape_file(Path(source_dir) / "config.json")
    plan = estimate(cfg, shape)
    free, total = torch.cuda.mem_get_info(dev)  # our CUDA context already exists and is not "free"
    available = free + torch.cuda.memory_reserved(dev)
    need = plan.total_bytes - plan.cuda_context
    name = torch.cuda.get_device_name(dev)
    if need <= available:
        log.info("memory plan: ~%.1f GiB predicted peak, %.1f GiB free on %s", need / GiB, available / GiB, name)
        return
    raise OutOfMemoryError(
        f"this run is predicted to need {need / GiB:.1f} GiB of GPU memory at its peak "
        f"({plan.peak_phase} phase, micro_batch_size={plan.micro_batch_size}, max_length={plan.max_length}) "
        f"but only {available / GiB:.1f} GiB is free on {name} ({total / GiB:.1f} GiB card)",
        suggest(cfg, shape, available + plan.cuda_context)
        + "; `qlora-kit plan CONFIG` shows the breakdown; --skip-memory-check trains anyway",
    )


# --------------------------------------------------------------------------- CLI


def run_plan(config_path: str | Path, overrides: list[str], gpu_memory: float | None = None,
             as_json: bool = False) -> int:
    """``qlora-kit plan``: print the prediction; exit 0 when it fits, EXIT_OOM when it does not.

    Raises:
        ConfigError: invalid config.
        ModelError: the model's shape cannot be found.
    """
    cfg, _ = load_config(config_path, overrides)
    shape = read_shape(cfg.model)
    budget, budget_source = gpu_budget(gpu_memory)
    report = build_report(cfg, shape, budget, budget_source)
    if as_json:
        print(json.dumps(report, indent=2))
    else:
        print_report(report)
    return 0 if report["fits"] else EXIT_OOM


def gpu_budget(gpu_memory: float | None) -> tuple[int, str]:
    """Bytes to plan for: ``--gpu-memory`` GiB, else this GPU's total, else an assumed 24 GiB card."""
    if gpu_memory is not None:
        if gpu_memory <= 0:
            raise ConfigError(f"--gpu-memory must be positive GiB, got {gpu_memory}")
        return int(gpu_memory * GiB), f"--gpu-memory {gpu_memory:g} GiB"
    try:
        import torch

        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            return int(props.total_memory), f"this GPU ({props.name})"
    except Exception:  # a broken CUDA setup must not stop planning
        pass
    return int(DEFAULT_GPU_GIB * GiB), f"assumed {DEFAULT_GPU_GIB:g} GiB card (no GPU here; set --gpu-memory)"


def build_report(cfg: Config, shape: ModelShape, budget: int, budget_source: str = "") -> dict[str, Any]:
    """The JSON-able prediction, with what fits ``budget``."""
    plan = estimate(cfg, shape)
    return {
        "model": cfg.model.name_or_path,
        "shape": {k: v for k, v in asdict(shape).items()},
        "micro_batch_size": plan.micro_batch_size,
        "max_length": plan.max_length,
        "compute_dtype": plan.compute_dtype,
        "gradient_checkpointing": cfg.train.gradient_checkpointing,
        "optimizer": cfg.train.optimizer,
        "double_quant": cfg.model.double_quant,
        "lora_targets": plan.targets,
        "lora_type": cfg.lora.type,
        "lora_init": cfg.lora.init,
        "trainable_parameters": plan.trainable_parameters,
        "weights_bytes": plan.weights_bytes,
        "peak_phase": plan.peak_phase,
        "peak_allocated_bytes": plan.allocated_peak,
        "torch_allocated_peak_bytes": plan.torch_allocated_peak,
        "torch_reserved_peak_bytes": plan.torch_reserved_peak,
        "total_bytes": plan.total_bytes,
        "total_gib": round(plan.total_bytes / GiB, 2),
        "gpu_memory_bytes": budget,
        "gpu_memory_source": budget_source,
        "fits": plan.total_bytes <= budget,
        "headroom_bytes": budget - plan.total_bytes,
        "max_length_that_fits": max_length_that_fits(cfg, shape, budget),
        "micro_batch_size_that_fits": micro_batch_size_that_fits(cfg, shape, budget),
        "breakdown": plan.breakdown(),
        "phases": plan.phase_totals(),
        "suggestion": None if plan.total_bytes <= budget else suggest(cfg, shape, budget),
    }


_LABELS = {
    "nf4_weights": "4-bit linear weights (NF4{dq})",
    "weights_16bit": "16-bit embeddings, lm_head, norms",
    "lora_parameters": "LoRA parameters",
    "lora_gradients": "LoRA gradients",
    "optimizer_state": "optimizer state ({opt})",
    "checkpoints": "activation checkpoints (1 per layer)",
    "layer_activations": "activations of all layers (no checkpointing)",
    "attention_mask": "attention mask",
    "layer_recompute": "one layer recomputed for backward",
    "backward_working": "backward working gradients",
    "dequant_buffer": "dequantised weight buffer",
    "final_norm": "final norm input (fp32)",
    "logits_and_loss": "logits + fp32 loss and its gradient",
    "quantisation_buffer": "16-bit matrix being quantised",
    "fragmentation_margin": "allocator fragmentation margin (10%)",
    "cuda_context": "CUDA context + kernels",
    "vera_projections": "VeRA shared frozen projections",
    "adalora_importance": "AdaLoRA importance scores",
    "loraga_gradients": "LoRA-GA fp32 gradients of the target weights",
    "loraga_inputs": "LoRA-GA target inputs kept for the gradient",
    "loraga_forward_backward": "LoRA-GA forward/backward pass",
    "init_working": "adapter init SVD/QR working set (1 matrix)",
}


def _human(n: int) -> str:
    return f"{n / GiB:.2f} GiB" if abs(n) >= GiB else f"{n / MiB:.0f} MiB"


def print_report(report: dict[str, Any]) -> None:
    """Print the prediction as a rich table with a verdict."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    table = Table(title=f"Memory plan: {report['model']} (B={report['micro_batch_size']}, "
                        f"T={report['max_length']}, {report['compute_dtype']}, peak in {report['peak_phase']} phase)")
    table.add_column("component")
    table.add_column("memory", justify="right")
    dq = " + double quant" if report["double_quant"] else ""
    for key, value in report["breakdown"].items():
        if value:
            label = _LABELS.get(key, key).format(dq=dq, opt=report["optimizer"])
            table.add_row(label, _human(value))
    table.add_row("[bold]predicted peak[/bold]", f"[bold]{_human(report['total_bytes'])}[/bold]")
    table.add_row("GPU memory", f"{_human(report['gpu_memory_bytes'])} ({report['gpu_memory_source']})")
    console.print(table)
    verdict = "[green]fits[/green]" if report["fits"] else "[red]does NOT fit[/red]"
    console.print(f"{verdict}: headroom {_human(report['headroom_bytes'])}; "
                  f"{report['trainable_parameters']:,} trainable parameters on {', '.join(report['lora_targets'])}")
    console.print(f"largest max_length that fits: {report['max_length_that_fits']}; "
                  f"largest micro_batch_size that fits: {report['micro_batch_size_that_fits']}")
    if report["suggestion"]:
        console.print(f"fix: {report['suggestion']}")
