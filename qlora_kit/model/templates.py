"""Chat templates by name (``model.chat_template: chatml | llama3 | mistral``): the Jinja files qlora-kit ships
(``chat_templates/<name>.jinja``, all rendering tools), and the check that a tokenizer has the tokens a named
template ends its turns with (generation must be able to stop on one token)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from qlora_kit.core.config import CHAT_TEMPLATE_NAMES
from qlora_kit.core.errors import ConfigError

TEMPLATE_DIR = Path(__file__).with_name("chat_templates")

# The tokens each named template writes as markers; each must be one token of the tokenizer.
MARKERS: dict[str, tuple[str, ...]] = {
    "chatml": ("<|im_start|>", "<|im_end|>"),
    "llama3": ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
    "mistral": (),  # [INST] may be plain text; replies end with the tokenizer's own EOS
}
INSTEAD = {  # what to use when a tokenizer lacks a template's markers
    "chatml": "model.chat_template: mistral (replies end with the tokenizer's own EOS)",
    "llama3": "model.chat_template: mistral (replies end with the tokenizer's own EOS)",
    "mistral": "a model whose tokenizer has an EOS token",
}


def named_template(name: str) -> str:
    """The Jinja text of a template qlora-kit ships."""
    if name not in CHAT_TEMPLATE_NAMES:
        raise ValueError(f"no chat template named {name!r}")
    return (TEMPLATE_DIR / f"{name}.jinja").read_text(encoding="utf-8")


def template_name(value: str | None) -> str | None:
    """The name when ``model.chat_template`` names a shipped template (None for a Jinja text or no value)."""
    return value if value in CHAT_TEMPLATE_NAMES else None


def apply_chat_template_setting(tokenizer: Any, value: str | None, model_name: str) -> None:
    """Give ``tokenizer`` the template ``model.chat_template`` asks for (a name or a Jinja text); a name is
    refused when the tokenizer lacks a token it ends turns with.

    Raises:
        ConfigError: a named template whose markers are not single tokens of this tokenizer.
    """
    if not value:
        return
    name = template_name(value)
    if name is None:
        tokenizer.chat_template = value
        return
    missing = [m for m in MARKERS[name] if not is_single_token(tokenizer, m)]
    if name == "mistral" and tokenizer.eos_token is None:
        missing.append("an EOS token")
    if missing:
        raise ConfigError(
            f"model.chat_template: {name} needs {', '.join(missing)} as single tokens, which the tokenizer of "
            f"{model_name} lacks (generation could not stop at the end of a reply)",
            f"use {INSTEAD[name]}, or a Jinja template built on this tokenizer's special tokens",
            key="model.chat_template",
        )
    tokenizer.chat_template = named_template(name)


def is_single_token(tokenizer: Any, text: str) -> bool:
    """Whether ``text`` encodes to exactly one token (a special or added token of the vocabulary)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return len(ids) == 1
