"""Rows in every supported format and small chat templates, for the data tests.

The templates imitate the structure of real model families (written here, not copied):
Llama-2 ``[INST]`` turns with BOS/EOS, Llama-3 header tokens with trimmed content,
ChatML with an injected default system prompt (SmolLM2-like), a Qwen3-like one
that renders the last reply differently from earlier ones (defeats prefix diffing), and a
Gemma-2-like one with a ``model`` role that refuses system turns.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from conftest import write_jsonl

from qlora_kit.core.config import DataConfig
from qlora_kit.data.build import DataBundle, build_data
from qlora_kit.data.encode import Sample

LLAMA2_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}"
    "{% set system = messages[0]['content'] %}{% set turns = messages[1:] %}"
    "{% else %}{% set system = '' %}{% set turns = messages %}{% endif %}"
    "{% for m in turns %}"
    "{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant') }}{% endif %}"
    "{% if m['role'] == 'user' %}"
    "{% if loop.first and system %}{% set text = '<<SYS>>\\n' + system + '\\n<</SYS>>\\n\\n' + m['content'] %}"
    "{% else %}{% set text = m['content'] %}{% endif %}"
    "{{ bos_token + '[INST] ' + text | trim + ' [/INST]' }}"
    "{% else %}{{ ' ' + m['content'] | trim + ' ' + eos_token }}{% endif %}"
    "{% endfor %}"
)

NO_SYSTEM_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    "{% for m in messages %}"
    "{% set role = 'model' if m['role'] == 'assistant' else m['role'] %}"
    "{{ '<|im_start|>' + role + '\n' + m['content'] | trim + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>model\n' }}{% endif %}"
)

LLAMA3_SPECIAL = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
LLAMA3_TEMPLATE = (
    "{% for m in messages %}"
    "{% set text = '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n'"
    " + m['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set text = '<|begin_of_text|>' + text %}{% endif %}"
    "{{ text }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)

DEFAULT_SYSTEM = "You are a helpful assistant"
DEFAULT_SYSTEM_TEMPLATE = (
    "{% for m in messages %}"
    "{% if loop.first and m['role'] != 'system' %}"
    "{{ '<|im_start|>system\\n" + DEFAULT_SYSTEM + "<|im_end|>\\n' }}{% endif %}"
    "{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# The final assistant turn gets an (empty) thinking block; earlier ones do not, so the
# render of a prefix ending at an earlier reply is not a prefix of the whole chat.
THINK_TEMPLATE = (
    "{% for m in messages %}"
    "{{ '<|im_start|>' + m['role'] + '\\n' }}"
    "{% if m['role'] == 'assistant' and loop.last %}{{ '<think>\\n\\n</think>\\n\\n' }}{% endif %}"
    "{{ m['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


# The system prompt goes into the last user turn (as Mistral's templates do), so prefixes
# ending at an earlier reply render that earlier user turn differently.
SYSTEM_LAST_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}"
    "{% set system = messages[0]['content'] %}{% set turns = messages[1:] %}"
    "{% else %}{% set system = '' %}{% set turns = messages %}{% endif %}"
    "{% set users = turns | selectattr('role', 'equalto', 'user') | list %}"
    "{{ bos_token }}"
    "{% for m in turns %}"
    "{% if m['role'] == 'user' %}"
    "{% if system and m is sameas users[-1] %}{{ '[INST] ' + system + '\\n\\n' + m['content'] + '[/INST]' }}"
    "{% else %}{{ '[INST] ' + m['content'] + '[/INST]' }}{% endif %}"
    "{% else %}{{ ' ' + m['content'] + eos_token }}{% endif %}"
    "{% endfor %}"
)


def chat(*turns: tuple[str, str]) -> list[dict[str, str]]:
    """[("user", "hi"), ("assistant", "hello")] → messages."""
    return [{"role": role, "content": content} for role, content in turns]


MULTI_TURN = chat(
    ("system", "be brief"),
    ("user", "2 + 3 ?"),
    ("assistant", "2 + 3 = 5"),
    ("user", "and 4 + 4 ?"),
    ("assistant", "4 + 4 = 8"),
)


def rows_in_format(fmt: str, n: int = 4) -> list[dict[str, Any]]:
    """``n`` small rows of format ``fmt`` whose replies are 'a + b = c'."""
    rows = []
    for i in range(n):
        a, b = i % 10, (3 * i + 1) % 10
        question, answer = f"{a} + {b} ?", f"{a} + {b} = {a + b}"
        if fmt == "messages":
            rows.append({"messages": chat(("user", question), ("assistant", answer))})
        elif fmt == "sharegpt":
            rows.append({"conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]})
        elif fmt == "alpaca":
            rows.append({"instruction": "add", "input": question, "output": answer})
        elif fmt == "prompt_completion":
            rows.append({"prompt": question, "completion": answer})
        elif fmt == "text":
            rows.append({"text": f"{question} {answer}"})
        else:
            raise ValueError(fmt)
    return rows


FORMATS = ["messages", "sharegpt", "alpaca", "prompt_completion", "text"]


def build(tmp_path: Path, rows: list[Any], tokenizer, max_length: int = 256, seed: int = 0, **data: Any
          ) -> DataBundle:
    """build_data on ``rows`` written as .jsonl, no validation split unless asked."""
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    cfg = DataConfig(path=str(path), **{"val_fraction": 0.0, **data})
    return build_data(cfg, tokenizer, max_length, seed)


def trained_runs(tokenizer, sample: Sample) -> list[str]:
    """Decoded text of each contiguous run of labelled tokens (labels must equal input_ids)."""
    runs: list[list[int]] = []
    prev = False
    for tid, lab in zip(sample["input_ids"], sample["labels"]):
        on = lab != -100
        if on:
            assert lab == tid
            if not prev:
                runs.append([])
            runs[-1].append(tid)
        prev = on
    return [tokenizer.decode(r) for r in runs]


def untrained_text(tokenizer, sample: Sample) -> str:
    return tokenizer.decode([t for t, lab in zip(sample["input_ids"], sample["labels"]) if lab == -100])


def with_template(tokenizer, template: str, special: list[str] | None = None):
    if special:
        tokenizer.add_tokens(special, special_tokens=True)
    tokenizer.chat_template = template
    return tokenizer


def long_rows(n: int, chars: int, prompt_chars: int = 40) -> list[dict[str, Any]]:
    words = "the quick brown fox jumps over the lazy dog while numbers 12345 and symbols ;:- pass by".split()
    rows = []
    for i in range(n):
        text = " ".join(words[(i + k) % len(words)] for k in range(chars // 4))[:chars]
        rows.append({"messages": chat(("user", f"question {i}: " + text[:prompt_chars]), ("assistant", text))})
    return rows
