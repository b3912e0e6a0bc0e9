"""The template's default system prompt is visible, and data.default_system_prompt decides (issue 21)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from conftest import arithmetic_rows, write_jsonl
from data_rows import DEFAULT_SYSTEM, DEFAULT_SYSTEM_TEMPLATE, LLAMA2_TEMPLATE, NO_SYSTEM_TEMPLATE, chat

from qlora_kit.core.config import DataConfig
from qlora_kit.data.build import DataBundle, build_data
from qlora_kit.data.summary import summary_rows
from qlora_kit.data.system_prompt import first_words, template_default_system

ROWS = arithmetic_rows(8) + [{"messages": chat(("system", "Be terse."), ("user", "1 + 1 ?"), ("assistant", "2"))}]


def build(tmp_path: Path, tokenizer: Any, **data: Any) -> DataBundle:
    path = write_jsonl(tmp_path / "rows.jsonl", ROWS)
    return build_data(DataConfig(path=str(path), **{"val_fraction": 0.25, **data}), tokenizer, 256, 0)


def texts(tokenizer: Any, bundle: DataBundle) -> list[str]:
    return [tokenizer.decode(s["input_ids"]) for s in bundle.train + bundle.val]


def test_default_system_prompt_is_found_by_rendering(fresh_tokenizer):
    assert template_default_system(fresh_tokenizer) is None  # plain ChatML inserts nothing
    fresh_tokenizer.chat_template = DEFAULT_SYSTEM_TEMPLATE
    assert template_default_system(fresh_tokenizer) == DEFAULT_SYSTEM
    for template in (LLAMA2_TEMPLATE, NO_SYSTEM_TEMPLATE):
        fresh_tokenizer.chat_template = template
        assert template_default_system(fresh_tokenizer) is None


def test_keep_says_so_in_the_summary(tmp_path, fresh_tokenizer, caplog):
    fresh_tokenizer.chat_template = DEFAULT_SYSTEM_TEMPLATE
    with caplog.at_level("INFO", logger="qlora_kit"):
        bundle = build(tmp_path, fresh_tokenizer)
    note = bundle.summary.system_prompt_note
    assert note.startswith("the chat template inserts its default system prompt into 8 rows without a system prompt")
    assert f'"{DEFAULT_SYSTEM}"' in note and note in caplog.text
    assert ("system prompt", note) in summary_rows(bundle.summary)
    assert bundle.summary.to_json()["default_system_prompt"] == DEFAULT_SYSTEM
    assert sum(DEFAULT_SYSTEM in t for t in texts(fresh_tokenizer, bundle)) == 8


def test_drop_renders_an_empty_system_turn_instead(tmp_path, fresh_tokenizer):
    fresh_tokenizer.chat_template = DEFAULT_SYSTEM_TEMPLATE
    bundle = build(tmp_path, fresh_tokenizer, default_system_prompt="drop")
    rendered = texts(fresh_tokenizer, bundle)
    assert not any(DEFAULT_SYSTEM in t for t in rendered)
    assert sum(t.startswith("<|im_start|>system\n<|im_end|>") for t in rendered) == 8
    assert "8 rows without a system prompt get an empty system turn" in bundle.summary.system_prompt_note
    assert all(h["messages"][0]["role"] == "system" for h in bundle.heldout)  # the export check prompts the same way


@pytest.mark.parametrize("template", [None, DEFAULT_SYSTEM_TEMPLATE])
def test_a_text_becomes_the_system_prompt_of_rows_without_one(tmp_path, fresh_tokenizer, template):
    if template:
        fresh_tokenizer.chat_template = template
    bundle = build(tmp_path, fresh_tokenizer, default_system_prompt="You answer with numbers only.")
    rendered = texts(fresh_tokenizer, bundle)
    assert sum("You answer with numbers only." in t for t in rendered) == 8
    assert sum("Be terse." in t for t in rendered) == 1 and not any(DEFAULT_SYSTEM in t for t in rendered)
    assert bundle.summary.system_prompt_note == '8 rows without a system prompt get data.default_system_prompt ' \
                                                '"You answer with numbers only."'


def test_no_note_when_nothing_is_inserted(tmp_path, fresh_tokenizer):
    assert build(tmp_path, fresh_tokenizer).summary.system_prompt_note is None
    assert build(tmp_path, fresh_tokenizer, default_system_prompt="drop").summary.system_prompt_note is None


def test_first_words_are_cut() -> None:
    assert first_words("You are a helpful AI assistant named SmolLM, trained by Hugging Face", 30) == \
        '"You are a helpful AI assistant…"'
