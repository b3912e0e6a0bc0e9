"""Row formats: detection, parsing and what each format trains on."""

from __future__ import annotations

import logging

import pytest
from conftest import arithmetic_rows, write_jsonl
from data_rows import (
    FORMATS,
    build,
    chat,
    rows_in_format,
    trained_runs,
    untrained_text,
)

from qlora_kit.core.errors import DataError


def test_sharegpt_maps_roles_and_trains_gpt_turns(tmp_path, tok):
    row = {"conversations": [
        {"from": "system", "value": "be brief"},
        {"from": "human", "value": "1 + 1 ?"},
        {"from": "gpt", "value": "1 + 1 = 2"},
    ]}
    sample = build(tmp_path, [row], tok).train[0]
    assert trained_runs(tok, sample) == ["1 + 1 = 2<|im_end|>"]
    assert tok.decode(sample["input_ids"]).startswith("<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\n")


def test_developer_role_is_a_system_turn(tmp_path, tok):
    row = {"messages": [{"role": "developer", "content": "be brief"}, {"role": "user", "content": "1 + 1 ?"},
                        {"role": "assistant", "content": "2"}]}
    sample = build(tmp_path, [row], tok).train[0]
    assert tok.decode(sample["input_ids"]).startswith("<|im_start|>system\nbe brief<|im_end|>\n")
    assert trained_runs(tok, sample) == ["2<|im_end|>"]


def test_alpaca_becomes_user_assistant_chat(tmp_path, tok):
    rows = [
        {"instruction": "add", "input": "2 + 2 ?", "output": "2 + 2 = 4"},
        {"instruction": "say hello", "input": "", "output": "hello"},
    ]
    bundle = build(tmp_path, rows, tok)
    first, second = bundle.train
    assert trained_runs(tok, first) == ["2 + 2 = 4<|im_end|>"]
    assert "<|im_start|>user\nadd\n\n2 + 2 ?<|im_end|>" in tok.decode(first["input_ids"])
    assert trained_runs(tok, second) == ["hello<|im_end|>"]
    assert "<|im_start|>user\nsay hello<|im_end|>" in tok.decode(second["input_ids"])


def test_prompt_completion_trains_completion_only(tmp_path, tok):
    sample = build(tmp_path, [{"prompt": "3 + 4 ?", "completion": "3 + 4 = 7"}], tok).train[0]
    assert trained_runs(tok, sample) == ["3 + 4 = 7<|im_end|>"]
    assert "3 + 4 ?" in untrained_text(tok, sample)


def test_conversational_prompt_completion(tmp_path, tok):
    row = {"prompt": chat(("user", "1 + 2 ?")), "completion": chat(("assistant", "1 + 2 = 3"))}
    sample = build(tmp_path, [row], tok).train[0]
    assert trained_runs(tok, sample) == ["1 + 2 = 3<|im_end|>"]


def test_prompt_completion_without_chat_template_is_plain_text(tmp_path, tok):
    tok.chat_template = None
    sample = build(tmp_path, [{"prompt": "3 + 4 =", "completion": " 7"}], tok).train[0]
    assert sample["input_ids"][0] == tok.bos_token_id and sample["input_ids"][-1] == tok.eos_token_id
    assert trained_runs(tok, sample) == [" 7<|im_end|>"]


def test_raw_text_adds_bos_eos_and_trains_everything(tmp_path, tok):
    sample = build(tmp_path, [{"text": "the water is good"}], tok).train[0]
    ids = sample["input_ids"]
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    assert tok.decode(ids[1:-1]) == "the water is good"
    assert sample["labels"] == [-100] + ids[1:]


@pytest.mark.parametrize("fmt", FORMATS)
def test_auto_detects_format(tmp_path, tok, fmt, caplog):
    with caplog.at_level(logging.INFO, logger="qlora_kit"):
        bundle = build(tmp_path, rows_in_format(fmt), tok)
    assert bundle.summary.format == fmt and bundle.summary.format_detected
    assert bundle.fingerprint["format"] == fmt
    assert f"data format: {fmt} (auto-detected" in caplog.text
    assert len(bundle.train) == 4


def test_explicit_format_mismatch_names_fields(tmp_path, tok):
    with pytest.raises(DataError) as err:
        build(tmp_path, rows_in_format("messages"), tok, format="alpaca")
    assert "'instruction'" in err.value.message and "'messages'" in err.value.message
    assert "messages" in err.value.hint


def test_undetectable_format(tmp_path, tok):
    with pytest.raises(DataError, match=r"cannot detect the data format.*\['question', 'answer'\]"):
        build(tmp_path, [{"question": "q", "answer": "a"}], tok)


def test_chat_rows_without_chat_template(tmp_path, tok):
    tok.chat_template = None
    with pytest.raises(DataError) as err:
        build(tmp_path, arithmetic_rows(3), tok)
    assert "no chat template" in err.value.message and "model.chat_template" in err.value.hint


def test_alpaca_rows_missing_output_are_bad(tmp_path, tok):
    rows = rows_in_format("alpaca", 9) + [{"instruction": "add", "input": "1 + 1"}]
    bundle = build(tmp_path, rows, tok, max_bad_fraction=0.5)
    assert bundle.summary.bad_rows == [10]
    assert "missing field 'output'" in bundle.summary.bad_row_reasons[0]


def test_row_with_unhashable_role_is_a_bad_row(tmp_path, tiny_llama) -> None:
    from transformers import AutoTokenizer

    from qlora_kit.core.config import DataConfig
    from qlora_kit.data.build import build_data

    rows = arithmetic_rows(200)
    rows[5] = {"messages": [{"role": ["user"], "content": "x"}, {"role": "assistant", "content": "y"}]}
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    bundle = build_data(DataConfig(path=str(data)), AutoTokenizer.from_pretrained(tiny_llama), 64, 0)
    assert 6 in bundle.summary.bad_rows
