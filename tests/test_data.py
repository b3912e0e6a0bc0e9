"""qlora_kit.data: loading, formats, assistant-only labels, splits, batching and packing isolation."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import arithmetic_rows, require_demo_gguf, trained_runs, write_jsonl
from data_rows import (
    DEFAULT_SYSTEM,
    DEFAULT_SYSTEM_TEMPLATE,
    LLAMA2_TEMPLATE,
    LLAMA3_SPECIAL,
    LLAMA3_TEMPLATE,
    MULTI_TURN,
    NO_SYSTEM_TEMPLATE,
    SYSTEM_LAST_TEMPLATE,
    THINK_TEMPLATE,
    chat,
    rows_in_format,
)

from qlora_kit.core.config import DataConfig
from qlora_kit.core.errors import DataError
from qlora_kit.data import batching, encode, formats, labels
from qlora_kit.data import build as D_build
from qlora_kit.data import summary as D_summary

FORMATS = ["messages", "sharegpt", "alpaca", "prompt_completion", "text"]


@pytest.fixture
def tok(tiny_llama: Path):
    """A fresh copy of the tiny ChatML tokenizer (tests may change its template)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_llama)


def build(tmp_path: Path, rows: list[Any], tokenizer, max_length: int = 256, seed: int = 0, **data: Any
          ) -> D_build.DataBundle:
    """build_data on ``rows`` written as .jsonl, no validation split unless asked."""
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    cfg = DataConfig(path=str(path), **{"val_fraction": 0.0, **data})
    return D_build.build_data(cfg, tokenizer, max_length, seed)


def untrained_text(tokenizer, sample: encode.Sample) -> str:
    return tokenizer.decode([t for t, lab in zip(sample["input_ids"], sample["labels"]) if lab == -100])


# --------------------------------------------------------------------------- formats and labels


def test_messages_trains_only_assistant_replies_and_end_of_turn(tmp_path, tok):
    bundle = build(tmp_path, [{"messages": MULTI_TURN}], tok)
    sample = bundle.train[0]
    assert trained_runs(tok, sample) == ["2 + 3 = 5<|im_end|>", "4 + 4 = 8<|im_end|>"]
    assert sample["labels"][0] == -100
    rendered = tok.apply_chat_template(MULTI_TURN, tokenize=False)
    assert tok.decode(sample["input_ids"]) == rendered
    hidden = untrained_text(tok, sample)
    assert "<|im_start|>assistant\n" in hidden and "be brief" in hidden and "and 4 + 4 ?" in hidden


def test_assistant_turn_with_weight_zero_is_not_trained(tmp_path, tok):
    turns = [dict(m) for m in MULTI_TURN]
    turns[2]["weight"] = 0
    bundle = build(tmp_path, [{"messages": turns}], tok)
    assert trained_runs(tok, bundle.train[0]) == ["4 + 4 = 8<|im_end|>"]


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


def test_train_on_inputs_trains_every_token_but_the_first(tmp_path, tok):
    sample = build(tmp_path, [{"messages": MULTI_TURN}], tok, train_on_inputs=True).train[0]
    assert sample["labels"] == [-100] + sample["input_ids"][1:]
    batch = batching.collate([sample, {"input_ids": [7, 8], "labels": [-100, 8]}], [[0], [1]], tok.pad_token_id, 64)
    assert (batch["labels"][1, 2:] == -100).all() and (batch["attention_mask"][1, 2:] == 0).all()


# --------------------------------------------------------------------------- real-world template shapes


def _with_template(tokenizer, template: str, special: list[str] | None = None):
    if special:
        tokenizer.add_tokens(special, special_tokens=True)
    tokenizer.chat_template = template
    return tokenizer


def test_llama2_inst_template(tmp_path, tok):
    _with_template(tok, LLAMA2_TEMPLATE)
    sample = build(tmp_path, [{"messages": MULTI_TURN}], tok).train[0]
    assert trained_runs(tok, sample) == [" 2 + 3 = 5 <|im_end|>", " 4 + 4 = 8 <|im_end|>"]
    assert untrained_text(tok, sample).count("[INST]") == 2


def test_llama2_template_errors_make_bad_rows(tmp_path, tok):
    _with_template(tok, LLAMA2_TEMPLATE)
    good = [{"messages": chat(("user", "hi"), ("assistant", "hello"))}] * 9
    broken = {"messages": chat(("user", "hi"), ("user", "again"), ("assistant", "hello"))}
    bundle = build(tmp_path, good + [broken], tok, max_bad_fraction=0.2)
    assert bundle.summary.bad_rows == [10]
    assert "must alternate" in bundle.summary.bad_row_reasons[0]


def test_template_without_system_role_gets_the_system_prompt_in_the_first_user_turn(tmp_path, tok, caplog):
    _with_template(tok, NO_SYSTEM_TEMPLATE)
    assert not labels.template_takes_system(tok)
    rows = [{"messages": chat(("system", "be brief"), ("user", f"{i} + 1 ?"), ("assistant", f"{i + 1}"),
                              ("user", "and + 2 ?"), ("assistant", f"{i + 3}"))} for i in range(10)]
    rows.append({"messages": chat(("user", "hi"), ("assistant", "hello"))})  # no system turn: unchanged
    with caplog.at_level("INFO", logger="qlora_kit"):
        bundle = build(tmp_path, rows, tok, val_fraction=0.2)
    assert "no system role: the system prompt of 10 rows" in caplog.text
    assert bundle.summary.bad_rows == []
    first = next(s for s in bundle.train if "be brief" in tok.decode(s["input_ids"]))
    assert tok.decode(first["input_ids"]).startswith("<|im_start|>user\nbe brief\n\n")
    assert len(trained_runs(tok, first)) == 2  # both replies still trained, nothing else
    assert all(h["messages"][0]["role"] == "user" for h in bundle.heldout)  # the export check prompts the same way
    from qlora_kit.inference.chat import render_chat

    prompt = render_chat(tok, chat(("system", "be brief"), ("user", "1 + 1 ?")))
    assert prompt == "<|im_start|>user\nbe brief\n\n1 + 1 ?<|im_end|>\n<|im_start|>model\n"
    assert labels.template_takes_system(_with_template(tok, LLAMA2_TEMPLATE))


def test_llama3_header_template_trims_content(tmp_path, tok):
    _with_template(tok, LLAMA3_TEMPLATE, LLAMA3_SPECIAL)
    turns = chat(("system", "be brief"), ("user", "2 + 3 ?"), ("assistant", "  2 + 3 = 5 \n"))
    sample = build(tmp_path, [{"messages": turns}], tok).train[0]
    assert trained_runs(tok, sample) == ["2 + 3 = 5<|eot_id|>"]
    assert untrained_text(tok, sample).endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")


def test_template_with_default_system_prompt(tmp_path, tok):
    _with_template(tok, DEFAULT_SYSTEM_TEMPLATE)
    sample = build(tmp_path, [{"messages": chat(("user", "hi"), ("assistant", "hello"))}], tok).train[0]
    assert trained_runs(tok, sample) == ["hello<|im_end|>"]
    assert DEFAULT_SYSTEM in untrained_text(tok, sample)


def test_template_rendering_earlier_turns_differently_falls_back_to_search(tmp_path, tok, caplog):
    _with_template(tok, THINK_TEMPLATE)
    with caplog.at_level(logging.INFO, logger="qlora_kit"):
        sample = build(tmp_path, [{"messages": MULTI_TURN}], tok).train[0]
    assert trained_runs(tok, sample) == ["2 + 3 = 5<|im_end|>", "<think>\n\n</think>\n\n4 + 4 = 8<|im_end|>"]
    assert "text search" in caplog.text


def test_system_prompt_in_last_user_turn_template(tmp_path, tok):
    _with_template(tok, SYSTEM_LAST_TEMPLATE)
    sample = build(tmp_path, [{"messages": MULTI_TURN}], tok).train[0]
    assert "[INST] and 4 + 4 ?" not in tok.decode(sample["input_ids"])  # the system prompt moved there
    assert trained_runs(tok, sample) == [" 2 + 3 = 5<|im_end|>", " 4 + 4 = 8<|im_end|>"]


def test_smollm2_real_template():
    """SmolLM2's own tokenizer and template (injects a default system prompt)."""
    from transformers import AutoTokenizer

    gguf = require_demo_gguf()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    messages = chat(("user", "What is 2 + 2?"), ("assistant", "2 + 2 = 4."),
                    ("user", "And 3 + 3?"), ("assistant", "6."))
    rows = [formats.Row(1, messages=messages, train_turns=(1, 3))]
    [encoded], bad = encode.encode_rows(rows, tokenizer, 256, train_on_inputs=False)
    assert not bad and encoded.sample is not None
    assert trained_runs(tokenizer, encoded.sample) == ["2 + 2 = 4.<|im_end|>", "6.<|im_end|>"]
    assert "You are a helpful AI assistant named SmolLM" in untrained_text(tokenizer, encoded.sample)
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    assert encoded.sample["input_ids"] == tokenizer(text, add_special_tokens=False)["input_ids"]


def test_template_without_end_of_turn_marker_warns(tmp_path, tok, caplog):
    tok.chat_template = (
        "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ 'assistant:' }}{% endif %}"
    )
    with caplog.at_level(logging.WARNING, logger="qlora_kit"):
        sample = build(tmp_path, arithmetic_rows(1), tok).train[0]
    assert trained_runs(tok, sample) == [" " + arithmetic_rows(1)[0]["messages"][1]["content"]]
    assert caplog.text.count("no end-of-turn token") == 1


def test_slow_tokenizer_path_matches_offsets(tok):
    job = encode._Job(1, *labels.ChatSpans(tok).locate(MULTI_TURN, (2, 4)))
    [(fast_ids, fast_labels, _ends)] = encode.token_labels_fast([job], tok)
    assert encode.token_labels_slow(job, tok) == (fast_ids, fast_labels)


def test_backend_encoding_equals_the_tokenizer_call(tok):
    texts = [tok.apply_chat_template(MULTI_TURN, tokenize=False), "the water ünïcode 🙂 is good"]
    enc = tok(texts, add_special_tokens=False, return_offsets_mapping=True)
    assert encode.encode_with_offsets(tok, texts) == [
        (ids, [tuple(o) for o in offs]) for ids, offs in zip(enc["input_ids"], enc["offset_mapping"])
    ]


# --------------------------------------------------------------------------- detection and errors


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


def test_jsonl_syntax_error_names_line(tmp_path, tok):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "one"}\n\n{"text": "two"\n{"text": "three"}\n')
    with pytest.raises(DataError, match=r"line 3: not valid JSON"):
        D_build.build_data(DataConfig(path=str(path)), tok, 64, 0)


def test_json_array_saved_as_jsonl_gets_a_hint(tmp_path, tok):
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps(rows_in_format("text"), indent=1))
    with pytest.raises(DataError) as err:
        D_build.build_data(DataConfig(path=str(path)), tok, 64, 0)
    assert "line 1" in err.value.message and "rename it to .json" in err.value.hint


@pytest.mark.parametrize("case", ["empty", "blank_lines", "missing", "directory", "suffix", "empty_json_list"])
def test_unusable_files(tmp_path, tok, case):
    path = {
        "empty": tmp_path / "empty.jsonl",
        "blank_lines": tmp_path / "blank.jsonl",
        "missing": tmp_path / "nope.jsonl",
        "directory": tmp_path / "folder",
        "suffix": tmp_path / "rows.txt",
        "empty_json_list": tmp_path / "rows.json",
    }[case]
    if case == "empty":
        path.write_text("")
    elif case == "blank_lines":
        path.write_text("\n  \n")
    elif case == "directory":
        path.mkdir()
    elif case == "suffix":
        path.write_text("hello\n")
    elif case == "empty_json_list":
        path.write_text("[]")
    with pytest.raises(DataError) as err:
        D_build.build_data(DataConfig(path=str(path)), tok, 64, 0)
    expected = {"empty": "is empty", "blank_lines": "is empty", "missing": "does not exist",
                "directory": "is a directory", "suffix": "unsupported data file type", "empty_json_list": "is empty"}
    assert expected[case] in err.value.message and "\n" not in err.value.message and err.value.hint


def test_bad_rows_are_skipped_with_line_numbers(tmp_path, tok, caplog):
    rows: list[Any] = arithmetic_rows(48)
    rows.insert(4, {"messages": [{"role": "user"}]})  # line 5: turn without content
    rows.insert(9, {"messages": "hello"})  # line 10: wrong type
    rows.append({"messages": [{"role": "robot", "content": "x"}]})  # line 51: unknown role
    rows.append(["not", "an", "object"])  # line 52
    with caplog.at_level(logging.WARNING, logger="qlora_kit"):
        bundle = build(tmp_path, rows, tok, max_bad_fraction=0.1)
    summary = bundle.summary
    assert summary.bad_rows == [5, 10, 51, 52] and summary.rows == 52 and summary.train_rows == 48
    assert "lines 5, 10, 51, 52" in caplog.text
    assert "line 10: field 'messages' must be a list" in " ".join(summary.bad_row_reasons)
    assert "unsupported role 'robot'" in " ".join(summary.bad_row_reasons)


def test_all_rows_bad_even_when_bad_rows_are_allowed(tmp_path, tok):
    with pytest.raises(DataError, match=r"all 3 rows of .* are malformed; line 1: field 'messages'"):
        build(tmp_path, [{"messages": 1}] * 3, tok, max_bad_fraction=1.0)


def test_too_many_bad_rows_abort(tmp_path, tok):
    rows = arithmetic_rows(20) + [{"messages": 1}, {"messages": 2}]
    with pytest.raises(DataError) as err:
        build(tmp_path, rows, tok, max_bad_fraction=0.05)
    assert "2 of 22 rows" in err.value.message and "line 21" in err.value.message
    assert "data.max_bad_fraction" in err.value.hint


def test_alpaca_rows_missing_output_are_bad(tmp_path, tok):
    rows = rows_in_format("alpaca", 9) + [{"instruction": "add", "input": "1 + 1"}]
    bundle = build(tmp_path, rows, tok, max_bad_fraction=0.5)
    assert bundle.summary.bad_rows == [10]
    assert "missing field 'output'" in bundle.summary.bad_row_reasons[0]


# --------------------------------------------------------------------------- truncation


def test_truncation_and_rows_without_trainable_tokens(tmp_path, tok):
    long_prompt = " ".join(["the water"] * 40)
    rows = arithmetic_rows(6) + [
        {"messages": chat(("user", long_prompt), ("assistant", "ok"))},  # reply beyond max_length
        {"messages": chat(("user", "hi"), ("assistant", " ".join(["the water"] * 40)))},  # reply cut short
        {"messages": chat(("user", "no reply here"))},  # nothing to train on at all
    ]
    bundle = build(tmp_path, rows, tok, max_length=40, max_bad_fraction=0.0)
    s = bundle.summary
    assert s.truncated == 2 and s.no_trainable == 2 and s.no_trainable_truncated == 1
    assert s.train_rows == 7 and max(len(x["input_ids"]) for x in bundle.train) == 40
    cut = bundle.train[-1]
    assert len(cut["input_ids"]) == 40 and cut["labels"][-1] != -100


def test_all_rows_truncated_to_zero_says_raise_max_length(tmp_path, tok):
    rows = [{"messages": chat(("user", " ".join(["the water"] * 30)), ("assistant", "ok"))}] * 5
    with pytest.raises(DataError) as err:
        build(tmp_path, rows, tok, max_length=16)
    assert "all 5 rows were truncated to zero trainable tokens" in err.value.message
    assert "train.max_length" in err.value.hint


def test_no_replies_at_all(tmp_path, tok):
    rows = [{"messages": chat(("user", "hi"))}] * 3
    with pytest.raises(DataError) as err:
        build(tmp_path, rows, tok)
    assert "no row" in err.value.message and "train_on_inputs" in err.value.hint


# --------------------------------------------------------------------------- other file types, hub, fingerprint


def test_json_csv_parquet_load_the_same_samples(tmp_path, tok):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = rows_in_format("alpaca", 5)
    reference = build(tmp_path, rows, tok).train
    (tmp_path / "list.json").write_text(json.dumps(rows))
    (tmp_path / "wrapped.json").write_text(json.dumps({"data": rows}))
    with (tmp_path / "rows.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["instruction", "input", "output"])
        writer.writeheader()
        writer.writerows(rows)
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "rows.parquet")
    for name in ("list.json", "wrapped.json", "rows.csv", "rows.parquet"):
        cfg = DataConfig(path=str(tmp_path / name), val_fraction=0.0)
        assert D_build.build_data(cfg, tok, 64, 0).train == reference, name


def test_parquet_with_nested_messages_and_csv_with_json_cells(tmp_path, tok):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = arithmetic_rows(3)
    reference = build(tmp_path, rows, tok).train
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "chat.parquet")
    (tmp_path / "chat.csv").write_text("messages\n" + "".join(
        '"' + json.dumps(r["messages"]).replace('"', '""') + '"\n' for r in rows))
    for name in ("chat.parquet", "chat.csv"):
        assert D_build.build_data(DataConfig(path=str(tmp_path / name), val_fraction=0.0), tok, 64, 0).train == reference


def test_invalid_json_file_names_line(tmp_path, tok):
    path = tmp_path / "rows.json"
    path.write_text('[\n {"text": "a"},\n {"text": }\n]')
    with pytest.raises(DataError, match="line 3"):
        D_build.build_data(DataConfig(path=str(path)), tok, 64, 0)


def test_hub_dataset_through_load_dataset(tok, monkeypatch):
    import datasets

    calls = []

    def fake_load(name, split):
        calls.append((name, split))
        return datasets.Dataset.from_list(rows_in_format("prompt_completion", 6))

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    bundle = D_build.build_data(DataConfig(path="someorg/some-data", split="train", val_fraction=0.0), tok, 64, 0)
    assert calls == [("someorg/some-data", "train")] and len(bundle.train) == 6
    assert bundle.fingerprint["path"] == "someorg/some-data [train]" and len(bundle.fingerprint["sha256"]) == 64


def test_hub_dataset_offline_is_a_data_error(tok):
    with pytest.raises(DataError) as err:
        D_build.build_data(DataConfig(path="someorg/surely-not-cached-qlora-kit"), tok, 64, 0)
    assert "offline" in err.value.message or "not found" in err.value.message


def test_fingerprint_hashes_files(tmp_path, tok):
    train = write_jsonl(tmp_path / "t.jsonl", arithmetic_rows(6))
    val = write_jsonl(tmp_path / "v.jsonl", arithmetic_rows(3, seed=1))
    bundle = D_build.build_data(DataConfig(path=str(train), val_path=str(val)), tok, 64, 0)
    assert bundle.fingerprint == {
        "path": str(train), "sha256": hashlib.sha256(train.read_bytes()).hexdigest(),
        "val_path": str(val), "val_sha256": hashlib.sha256(val.read_bytes()).hexdigest(), "format": "messages",
    }


# --------------------------------------------------------------------------- validation split and heldout


@pytest.mark.parametrize(
    ("n", "fraction", "cap", "expected"),
    [(100, 0.05, 200, 5), (100, 0.2, 3, 3), (2, 0.01, 200, 1), (1, 0.5, 200, 0), (50, 0.0, 200, 0), (40, 0.1, 0, 0)],
)
def test_val_split_sizes(tmp_path, tok, n, fraction, cap, expected):
    bundle = build(tmp_path, arithmetic_rows(n), tok, val_fraction=fraction, val_max_rows=cap)
    assert len(bundle.val) == expected and len(bundle.train) == n - expected
    assert len(bundle.heldout) == expected and bundle.summary.val_rows == expected


def test_val_split_is_seeded(tmp_path, tok):
    rows = [{"messages": chat(("user", f"q{i}"), ("assistant", f"reply {i}"))} for i in range(30)]
    refs = [[h["reference"] for h in build(tmp_path, rows, tok, seed=s, val_fraction=0.2).heldout] for s in (0, 0, 1)]
    assert refs[0] == refs[1] != refs[2]


def test_val_path_and_heldout_entries(tmp_path, tok):
    train = write_jsonl(tmp_path / "t.jsonl", arithmetic_rows(8))
    val = write_jsonl(tmp_path / "v.jsonl", [{"messages": MULTI_TURN}])
    bundle = D_build.build_data(DataConfig(path=str(train), val_path=str(val)), tok, 64, 0)
    assert len(bundle.train) == 8 and len(bundle.val) == 1
    assert bundle.heldout == [{"messages": MULTI_TURN[:4], "reference": "4 + 4 = 8"}]
    assert bundle.summary.val_source == str(val) and bundle.summary.rows == 9
    capped = D_build.build_data(DataConfig(path=str(train), val_path=str(train), val_max_rows=3), tok, 64, 0)
    assert len(capped.val) == 3 and len(capped.train) == 8


def test_heldout_for_text_and_plain_pairs(tmp_path, tok):
    text = build(tmp_path, [{"text": "the water is good for you"}] * 2, tok, val_fraction=0.5).heldout
    assert text == [{"prompt": "the water is", "reference": " good for you"}]
    tok.chat_template = None
    pair = build(tmp_path, [{"prompt": "1 + 1 =", "completion": " 2"}] * 2, tok, val_fraction=0.5).heldout
    assert pair == [{"prompt": "1 + 1 =", "reference": " 2"}]
    tok.chat_template = DEFAULT_SYSTEM_TEMPLATE
    chat_pair = build(tmp_path, [{"prompt": "1 + 1 =", "completion": " 2"}] * 2, tok, val_fraction=0.5).heldout
    assert chat_pair == [{"messages": [{"role": "user", "content": "1 + 1 ="}], "reference": " 2"}]


# --------------------------------------------------------------------------- summary


def test_summary_json_and_table(tmp_path, tok):
    from rich.console import Console

    bundle = build(tmp_path, arithmetic_rows(10), tok, val_fraction=0.2)
    s = bundle.summary
    assert (s.rows, s.train_rows, s.val_rows) == (10, 8, 2)
    assert s.tokens == sum(len(x["input_ids"]) for x in bundle.train)
    assert s.trainable_tokens == sum(sum(lab != -100 for lab in x["labels"]) for x in bundle.train)
    assert s.length_min <= s.length_mean <= s.length_max and sum(c for *_, c in s.length_histogram) == 8
    data = json.loads(json.dumps(s.to_json()))
    assert "«" in data["preview"] and data["preview"].endswith("<|im_end|>»\n")
    out = io.StringIO()
    D_summary.print_summary(s, Console(file=out, width=120))
    text = out.getvalue()
    assert "trainable tokens" in text and "assistant replies only" in text
    assert "trained tokens inside « »" in text and "«" in text.split("preview", 1)[1]


def test_large_input_tokenises_quickly(tmp_path, tok):
    rows = arithmetic_rows(6000)
    start = time.perf_counter()
    bundle = build(tmp_path, rows, tok, val_fraction=0.01)
    elapsed = time.perf_counter() - start
    assert len(bundle.train) + len(bundle.val) == 6000
    assert elapsed < 30, f"6000 rows took {elapsed:.1f}s"


# --------------------------------------------------------------------------- plan_batches and collate


def _long_rows(n: int, chars: int, prompt_chars: int = 40) -> list[dict[str, Any]]:
    words = "the quick brown fox jumps over the lazy dog while numbers 12345 and symbols ;:- pass by".split()
    rows = []
    for i in range(n):
        text = " ".join(words[(i + k) % len(words)] for k in range(chars // 4))[:chars]
        rows.append({"messages": chat(("user", f"question {i}: " + text[:prompt_chars]), ("assistant", text))})
    return rows


@pytest.mark.parametrize("fmt", ["messages", "text"])
def test_cutting_rows_before_tokenising_changes_no_sample(tmp_path, tok, monkeypatch, fmt):
    """The character cap is invisible: the same samples (and audit) as tokenising whole rows."""
    rows = arithmetic_rows(20) + _long_rows(12, 6000) + _long_rows(4, 1500) + _long_rows(3, 9000, prompt_chars=5000)
    if fmt == "text":
        rows = [{"text": r["messages"][0]["content"] + " " + r["messages"][1]["content"]} for r in rows]
    capped = build(tmp_path / "a", rows, tok, max_length=64, train_on_inputs=fmt == "text")
    monkeypatch.setattr(encode, "MAX_CHARS_PER_TOKEN", 10**9)
    whole = build(tmp_path / "b", rows, tok, max_length=64, train_on_inputs=fmt == "text")
    assert capped.train == whole.train and len(capped.train) >= 32
    drop_source = lambda summary: {k: v for k, v in summary.to_json().items() if k not in ("source", "sources")}  # noqa: E731
    assert drop_source(capped.summary) == drop_source(whole.summary)
    assert capped.summary.truncated >= 15


def test_megabyte_rows_are_not_tokenised_whole(tmp_path, tok, monkeypatch):
    """Five 1 MB rows used to take 37 s and 3.4 GB: the tokenizer now sees at most the cap per row."""
    seen: list[int] = []
    real = encode.encode_with_offsets
    monkeypatch.setattr(encode, "encode_with_offsets", lambda t, texts: seen.extend(map(len, texts)) or real(t, texts))
    rows = arithmetic_rows(10) + _long_rows(5, 1_000_000)
    start = time.perf_counter()
    bundle = build(tmp_path, rows, tok, max_length=128)
    took = time.perf_counter() - start
    assert max(seen) <= encode.MAX_CHARS_PER_TOKEN * 128 + encode.CUT_MARGIN_CHARS
    assert bundle.summary.truncated == 5 and len(bundle.train) == 15
    assert all(len(s["input_ids"]) <= 128 for s in bundle.train)
    assert took < 30, f"{took:.1f} s"


def test_a_row_of_very_long_tokens_falls_back_to_whole_row(tmp_path, tok, monkeypatch):
    """When the cut would land within max_length tokens, the whole row is tokenised (exact labels)."""
    monkeypatch.setattr(encode, "MAX_CHARS_PER_TOKEN", 1)  # force the cut to land too early
    monkeypatch.setattr(encode, "CUT_MARGIN_CHARS", 0)
    rows = _long_rows(3, 3000)
    capped = build(tmp_path / "a", rows, tok, max_length=64)
    monkeypatch.setattr(encode, "MAX_CHARS_PER_TOKEN", 10**9)
    assert capped.train == build(tmp_path / "b", rows, tok, max_length=64).train


def test_deeply_nested_json_row_is_a_data_error(tmp_path, tok):
    path = tmp_path / "deep.jsonl"
    path.write_text(json.dumps(arithmetic_rows(1)[0]) + "\n" + "[" * 100_000 + "]" * 100_000 + "\n")
    with pytest.raises(DataError, match="line 2: nests JSON too deeply"):
        D_build.build_data(DataConfig(path=str(path), val_fraction=0.0), tok, 64, 0)
    (tmp_path / "deep.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(DataError, match="nests JSON too deeply"):
        D_build.build_data(DataConfig(path=str(tmp_path / "deep.json"), val_fraction=0.0), tok, 64, 0)


@pytest.mark.parametrize("packing", [False, True])
def test_plan_batches_is_deterministic_and_complete(packing):
    lengths = [5 + (7 * i) % 40 for i in range(103)]
    args = dict(micro_batch_size=4, max_length=64, packing=packing, seed=3, shuffle=True)
    plan = batching.plan_batches(lengths, epoch=0, **args)
    assert plan == batching.plan_batches(lengths, epoch=0, **args)
    assert plan != batching.plan_batches(lengths, epoch=1, **args)
    assert plan != batching.plan_batches(lengths, epoch=0, **{**args, "seed": 4})
    for epoch in range(3):
        flat = [i for mb in batching.plan_batches(lengths, epoch=epoch, **args) for row in mb for i in row]
        assert sorted(flat) == list(range(103))
    assert all(len(mb) == 4 for mb in plan[:-1]) and 1 <= len(plan[-1]) <= 4
    if packing:
        assert all(sum(lengths[i] for i in row) <= 64 for mb in plan for row in mb)
        assert sum(len(mb) for mb in plan) < 103 / 1.5  # really packs
    else:
        assert all(len(row) == 1 for mb in plan for row in mb) and len(plan) == 26


def test_plan_batches_without_shuffle_keeps_order():
    plan = batching.plan_batches([3] * 5, micro_batch_size=2, max_length=8, packing=False, seed=0, epoch=7, shuffle=False)
    assert plan == [[[0], [1]], [[2], [3]], [[4]]]


def test_collate_unpacked_pads_right():
    samples = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8, 9], "labels": [-100, 9]}]
    batch = batching.collate(samples, [[0], [1]], pad_id=0, max_length=16)
    assert set(batch) == {"input_ids", "labels", "attention_mask"}
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 9, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [-100, 9, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]


def test_collate_packed_is_one_padding_free_row_with_varlen_inputs():
    samples = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8, 9], "labels": [-100, 9]},
               {"input_ids": [3, 4, 5, 6, 7, 8], "labels": [-100, 4, 5, 6, 7, 8]}]
    batch = batching.collate(samples, [[0, 1], [2]], pad_id=5, max_length=16)
    assert "attention_mask" not in batch
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9, 3, 4, 5, 6, 7, 8]]
    assert batch["labels"].tolist() == [[-100, 6, 7, -100, 9, -100, 4, 5, 6, 7, 8]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 1, 2, 3, 4, 5]]
    assert batch["cu_seq_lens_q"].tolist() == batch["cu_seq_lens_k"].tolist() == [0, 3, 5, 11]
    assert batch["cu_seq_lens_q"].dtype == torch.int32
    assert batch["max_length_q"] == batch["max_length_k"] == 6 and batch["packed_seq_lens"] == (3, 2, 6)
    # a row is cut at max_length (its last sample shortened), rows of one sample are packed too
    cut = batching.collate(samples, [[0, 2], [1]], pad_id=0, max_length=5, packing=True)
    assert cut["packed_seq_lens"] == (3, 2, 2) and cut["input_ids"].tolist() == [[5, 6, 7, 3, 4, 8, 9]]
    assert cut["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 1]]


def test_padding_with_eos_id_keeps_eos_targets(tmp_path, tok):
    bundle = build(tmp_path, arithmetic_rows(2), tok)
    batch = batching.collate(bundle.train, [[0], [1]], pad_id=tok.eos_token_id, max_length=64)
    assert (batch["labels"] == tok.eos_token_id).sum() == 2


# --------------------------------------------------------------------------- packing isolation on the real model


@pytest.fixture(scope="module")
def packed_samples(tiny_llama: Path, tmp_path_factory):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    path = write_jsonl(tmp_path_factory.mktemp("pack") / "rows.jsonl", arithmetic_rows(5) + [
        {"messages": chat(("user", "the water is"), ("assistant", "good for you and me"))}])
    return D_build.build_data(DataConfig(path=str(path), val_fraction=0.0), tokenizer, 64, 0).train


def _qlora_model(source: Path, attn: str, gradient_checkpointing: bool):
    from qlora_kit.core.config import LoraConfig, ModelConfig
    from qlora_kit.model.base import load_quantized_base
    from qlora_kit.model.lora import attach_lora

    base = load_quantized_base(source, ModelConfig(name_or_path=str(source), attn_implementation=attn),
                               torch.float32, torch.device("cpu"))
    model = attach_lora(base, LoraConfig(r=8, alpha=16, dropout=0.0), torch.float32, gradient_checkpointing)
    torch.manual_seed(0)
    for name, p in model.named_parameters():
        if "lora_B" in name:  # B starts at zero; make the adapters matter
            torch.nn.init.normal_(p, std=0.2)
    model.train()
    return model


@pytest.mark.parametrize(("attn", "gradient_checkpointing"),
                         [("sdpa", False), ("sdpa", True), ("eager", True), ("packed", True), ("packed", False)])
def test_packed_samples_do_not_attend_to_each_other(tiny_llama, packed_samples, attn, gradient_checkpointing):
    from qlora_kit.ops.packing import ATTENTION_NAME, use_packed_attention

    model = _qlora_model(tiny_llama, "sdpa" if attn == "packed" else attn, gradient_checkpointing)
    if attn == "packed":  # what training uses: no mask at all, samples kept apart by cu_seq_lens
        assert use_packed_attention(model) and model.config._attn_implementation == ATTENTION_NAME
    rows = [[0, 5, 1], [2, 3]]  # two packed rows, flattened into one padding-free row
    batch = batching.collate(packed_samples, rows, pad_id=0, max_length=128, packing=True)
    assert "attention_mask" not in batch and batch["input_ids"].shape[0] == 1
    # transformers' own packed detection (sdpa/eager masks) needs a cache-free forward: training-mode gradient
    # checkpointing forces use_cache=False by itself; without it the caller must pass it.
    packed = model(**batch) if gradient_checkpointing else model(**batch, use_cache=False)
    assert torch.isfinite(packed.loss)
    offset = 0
    for idx in [i for row in rows for i in row]:
        ids = torch.tensor([packed_samples[idx]["input_ids"]])
        alone = model(input_ids=ids, use_cache=False).logits[0]
        inside = packed.logits[0, offset : offset + ids.shape[1]]
        torch.testing.assert_close(inside, alone, atol=1e-5, rtol=0)
        offset += ids.shape[1]
    assert offset == batch["input_ids"].shape[1]


def test_unpacked_padding_does_not_change_logits(tiny_llama, packed_samples):
    model = _qlora_model(tiny_llama, "sdpa", True)
    batch = batching.collate(packed_samples, [[5], [0]], pad_id=0, max_length=64)
    out = model(**batch, use_cache=False).logits
    for b, idx in enumerate([5, 0]):
        ids = torch.tensor([packed_samples[idx]["input_ids"]])
        torch.testing.assert_close(out[b, : ids.shape[1]], model(input_ids=ids).logits[0], atol=1e-5, rtol=0)


def test_stored_truncation_and_padding_in_tokenizer_file_are_ignored(tiny_llama) -> None:
    """A tokenizer.json saved with truncation/padding must not cut or pad the training samples."""
    from transformers import AutoTokenizer

    from qlora_kit.data.encode import encode_with_offsets

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    texts = ["the people who were there could see the water and the light of the day " * 3, "hello"]
    plain = [list(ids) for ids, _ in encode_with_offsets(tok, texts)]
    assert len(plain[0]) > 8
    tok.backend_tokenizer.enable_truncation(max_length=8)
    tok.backend_tokenizer.enable_padding(pad_id=tok.pad_token_id, pad_token=tok.pad_token)
    assert [list(ids) for ids, _ in encode_with_offsets(tok, texts)] == plain


def test_row_with_unhashable_role_is_a_bad_row(tmp_path, tiny_llama) -> None:
    from transformers import AutoTokenizer

    from qlora_kit.core.config import DataConfig
    from qlora_kit.data.build import build_data

    rows = arithmetic_rows(200)
    rows[5] = {"messages": [{"role": ["user"], "content": "x"}, {"role": "assistant", "content": "y"}]}
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    bundle = build_data(DataConfig(path=str(data)), AutoTokenizer.from_pretrained(tiny_llama), 64, 0)
    assert 6 in bundle.summary.bad_rows
