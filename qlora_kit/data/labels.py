"""Which characters of a rendered conversation are trained on: assistant spans found through the chat template."""

from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Iterator, Sequence

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

from qlora_kit.core.errors import DataError
from qlora_kit.core.timelimit import TimeLimitExceeded, time_limit
from qlora_kit.data.formats import Message, Row, RowProblem
from qlora_kit.data.tools import call_names, call_prefix

log = logging.getLogger("qlora_kit")

TEMPLATE_SECONDS = 10.0  # per row (all its renderings); a real template renders a conversation in milliseconds


@contextmanager
def template_time_limit(row: int | None = None) -> Iterator[None]:
    """Stop the chat template after ``TEMPLATE_SECONDS`` (a runaway one: loops of 10^9 iterations, ...).

    Raises:
        DataError: the block ran longer, naming the row (None: a probe conversation of qlora-kit's own).
    """
    try:
        with time_limit(TEMPLATE_SECONDS):
            yield
    except TimeLimitExceeded:
        on = f"row {row}" if row is not None else "a two-turn probe conversation"
        raise DataError(f"the chat template ran for more than {TEMPLATE_SECONDS:g} s on {on} and was stopped "
                        "(a template renders a conversation in milliseconds)",
                        "fix its loops, or set model.chat_template to a template of your own") from None


Span = tuple[int, int]


_PROBE = "qlorakitprobe"
TEMPLATE_ERROR = "chat template error: "  # how a row the template raises on is reported (data/build.py)


class ChatSpans:
    """Locate each trained assistant reply (plus its end-of-turn text) in the rendered chat."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase):
        self.tokenizer = tokenizer
        with template_time_limit():
            self.end_of_turn = self._probe_end_of_turn()
        self.searched_turns = 0
        self._call_prefix: str | None = None

    def render(self, messages: list[Message], add_generation_prompt: bool = False,
               tools: list[dict[str, Any]] | None = None) -> str:
        return self.tokenizer.apply_chat_template(
            messages, tools=tools, tokenize=False, add_generation_prompt=add_generation_prompt
        )

    def locate(self, messages: list[Message], turns: Sequence[int], tools: list[dict[str, Any]] | None = None
               ) -> tuple[str, list[Span]]:
        """Render ``messages`` (with the tool list ``tools``); return the text and the character spans to train on.

        Raises:
            RowProblem: the template fails on this conversation, or a reply (or tool call) cannot be found.
        """
        try:
            full = self.render(messages, tools=tools)
        except Exception as exc:  # jinja TemplateError, raise_exception() in templates, ...
            first_line = str(exc).splitlines()[0] if str(exc).strip() else "(no message)"
            raise RowProblem(f"{TEMPLATE_ERROR}{type(exc).__name__}: {first_line[:300]}") from exc
        spans: list[Span] = []
        cursor = 0
        for i in turns:
            span = self._by_prefix(messages, i, full, cursor, tools) or self._by_search(messages, i, full, cursor)
            if span is None:
                raise RowProblem(f"assistant turn {i + 1} not found in the chat template's output (it rewrites it)")
            missing = [n for n in call_names(messages[i]) if n not in full[span[0]:span[1]]]
            if missing:
                raise RowProblem(f"the chat template leaves the tool call {missing[0]!r} of turn {i + 1} out")
            if span[1] > span[0]:
                spans.append(span)
            cursor = max(cursor, span[1])
        return full, spans

    def _by_prefix(self, messages: list[Message], i: int, full: str, cursor: int,
                   tools: list[dict[str, Any]] | None = None) -> Span | None:
        """Diff of the renders before and after turn ``i``, if both are prefixes of ``full``."""
        try:
            before = self.render(messages[:i], add_generation_prompt=True, tools=tools)
            through = full if i == len(messages) - 1 else self.render(messages[: i + 1], tools=tools)
        except Exception:
            return None
        if not (through.startswith(before) and full.startswith(through)) or len(before) < cursor:
            return None
        return len(before), len(before) + len(full[len(before) : len(through)].rstrip())

    def _by_search(self, messages: list[Message], i: int, full: str, cursor: int) -> Span | None:
        """Find the reply's text after the preceding turn; extend over the end-of-turn text.

        Spaces right before the reply join it (a token like ``" The"`` starts there).
        """
        start = cursor
        previous = messages[i - 1]["content"].strip() if i > 0 else ""
        if previous and (k := full.find(previous, cursor)) >= 0:
            start = k + len(previous)
        if messages[i].get("tool_calls"):
            return self._search_call(messages[i], full, start)
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

    def _search_call(self, message: Message, full: str, start: int) -> Span | None:
        """A tool-calling reply: from its text (or the template's call opening, e.g. ``<tool_call>``, before the
        first function name) through the end-of-turn text after it."""
        if self._call_prefix is None:
            self._call_prefix = call_prefix(self.tokenizer)
        content = message["content"].strip()
        k = full.find(content, start) if content else -1
        if k < 0:
            k = full.find(call_names(message)[0], start)
            if k < 0:
                return None
            prefix = self._call_prefix
            k = k - len(prefix) if prefix and full.startswith(prefix, k - len(prefix)) else k
        end = full.find(self.end_of_turn, k) if self.end_of_turn else -1
        if end < 0:
            return None
        self.searched_turns += 1
        return k, end + len(self.end_of_turn)

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

    Raises:
        DataError: the template runs away (see :func:`template_time_limit`).
    """
    user = [{"role": "user", "content": "Hi"}]
    with template_time_limit():
        try:
            tokenizer.apply_chat_template(user, tokenize=False)
        except Exception:  # noqa: BLE001 - templates raise all kinds of errors (jinja, role checks)
            return True
        try:
            tokenizer.apply_chat_template([{"role": "system", "content": "Be brief."}, *user], tokenize=False)
        except Exception:  # noqa: BLE001 - as above
            return False
    return True


def fold_system(messages: list[Message]) -> list[Message]:
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
