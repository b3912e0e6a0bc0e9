"""The system prompt of rows that have none: the chat template's default one (found by rendering) is kept,
dropped, or replaced by a text of the user's (``data.default_system_prompt``), and the summary says which."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

from qlora_kit.data.formats import Row

_SYSTEM, _USER = "qlorakitsystemprobe", "qlorakituserprobe"


def template_default_system(tokenizer: PreTrainedTokenizerBase) -> str | None:
    """The system prompt the chat template writes into a conversation that has none (SmolLM2's "You are a
    helpful AI assistant named SmolLM, ..."), or None when it writes none.

    Found by rendering one user turn with and without a probe system prompt: when the text without it is the
    text with it, the probe replaced by something, that something is the default.
    """
    user = [{"role": "user", "content": _USER}]
    try:
        plain = tokenizer.apply_chat_template(user, tokenize=False)
        with_system = tokenizer.apply_chat_template([{"role": "system", "content": _SYSTEM}, *user], tokenize=False)
    except Exception:  # noqa: BLE001 - no system role (Gemma-2), or no template: no default either
        return None
    if _SYSTEM not in with_system:
        return None
    head, tail = with_system.split(_SYSTEM, 1)
    if len(plain) < len(head) + len(tail) or not (plain.startswith(head) and plain.endswith(tail)):
        return None
    return plain[len(head):len(plain) - len(tail)].strip() or None


@dataclass
class SystemPromptUse:
    """What happened to rows without a system turn (for the summary)."""

    policy: str  # keep | drop | text
    template_default: str | None  # the chat template's default system prompt
    rows: int = 0  # conversation rows without a system turn
    text: str | None = None  # the system prompt those rows were trained with (None: none)

    @classmethod
    def of(cls, policy: str, template_default: str | None) -> "SystemPromptUse":
        """For the ``data.default_system_prompt`` value ``policy`` (keep, drop, or a text)."""
        return cls(policy if policy in ("keep", "drop") else "text", template_default)

    def describe(self) -> str | None:
        """One sentence for the summary, or None when nothing was inserted."""
        if not self.rows or (self.policy != "text" and not self.template_default):
            return None
        rows = f"{self.rows} row{'s' if self.rows != 1 else ''} without a system prompt"
        if self.policy == "keep":
            return (f"the chat template inserts its default system prompt into {rows}: {first_words(self.text)} "
                    "(data.default_system_prompt: drop, or a text of yours, changes that)")
        if self.policy == "drop":
            return f"{rows} get an empty system turn instead of the template's default {first_words(self.template_default)}"
        return f"{rows} get data.default_system_prompt {first_words(self.text)}"


def first_words(text: str | None, limit: int = 60) -> str:
    """``"You are a helpful AI assistant named SmolLM, trained…"``: the start of a prompt, quoted."""
    text = " ".join((text or "").split())
    return f'"{text[:limit].rstrip()}…"' if len(text) > limit else f'"{text}"'


def apply_system_policy(rows: list[Row], policy: str, template_default: str | None) -> tuple[list[Row], SystemPromptUse]:
    """``rows`` with the ``data.default_system_prompt`` policy applied to conversations without a system turn.

    keep: unchanged (the template inserts its default, if any); drop: an empty system turn, so a template
    with a default does not insert it; any other text: that text as their system turn.
    """
    use = SystemPromptUse.of(policy, template_default)
    inserted = {"keep": None, "drop": "" if template_default else None}.get(policy, policy)
    use.text = template_default if policy == "keep" else inserted or None
    out = []
    for row in rows:
        if row.messages is not None and (not row.messages or row.messages[0]["role"] != "system"):
            use.rows += 1
            if inserted is not None:
                row = replace(row, messages=[{"role": "system", "content": inserted}, *row.messages],
                              train_turns=tuple(i + 1 for i in row.train_turns))
        out.append(row)
    return out, use
