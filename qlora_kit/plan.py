"""Predict the peak GPU memory of a QLoRA run from the model's ``config.json`` alone.

No weights are loaded: the shape (hidden size, layers, heads, vocabulary, ...) comes from
a local model directory, a ``.gguf`` file's metadata, a built-in copy of the published
``config.json`` for well-known hub ids (``qlora_kit/model_shapes``; works offline), or the
hub (``config.json`` only).  ``train`` resolves the ``"auto"`` memory settings with
:func:`resolve_auto` and calls :func:`check_fits` before loading on CUDA.

The model follows what the training code keeps alive (docs/CONTRACTS.md, "Memory
techniques"); each term is one row of the breakdown.  Notation: N tokens of a micro-batch
(micro_batch_size x max_length: packed rows carry no padding, padded rows count their
padding), N_lab of them labelled (all, unless told), H hidden, I intermediate, L layers,
V vocabulary, qd/kvd query/key-value widths, r LoRA rank, s bytes of the compute dtype (2
on CUDA, 4 for fp32), a bytes of an adapter weight (4: fp32 master copies by default).

* Static: ``nf4_weights`` (4-bit values + absmax, double-quantised or fp32),
  ``weights_16bit`` (embeddings, lm_head, norms, biases), ``lora_parameters`` and
  ``lora_gradients`` (a bytes each, gradients resident across gradient accumulation),
  ``optimizer_state`` (8-bit AdamW: 2 bytes/param + fp32 absmax per 256 values, fp32 for
  tensors under 4096 values; 32-bit: 8 bytes/param; paged states of >= 1e5 values live in
  CUDA managed memory: counted, but invisible to ``torch.cuda.max_memory_allocated``).
* ``autocast_adapter_copies``: with 16-bit compute and fp32 adapters autocast caches a
  16-bit copy of every adapter weight for the forward pass.
* ``step_inputs``: token ids, labels, positions (int64) and the RoPE cos/sin tables that
  every layer's checkpoint keeps.
* ``checkpoints``: every ``checkpoint_every_n_layers``-th layer keeps only its input (s*H
  per token); with activation offload they live in pinned host memory (``host_memory``)
  and the GPU holds the layer being recomputed plus one prefetched input.
  ``layer_activations``: the layers that are not checkpointed keep everything they save.
* What one layer saves (``layer_recompute`` when it is recomputed): two RMSNorms (fp32
  input copy + fp32 reciprocal norm), the attention's q, k (after RoPE), v, output and
  fp32 log-sum-exp (flash / memory-efficient kernels: no T*T matrix, K/V never repeated),
  the MLP's gate, SiLU output and up (3*s*I; with ``tiled_mlp`` only the MLP input: the
  intermediates exist for one 4096-token tile at a time), and the adapters' inputs: with
  dropout every adapted module keeps its dropout output + mask, without one shared copy
  per input; the r-wide middle of each adapter.  Eager attention adds T*T scores per head.
* ``backward_working``: the largest of four moments of the backward pass (``peak_stage``):
  the final norm's backward, a layer's MLP backward (two ``[N, I]`` gradients, or one
  tile), its post-attention RMSNorm backward (~5 fp32 ``[N, H]`` temporaries), its
  attention backward (FlashAttention-2 buffers: dq/dk/dv, fp32 dq accumulator, dk/dv
  expanded to every query head for grouped-query attention).  ``dequant_buffer``: one 4-bit
  matrix dequantised to the compute dtype for the matmul.
* Loss: ``fused_loss`` (default): no logits; a 4096 x 32768 projection tile, the
  labelled hidden states (s bytes, saved; CUDA projects only labelled positions) and their
  fp32 gradient: flat in T for the vocabulary, linear in N_lab*H.  ``logits_and_loss`` (``fused_loss: false``): B*T*V
  logits in the compute dtype + fp32 log-probabilities and gradients (12 bytes/logit).
  ``final_norm``: the final RMSNorm's fp32 input.
* LoRA variants: AdaLoRA adds r singular values per module and keeps three importance
  tensors per parameter (``adalora_importance``); VeRA trains out + r values per module,
  holds the shared frozen projections (``vera_projections``) and keeps ``x A`` and its
  scaled copy per token; a non-default ``lora.init`` adds an ``init`` phase (see
  :func:`init_phase`: LoRA-GA's float32 gradients of every target weight are the large one).
* The peak is the largest of the phases: ``load`` (a 16-bit matrix being quantised),
  ``init`` (non-default ``lora.init``), ``loss`` (end of the forward pass) and ``backward``.  ``fragmentation_margin``: 5 % of
  the peak with ``expandable_segments`` (what ``train`` sets), 10 % when
  ``PYTORCH_CUDA_ALLOC_CONF`` is set without it; ``cuda_context``: 500 MiB for the CUDA
  context, cuBLAS and bitsandbytes kernels (outside PyTorch's allocator).  Both are
  assumptions until a GPU benchmark measures them (benchmarks/README.md).

Several GPUs (``--num-gpus N``, and ``train`` under a launcher) are planned per GPU
(:class:`Parallel`, :func:`parallel_components`): each GPU runs ``micro_batch_size`` rows, so
activations are per GPU as for one.  DDP keeps the whole model on every GPU and adds its
gradient buckets (``ddp_gradient_buckets``: one more copy of the adapter gradients).  FSDP
(FULL_SHARD) divides the packed 4-bit values, the layers' 16-bit norms, the adapters, their
gradients and optimizer state by N; the quantisation constants (not parameters, so not
sharded) and the root unit (embeddings, lm_head, final norm) stay whole on every GPU, and two
decoder layers are gathered at a time (``fsdp_gathered_layers``: the one computing, the one
prefetched).  The ``load`` phase of FSDP is not sharded: every rank quantises the whole
base on its own GPU before FSDP shards it (transformers 5.x has no rank-0-only loading for
4-bit models).  With ``fsdp_offload_params`` (``fsdp-offload``) the shards live in host
memory, and the base is loaded on the CPU: the GPU holds two layers being sharded, the root
unit and the quantisation constants while loading, the host the whole 4-bit model
(``host_memory``, per process).

Mixture-of-experts models are not modelled and are refused.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from qlora_kit.config import Config, ModelConfig, attribute_origin, load_config
from qlora_kit.errors import EXIT_OOM, ConfigError, ModelError, OutOfMemoryError

log = logging.getLogger("qlora_kit")

KiB, MiB, GiB = 1024, 1024**2, 1024**3
NF4_BLOCK = 64  # values per first-level absmax
NESTED_BLOCK = 256  # first-level absmax values per fp32 second-level constant
OPT8_MIN_NUMEL = 4096  # bitsandbytes keeps fp32 states for smaller tensors (min_8bit_size)
OPT8_BLOCK = 256  # values per fp32 absmax in 8-bit optimizer states
PAGED_MIN_NUMEL = 100_000  # bitsandbytes pages only state buffers at least this large
LOSS_FP32_BYTES = 12  # fp32 log-probs + fp32 gradient in + fp32 gradient out, per logit
LOSS_TOKEN_TILE = 4096  # trl's ChunkedLogProbFunction: tokens per projection tile (TOKEN_CHUNK_SIZE)
LOSS_VOCAB_TILE = 32768  # vocabulary entries per tile (trl.trainer.utils._CHUNKED_LOGPROB_CHUNK_SIZE)
LOSS_SCALARS_PER_LABEL = 48  # fp32 online-softmax statistics, log-probs, int64 target per labelled token
MLP_TILE_TOKENS = 4096  # qlora_kit.ops.tiled_mlp.MLP_TILE_TOKENS
NORM_BACKWARD_FP32_COPIES = 5  # fp32 [N, H] temporaries of an RMSNorm's backward (measured on CPU, same ops)
OFFLOAD_IN_FLIGHT = 2  # offloaded checkpoints on the GPU at once: the layer recomputed + one prefetched
STEP_INPUT_BYTES = 24  # int64 input_ids, labels, position_ids per token
CUDA_CONTEXT_BYTES = 500 * MiB
FRAGMENTATION_EXPANDABLE = 0.05  # allocator margin with expandable_segments (train's default)
FRAGMENTATION_LEGACY = 0.10  # ... with fixed-size segments
AUTO_HEADROOM = 0.10  # checkpoint_every_n_layers=auto keeps this fraction of the budget spare
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
    "meta-llama/llama-3.1-70b": "llama-3.1-70b",
    "meta-llama/llama-3.1-70b-instruct": "llama-3.1-70b",
    "meta-llama/meta-llama-3.1-70b": "llama-3.1-70b",
    "meta-llama/meta-llama-3.1-70b-instruct": "llama-3.1-70b",
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

    Order: ``smollm2-demo`` (the demo's GGUF), ``.gguf`` metadata, a local directory (or
    config.json file), a built-in shape for a known hub id (no network), then ``config.json``
    from the hub.

    Raises:
        ModelError: nothing found, or the hub cannot be reached for an unknown id.
    """
    from qlora_kit.demo import DEMO_MODEL, find_demo_gguf

    name = model.name_or_path
    path = Path(name).expanduser()
    if name == DEMO_MODEL:
        return shape_from_gguf(find_demo_gguf())
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
        raise ModelError(f"GGUF file {path} not found", "check model.name_or_path", key="model.name_or_path")
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
    """(total, pageable) optimizer-state bytes for adapter tensors of the given sizes.

    ``auto`` counts as ``adamw_8bit`` (what it resolves to unless paging matters, which
    does not change the total).  Pageable bytes are those a paged optimizer keeps in CUDA
    managed memory (tensors of at least :data:`PAGED_MIN_NUMEL` values).
    """
    total = pageable = 0
    for n in numels:
        if optimizer == "adamw_torch":
            total += 2 * adapter_bytes * n
            continue
        if optimizer in ("paged_adamw_8bit", "adamw_8bit", "auto") and n >= OPT8_MIN_NUMEL:
            state = 2 * n
            absmax = 2 * 4 * math.ceil(n / OPT8_BLOCK)
        else:
            state, absmax = 8 * n, 0
        total += state + absmax
        if n >= PAGED_MIN_NUMEL:
            pageable += state
    return total, pageable


# --------------------------------------------------------------------------- the techniques of one run


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


# --------------------------------------------------------------------------- per-token pieces of a layer


def adapter_saved_per_token(shape: ModelShape, tech: Techniques, groups: tuple[str, ...]) -> int:
    """Bytes per token the LoRA adapters of the given input groups save for the backward pass.

    peft's LoRA forward is ``base(x) + B(A(dropout(x))) * scale``.  The 4-bit base saves
    nothing of ``x`` (bitsandbytes keeps only the packed weight).  With dropout, every
    adapted module saves its own dropout output plus the mask; without, ``A`` saves the
    input, one copy per input shared by the modules reading it (none for ``o_proj`` on the
    flash path, whose input is the output the attention kernel keeps anyway).  ``B`` saves
    ``A``'s r-wide output.  DoRA also keeps the base output for its magnitude (approximate).
    VeRA keeps ``x A`` scaled by lambda_d beside it, and ``(.) B`` (out wide) for lambda_b.
    """
    layers = linear_layers(shape)
    s, total, shared = tech.s, 0, set()
    for name in tech.targets:
        lin = layers[name]
        if lin.group not in groups:
            continue
        total += s * tech.r
        if tech.lora_type == "vera":
            total += s * (tech.r + lin.out_features)
        if tech.dora:
            total += s * lin.out_features
        if tech.dropout:
            total += (s + tech.mask_bytes) * lin.in_features
        elif lin.group not in shared:
            shared.add(lin.group)
            if not (lin.group == "attn_out" and tech.attention == "flash"):
                total += s * lin.in_features
    return total


def norm_saved_per_token(shape: ModelShape, tech: Techniques) -> int:
    """One RMSNorm: its fp32 input (a copy for 16-bit inputs) and the fp32 reciprocal norm."""
    return 4 * shape.hidden_size + 4


def attention_saved_per_token(shape: ModelShape, tech: Techniques) -> int:
    """Bytes per token the attention block keeps, T*T terms excluded (see :func:`attention_square`).

    Flash / CPU SDPA keep q and k after RoPE, v, the output and a fp32 log-sum-exp per head;
    K/V are never repeated for grouped-query heads.  Eager/math attention keeps k/v repeated
    to every head plus its own output copy.
    """
    s, qd, kvd = tech.s, shape.q_dim, shape.kv_dim
    total = adapter_saved_per_token(shape, tech, ("attn_in", "attn_out")) + norm_saved_per_token(shape, tech)
    if tech.attention in ("flash", "sdpa_cpu"):
        total += s * (qd + kvd) + s * kvd + s * qd + 4 * shape.num_heads
    else:
        total += s * qd * 4
    if shape.qk_norm:
        total += 4 * (qd + shape.kv_dim) + 4 * (shape.num_heads + shape.num_kv_heads)
    return total


def mlp_saved_per_token(shape: ModelShape, tech: Techniques, tiled: bool) -> int:
    """Bytes per token the MLP half keeps over the whole sequence: its norm and either its
    activations (SwiGLU gate, activation and up; the adapters' inputs) or, tiled, its input only."""
    total = norm_saved_per_token(shape, tech)
    if tiled:
        return total + tech.s * shape.hidden_size
    return total + 3 * tech.s * shape.intermediate_size + adapter_saved_per_token(shape, tech, ("mlp_in", "mlp_out"))


def mlp_tile_per_token(shape: ModelShape, tech: Techniques) -> int:
    """Bytes per token of one MLP tile during its backward: activations, adapter inputs and gradients."""
    s, h, i = tech.s, shape.hidden_size, shape.intermediate_size
    saved = 3 * s * i + adapter_saved_per_token(shape, tech, ("mlp_in", "mlp_out"))
    return saved + 2 * s * i + 2 * s * h


def mlp_is_tiled(tech: Techniques, batch: int, length: int) -> bool:
    """True when the tiled MLP really tiles: its rows (the packed row, or each padded row) exceed one tile."""
    return tech.tiled_mlp and (batch * length if tech.packed else length) > MLP_TILE_TOKENS


def layer_saved_bytes(shape: ModelShape, tech: Techniques, batch: int, length: int) -> tuple[int, int]:
    """(attention half, MLP half) of what one decoder layer saves for its backward, in bytes."""
    n = batch * length
    attention = attention_saved_per_token(shape, tech) * n + attention_square(shape, tech, batch, length)[1]
    return attention, mlp_saved_per_token(shape, tech, mlp_is_tiled(tech, batch, length)) * n


def attention_square(shape: ModelShape, tech: Techniques, batch: int, length: int) -> tuple[int, int]:
    """(mask kept all step, per-layer T*T bytes saved by one layer) for eager/math attention; (0, 0) otherwise."""
    if tech.attention not in ("eager", "math"):
        return 0, 0
    square = (batch * length) ** 2 if tech.packed else batch * length * length
    mask = square * tech.s if tech.attention == "eager" else 0
    return mask, square * shape.num_heads * (4 + tech.s)  # fp32 softmax output + 16-bit probabilities


def flash_backward_per_token(shape: ModelShape, tech: Techniques) -> int:
    """Buffers of the attention backward kernel per token.

    FlashAttention-2's backward (what torch's flash SDPA and ``varlen_attn`` run): dq, dk,
    dv in the compute dtype, an fp32 ``dq_accum`` over all query heads, an fp32
    ``softmax_d`` per head, and for grouped-query attention dk/dv expanded to every query
    head before they are summed per group.  The CPU backward is modelled the same way,
    without the expansion.
    """
    s, qd, kvd = tech.s, shape.q_dim, shape.kv_dim
    total = s * qd + 2 * s * kvd + 4 * qd + 4 * shape.num_heads
    if tech.attention == "flash" and shape.num_kv_heads != shape.num_heads:
        total += 2 * s * qd
    return total


# --------------------------------------------------------------------------- several GPUs


STRATEGIES = ("ddp", "fsdp", "fsdp-offload")
FSDP_GATHERED_LAYERS = 2  # decoder layers unsharded at once: the one computing + the one prefetched


@dataclass(frozen=True)
class Parallel:
    """How many GPUs train together and how: ``ddp`` (whole model per GPU) or ``fsdp`` (sharded)."""

    gpus: int = 1
    strategy: str = "ddp"  # "ddp", "fsdp" or "fsdp-offload"

    @property
    def fsdp(self) -> bool:
        return self.strategy.startswith("fsdp")

    @property
    def single(self) -> bool:
        return self.gpus == 1 and not self.fsdp

    def label(self) -> str:
        names = {"ddp": "DDP", "fsdp": "FSDP", "fsdp-offload": "FSDP + CPU offload"}
        return "1 GPU" if self.single else f"{self.gpus} GPUs, {names[self.strategy]}, per GPU"


_PARALLEL: contextvars.ContextVar[Parallel] = contextvars.ContextVar("qlora_kit_parallel", default=Parallel())


@contextlib.contextmanager
def planning_for(parallel: Parallel) -> Any:
    """Plan every estimate inside the block per GPU of ``parallel`` (resolve_auto, fits, suggest included)."""
    token = _PARALLEL.set(parallel)
    try:
        yield parallel
    finally:
        _PARALLEL.reset(token)


def parallel_components(shape: ModelShape, tech: "Techniques", numels: list[int], parallel: Parallel
                        ) -> tuple[dict[str, int], dict[str, int] | None, int]:
    """Per-GPU terms of a multi-GPU run: (static terms replacing the single-GPU ones, the load phase when it
    differs from one GPU's, host bytes per rank)."""
    lora = adapter_components(numels, tech)
    if not parallel.fsdp:
        return ({"ddp_gradient_buckets": lora["lora_gradients"]} if parallel.gpus > 1 else {}), None, 0
    n, s, h, L = parallel.gpus, tech.s, shape.hidden_size, shape.num_layers
    layers = linear_layers(shape).values()
    packed = sum(math.ceil(lin.numel / 2) for lin in layers)  # per decoder layer: the sharded 4-bit values
    constants = sum(nf4_bytes(lin.numel, tech.double_quant) - math.ceil(lin.numel / 2) for lin in layers)
    norms = 2 * h + (shape.q_dim + 2 * shape.kv_dim if shape.qkv_bias else 0) + (2 * shape.head_dim if shape.qk_norm
                                                                               else 0)
    root = shape.vocab_size * h * (1 if shape.tie_word_embeddings else 2) + h
    layer_bytes = packed + s * norms
    offload = parallel.strategy == "fsdp-offload"
    shards = {"nf4": L * packed // n, "norms": L * s * norms // n, **{k: v // n for k, v in lora.items()}}
    components = {
        "nf4_weights": L * constants + (0 if offload else shards["nf4"]),
        "weights_16bit": s * root + (0 if offload else shards["norms"]),
        "fsdp_gathered_layers": FSDP_GATHERED_LAYERS * layer_bytes,
        **{k: 0 if offload else shards[k] for k in lora},
    }
    if not offload:
        return components, None, 0
    # Offloaded: loaded on the CPU, each unit moved to the GPU only while FSDP shards it (distributed.load_device).
    load = {"nf4_weights": L * constants, "weights_16bit": s * root,
            "fsdp_gathered_layers": FSDP_GATHERED_LAYERS * layer_bytes}
    whole = L * (packed + constants + s * norms) + s * root  # the 4-bit model in host memory while loading
    return components, load, max(sum(shards.values()), whole)


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
    host_bytes: int = 0
    stage: str = ""  # the moment of the backward phase that peaks
    fragmentation_fraction: float = 0.05
    peak_phase: str = ""
    allocated_peak: int = 0
    fragmentation: int = 0
    cuda_context: int = CUDA_CONTEXT_BYTES

    def __post_init__(self) -> None:
        sums = {name: sum(parts.values()) for name, parts in self.phases.items()}
        self.peak_phase = max(sums, key=lambda k: sums[k])
        self.allocated_peak = sums[self.peak_phase]
        self.fragmentation = int(self.allocated_peak * self.fragmentation_fraction)

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


def estimate(cfg: Config, shape: ModelShape, micro_batch_size: int | None = None, max_length: int | None = None,
             *, device: str = "cuda", labelled_tokens: int | None = None, parallel: Parallel | None = None
             ) -> MemoryPlan:
    """Predict the memory of ``cfg`` on ``shape`` (optionally at another micro-batch/length).

    ``"auto"`` settings count as their conservative choice (see :func:`resolve_auto` for
    the planner's). ``labelled_tokens`` (tokens that carry a label) defaults to all of them.
    ``device="cpu"`` models the CPU kernels (used to check the model against measurements).
    ``parallel``: plan one GPU of a multi-GPU run (default: the :func:`planning_for` block's).

    Raises:
        ModelError: LoRA targets that this architecture does not have.
    """
    batch = micro_batch_size or cfg.train.micro_batch_size
    length = max_length or cfg.train.max_length
    tokens = batch * length
    labelled = tokens if labelled_tokens is None else min(labelled_tokens, tokens)
    tech = techniques(cfg, shape, device)
    weights = weight_components(shape, tech)
    numels, frozen = variant_tensors(shape, list(tech.targets), cfg.lora)
    static = {**weights, **adapter_components(numels, tech, frozen)}
    loss_phase, backward_phase, stage, host = activation_phases(shape, tech, batch, length, labelled, numels)
    parallel = parallel or _PARALLEL.get()
    max_linear = max(lin.numel for lin in linear_layers(shape).values())
    load = {**weights, "quantisation_buffer": max_linear * tech.s + 4 * math.ceil(max_linear / NF4_BLOCK)}
    if not parallel.single:
        per_gpu, per_gpu_load, host_shards = parallel_components(shape, tech, numels, parallel)
        static = {**static, **per_gpu}
        load = per_gpu_load or load
        host += host_shards
    phases = {"load": load, "loss": {**static, **loss_phase}, "backward": {**static, **backward_phase}}
    init = init_phase(shape, cfg, tech, tokens, numels, frozen, (loss_phase, backward_phase))
    if init:
        phases["init"] = {**weights, **init}
    _, pageable = optimizer_bytes(numels, tech.optimizer, tech.adapter_bytes)
    paged = pageable if tech.optimizer.startswith("paged_") and device == "cuda" and not parallel.fsdp else 0
    return MemoryPlan(
        shape=shape, micro_batch_size=batch, max_length=length,
        compute_dtype="float32" if tech.s == 4 else ("bfloat16" if cfg.model.compute_dtype == "auto"
                                                     else cfg.model.compute_dtype),
        targets=list(tech.targets), trainable_parameters=sum(numels),
        phases=phases,
        paged_optimizer_bytes=paged, weights_bytes=sum(weights.values()), host_bytes=host, stage=stage,
        fragmentation_fraction=fragmentation_fraction(),
    )


def weight_components(shape: ModelShape, tech: Techniques) -> dict[str, int]:
    """The frozen base: 4-bit linear layers, 16-bit embeddings / lm_head / norms / biases."""
    layers = linear_layers(shape)
    nf4 = shape.num_layers * sum(nf4_bytes(lin.numel, tech.double_quant) for lin in layers.values())
    h, L = shape.hidden_size, shape.num_layers
    params16 = shape.vocab_size * h * (1 if shape.tie_word_embeddings else 2) + (2 * L + 1) * h
    if shape.qkv_bias:
        params16 += L * (shape.q_dim + 2 * shape.kv_dim)
    if shape.qk_norm:
        params16 += L * 2 * shape.head_dim
    return {"nf4_weights": nf4, "weights_16bit": params16 * tech.s}


def adapter_components(numels: list[int], tech: Techniques, frozen: int = 0) -> dict[str, int]:
    """Adapter weights (master copy), their gradients (resident across gradient accumulation), optimizer state;
    VeRA's ``frozen`` shared projections; AdaLoRA's importance scores (its RankAllocator keeps the score, its
    average and its uncertainty for every parameter)."""
    n, a = sum(numels), tech.adapter_bytes
    opt, _ = optimizer_bytes(numels, tech.optimizer, a)
    parts = {"lora_parameters": n * a, "lora_gradients": n * a, "optimizer_state": opt}
    if frozen:
        parts["vera_projections"] = frozen * a
    if tech.lora_type == "adalora":
        parts["adalora_importance"] = 3 * n * a
    return parts


def init_phase(shape: ModelShape, cfg: Config, tech: Techniques, tokens: int, numels: list[int], frozen: int,
               passes: tuple[dict[str, int], dict[str, int]]) -> dict[str, int]:
    """Memory of ``lora.init`` beyond the base weights (empty for the default init); no optimizer exists yet.

    lora_ga: the adapters, a float32 gradient per target weight, the input each target's hook
    keeps until its backward (per ``lora.loraga_passes`` group), and one training
    forward/backward with the adapters disabled (``passes``: the loss and backward phases'
    activations).  loftq / pissa / olora: the adapters, plus the float32 working set of one
    matrix's SVD/QR and residual (W, residual, U, Vh, product: :data:`INIT_WORK_FACTOR` x the
    largest target, 4 bytes each) and its 4-bit replacement.
    """
    if cfg.lora.init == "default":
        return {}
    layers = linear_layers(shape)
    targets = list(tech.targets)
    largest = max(layers[n].numel for n in targets)
    adapters = sum(numels) * tech.adapter_bytes + frozen * tech.adapter_bytes
    if cfg.lora.init != "lora_ga":
        return {"lora_parameters": adapters, "init_working": INIT_WORK_FACTOR * 4 * largest + nf4_bytes(largest)}
    widths = {layers[n].group: layers[n].in_features for n in targets}
    working = max(sum(v for k, v in phase.items() if k != "autocast_adapter_copies") for phase in passes)
    return {"lora_parameters": adapters,
            "loraga_gradients": _per_pass(4 * sum(layers[n].numel for n in targets), shape, cfg, 4 * largest),
            "loraga_inputs": _per_pass(tech.s * tokens * sum(widths.values()), shape, cfg, 0),
            "loraga_forward_backward": working}


def _per_pass(per_layer: int, shape: ModelShape, cfg: Config, slack: int) -> int:
    """Bytes of one LoRA-GA gradient pass: the targets are cut into ``lora.loraga_passes`` contiguous groups of
    about equal size, so one group holds total/passes plus at most one layer (and one matrix, ``slack``)."""
    total = per_layer * shape.num_layers
    passes = cfg.lora.loraga_passes
    return total if passes == 1 else min(total, total // passes + per_layer + slack)


def fused_loss_rows(tech: Techniques, batch: int, length: int, labelled: int) -> int:
    """Positions trl's fused LM head projects: the labelled ones with Triton (CUDA), every position elsewhere."""
    return labelled if tech.device == "cuda" else batch * (length - 1)


def fused_loss_bytes(shape: ModelShape, tech: Techniques, batch: int, length: int, labelled: int) -> int:
    """Peak of trl's fused LM-head loss (``ops.loss``: ``add_fused_lm_head`` → ``ChunkedLogProbFunction``).

    With Triton (CUDA) the labelled rows of the backbone's last hidden state are copied out
    (saved) and the full hidden state is freed after the forward; elsewhere every position is
    scored from the hidden state itself (a view for one row, kept until the backward).  One
    projection buffer of ``min(rows, 4096) x 32768`` values in the compute dtype; the backward
    adds an fp32 gradient accumulator ``[rows, H]`` and its cast.  Triton folds the tile in
    place; on CPU trl folds it with torch ops, holding fp32 temporaries of tile size (3 in the
    forward, 7 + a bool mask in the backward: trl 1.16 ``_forward_tile`` / ``_backward_tile``).
    Per row a few fp32 statistics and the int64 target.
    """
    s, h, n = tech.s, shape.hidden_size, batch * length
    rows = fused_loss_rows(tech, batch, length, labelled)
    buffer = s * min(rows, LOSS_TOKEN_TILE) * LOSS_VOCAB_TILE  # allocated 32768 wide even for smaller vocabularies
    if tech.device == "cuda":
        forward = s * h * (n + rows) + buffer
        backward = (2 * s + 4) * h * rows + buffer
    else:
        tile = min(rows, LOSS_TOKEN_TILE) * min(shape.vocab_size, LOSS_VOCAB_TILE)
        copy = s * h * rows if batch > 1 else 0  # [:, :-1] of one row is a view; of several rows, a copy
        forward = s * h * n + copy + buffer + 3 * 4 * tile
        backward = s * h * n + copy + (s + 4) * h * rows + buffer + 29 * tile
    return max(forward, backward) + LOSS_SCALARS_PER_LABEL * rows


def activation_phases(shape: ModelShape, tech: Techniques, batch: int, length: int, labelled: int,
                      numels: list[int]) -> tuple[dict[str, int], dict[str, int], str, int]:
    """(loss-phase terms, backward-phase terms, backward peak stage, pinned host bytes)."""
    s, h, L, n = tech.s, shape.hidden_size, shape.num_layers, batch * length
    tiled = mlp_is_tiled(tech, batch, length)
    mask = attention_square(shape, tech, batch, length)[0]
    attn_part, mlp_part = layer_saved_bytes(shape, tech, batch, length)
    layout = checkpointed_layers(L, tech.every_n)
    n_ckpt = len(layout) if tech.checkpointing else 0
    resident = n_ckpt if not tech.offload else min(n_ckpt, OFFLOAD_IN_FLIGHT)
    common = {
        "step_inputs": n * (STEP_INPUT_BYTES + 2 * s * shape.head_dim),
        "checkpoints": resident * s * h * n,
        "layer_activations": (L - n_ckpt) * (attn_part + mlp_part),  # layers that are not checkpointed
        "attention_mask": mask,
    }
    per_layer_params = sum(numels) // L
    loss = {**common, "autocast_adapter_copies": s * sum(numels) if tech.autocast else 0,
            "final_norm": norm_saved_per_token(shape, tech) * n}
    if tech.fused_loss:
        loss["fused_loss"] = fused_loss_bytes(shape, tech, batch, length, labelled)
    else:
        loss["logits_and_loss"] = (s + LOSS_FP32_BYTES) * shape.vocab_size * n
    stages = backward_stages(shape, tech, batch, length, attn_part, mlp_part, tiled)
    if not tech.checkpointing or L - 1 not in layout:
        # The backward peaks at the last layer; not checkpointed, its activations are already in layer_activations
        # (a checkpointed layer further down finds one layer's activations freed for each recomputed one).
        stages = {k: {**v, "layer_recompute": 0} if k != "final_norm" else v for k, v in stages.items()}
    stage = max(stages, key=lambda k: sum(stages[k].values()))
    copies = s * per_layer_params * (L - n_ckpt + 1) if tech.autocast else 0
    backward = {**common, "autocast_adapter_copies": copies, **stages[stage]}
    host = n_ckpt * s * h * n if tech.offload else 0
    return loss, backward, stage, host


def backward_stages(shape: ModelShape, tech: Techniques, batch: int, length: int, attn_part: int, mlp_part: int,
                    tiled: bool) -> dict[str, dict[str, int]]:
    """Memory of the backward pass at its candidate peaks, beyond what the whole step keeps.

    - ``final_norm``: the final RMSNorm's backward (before any decoder layer): the scattered
      hidden-state gradients and the norm's fp32 temporaries;
    - ``mlp``: a recomputed layer's MLP backward: the layer's saved activations, the
      incoming gradient, the two ``[tokens, I]`` gradients of the down projection's input
      (base and adapter paths), a dequantised 4-bit matrix.  Tiled: one tile's
      activations and gradients, plus the MLP input and its gradient;
    - ``norm``: the post-attention RMSNorm backward (MLP activations freed): ~5 fp32
      ``[tokens, H]`` temporaries (``pow``/``mean``/``rsqrt`` backward in fp32);
    - ``attention``: the attention backward: the kernel's buffers (:func:`flash_backward_per_token`).
    """
    s, h, i, n = tech.s, shape.hidden_size, shape.intermediate_size, batch * length
    dequant = max(lin.numel for lin in linear_layers(shape).values()) * s
    grad = s * h * n  # the gradient arriving at the layer (or the norm)
    norm_temps = NORM_BACKWARD_FP32_COPIES * 4 * h * n
    final = {"final_norm": norm_saved_per_token(shape, tech) * n, "backward_working": 2 * grad + norm_temps}
    if tiled:
        rows = batch * MLP_TILE_TOKENS if not tech.packed else MLP_TILE_TOKENS
        mlp_work = 2 * grad + mlp_tile_per_token(shape, tech) * rows
    else:
        mlp_work = grad + 2 * s * i * n
    attention_work = grad + s * shape.q_dim * n + flash_backward_per_token(shape, tech) * n
    if tech.attention in ("eager", "math"):
        square = (batch * length) ** 2 if tech.packed else batch * length * length
        attention_work += square * shape.num_heads * (4 + tech.s)  # gradients of the scores
    norm2 = norm_saved_per_token(shape, tech) * n
    return {
        "final_norm": final,
        "mlp": {"layer_recompute": attn_part + mlp_part, "backward_working": mlp_work, "dequant_buffer": dequant},
        "norm": {"layer_recompute": attn_part + norm2, "backward_working": 2 * grad + norm_temps},
        "attention": {"layer_recompute": attn_part, "backward_working": attention_work, "dequant_buffer": dequant},
    }


def fragmentation_fraction() -> float:
    """Allocator margin: smaller with ``expandable_segments`` (what ``train`` sets unless the user chose)."""
    import os

    conf = os.environ.get("PYTORCH_ALLOC_CONF") or os.environ.get("PYTORCH_CUDA_ALLOC_CONF") or ""
    if conf and "expandable_segments:true" not in conf.replace(" ", "").lower():
        return FRAGMENTATION_LEGACY
    return FRAGMENTATION_EXPANDABLE


# --------------------------------------------------------------------------- what fits


def memory_minimal(cfg: Config, offload: bool | None = None) -> Config:
    """``cfg`` with every ``"auto"`` memory setting at its lowest-memory choice.

    Tiled MLP on, every layer checkpointed, 8-bit AdamW, offload on; ``offload`` (when
    given) sets activation offload whatever the config says (off without checkpointing).
    Values the user set are kept.
    """
    copy = _fill_auto(cfg, tiled_mlp=True, checkpoint_every_n_layers=1, optimizer="adamw_8bit",
                      activation_offload=cfg.train.gradient_checkpointing)
    if offload is not None:
        copy.train.activation_offload = offload and copy.train.gradient_checkpointing
    return copy


def _fill_auto(cfg: Config, **choices: Any) -> Config:
    """A copy of ``cfg`` whose ``train`` settings still at ``"auto"`` take the given values."""
    copy = cfg.model_copy(deep=True)
    for key, value in choices.items():
        if getattr(copy.train, key) == "auto":
            setattr(copy.train, key, value)
    return copy


def fits(cfg: Config, shape: ModelShape, budget: int, micro_batch_size: int | None = None,
         max_length: int | None = None, offload: bool | None = None) -> bool:
    """True when some choice allowed by ``cfg``'s ``"auto"`` settings fits ``budget`` bytes."""
    plan = estimate(memory_minimal(cfg, offload), shape, micro_batch_size, max_length)
    return plan.total_bytes <= budget


def max_length_that_fits(cfg: Config, shape: ModelShape, budget: int, offload: bool | None = None) -> int | None:
    """Largest max_length (a multiple of 64, up to the model's context) that fits; None if none does.

    ``offload`` forces activation offload on or off; by default the config's own setting
    (``auto`` allows it).
    """
    limit = min(shape.max_position_embeddings or MAX_SEARCH_LENGTH, MAX_SEARCH_LENGTH)
    return _largest(lambda k: fits(cfg, shape, budget, max_length=k * LENGTH_STEP, offload=offload), 1,
                    limit // LENGTH_STEP, scale=LENGTH_STEP)


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
    if t.activation_offload is False and t.gradient_checkpointing:
        offloaded = max_length_that_fits(cfg, shape, budget, offload=True)
        if offloaded is not None and offloaded > (length or 0):
            options.append("--set train.activation_offload=true"
                           + (f" --set train.max_length={offloaded}" if offloaded < t.max_length else ""))
    batch = micro_batch_size_that_fits(cfg, shape, budget)
    if batch is not None and batch < b:
        options.append(f"--set train.micro_batch_size={batch} "
                       f"--set train.gradient_accumulation_steps={accum * math.ceil(b / batch)}")
    knobs = [
        ("train", {"gradient_checkpointing": True}, "--set train.gradient_checkpointing=true"),
        ("train", {"checkpoint_every_n_layers": 1}, "--set train.checkpoint_every_n_layers=1"),
        ("train", {"tiled_mlp": True}, "--set train.tiled_mlp=true"),
        ("train", {"fused_loss": True}, "--set train.fused_loss=true"),
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
        key, value = next(iter(change.items()))
        current = getattr(getattr(cfg, section), key)
        if current != value and current != "auto" and fits(_variant(cfg, section, **change), shape, budget):
            options.append(text)
    if not options:
        smallest = estimate(memory_minimal(_variant(cfg, "train", micro_batch_size=1, max_length=256)),
                            shape).total_bytes
        return (f"even micro_batch_size=1 at max_length=256 needs {smallest / GiB:.1f} GiB: "
                "use a card with more memory, or a smaller model")
    return "; or ".join(options)


def _variant(cfg: Config, section: str, **values: Any) -> Config:
    """A copy of ``cfg`` with some values of one section changed."""
    copy = cfg.model_copy(deep=True)
    for key, value in values.items():
        setattr(getattr(copy, section), key, value)
    return copy


# --------------------------------------------------------------------------- "auto" settings


def resolve_auto(cfg: Config, shape: ModelShape, budget_bytes: int) -> Config:
    """A copy of ``cfg`` with every ``"auto"`` memory setting made concrete by the plan.

    - ``activation_offload``: on only when the run does not fit ``budget_bytes`` without it
      (after the tiled MLP was tried);
    - ``tiled_mlp``: on only when the untiled MLP does not fit (and the row is longer than a tile);
    - ``checkpoint_every_n_layers``: the fewest checkpointed layers that fit with :data:`AUTO_HEADROOM`
      to spare (fewer recomputed layers: faster; n may be fractional, see :func:`checkpointed_layers`),
      1 when even that is too much;
    - ``optimizer``: ``adamw_torch`` (fused on CUDA: fp32 states, no host sync in its step) when its
      states fit in what the rest of the plan leaves spare (with :data:`AUTO_HEADROOM`), so it never
      costs context length or recomputed layers; else ``adamw_8bit`` (bitsandbytes 0.50 synchronises
      the GPU once per parameter in its step); ``paged_adamw_8bit`` only when the run fits just
      because a paged state may leave the GPU under memory pressure.

    A run that fits in no arrangement gets the lowest-memory one (``check_fits`` then refuses it).
    """
    t = cfg.train
    offloads = [False, True] if t.activation_offload == "auto" else [bool(t.activation_offload)]
    tilings = [False, True] if t.tiled_mlp == "auto" else [t.tiled_mlp]
    every_n = 1 if t.checkpoint_every_n_layers == "auto" else t.checkpoint_every_n_layers
    candidates = [(o, m) for o in offloads for m in tilings if t.gradient_checkpointing or not o]
    chosen = None
    for offload, tiled in candidates:
        candidate = _concrete(cfg, offload, tiled, every_n)
        if estimate(candidate, shape).total_bytes <= budget_bytes:
            chosen = candidate
            break
    if chosen is None:
        chosen = _concrete(cfg, *candidates[-1], every_n)
    elif t.checkpoint_every_n_layers == "auto" and t.gradient_checkpointing:
        chosen.train.checkpoint_every_n_layers = _sparsest_checkpointing(chosen, shape,
                                                                         int(budget_bytes * (1 - AUTO_HEADROOM)))
    if t.optimizer == "auto":
        chosen.train.optimizer = _pick_optimizer(chosen, shape, budget_bytes)
    _log_resolution(cfg, chosen)
    return chosen


def _sparsest_checkpointing(cfg: Config, shape: ModelShape, roomy: int) -> float:
    """The every-n with the fewest checkpointed layers (the least recomputation) whose plan fits ``roomy`` bytes;
    1 when only checkpointing every layer does (or nothing does)."""
    L = shape.num_layers

    def fits(count: int) -> bool:
        every_n = every_n_for(L, count)
        return estimate(_variant(cfg, "train", checkpoint_every_n_layers=every_n), shape).total_bytes <= roomy

    lo, hi = 1, L  # bisection for the smallest count that fits (memory falls as the count grows)
    if fits(lo):
        return every_n_for(L, lo)
    if not fits(hi):
        return 1
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if fits(mid) else (mid, hi)
    return every_n_for(L, hi)


def checkpointed_layers(num_layers: int, every_n: float) -> list[int]:
    """The decoder layers checkpointed when every ``every_n``-th is: ``ceil(L / n)`` layers spread evenly.

    An integer n gives transformers' own layout (layers 0, n, 2n, ...); a fractional one (what
    ``auto`` may choose, e.g. 32/19 for 19 of 32 layers) fills the gap between n = 1 (all) and n = 2 (half).
    """
    return [i for i in range(num_layers) if i == 0 or math.floor(i / every_n) > math.floor((i - 1) / every_n)]


def every_n_for(num_layers: int, count: int) -> float:
    """The every-n that checkpoints ``count`` of ``num_layers`` layers: an int when one does, else L / count
    rounded to 4 decimals (kept readable in logs and manifests; nudged until it gives exactly ``count``)."""
    whole = math.ceil(num_layers / count)
    if len(checkpointed_layers(num_layers, whole)) == count:
        return whole
    n = round(num_layers / count, 4)
    while len(checkpointed_layers(num_layers, n)) > count:
        n = round(n + 1e-4, 4)
    while len(checkpointed_layers(num_layers, n)) < count:
        n = round(n - 1e-4, 4)
    return n


def _concrete(cfg: Config, offload: bool, tiled: bool, every_n: float) -> Config:
    copy = cfg.model_copy(deep=True)
    t = copy.train
    t.activation_offload, t.tiled_mlp, t.checkpoint_every_n_layers = offload, tiled, every_n
    if t.optimizer == "auto":
        t.optimizer = "adamw_8bit"
    return copy


def _pick_optimizer(cfg: Config, shape: ModelShape, budget: int) -> str:
    """The optimizer ``auto`` resolves to for ``cfg`` (planned with 8-bit AdamW) within ``budget`` bytes.

    ``adamw_torch`` when the run with its fp32 states stays within the budget less
    :data:`AUTO_HEADROOM` (no host sync per step: bitsandbytes 0.50's step synchronises the GPU once
    per parameter); ``paged_adamw_8bit`` when the run fits only if its pageable state may leave the
    GPU; else ``adamw_8bit``.
    """
    if estimate(_variant(cfg, "train", optimizer="adamw_torch"), shape).total_bytes <= budget * (1 - AUTO_HEADROOM):
        return "adamw_torch"
    plan = estimate(_variant(cfg, "train", optimizer="adamw_8bit"), shape)
    numels, _ = variant_tensors(shape, plan.targets, cfg.lora)
    _, pageable = optimizer_bytes(numels, "paged_adamw_8bit", 4)
    if plan.total_bytes > budget >= plan.total_bytes - pageable and pageable > 0:
        return "paged_adamw_8bit"
    return "adamw_8bit"


def _log_resolution(cfg: Config, resolved: Config) -> None:
    keys = ("activation_offload", "tiled_mlp", "checkpoint_every_n_layers", "optimizer")
    made = [f"{k}={getattr(resolved.train, k)}" for k in keys if getattr(cfg.train, k) == "auto"]
    if made:
        log.debug("memory plan: auto settings resolved to %s", ", ".join(made))


def conservative_settings(cfg: Config) -> Config:
    """``"auto"`` made concrete without a plan: offload off, every layer checkpointed, MLP untiled,
    non-paged 8-bit AdamW (used when the model's shape cannot be planned)."""
    return _fill_auto(cfg, activation_offload=False, checkpoint_every_n_layers=1, tiled_mlp=False,
                      optimizer="adamw_8bit")


MEMORY_KEYS = ("packing", "fused_loss", "gradient_checkpointing", "checkpoint_every_n_layers", "tiled_mlp",
               "activation_offload", "optimizer")


def memory_settings(cfg: Config) -> dict[str, Any]:
    """The memory-relevant settings of ``cfg`` (data.packing and the train keys), as a flat mapping."""
    return {k: cfg.data.packing if k == "packing" else getattr(cfg.train, k) for k in MEMORY_KEYS}


# --------------------------------------------------------------------------- train's pre-flight


def check_fits(cfg: Config, source_dir: Path, device: Any) -> None:
    """Refuse a run predicted not to fit in the free memory of ``device`` (CUDA only).

    ``cfg`` is the run's resolved config (no ``"auto"`` left: see :func:`resolve_auto`).

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
             as_json: bool = False, num_gpus: int = 1, strategy: str = "ddp") -> int:
    """``qlora-kit plan``: print the prediction (per GPU with ``num_gpus`` > 1); exit 0 when it fits, EXIT_OOM when not.

    Raises:
        ConfigError: invalid config, ``num_gpus`` below 1 or an unknown ``strategy``.
        ModelError: the model's shape cannot be found.
    """
    if num_gpus < 1:
        raise ConfigError(f"--num-gpus must be at least 1, got {num_gpus}")
    if strategy not in STRATEGIES:
        raise ConfigError(f"--strategy {strategy!r} is not one of {', '.join(STRATEGIES)}",
                          "ddp: the whole model on every GPU; fsdp: sharded; fsdp-offload: sharded in host memory")
    from qlora_kit.model import check_attention

    cfg, sources = load_config(config_path, overrides)
    try:
        shape = read_shape(cfg.model)
        check_attention(shape.model_type, cfg.model.attn_implementation, cfg.model.name_or_path)
    except ModelError as exc:
        exc.key = exc.key or "model.name_or_path"
        attribute_origin(exc, sources)
        raise
    budget, budget_source = gpu_budget(gpu_memory)
    with planning_for(Parallel(num_gpus, strategy)) as parallel:
        report = build_report(cfg, shape, budget, budget_source)
    report["parallel"] = {"gpus": parallel.gpus, "strategy": parallel.strategy, "per_gpu": not parallel.single,
                          "global_micro_batch_size": parallel.gpus * report["micro_batch_size"],
                          "global_batch_size": parallel.gpus * report["micro_batch_size"]
                          * cfg.train.gradient_accumulation_steps}
    if as_json:
        print(json.dumps(report, indent=2))
    else:
        print_report(report)
    return 0 if report["fits"] else EXIT_OOM


def gpu_budget(gpu_memory: float | None) -> tuple[int, str]:
    """Bytes to plan for: ``--gpu-memory`` GiB, else this GPU's total, else an assumed 24 GiB card."""
    if gpu_memory is not None:
        if not math.isfinite(gpu_memory) or gpu_memory <= 0 or gpu_memory > 1e6:
            raise ConfigError(f"--gpu-memory must be a positive number of GiB, got {gpu_memory:g}",
                              "give the card's memory in GiB, e.g. --gpu-memory 24")
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
    """The JSON-able prediction for ``cfg`` with its ``"auto"`` settings resolved for ``budget``."""
    resolved = resolve_auto(cfg, shape, budget)
    plan = estimate(resolved, shape)
    checkpointing = cfg.train.gradient_checkpointing
    fits_now = plan.total_bytes <= budget
    return {
        "model": cfg.model.name_or_path,
        "shape": {k: v for k, v in asdict(shape).items()},
        "micro_batch_size": plan.micro_batch_size,
        "max_length": plan.max_length,
        "compute_dtype": plan.compute_dtype,
        "adapter_dtype": cfg.lora.adapter_dtype,
        "gradient_checkpointing": checkpointing,
        "optimizer": resolved.train.optimizer,
        "double_quant": cfg.model.double_quant,
        "memory_settings": memory_settings(resolved),
        "checkpointed_layers": len(checkpointed_layers(shape.num_layers, resolved.train.checkpoint_every_n_layers))
        if checkpointing else 0,
        "auto_settings": [k for k, v in memory_settings(cfg).items() if v == "auto"],
        "lora_targets": plan.targets,
        "lora_type": cfg.lora.type,
        "lora_init": cfg.lora.init,
        "trainable_parameters": plan.trainable_parameters,
        "weights_bytes": plan.weights_bytes,
        "peak_phase": plan.peak_phase,
        "peak_stage": plan.stage if plan.peak_phase == "backward" else None,
        "peak_allocated_bytes": plan.allocated_peak,
        "torch_allocated_peak_bytes": plan.torch_allocated_peak,
        "torch_reserved_peak_bytes": plan.torch_reserved_peak,
        "host_memory_bytes": plan.host_bytes,
        "total_bytes": plan.total_bytes,
        "total_gib": round(plan.total_bytes / GiB, 2),
        "gpu_memory_bytes": budget,
        "gpu_memory_source": budget_source,
        "fits": fits_now,
        "headroom_bytes": budget - plan.total_bytes,
        "max_length_that_fits": max_length_that_fits(cfg, shape, budget),
        "max_length_that_fits_without_offload": max_length_that_fits(cfg, shape, budget, offload=False),
        "max_length_that_fits_with_offload": (max_length_that_fits(cfg, shape, budget, offload=True)
                                              if checkpointing else None),
        "micro_batch_size_that_fits": micro_batch_size_that_fits(cfg, shape, budget),
        "fragmentation_fraction": plan.fragmentation_fraction,
        "breakdown": plan.breakdown(),
        "phases": plan.phase_totals(),
        "suggestion": None if fits_now else suggest(resolved, shape, budget),
    }


_LABELS = {
    "nf4_weights": "4-bit linear weights (NF4{dq})",
    "weights_16bit": "16-bit embeddings, lm_head, norms",
    "lora_parameters": "LoRA parameters ({adapter})",
    "lora_gradients": "LoRA gradients ({adapter})",
    "optimizer_state": "optimizer state ({opt})",
    "autocast_adapter_copies": "16-bit adapter copies (autocast)",
    "step_inputs": "token ids, labels, positions, RoPE tables",
    "checkpoints": "checkpointed layer inputs{offload}",
    "layer_activations": "activations of layers not checkpointed",
    "attention_mask": "attention mask",
    "layer_recompute": "one layer recomputed for backward",
    "backward_working": "backward gradients and temporaries ({stage})",
    "dequant_buffer": "dequantised weight buffer",
    "final_norm": "final norm input (fp32)",
    "fused_loss": "fused loss (tiles, labelled hidden states)",
    "logits_and_loss": "logits + fp32 loss and its gradient",
    "quantisation_buffer": "16-bit matrix being quantised",
    "ddp_gradient_buckets": "DDP gradient buckets (adapter gradients)",
    "fsdp_gathered_layers": "FSDP: decoder layers gathered (2)",
    "fragmentation_margin": "allocator fragmentation margin ({frag:.0%})",
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


def _tokens(n: int | None) -> str:
    return "none" if n is None else f"{n:,}"


def print_report(report: dict[str, Any]) -> None:
    """Print the prediction as a rich table with a verdict and what fits."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    settings = report["memory_settings"]
    parallel = report.get("parallel") or {}
    where = ""
    if parallel.get("per_gpu"):
        where = f", {Parallel(parallel['gpus'], parallel['strategy']).label()}"
    table = Table(title=f"Memory plan: {report['model']} (B={report['micro_batch_size']}, "
                        f"T={report['max_length']}, {report['compute_dtype']}, peak in {report['peak_phase']} phase"
                        f"{where})")
    table.add_column("component")
    table.add_column("memory", justify="right")
    context = {"dq": " + double quant" if report["double_quant"] else "", "opt": report["optimizer"],
               "adapter": report["adapter_dtype"], "stage": report["peak_stage"] or "loss",
               "frag": report["fragmentation_fraction"],
               "offload": " (2 on the GPU, the rest on the host)" if settings["activation_offload"] else ""}
    for key, value in report["breakdown"].items():
        if value:
            table.add_row(_LABELS.get(key, key).format(**context), _human(value))
    table.add_row("[bold]predicted peak" + (" per GPU" if where else "") + "[/bold]",
                  f"[bold]{_human(report['total_bytes'])}[/bold]")
    table.add_row("GPU memory", f"{_human(report['gpu_memory_bytes'])} ({report['gpu_memory_source']})")
    console.print(table)
    verdict = "[green]fits[/green]" if report["fits"] else "[red]does NOT fit[/red]"
    console.print(f"{verdict}: headroom {_human(report['headroom_bytes'])}; "
                  f"{report['trainable_parameters']:,} trainable parameters on {', '.join(report['lora_targets'])}")
    auto = set(report["auto_settings"])
    shown = ", ".join(f"{k}={v}{' (auto)' if k in auto else ''}" for k, v in settings.items())
    console.print(f"memory settings: {shown}")
    if report["checkpointed_layers"]:
        layers = report["shape"]["num_layers"]
        console.print(f"checkpointed layers: {report['checkpointed_layers']} of {layers} (recomputed in the backward; "
                      f"the other {layers - report['checkpointed_layers']} keep their activations)")
    if report["host_memory_bytes"]:
        console.print(f"host memory (offloaded checkpoints / FSDP shards) per process: "
                      f"{_human(report['host_memory_bytes'])}")
    if parallel.get("per_gpu"):
        phases = report["phases"]
        loading = ("the base is loaded on the CPU and sharded unit by unit" if parallel["strategy"] == "fsdp-offload"
                   else "every rank quantises the whole base on its GPU first")
        context = report["breakdown"]["cuda_context"]
        console.print(f"{parallel['gpus']} GPUs: global micro-batch {parallel['global_micro_batch_size']} rows, "
                      f"global batch {parallel['global_batch_size']} rows per optimizer step; per GPU: load phase "
                      f"{_human(phases['load'] + context)} ({loading}), training "
                      f"{_human(max(phases['loss'], phases['backward']) + context)} (allocator margin not included)")
    console.print(f"longest max_length that fits: {_tokens(report['max_length_that_fits_without_offload'])} "
                  f"without activation offload, {_tokens(report['max_length_that_fits_with_offload'])} with it; "
                  f"largest micro_batch_size that fits: {_tokens(report['micro_batch_size_that_fits'])}")
    if report["suggestion"]:
        console.print(f"fix: {report['suggestion']}")
