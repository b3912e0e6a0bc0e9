"""Which characters of a rendered conversation are trained on: assistant spans found through the chat template."""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Sequence

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

from qlora_kit.data.formats import Row, RowProblem

log = logging.getLogger("qlora_kit")


Span = tuple[int, int]


_PROBE = "qlorakitprobe"
TEMPLATE_ERROR = "chat template error: "  # how a row the template raises on is reported (data/build.py)


class ChatSpans:
    """Locate each trained assistant reply (plus its end-of-turn text) in the rendered chat."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase):
        self.tokenizer = tokenizer
        self.end_of_turn = self._probe_end_of_turn()
        self.searched_turns = 0

    def render(self, messages: list[dict[str, str]], add_generation_prompt: bool = False) -> str:
        return self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )

    def locate(self, messages: list[dict[str, str]], turns: Sequence[int]) -> tuple[str, list[Span]]:
        """Render ``messages``; return the text and the character spans to train on.

        Raises:
            RowProblem: the template fails on this conversation, or a reply cannot be found.
        """
        try:
            full = self.render(messages)
        except Exception as exc:  # jinja TemplateError, raise_exception() in templates, ...
            first_line = str(exc).splitlines()[0] if str(exc).strip() else "(no message)"
            raise RowProblem(f"{TEMPLATE_ERROR}{type(exc).__name__}: {first_line[:300]}") from exc
        spans: list[Span] = []
        cursor = 0
        for i in turns:
            span = self._by_prefix(messages, i, full, cursor) or self._by_search(messages, i, full, cursor)
            if span is None:
                raise RowProblem(f"assistant turn {i + 1} not found in the chat template's output (it rewrites it)")
            if span[1] > span[0]:
                spans.append(span)
            cursor = max(cursor, span[1])
        return full, spans

    def _by_prefix(self, messages: list[dict[str, str]], i: int, full: str, cursor: int) -> Span | None:
        """Diff of the renders before and after turn ``i``, if both are prefixes of ``full``."""
        try:
            before = self.render(messages[:i], add_generation_prompt=True)
            through = full if i == len(messages) - 1 else self.render(messages[: i + 1])
        except Exception:
            return None
        if not (through.startswith(before) and full.startswith(through)) or len(before) < cursor:
            return None
        return len(before), len(before) + len(full[len(before) : len(through)].rstrip())

    def _by_search(self, messages: list[dict[str, str]], i: int, full: str, cursor: int) -> Span | None:
        """Find the reply's text after the preceding turn; extend over the end-of-turn text.

        Spaces right before the reply join it (a token like ``" The"`` starts there).
        """
        start = cursor
        previous = messages[i - 1]["content"].strip() if i > 0 else ""
        if previous and (k := full.find(previous, cursor)) >= 0:
            start = k + len(previous)
        content = messages[i]["content"].strip()
        if not content:
            k = full.find(self.end_of_turn, start) if self.end_of_turn else -1
            return (k, k + len(self.end_of_turn)) if k >= 0 else None
        k = full.find(content, start)
        if k < 0:
            return None
        end = k + len(content)
        while k > start and full[k - 1] in " \t":
            k -= 1
        if self.end_of_turn and full.startswith(self.end_of_turn, end):
            end += len(self.end_of_turn)
        self.searched_turns += 1
        return k, end

    def _probe_end_of_turn(self) -> str:
        """The text a template puts after a reply (e.g. ``<|im_end|>``), from a probe chat."""
        user = [{"role": "user", "content": "Hi"}]
        try:
            before = self.render(user, add_generation_prompt=True)
            through = self.render(user + [{"role": "assistant", "content": _PROBE}])
        except Exception:
            return self.tokenizer.eos_token or ""
        tail = through[len(before) :] if through.startswith(before) else ""
        if _PROBE not in tail:
            return self.tokenizer.eos_token or ""
        return tail.split(_PROBE, 1)[1].rstrip()


def template_takes_system(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Whether the chat template renders a leading system turn (Gemma-2's raises "System role not supported").

    A template that fails on a plain user turn too counts as taking one: its rows report the error.
    """
    user = [{"role": "user", "content": "Hi"}]
    try:
        tokenizer.apply_chat_template(user, tokenize=False)
    except Exception:  # noqa: BLE001 - templates raise all kinds of errors (jinja, role checks)
        return True
    try:
        tokenizer.apply_chat_template([{"role": "system", "content": "Be brief."}, *user], tokenize=False)
    except Exception:  # noqa: BLE001 - as above
        return False
    return True


def fold_system(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A leading system turn put before the first user message (its content, a blank line, then the user's):
    what models whose template has no system role expect; other conversations are returned unchanged."""
    if len(messages) < 2 or messages[0]["role"] != "system" or messages[1]["role"] != "user":
        return messages
    first = {**messages[1], "content": f"{messages[0]['content']}\n\n{messages[1]['content']}"}
    return [first, *messages[2:]]


def fold_system_rows(rows: list[Row]) -> tuple[list[Row], int]:
    """``rows`` with :func:`fold_system` applied (trained turn indices shifted); how many rows changed."""
    out, folded = [], 0
    for row in rows:
        messages = fold_system(row.messages) if row.messages is not None else None
        if messages is not row.messages:
            row = replace(row, messages=messages, train_turns=tuple(i - 1 for i in row.train_turns))
            folded += 1
        out.append(row)
    return out, folded


def make_chat_spans(tokenizer: PreTrainedTokenizerBase, rows: list[Row]) -> ChatSpans | None:
    """A ChatSpans for conversation rows; warns when replies end without an end-of-turn marker."""
    if not any(r.messages is not None for r in rows):
        return None
    chat = ChatSpans(tokenizer)
    if not chat.end_of_turn:
        log.warning("the chat template puts no end-of-turn token after replies: the model may not learn to stop")
    return chat
