"""Tool-calling rows and chat templates shaped like three real tool templates, for the tool tests.

The templates are written here (not copied) after the structure of the real ones:
- ``LLAMA31_TOOLS``: Llama-3.1 Instruct: a system block that always carries knowledge/date lines (plus
  "Environment: ipython" with tools), the tool list put into the *first user message*, one call per
  assistant turn as ``{"name": ..., "parameters": ...}``, results as ``ipython`` turns, ``<|eot_id|>``.
- ``QWEN25_TOOLS``: Qwen2.5 Instruct: ChatML with a default system prompt, the tool list inside
  ``<tools></tools>`` in the system turn, calls as ``<tool_call>`` JSON after the reply's text, consecutive
  results grouped into one user turn of ``<tool_response>`` blocks.
- ``MISTRAL_TOOLS``: Mistral-7B-Instruct-v0.3: ``[AVAILABLE_TOOLS]`` and the system prompt before the *last*
  user turn, ``[TOOL_CALLS]`` JSON list ending in EOS, ``[TOOL_RESULTS]``, and a refusal of call ids that are
  not nine characters long.
"""

from __future__ import annotations

import json
from typing import Any

LLAMA31_SPECIAL = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
LLAMA31_TOOLS = (
    "{{- bos_token }}"
    "{%- if messages[0]['role'] == 'system' %}{%- set system = messages[0]['content'] | trim %}"
    "{%- set rest = messages[1:] %}{%- else %}{%- set system = '' %}{%- set rest = messages %}{%- endif %}"
    "{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' }}"
    "{%- if tools is not none %}{{- 'Environment: ipython\\n' }}{%- endif %}"
    "{{- 'Cutting Knowledge Date: December 2023\\nToday Date: 01 Jan 2025\\n\\n' + system + '<|eot_id|>' }}"
    "{%- if tools is not none and rest %}"
    "{%- set first = rest[0]['content'] | trim %}{%- set rest = rest[1:] %}"
    "{{- '<|start_header_id|>user<|end_header_id|>\\n\\n' }}"
    "{{- 'Answer with a JSON function call from this list, as {\"name\": name, \"parameters\": arguments}.\\n\\n' }}"
    "{%- for t in tools %}{{- t | tojson(indent=4) + '\\n\\n' }}{%- endfor %}"
    "{{- first + '<|eot_id|>' }}"
    "{%- endif %}"
    "{%- for m in rest %}"
    "{%- if m['role'] == 'assistant' and m['tool_calls'] %}"
    "{%- if m['tool_calls'] | length != 1 %}{{- raise_exception('only one tool call per turn') }}{%- endif %}"
    "{%- set call = m['tool_calls'][0]['function'] %}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n{\"name\": \"' + call['name'] + '\", \"parameters\": ' }}"
    "{{- call['arguments'] | tojson + '}<|eot_id|>' }}"
    "{%- elif m['role'] in ['tool', 'ipython'] %}"
    "{{- '<|start_header_id|>ipython<|end_header_id|>\\n\\n' + m['content'] + '<|eot_id|>' }}"
    "{%- else %}"
    "{{- '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n' + m['content'] | trim + '<|eot_id|>' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)

QWEN25_DEFAULT_SYSTEM = "You are Qwen-like, a tiny test model. You are a helpful assistant."
QWEN25_TOOLS = (
    "{%- if tools %}"
    "{{- '<|im_start|>system\\n' }}"
    "{%- if messages[0]['role'] == 'system' %}{{- messages[0]['content'] }}"
    "{%- else %}{{- '" + QWEN25_DEFAULT_SYSTEM + "' }}{%- endif %}"
    "{{- '\\n\\n# Tools\\n\\nFunction signatures are inside <tools></tools> XML tags:\\n<tools>' }}"
    "{%- for t in tools %}{{- '\\n' + t | tojson }}{%- endfor %}"
    "{{- '\\n</tools>\\n\\nReturn each call inside <tool_call></tool_call> XML tags.<|im_end|>\\n' }}"
    "{%- elif messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>system\\n" + QWEN25_DEFAULT_SYSTEM + "<|im_end|>\\n' }}{%- endif %}"
    "{%- for m in messages %}"
    "{%- if m['role'] == 'user' or (m['role'] == 'assistant' and not m['tool_calls']) %}"
    "{{- '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
    "{%- elif m['role'] == 'assistant' %}"
    "{{- '<|im_start|>assistant' }}{%- if m['content'] %}{{- '\\n' + m['content'] }}{%- endif %}"
    "{%- for c in m['tool_calls'] %}{%- set f = c['function'] %}"
    "{{- '\\n<tool_call>\\n{\"name\": \"' + f['name'] + '\", \"arguments\": ' + f['arguments'] | tojson }}"
    "{{- '}\\n</tool_call>' }}{%- endfor %}{{- '<|im_end|>\\n' }}"
    "{%- elif m['role'] == 'tool' %}"
    "{%- if loop.index0 == 0 or messages[loop.index0 - 1]['role'] != 'tool' %}{{- '<|im_start|>user' }}{%- endif %}"
    "{{- '\\n<tool_response>\\n' + m['content'] + '\\n</tool_response>' }}"
    "{%- if loop.last or messages[loop.index0 + 1]['role'] != 'tool' %}{{- '<|im_end|>\\n' }}{%- endif %}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

MISTRAL_SPECIAL = ["[INST]", "[/INST]", "[TOOL_CALLS]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]",
                   "[TOOL_RESULTS]", "[/TOOL_RESULTS]"]
MISTRAL_TOOLS = (
    "{%- if messages[0]['role'] == 'system' %}{%- set system = messages[0]['content'] %}"
    "{%- set turns = messages[1:] %}{%- else %}{%- set turns = messages %}{%- endif %}"
    "{%- set users = turns | selectattr('role', 'equalto', 'user') | list %}"
    "{{- bos_token }}"
    "{%- for m in turns %}"
    "{%- if m['role'] == 'user' %}"
    "{%- if tools is not none and m == users[-1] %}"
    "{{- '[AVAILABLE_TOOLS] [' }}{%- for t in tools %}{{- t | tojson }}{%- if not loop.last %}{{- ', ' }}"
    "{%- endif %}{%- endfor %}{{- '][/AVAILABLE_TOOLS]' }}{%- endif %}"
    "{%- if system is defined and m == users[-1] %}{{- '[INST] ' + system + '\\n\\n' + m['content'] + '[/INST]' }}"
    "{%- else %}{{- '[INST] ' + m['content'] + '[/INST]' }}{%- endif %}"
    "{%- elif m['tool_calls'] is defined and m['tool_calls'] %}"
    "{{- '[TOOL_CALLS] [' }}"
    "{%- for c in m['tool_calls'] %}"
    "{%- if c['id'] is not defined or c['id'] | length != 9 %}"
    "{{- raise_exception('Tool call IDs should be alphanumeric strings with length 9!') }}{%- endif %}"
    "{{- '{\"name\": \"' + c['function']['name'] + '\", \"arguments\": ' + c['function']['arguments'] | tojson }}"
    "{{- ', \"id\": \"' + c['id'] + '\"}' }}{%- if not loop.last %}{{- ', ' }}{%- endif %}"
    "{%- endfor %}{{- ']' + eos_token }}"
    "{%- elif m['role'] == 'assistant' %}{{- ' ' + m['content'] | trim + eos_token }}"
    "{%- elif m['role'] == 'tool' %}"
    "{{- '[TOOL_RESULTS] {\"content\": ' + m['content'] + ', \"call_id\": \"' + m['tool_call_id'] + '\"}' }}"
    "{{- '[/TOOL_RESULTS]' }}"
    "{%- endif %}"
    "{%- endfor %}"
)

WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather of a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
TIME_TOOL = {"name": "get_time", "description": "Local time of a city.",  # bare, as ShareGPT tool sets give it
             "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}


def weather_row(i: int, arguments_as_text: bool = True, call_id: str = "call00001") -> dict[str, Any]:
    """One OpenAI-style tool conversation: ask, call (arguments as a JSON string or object), result, answer."""
    arguments: Any = {"city": f"Town{i}"}
    return {"messages": [
        {"role": "user", "content": f"How warm is it in Town{i}?"},
        {"role": "assistant", "content": None, "tool_calls": [{"id": call_id, "type": "function", "function": {
            "name": "get_weather", "arguments": json.dumps(arguments) if arguments_as_text else arguments}}]},
        {"role": "tool", "tool_call_id": call_id, "name": "get_weather", "content": json.dumps({"celsius": i})},
        {"role": "assistant", "content": f"It is {i} degrees in Town{i}."},
    ], "tools": [WEATHER_TOOL]}


def two_question_row(i: int) -> dict[str, Any]:
    """Two user questions, the second answered with a tool call (Mistral's tool list moves to the last one)."""
    row = weather_row(i)
    return {"messages": [{"role": "user", "content": f"Hello {i}"}, {"role": "assistant", "content": f"Hi {i}!"},
                         *row["messages"]], "tools": row["tools"]}
