"""The data audit: bad rows, truncation, splits, held-out rows, fingerprint, summary (data.build)."""

from __future__ import annotations

import hashlib
import io
import json
import logging
from typing import Any

import pytest
from conftest import arithmetic_rows, write_jsonl
from data_rows import (
    DEFAULT_SYSTEM_TEMPLATE,
    MULTI_TURN,
    build,
    chat,
)

from qlora_kit.core.config import DataConfig
from qlora_kit.core.errors import DataError
from qlora_kit.data import build as D_build
from qlora_kit.data import summary as D_summary


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


def test_fingerprint_hashes_files(tmp_path, tok):
    train = write_jsonl(tmp_path / "t.jsonl", arithmetic_rows(6))
    val = write_jsonl(tmp_path / "v.jsonl", arithmetic_rows(3, seed=1))
    bundle = D_build.build_data(DataConfig(path=str(train), val_path=str(val)), tok, 64, 0)
    assert bundle.fingerprint == {
        "path": str(train), "sha256": hashlib.sha256(train.read_bytes()).hexdigest(),
        "val_path": str(val), "val_sha256": hashlib.sha256(val.read_bytes()).hexdigest(), "format": "messages",
    }


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
