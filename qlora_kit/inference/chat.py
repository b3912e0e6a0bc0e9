"""The chat format at inference: rendering prompts, end-of-turn and EOS ids, stop strings."""

from __future__ import annotations

import logging
from typing import Any

from qlora_kit.core.errors import ModelError
from qlora_kit.data.labels import fold_system, template_takes_system

log = logging.getLogger("qlora_kit")

_SENTINEL = "qlorakitsentinel"


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


def render_chat(tokenizer: Any, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None) -> str:
    """The prompt text for ``messages`` (and the tool list ``tools``): the chat template with the generation
    prompt (plain join without one).

    Raises:
        ModelError: the template rejects the conversation (e.g. roles not alternating); a template without
            a system role gets the system prompt before the first user message, as in training.
    """
    if getattr(tokenizer, "chat_template", None):
        from jinja2.exceptions import TemplateError

        if messages and messages[0]["role"] == "system" and not template_takes_system(tokenizer):
            messages = fold_system(messages)  # as training did for this template
        try:
            return tokenizer.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=True)
        except TemplateError as exc:  # e.g. "System role not supported", roles must alternate
            raise ModelError(f"the chat template rejected this conversation: {exc}",
                             "keep user/assistant turns alternating (or drop --system)") from exc
    return "\n".join(m["content"] for m in messages) + "\n"


def encode_chat(tokenizer: Any, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None
                ) -> list[int]:
    """Prompt ids for ``messages`` (and ``tools``) through the chat template (plain text join when there is none).

    Raises:
        ModelError: the template rejects the conversation.
    """
    text = render_chat(tokenizer, messages, tools)
    return tokenizer(text, add_special_tokens=not getattr(tokenizer, "chat_template", None))["input_ids"]


def cut_after_stop(ids: list[int], eos_ids: list[int]) -> list[int]:
    """Everything up to and including the first stop token."""
    for i, tok in enumerate(ids):
        if tok in eos_ids:
            return ids[: i + 1]
    return ids


def strip_stop(ids: list[int], eos_ids: list[int]) -> list[int]:
    """Drop everything from the first stop token on."""
    for i, tok in enumerate(ids):
        if tok in eos_ids:
            return ids[:i]
    return ids
