"""`qlora-kit generate` / `chat` on run directories and exports; stop tokens from the chat template."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from qlora_kit.commands import generate
from qlora_kit.core.errors import ModelError
from qlora_kit.inference import chat, generation, load

pytestmark = pytest.mark.usefixtures("one_thread")


LLAMA3 = ("{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n{{ m['content'] | trim }}"
          "<|eot_id|>{% endfor %}{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n"
          "{% endif %}")


GEMMA = ("{% for m in messages %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n"
         "{{ m['content'] }}<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")


MISTRAL = ("{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
           "{% else %}{{ m['content'] }}</s>{% endif %}{% endfor %}")


PLAIN = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"


def test_end_of_turn_token_of_common_templates(tiny_llama: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    assert chat.end_of_turn_ids(tok) == [tok.convert_tokens_to_ids("<|im_end|>")]  # ChatML
    tok.add_special_tokens({"additional_special_tokens": ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
                                                          "<start_of_turn>", "<end_of_turn>"]},
                           replace_extra_special_tokens=False)
    for template, token in ((LLAMA3, "<|eot_id|>"), (GEMMA, "<end_of_turn>"), (MISTRAL, "</s>")):
        tok.chat_template = template
        assert chat.end_of_turn_ids(tok) == [tok.convert_tokens_to_ids(token)], token
    tok.chat_template = PLAIN
    assert chat.end_of_turn_ids(tok) == []
    tok.chat_template = None
    assert chat.end_of_turn_ids(tok) == []


def test_eos_ids_are_the_union_without_duplicates(tiny_llama: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    im_end, eos_s = tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("</s>")
    assert chat.eos_token_ids(tok) == [im_end]
    assert chat.eos_token_ids(tok, [eos_s, im_end]) == [im_end, eos_s]
    tok.eos_token = "</s>"
    assert chat.eos_token_ids(tok, None) == [eos_s, im_end]


def test_run_and_export_load_ready_for_inference(run_and_export: tuple[Path, Path]) -> None:
    import bitsandbytes as bnb

    run, out = run_and_export
    for path, kind in ((run, "run"), (out, "export")):
        loaded = load.load_for_generation(path, torch.device("cpu"))
        assert loaded.kind == kind
        assert not loaded.model.training and loaded.model.config.use_cache
        assert loaded.tokenizer.convert_tokens_to_ids("<|im_end|>") in loaded.eos_ids
    layers = [m for m in loaded.model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert not layers  # the export is a plain checkpoint


def test_not_a_model_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="does not exist"):
        load.load_for_generation(tmp_path / "missing")
    with pytest.raises(ModelError, match="neither"):
        load.load_for_generation(tmp_path)


def test_generate_once_agrees_on_run_and_export(run_and_export: tuple[Path, Path], capsys) -> None:
    run, out = run_and_export
    texts = []
    for path in (run, out):
        assert generate.generate_once(path, "what is 2 + 3 ?", max_new_tokens=16, device=torch.device("cpu")) == 0
        texts.append(capsys.readouterr().out)
    assert texts[0] == texts[1] and texts[0].strip()


def test_generation_stops_on_end_of_turn(run_and_export: tuple[Path, Path]) -> None:
    _, out = run_and_export
    loaded = load.load_for_generation(out, torch.device("cpu"))
    eot = loaded.tokenizer.convert_tokens_to_ids("<|im_end|>")
    loaded.model.generation_config.sequence_bias = {(eot,): 100.0}  # the model now always says <|im_end|>
    prompt = chat.encode_chat(loaded.tokenizer, [{"role": "user", "content": "hello"}])
    assert generation.generate_ids(loaded, prompt, max_new_tokens=10) == [eot]
    loaded.eos_ids = [loaded.tokenizer.convert_tokens_to_ids("</s>")]  # without it, generation runs on
    assert generation.generate_ids(loaded, prompt, max_new_tokens=10) == [eot] * 10


def test_chat_loop_keeps_and_resets_history(run_and_export: tuple[Path, Path], capsys,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    _, out = run_and_export
    seen: list[list[dict]] = []
    encode = generate.encode_chat
    monkeypatch.setattr(generate, "encode_chat", lambda tok, msgs: seen.append([dict(m) for m in msgs]) or encode(tok, msgs))
    lines = iter(["hello", "and again", "/reset", "fresh start"])

    def read(prompt: str) -> str:
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None

    code = generate.chat_loop(out, system="be brief", max_new_tokens=6, device=torch.device("cpu"), read=read)
    assert code == 0
    assert [len(m) for m in seen] == [2, 4, 2]  # system+user; +assistant+user; reset
    assert seen[1][2]["role"] == "assistant" and seen[2][0] == {"role": "system", "content": "be brief"}
    assert capsys.readouterr().out.count("assistant> ") == 3


def test_sampling_with_temperature(run_and_export: tuple[Path, Path]) -> None:
    _, out = run_and_export
    loaded = load.load_for_generation(out, torch.device("cpu"))
    prompt = chat.encode_chat(loaded.tokenizer, [{"role": "user", "content": "hello"}])
    torch.manual_seed(0)
    ids = generation.generate_ids(loaded, prompt, max_new_tokens=5, temperature=0.9)
    assert 1 <= len(ids) <= 5
    assert chat.strip_stop(ids + [loaded.eos_ids[0], 7], loaded.eos_ids) == chat.strip_stop(ids, loaded.eos_ids)


def test_template_that_rejects_the_conversation_is_a_clear_error(tiny_llama) -> None:
    from transformers import AutoTokenizer

    from qlora_kit.core.errors import ModelError
    from qlora_kit.inference.chat import encode_chat

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    tok.chat_template = ("{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
                         "{{ raise_exception('Roles must alternate') }}{% endif %}{{ m['content'] }}{% endfor %}")
    with pytest.raises(ModelError, match="Roles must alternate"):
        encode_chat(tok, [{"role": "user", "content": "hi"}, {"role": "user", "content": "again"}])
