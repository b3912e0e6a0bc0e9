"""Tool-calling rows, OpenAI style: ``tool_calls`` on assistant turns, ``role: tool`` results, a per-row ``tools``
list; put into the shape chat templates expect, and a check that a template renders them at all."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

from qlora_kit.core.errors import short_repr

ToolCall = dict[str, Any]  # {"type": "function", "function": {"name": str, "arguments": dict}, "id"?: str}


class ToolProblem(ValueError):
    """A tool call, tool result or tool list that cannot be used (the row is bad)."""


def maybe_json(value: Any) -> Any:
    """A JSON list or object stored as a string (CSV/parquet cells, ShareGPT tool rows) decoded; else unchanged."""
    if isinstance(value, str) and value.lstrip().startswith(("[", "{")):
        try:
            return json.loads(value)
        except (json.JSONDecodeError, RecursionError):
            return value
    return value


def parse_tool_calls(value: Any, where: str) -> list[ToolCall]:
    """``tool_calls`` of an assistant turn (a list, one call, or their JSON text) in the nested OpenAI shape
    with ``arguments`` as an object (templates serialise it themselves).

    Raises:
        ToolProblem: not a list of calls, a call without a name, or arguments that are not a JSON object.
    """
    value = maybe_json(value)
    calls = [value] if isinstance(value, dict) else value
    if not isinstance(calls, list) or not calls:
        raise ToolProblem(f"{where} tool_calls must be a non-empty list of calls, got {short_repr(value, 60)}")
    return [_tool_call(call, f"{where} tool_calls[{i}]") for i, call in enumerate(calls, 1)]


def _tool_call(call: Any, where: str) -> ToolCall:
    if not isinstance(call, dict):
        raise ToolProblem(f"{where} must be an object, got {type(call).__name__}")
    function = call.get("function", call)  # nested OpenAI shape, or flat {"name", "arguments"}
    if not isinstance(function, dict):
        raise ToolProblem(f"{where} function must be an object, got {type(function).__name__}")
    name = function.get("name")
    if not isinstance(name, str) or not name.strip():
        raise ToolProblem(f"{where} needs a function name")
    arguments = function.get("arguments", function.get("parameters", {}))
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except (json.JSONDecodeError, RecursionError):
            raise ToolProblem(f"{where} arguments are not valid JSON: {short_repr(arguments, 60)}") from None
    if not isinstance(arguments, dict):
        raise ToolProblem(f"{where} arguments must be a JSON object, got {type(arguments).__name__}")
    out: ToolCall = {"type": "function", "function": {"name": name, "arguments": arguments}}
    if call.get("id") is not None:
        out["id"] = str(call["id"])
    return out


def parse_tools(value: Any) -> list[dict[str, Any]] | None:
    """A row's ``tools`` (function schemas) in the OpenAI shape ``{"type": "function", "function": {...}}``;
    bare ``{"name", "description", "parameters"}`` entries (ShareGPT tool sets) are wrapped. None when absent.

    Raises:
        ToolProblem: not a list of objects with a function name.
    """
    value = maybe_json(value)
    if value is None or value == "" or value == []:
        return None
    if not isinstance(value, list):
        raise ToolProblem(f"field 'tools' must be a list of function definitions, got {type(value).__name__}")
    tools = []
    for i, tool in enumerate(value, 1):
        function = tool.get("function", tool) if isinstance(tool, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise ToolProblem(f"tools[{i}] must be a function definition with a name, got {short_repr(tool, 60)}")
        tools.append({"type": "function", "function": function})
    return tools


def tool_result_text(content: Any, where: str) -> str:
    """The content of a tool result: text as is, a JSON value as its JSON text.

    Raises:
        ToolProblem: no content.
    """
    if isinstance(content, str):
        return content
    if content is None:
        raise ToolProblem(f"{where} (a tool result) has no content")
    return json.dumps(content, ensure_ascii=False)


def call_names(message: dict[str, Any]) -> list[str]:
    """The function names an assistant turn calls (empty for a plain reply)."""
    return [c["function"]["name"] for c in message.get("tool_calls") or ()]


# --------------------------------------------------------------------------- does the template render tools?

PROBE_ID = "a1b2c3d4e"  # nine alphanumeric characters: Mistral's templates insist on that length
PROBE_TOOL = {"type": "function", "function": {
    "name": "qlorakit_lookup", "description": "Look up a qlorakitdescription.",
    "parameters": {"type": "object", "properties": {"query": {"type": "string", "description": "what"}},
                   "required": ["query"]}}}
PROBE_CALL = {"id": PROBE_ID, "type": "function",
              "function": {"name": "qlorakit_lookup", "arguments": {"query": "qlorakitargument"}}}
PROBE_CHAT = [
    {"role": "user", "content": "Look it up."},
    {"role": "assistant", "content": "", "tool_calls": [PROBE_CALL]},
    {"role": "tool", "tool_call_id": PROBE_ID, "name": "qlorakit_lookup", "content": "qlorakitresult"},
    {"role": "assistant", "content": "Found it."},
]
_NEEDS = {"tools": ("qlorakitdescription", "the tool list"), "calls": ("qlorakitargument", "tool calls"),
          "results": ("qlorakitresult", "tool results")}


def tool_needs(messages_and_tools: list[tuple[list[dict[str, Any]], list[dict[str, Any]] | None]]) -> set[str]:
    """What of tool calling the rows use: ``tools`` (a tool list), ``calls``, ``results``."""
    needs: set[str] = set()
    for messages, tools in messages_and_tools:
        if tools:
            needs.add("tools")
        for m in messages:
            if m.get("tool_calls"):
                needs.add("calls")
            if m["role"] == "tool":
                needs.add("results")
    return needs


def tool_support_problem(tokenizer: PreTrainedTokenizerBase, needs: set[str]) -> str | None:
    """Why the chat template cannot train the tool parts in ``needs`` (None when it renders them all):
    it fails on a tool-calling conversation, or its output lacks the tool list, the calls or the results."""
    if not needs:
        return None
    try:
        text = tokenizer.apply_chat_template(PROBE_CHAT, tools=[PROBE_TOOL], tokenize=False)
    except Exception as exc:  # jinja errors, raise_exception() in templates
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return f"it fails on a tool-calling conversation ({short_repr(first, 120)})"
    missing = [what for need, (marker, what) in _NEEDS.items() if need in needs and marker not in text]
    return f"it leaves out {' and '.join(missing)}" if missing else None


def call_prefix(tokenizer: PreTrainedTokenizerBase) -> str:
    """The text the template writes in a tool-calling reply before the function name (e.g. ``<tool_call>\\n{"name": "``),
    read from a probe; empty when the probe cannot be rendered."""
    user = PROBE_CHAT[:1]
    try:
        before = tokenizer.apply_chat_template(user, tools=[PROBE_TOOL], tokenize=False, add_generation_prompt=True)
        through = tokenizer.apply_chat_template(PROBE_CHAT[:2], tools=[PROBE_TOOL], tokenize=False)
    except Exception:  # noqa: BLE001 - any template failure: no prefix known
        return ""
    if not through.startswith(before):
        return ""
    tail = through[len(before):]
    name = PROBE_CALL["function"]["name"]
    return tail[: tail.find(name)] if name in tail else ""
