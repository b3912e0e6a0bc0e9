"""The run's tokenizer as GGUF metadata: vocabulary, merges or scores, token types, special ids, template.

llama.cpp re-implements tokenisation, so what it needs is not just the vocabulary but *which*
pre-tokenizer to run (``tokenizer.ggml.pre``).  The value is decided from the run's own
``tokenizer.json`` — the tokenizer training used — by matching its pre-tokenizer against the
ones llama.cpp implements (``PRE_TOKENIZERS``), never from the model's name: a SmolLM2
converted from GGUF by transformers, for instance, trains with the plain GPT-2 pre-tokenizer,
not llama.cpp's ``smollm`` one, and llama.cpp must split digits the way training did.  A
tokenizer that matches none is refused rather than exported with a guess.

Two vocabulary kinds are written:

* ``gpt2``  byte-level BPE (Llama 3, Qwen2, SmolLM2...): tokens, merges, pre-tokenizer;
* ``llama`` SentencePiece-style BPE with byte fallback (Llama 2, Mistral 7B): tokens with
  scores.  llama.cpp merges the highest-scoring pair first, so each token's score is minus
  the rank of the merge that makes it: the same order as the tokenizer's merge list.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qlora_kit.core.errors import ModelError

# The "original regex from tokenizer.json" of the pre-tokenizers llama.cpp implements (llama-vocab.cpp).
_LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_TEKKEN_REGEX = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|[^\r\n\p{L}\p{N}]?"
                 r"[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_BYTE_LEVEL_REGEX = {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}
_BYTE_LEVEL_PLAIN = {"type": "ByteLevel", "add_prefix_space": False, "use_regex": False}


def _split(regex: str) -> dict[str, Any]:
    return {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": False}


# tokenizer.ggml.pre value → the tokenizers pre-tokenizer steps that behave like it.
PRE_TOKENIZERS: dict[str, list[dict[str, Any]]] = {
    "gpt-2": [_BYTE_LEVEL_REGEX],
    "smollm": [{"type": "Digits", "individual_digits": True}, _BYTE_LEVEL_REGEX],
    "llama-bpe": [_split(_LLAMA3_REGEX), _BYTE_LEVEL_PLAIN],
    "qwen2": [_split(_QWEN2_REGEX), _BYTE_LEVEL_PLAIN],
    "tekken": [_split(_TEKKEN_REGEX), _BYTE_LEVEL_PLAIN],
}
_NORMALIZERS_IGNORED = (None, "NFC")  # llama.cpp does not normalise; NFC text (the usual input) is unchanged

# gguf.TokenType values (kept here so this module imports without gguf).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


@dataclass
class GgufVocab:
    """Everything llama.cpp needs to tokenise like the run's tokenizer."""

    model: str  # "gpt2" (byte-level BPE) or "llama" (SentencePiece-style BPE)
    pre: str  # tokenizer.ggml.pre
    tokens: list[str]
    types: list[int]
    scores: list[float] | None
    merges: list[str]
    special_ids: dict[str, int] = field(default_factory=dict)  # bos/eos/unk/pad/eot
    add_bos: bool = False
    add_eos: bool = False
    add_space_prefix: bool | None = None
    chat_template: str | None = None


# --------------------------------------------------------------------------- reading the run's tokenizer


def read_vocab(tokenizer_dir: Path, tokenizer: Any, n_vocab: int, end_of_turn: list[int]) -> GgufVocab:
    """Build the GGUF vocabulary of ``tokenizer`` (loaded from ``tokenizer_dir``), padded to ``n_vocab`` rows.

    Raises:
        ModelError: no ``tokenizer.json``, a tokenizer kind or pre-tokenizer llama.cpp does not
            reproduce, or more tokens than the model has embedding rows.
    """
    spec = _tokenizer_json(tokenizer_dir)
    model = spec.get("model", {})
    if model.get("type") != "BPE":
        raise ModelError(f"the run's tokenizer is a {model.get('type')} tokenizer: the GGUF export supports BPE "
                         "tokenizers (Llama, Mistral, Qwen2 families)", "export with --format hf")
    sentencepiece_like = bool(model.get("byte_fallback"))
    tokens, types = _token_table(spec, tokenizer, n_vocab, sentencepiece_like)
    vocab = GgufVocab(
        model="llama" if sentencepiece_like else "gpt2",
        pre="default" if sentencepiece_like else pre_tokenizer_name(spec),
        tokens=tokens, types=types,
        scores=_merge_scores(spec, tokens) if sentencepiece_like else None,
        merges=[] if sentencepiece_like else _merges(tokenizer_dir),
        chat_template=_chat_template(tokenizer),
    )
    if sentencepiece_like:
        vocab.add_space_prefix = _adds_space_prefix(spec)
    _set_special_ids(vocab, tokenizer, end_of_turn)
    return vocab


def _tokenizer_json(tokenizer_dir: Path) -> dict[str, Any]:
    path = tokenizer_dir / "tokenizer.json"
    if not path.is_file():
        raise ModelError(f"{path} is missing: the GGUF export reads the vocabulary from a fast tokenizer's "
                         "tokenizer.json", "export with --format hf")
    return json.loads(path.read_text(encoding="utf-8"))


def pre_tokenizer_name(spec: dict[str, Any]) -> str:
    """The ``tokenizer.ggml.pre`` value whose behaviour equals this byte-level tokenizer's pre-tokenizer.

    Raises:
        ModelError: a normaliser or pre-tokenizer llama.cpp does not implement.
    """
    normalizer = (spec.get("normalizer") or {}).get("type")
    if normalizer not in _NORMALIZERS_IGNORED:
        raise ModelError(f"the run's tokenizer normalises text ({normalizer}), which llama.cpp does not reproduce",
                         "export with --format hf")
    if (spec.get("decoder") or {}).get("type") != "ByteLevel":
        raise ModelError("the run's BPE tokenizer is not byte-level (its decoder is "
                         f"{(spec.get('decoder') or {}).get('type')}): llama.cpp could not reproduce it",
                         "export with --format hf")
    pre = spec.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    for name, wanted in PRE_TOKENIZERS.items():
        if len(steps) == len(wanted) and all(_step_matches(s, w) for s, w in zip(steps, wanted)):
            return name
    kinds = " + ".join(str(s.get("type")) for s in steps) or "none"
    raise ModelError(f"the run's tokenizer pre-tokenizes with {kinds}, which matches none of the llama.cpp "
                     f"pre-tokenizers qlora-kit maps ({', '.join(PRE_TOKENIZERS)}): llama.cpp would split text "
                     "differently from training", "export with --format hf")


def _step_matches(step: dict[str, Any], wanted: dict[str, Any]) -> bool:
    return all(step.get(key, False if key == "add_prefix_space" else None) == value for key, value in wanted.items())


def _token_table(spec: dict[str, Any], tokenizer: Any, n_vocab: int, sentencepiece_like: bool
                 ) -> tuple[list[str], list[int]]:
    """Token strings and types in id order, padded with unused ``[PAD<id>]`` tokens to ``n_vocab``."""
    by_id: dict[int, tuple[str, int]] = {}
    unk = spec["model"].get("unk_token")
    for text, idx in spec["model"]["vocab"].items():
        kind = NORMAL
        if sentencepiece_like and len(text) == 6 and text.startswith("<0x") and text.endswith(">"):
            kind = BYTE
        elif text == unk:
            kind = UNKNOWN
        by_id[idx] = (text, kind)
    for added in spec.get("added_tokens", []):
        kind = CONTROL if added.get("special") else USER_DEFINED
        if added["content"] == unk:
            kind = UNKNOWN
        by_id[added["id"]] = (added["content"], kind)
    if max(by_id, default=-1) >= n_vocab:
        raise ModelError(f"the run's tokenizer has token id {max(by_id)} but the model has only {n_vocab} "
                         "embedding rows", "the tokenizer does not belong to this base model")
    taken = {text for text, _ in by_id.values()}
    tokens, types = [], []
    for idx in range(n_vocab):
        text, kind = by_id.get(idx, (f"[PAD{idx}]", UNUSED))
        if idx not in by_id and text in taken:
            text = f"[PAD{idx}-qlora-kit]"
        tokens.append(text)
        types.append(kind)
    return tokens, types


def _merges(tokenizer_dir: Path) -> list[str]:
    import gguf

    merges = gguf.SpecialVocab(tokenizer_dir, load_merges=True).merges
    if not merges:
        raise ModelError(f"{tokenizer_dir / 'tokenizer.json'} has no BPE merges", "export with --format hf")
    return merges


def _merge_scores(spec: dict[str, Any], tokens: list[str]) -> list[float]:
    """Score = -(rank of the merge producing the token); single characters 0; other unmerged pieces last."""
    rank: dict[str, int] = {}
    for i, merge in enumerate(spec["model"].get("merges", [])):
        left, right = merge if isinstance(merge, list) else merge.split(" ", 1)
        rank.setdefault(left + right, i)
    scores = []
    for text in tokens:
        if text in rank:
            scores.append(-float(rank[text] + 1))
        else:
            scores.append(0.0 if len(text) == 1 else -1e9)
    return scores


def _adds_space_prefix(spec: dict[str, Any]) -> bool:
    """Whether the SentencePiece-style tokenizer prepends '▁' to the text (Prepend normaliser or Metaspace)."""
    found = json.dumps([spec.get("normalizer"), spec.get("pre_tokenizer")])
    if '"Prepend"' in found:
        return True
    return '"Metaspace"' in found and '"prepend_scheme": "never"' not in found


def _chat_template(tokenizer: Any) -> str | None:
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        template = template.get("default")
    return template or None


def _set_special_ids(vocab: GgufVocab, tokenizer: Any, end_of_turn: list[int]) -> None:
    for kind in ("bos", "eos", "unk", "pad"):
        idx = getattr(tokenizer, f"{kind}_token_id", None)
        if idx is not None:
            vocab.special_ids[kind] = int(idx)
    eot = [i for i in end_of_turn if i != vocab.special_ids.get("eos")]
    if eot:
        vocab.special_ids["eot"] = eot[0]
    probe = tokenizer("a")["input_ids"]
    vocab.add_bos = bool(probe) and probe[0] == vocab.special_ids.get("bos")
    vocab.add_eos = len(probe) > 1 and probe[-1] == vocab.special_ids.get("eos")


# --------------------------------------------------------------------------- writing and reading back


def write_vocab(writer: Any, vocab: GgufVocab) -> None:
    """Add the tokenizer keys to a ``gguf.GGUFWriter``."""
    writer.add_tokenizer_model(vocab.model)
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.types)
    if vocab.scores is not None:
        writer.add_token_scores(vocab.scores)
    if vocab.merges:
        writer.add_token_merges(vocab.merges)
    for kind, idx in vocab.special_ids.items():
        getattr(writer, f"add_{kind}_token_id")(idx)
    writer.add_add_bos_token(vocab.add_bos)
    writer.add_add_eos_token(vocab.add_eos)
    if vocab.add_space_prefix is not None:
        writer.add_add_space_prefix(vocab.add_space_prefix)
    if vocab.chat_template:
        writer.add_chat_template(vocab.chat_template)


def read_gguf_vocab(path: Path) -> dict[str, Any]:
    """The tokenizer keys of a GGUF file, as plain Python values (for round-trip checks)."""
    import gguf

    reader = gguf.GGUFReader(path)
    wanted = {"tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.tokens", "tokenizer.ggml.token_type",
              "tokenizer.ggml.scores", "tokenizer.ggml.merges", "tokenizer.ggml.bos_token_id",
              "tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id", "tokenizer.ggml.unknown_token_id",
              "tokenizer.ggml.padding_token_id", "tokenizer.ggml.add_bos_token", "tokenizer.ggml.add_eos_token",
              "tokenizer.ggml.add_space_prefix", "tokenizer.chat_template"}
    return {key: field.contents() for key, field in reader.fields.items() if key in wanted}


def vocab_round_trip(path: Path, vocab: GgufVocab) -> list[str]:
    """Differences between the tokenizer stored in the GGUF at ``path`` and ``vocab`` (empty when identical)."""
    stored = read_gguf_vocab(path)
    expected: dict[str, Any] = {
        "tokenizer.ggml.model": vocab.model, "tokenizer.ggml.pre": vocab.pre, "tokenizer.ggml.tokens": vocab.tokens,
        "tokenizer.ggml.token_type": vocab.types, "tokenizer.ggml.add_bos_token": vocab.add_bos,
        "tokenizer.ggml.add_eos_token": vocab.add_eos, "tokenizer.chat_template": vocab.chat_template,
    }
    if vocab.merges:
        expected["tokenizer.ggml.merges"] = vocab.merges
    names = {"bos": "bos_token_id", "eos": "eos_token_id", "eot": "eot_token_id", "unk": "unknown_token_id",
             "pad": "padding_token_id"}
    for kind, idx in vocab.special_ids.items():
        expected[f"tokenizer.ggml.{names[kind]}"] = idx
    return [key for key, value in expected.items() if stored.get(key) != value]
