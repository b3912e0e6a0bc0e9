"""`qlora-kit generate` / `qlora-kit chat`: talk to a run directory, an exported model or a GGUF file.

A run directory is rebuilt as NF4 base + adapter (``model.load_run_for_inference``); an
exported directory is loaded with plain transformers, and so is a ``.gguf`` file once
converted into the cached HF checkpoint configs use.  Both go through the tokenizer's
chat template, stream tokens as they are produced, and stop on the same EOS set that
``qlora-kit export`` writes into ``generation_config.json`` (``eos_token_ids``): the
tokenizer's EOS, the chat template's end-of-turn token(s) and the base model's EOS ids.
"""

from __future__ import annotations

import copy
import json
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from qlora_kit.errors import ModelError

log = logging.getLogger("qlora_kit")

_SENTINEL = "qlorakitsentinel"


# --------------------------------------------------------------------------- stop tokens


def end_of_turn_ids(tokenizer: Any) -> list[int]:
    """Token ids the chat template writes right after an assistant message (e.g. ``<|im_end|>``).

    Found by rendering a one-turn conversation with a sentinel answer and reading the first
    token after it; only special/added tokens count.  Empty when there is no template or it
    closes turns with plain text.
    """
    if not getattr(tokenizer, "chat_template", None):
        return []
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": _SENTINEL}]
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False)
    except Exception as exc:  # templates raise all kinds of errors (jinja, role checks)
        log.warning("could not render the chat template to find its end-of-turn token: %s", exc)
        return []
    tail = text[text.rfind(_SENTINEL) + len(_SENTINEL):].lstrip()
    if not tail:
        return []
    ids = tokenizer(tail, add_special_tokens=False)["input_ids"]
    special = set(tokenizer.all_special_ids) | set(getattr(tokenizer, "added_tokens_decoder", {}) or {})
    return [ids[0]] if ids and ids[0] in special else []


def eos_token_ids(tokenizer: Any, base_eos: int | list[int] | None = None) -> list[int]:
    """Union of the tokenizer's EOS, the template's end-of-turn token(s) and the base model's EOS ids."""
    found: list[int] = []
    if tokenizer.eos_token_id is not None:
        found.append(int(tokenizer.eos_token_id))
    found += end_of_turn_ids(tokenizer)
    if base_eos is not None:
        found += [int(i) for i in (base_eos if isinstance(base_eos, (list, tuple)) else [base_eos])]
    return list(dict.fromkeys(found))


# --------------------------------------------------------------------------- loading


@dataclass
class Loaded:
    """A model ready to generate, with its tokenizer and stop tokens."""

    model: Any
    tokenizer: Any
    eos_ids: list[int]
    kind: str  # "run" (NF4 + adapter) or "export" (plain checkpoint)
    info: dict[str, Any] = field(default_factory=dict)


def load_for_generation(path: str | Path, device: torch.device | None = None) -> Loaded:
    """Load a run directory (NF4 + adapter), an exported/plain HF model directory, or a ``.gguf`` file.

    A GGUF file (or ``smollm2-demo``, the demo's) is converted once into the cached HF
    checkpoint that configs use (``model.convert_gguf``) and loaded from there.

    Raises:
        ModelError: ``path`` is none of these, or the run is damaged.
        RunInUseError: a training run is writing ``path``.
    """
    from qlora_kit import rundir, runlock
    from qlora_kit.demo import DEMO_MODEL, find_demo_gguf
    from qlora_kit.model import convert_gguf

    p = Path(path)
    if str(path) == DEMO_MODEL and not p.exists():
        p = find_demo_gguf()
    if not p.exists():
        raise ModelError(f"{p} does not exist",
                         "pass a run directory (output_dir of `qlora-kit train`), an export, or a .gguf file")
    if p.is_file() and p.suffix.lower() == ".gguf":
        return _load_export(convert_gguf(p), device)
    if p.is_dir() and rundir.is_run_dir(p):
        with runlock.shared(p, "generate"):  # not while a training run writes it
            return _load_run(p, device)
    if p.is_dir() and (p / "config.json").is_file():
        return _load_export(p, device)
    raise ModelError(
        f"{p} is neither a qlora-kit run directory, a model directory nor a .gguf file "
        "(no manifest.json/config.yaml, no config.json)",
        "pass the output_dir of `qlora-kit train`, a directory written by `qlora-kit export`, or a .gguf file",
    )


def _load_run(run: Path, device: torch.device | None) -> Loaded:
    from qlora_kit.model import load_run_for_inference

    model, tokenizer, manifest = load_run_for_inference(run, device=device)
    base_eos = getattr(model.generation_config, "eos_token_id", None)
    return Loaded(model, tokenizer, eos_token_ids(tokenizer, base_eos), "run", {"manifest": manifest})


def _load_export(path: Path, device: torch.device | None) -> Loaded:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qlora_kit.model import pick_device, set_inference_mode

    device = device or pick_device()
    dtype = inference_dtype(path, device)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, device_map={"": device})
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot load the model in {path}: {exc}") from exc
    set_inference_mode(model)
    base_eos = getattr(model.generation_config, "eos_token_id", None)
    return Loaded(model, tokenizer, eos_token_ids(tokenizer, base_eos), "export", {"dtype": str(dtype)})


def inference_dtype(path: Path, device: torch.device) -> torch.dtype | str:
    """Stored dtype on GPU; float32 on CPU when it fits in half the free RAM (16-bit matmuls are slow there)."""
    if device.type != "cpu":
        return "auto"
    import psutil

    weights = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    stored = _stored_dtype(path)
    upcast = weights * (2 if stored in ("float16", "bfloat16") else 1)
    if upcast < psutil.virtual_memory().available / 2:
        return torch.float32
    return "auto"


def _stored_dtype(path: Path) -> str | None:
    try:
        cfg = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return None
    return cfg.get("dtype") or cfg.get("torch_dtype")


# --------------------------------------------------------------------------- prompting


def render_chat(tokenizer: Any, messages: list[dict[str, str]]) -> str:
    """The prompt text for ``messages``: the chat template with the generation prompt (plain join without one).

    Raises:
        ModelError: the template rejects the conversation (e.g. roles not alternating); a template without
            a system role gets the system prompt before the first user message, as in training.
    """
    if getattr(tokenizer, "chat_template", None):
        from jinja2.exceptions import TemplateError

        from qlora_kit.data import fold_system, template_takes_system

        if messages and messages[0]["role"] == "system" and not template_takes_system(tokenizer):
            messages = fold_system(messages)  # as training did for this template
        try:
            return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except TemplateError as exc:  # e.g. "System role not supported", roles must alternate
            raise ModelError(f"the chat template rejected this conversation: {exc}",
                             "keep user/assistant turns alternating (or drop --system)") from exc
    return "\n".join(m["content"] for m in messages) + "\n"


def encode_chat(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    """Prompt ids for ``messages`` through the chat template (plain text join when there is none).

    Raises:
        ModelError: the template rejects the conversation.
    """
    text = render_chat(tokenizer, messages)
    return tokenizer(text, add_special_tokens=not getattr(tokenizer, "chat_template", None))["input_ids"]


def greedy_or_sampling_config(model: Any, eos_ids: list[int], pad_id: int | None, max_new_tokens: int,
                              temperature: float = 0.0):
    """The model's generation config with our stop tokens: plain argmax at temperature 0, else sampling.

    Greedy switches off everything that would bend the argmax (sampling knobs, repetition
    penalties from the base's generation_config.json), so two models compared greedily are
    compared on their logits alone.
    """
    gen = copy.deepcopy(model.generation_config)
    pad = pad_id if pad_id is not None else (eos_ids[0] if eos_ids else None)
    gen.update(max_new_tokens=max_new_tokens, eos_token_id=list(eos_ids) or None, pad_token_id=pad)
    if temperature > 0:
        gen.update(do_sample=True, temperature=temperature)
    else:
        gen.update(do_sample=False, temperature=None, top_p=None, top_k=None, min_p=None, repetition_penalty=None,
                   no_repeat_ngram_size=None)
    return gen


def generate_tokens(model: Any, prompts: list[list[int]], eos_ids: list[int], pad_id: int | None,
                    max_new_tokens: int, temperature: float = 0.0, batch_size: int = 1,
                    streamer: Any = None) -> list[list[int]]:
    """New token ids for each prompt, greedy at temperature 0 (the one generation helper of qlora-kit).

    Prompts are run ``batch_size`` at a time, left-padded.  Each result ends at, and keeps,
    its first stop token (``eos_ids``); nothing after it (batch padding) is returned.
    """
    gen = greedy_or_sampling_config(model, eos_ids, pad_id, max_new_tokens, temperature)
    device = next(model.parameters()).device
    results: list[list[int]] = []
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start:start + batch_size]
        width = max(len(p) for p in batch)
        ids = torch.tensor([[gen.pad_token_id or 0] * (width - len(p)) + p for p in batch], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch], device=device)
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=mask, generation_config=gen, streamer=streamer)
        results += [cut_after_stop(row[width:].tolist(), eos_ids) for row in out]
    return results


def cut_after_stop(ids: list[int], eos_ids: list[int]) -> list[int]:
    """Everything up to and including the first stop token."""
    for i, tok in enumerate(ids):
        if tok in eos_ids:
            return ids[: i + 1]
    return ids


def generate_ids(loaded: Loaded, prompt_ids: list[int], max_new_tokens: int, temperature: float = 0.0,
                 streamer: Any = None) -> list[int]:
    """New token ids for one prompt (stops after an EOS id, which is kept)."""
    pad = loaded.tokenizer.pad_token_id
    return generate_tokens(loaded.model, [prompt_ids], loaded.eos_ids, pad, max_new_tokens, temperature,
                           streamer=streamer)[0]


def strip_stop(ids: list[int], eos_ids: list[int]) -> list[int]:
    """Drop everything from the first stop token on."""
    for i, tok in enumerate(ids):
        if tok in eos_ids:
            return ids[:i]
    return ids


def _streamer(tokenizer: Any):
    from transformers import TextStreamer

    return TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)


# --------------------------------------------------------------------------- commands


def generate_once(path: str | Path, prompt: str, system: str | None = None, max_new_tokens: int = 256,
                  temperature: float = 0.0, device: torch.device | None = None) -> int:
    """Answer one prompt through the chat template, streaming to stdout; return the exit code.

    Raises:
        ModelError: ``path`` is neither a run nor a model directory.
    """
    loaded = load_for_generation(path, device)
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    ids = generate_ids(loaded, encode_chat(loaded.tokenizer, messages), max_new_tokens, temperature,
                       streamer=_streamer(loaded.tokenizer))
    sys.stdout.flush()
    if ids and ids[-1] not in loaded.eos_ids and len(ids) >= max_new_tokens:
        log.info("stopped at --max-new-tokens=%d before an end-of-turn token", max_new_tokens)
    return 0


def chat_loop(path: str | Path, system: str | None = None, max_new_tokens: int = 512, temperature: float = 0.0,
              device: torch.device | None = None, read: Callable[[str], str] = input) -> int:
    """Interactive chat: ``/exit`` (or EOF) quits, ``/reset`` clears the history; return the exit code.

    Raises:
        ModelError: ``path`` is neither a run nor a model directory.
    """
    loaded = load_for_generation(path, device)
    print(f"loaded {loaded.kind} model from {path}; /exit to quit, /reset to clear the history", flush=True)
    history = _fresh_history(system)
    while True:
        try:
            line = read("you> ").strip()
        except EOFError:
            print()
            return 0
        if line in ("/exit", "/quit"):
            return 0
        if line == "/reset":
            history = _fresh_history(system)
            print("(history cleared)", flush=True)
            continue
        if not line:
            continue
        history.append({"role": "user", "content": line})
        print("assistant> ", end="", flush=True)
        ids = generate_ids(loaded, encode_chat(loaded.tokenizer, history), max_new_tokens, temperature,
                           streamer=_streamer(loaded.tokenizer))
        reply = loaded.tokenizer.decode(strip_stop(ids, loaded.eos_ids), skip_special_tokens=True)
        history.append({"role": "assistant", "content": reply.strip()})


def _fresh_history(system: str | None) -> list[dict[str, str]]:
    return [{"role": "system", "content": system}] if system else []
