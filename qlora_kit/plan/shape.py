"""A model's shape for the planner: from config.json, a GGUF header, the hub, or a built-in file."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qlora_kit.core.config import ModelConfig
from qlora_kit.core.errors import ModelError
from qlora_kit.model.sources import HUB_ID, gguf_path

SHAPES_DIR = Path(__file__).parents[1] / "model_shapes"


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


def beyond_context(tokens: int, context: Any, subject: str) -> str | None:
    """The warning for ``tokens`` positions past the model's context (``max_position_embeddings``), or None.

    Positions restart at 0 in every sample (packed or not), so only a sample's own length counts:
    positions past the context were never trained, and transformers does not refuse them.  ``train``
    says it for its longest sample, ``plan`` for ``train.max_length``; ``subject`` starts the line.
    """
    if not isinstance(context, int) or isinstance(context, bool) or not 0 < context < tokens:
        return None
    return (f"{subject}, more than the model's context of {context} (max_position_embeddings): positions past "
            f"{context} were never trained; lower train.max_length to {context} to truncate such samples there")


def read_shape(model: ModelConfig) -> ModelShape:
    """Find the shape of ``model.name_or_path`` without loading weights.

    Order: ``smollm2-demo`` (the demo's GGUF), ``.gguf`` metadata, a local directory (or
    config.json file), a built-in shape for a known hub id (no network), then ``config.json``
    from the hub.

    Raises:
        ModelError: nothing found, or the hub cannot be reached for an unknown id.
    """

    name = model.name_or_path
    path = Path(name).expanduser()
    gguf = gguf_path(name)
    if gguf is not None:
        return shape_from_gguf(gguf)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelError(f"{path} has no config.json", "point model.name_or_path at a Hugging Face model directory")
        return load_shape_file(path / "config.json")
    if path.is_file() and path.name == "config.json":
        return load_shape_file(path)
    stem = builtin_shape_name(name)
    if stem is not None:
        return load_builtin_shape(stem)

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
        raise ModelError("reading .gguf files needs the gguf package",
                         'in your qlora-kit clone: pip install -c constraints.txt -e ".[gguf]"') from exc
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
