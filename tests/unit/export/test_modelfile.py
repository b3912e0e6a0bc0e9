"""The Modelfile's Go TEMPLATE renders what the run's Jinja chat template renders, as Ollama would call it.

Ollama is not available here, so the Go template is rendered with ``gotemplate`` (a small
text/template interpreter) on the data Ollama gives it: ``.Messages`` with the system message
included (the Modelfile's SYSTEM inserted when the request has none) and ``.System`` the
system text.  The Jinja templates below are written for these tests in the shape of each
family's published template (ChatML with and without a default system prompt, Llama-3 and
Llama-3.1 with its date preamble, Mistral with the system prompt on the first or the last user
turn, Llama-2 with ``<<SYS>>``).
"""

from __future__ import annotations

from typing import Any

import gotemplate
import pytest

from qlora_kit.export.modelfile import chat_format, write_modelfile

CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


CHATML_DEFAULT_SYSTEM = (
    "{% if messages[0].role != 'system' %}{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{% endif %}" + CHATML)


LLAMA3 = ("{{ bos_token }}{% for m in messages %}{{ '<|start_header_id|>' + m.role + '<|end_header_id|>\\n\\n' + "
          "m.content | trim + '<|eot_id|>' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}")


LLAMA31 = ("{{ bos_token }}{% if messages[0].role == 'system' %}{% set system = messages[0].content %}"
           "{% set messages = messages[1:] %}{% else %}{% set system = '' %}{% endif %}"
           "{{ '<|start_header_id|>system<|end_header_id|>\\n\\nCutting Knowledge Date: December 2023\\n"
           "Today Date: 26 Jul 2024\\n\\n' + system + '<|eot_id|>' }}"
           "{% for m in messages %}{{ '<|start_header_id|>' + m.role + '<|end_header_id|>\\n\\n' + m.content + "
           "'<|eot_id|>' }}{% endfor %}"
           "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}")


MISTRAL_SYSTEM_LAST = (
    "{% if messages[0].role == 'system' %}{% set system = messages[0].content %}{% set loop_messages = messages[1:] %}"
    "{% else %}{% set loop_messages = messages %}{% endif %}{{ bos_token }}"
    "{% for m in loop_messages %}{% if m.role == 'user' %}{% if loop.last and system is defined %}"
    "{{ '[INST] ' + system + '\\n\\n' + m.content + '[/INST]' }}{% else %}{{ '[INST] ' + m.content + '[/INST]' }}"
    "{% endif %}{% else %}{{ ' ' + m.content + eos_token }}{% endif %}{% endfor %}")


MISTRAL_SYSTEM_FIRST = (
    "{% if messages[0].role == 'system' %}{% set system = messages[0].content %}{% set loop_messages = messages[1:] %}"
    "{% else %}{% set loop_messages = messages %}{% endif %}{{ bos_token }}"
    "{% for m in loop_messages %}{% if m.role == 'user' %}{% if loop.first and system is defined %}"
    "{{ '[INST] ' + system + '\\n\\n' + m.content + ' [/INST]' }}{% else %}{{ '[INST] ' + m.content + ' [/INST]' }}"
    "{% endif %}{% else %}{{ m.content + eos_token }}{% endif %}{% endfor %}")


LLAMA2 = (
    "{% if messages[0].role == 'system' %}{% set system = messages[0].content %}{% set loop_messages = messages[1:] %}"
    "{% else %}{% set loop_messages = messages %}{% endif %}"
    "{% for m in loop_messages %}{% if m.role == 'user' %}"
    "{% if loop.index0 == 0 and system is defined %}{% set content = '<<SYS>>\\n' + system + '\\n<</SYS>>\\n\\n' + "
    "m.content %}{% else %}{% set content = m.content %}{% endif %}"
    "{{ bos_token + '[INST] ' + content + ' [/INST]' }}{% else %}{{ ' ' + m.content + ' ' + eos_token }}{% endif %}"
    "{% endfor %}")


UNKNOWN = ("{% for m in messages %}{{ '### ' + m.role | upper + ':\\n' + m.content + '\\n' }}{% endfor %}"
           "{% if add_generation_prompt %}{{ '### ASSISTANT:\\n' }}{% endif %}")


CASES = {  # name: (template, end-of-turn token, expected family[, BOS token])
    "chatml": (CHATML, "<|im_end|>", "chatml"),
    "chatml-default-system": (CHATML_DEFAULT_SYSTEM, "<|im_end|>", "chatml"),
    # SmolLM2: the BOS token *is* <|im_start|>, which opens every turn (not a BOS the template adds)
    "chatml-bos-is-im_start": (CHATML_DEFAULT_SYSTEM, "<|im_end|>", "chatml", "<|im_start|>"),
    "llama3": (LLAMA3, "<|eot_id|>", "llama3"),
    "llama3.1": (LLAMA31, "<|eot_id|>", "llama3"),
    "mistral-system-last": (MISTRAL_SYSTEM_LAST, "</s>", "mistral"),
    "mistral-system-first": (MISTRAL_SYSTEM_FIRST, "</s>", "mistral"),
    "llama2": (LLAMA2, "</s>", "llama2"),
}


CONVERSATIONS: list[list[dict[str, str]]] = [
    [{"role": "user", "content": "Name a prime."}],
    [{"role": "system", "content": "Answer in French."}, {"role": "user", "content": "Name a prime."}],
    [{"role": "user", "content": "2 + 2?"}, {"role": "assistant", "content": "4"},
     {"role": "user", "content": "And 3 + 3?"}],
    [{"role": "system", "content": "Terse."}, {"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
     {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}, {"role": "user", "content": "e"}],
]


@pytest.fixture(scope="module")
def base_tokenizer(tiny_models) -> Any:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_models("llama"))
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|start_header_id|>", "<|end_header_id|>",
                                                                "<|eot_id|>"]})
    return tokenizer


def with_template(tokenizer: Any, template: str | None, eos: str, bos: str | None = None) -> Any:
    import copy

    tok = copy.deepcopy(tokenizer)
    tok.chat_template = template
    tok.eos_token = eos
    if bos is not None:
        tok.bos_token = bos
    return tok


def ollama_data(messages: list[dict[str, str]], modelfile_system: str | None) -> dict[str, Any]:
    """What Ollama passes the template: SYSTEM inserted when the request has no system message."""
    if modelfile_system and not any(m["role"] == "system" for m in messages):
        messages = [{"role": "system", "content": modelfile_system}] + messages
    system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
    return {"System": system, "Messages": [{"Role": m["role"], "Content": m["content"]} for m in messages]}


@pytest.mark.parametrize("bos_added_by_runtime", [True, False])
@pytest.mark.parametrize("case", sorted(CASES))
def test_go_template_renders_the_jinja_template(case: str, bos_added_by_runtime: bool, base_tokenizer) -> None:
    template, eos, family, *bos = CASES[case]
    tok = with_template(base_tokenizer, template, eos, *bos)
    fmt = chat_format(tok, [tok.convert_tokens_to_ids(eos)], bos_added_by_runtime=bos_added_by_runtime)
    assert fmt.family == family and fmt.warning is None
    assert fmt.stops == [eos]
    for messages in CONVERSATIONS:
        want = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        if bos_added_by_runtime and want.startswith(tok.bos_token) and not bos:
            want = want[len(tok.bos_token):]  # llama.cpp adds the BOS token itself (add_bos_token)
        got = gotemplate.render(fmt.template, ollama_data(messages, fmt.system))
        assert got == want, (case, messages)


def test_default_system_prompt_becomes_the_modelfile_system(base_tokenizer) -> None:
    tok = with_template(base_tokenizer, CHATML_DEFAULT_SYSTEM, "<|im_end|>")
    fmt = chat_format(tok, [tok.eos_token_id], bos_added_by_runtime=False)
    assert fmt.system == "You are a helpful assistant."
    text = write_modelfile(fmt, "m-Q8_0.gguf", "m")
    assert 'SYSTEM """You are a helpful assistant."""' in text and "FROM ./m-Q8_0.gguf" in text


def test_every_end_of_turn_token_is_a_stop(base_tokenizer) -> None:
    tok = with_template(base_tokenizer, LLAMA3, "<|eot_id|>")
    ids = [tok.convert_tokens_to_ids(t) for t in ("<|eot_id|>", "</s>", "<|eot_id|>")]
    text = write_modelfile(chat_format(tok, ids, bos_added_by_runtime=True), "m.gguf", "m")
    assert [line for line in text.splitlines() if line.startswith("PARAMETER")] == [
        'PARAMETER stop "<|eot_id|>"', 'PARAMETER stop "</s>"']


@pytest.mark.parametrize("template", [UNKNOWN, None])
def test_unknown_or_missing_template_gets_a_plain_template_and_a_warning(template: str | None,
                                                                          base_tokenizer) -> None:
    tok = with_template(base_tokenizer, template, "</s>")
    fmt = chat_format(tok, [tok.eos_token_id], bos_added_by_runtime=True)
    assert fmt.family == "plain" and "TEMPLATE" in fmt.warning and fmt.stops == ["</s>"]
    rendered = gotemplate.render(fmt.template, ollama_data(CONVERSATIONS[1], None))
    assert rendered == "Answer in French.\n\nuser: Name a prime.\nassistant: "


def test_gotemplate_refuses_what_it_does_not_implement() -> None:
    """The interpreter raises on unsupported syntax rather than misrendering it."""
    with pytest.raises(AssertionError):
        gotemplate.render("{{ printf \"%s\" .X }}", {"X": "a"})
