"""Tokenising: offsets, speed, and bounded text cuts that change no sample (data.encode)."""

from __future__ import annotations

import time

import pytest
from conftest import arithmetic_rows
from data_rows import (
    MULTI_TURN,
    build,
    long_rows,
)

from qlora_kit.data import encode, labels


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


def test_large_input_tokenises_quickly(tmp_path, tok):
    rows = arithmetic_rows(6000)
    start = time.perf_counter()
    bundle = build(tmp_path, rows, tok, val_fraction=0.01)
    elapsed = time.perf_counter() - start
    assert len(bundle.train) + len(bundle.val) == 6000
    assert elapsed < 30, f"6000 rows took {elapsed:.1f}s"


@pytest.mark.parametrize("fmt", ["messages", "text"])
def test_cutting_rows_before_tokenising_changes_no_sample(tmp_path, tok, monkeypatch, fmt):
    """The character cap is invisible: the same samples (and audit) as tokenising whole rows."""
    rows = arithmetic_rows(20) + long_rows(12, 6000) + long_rows(4, 1500) + long_rows(3, 9000, prompt_chars=5000)
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
    rows = arithmetic_rows(10) + long_rows(5, 1_000_000)
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
    rows = long_rows(3, 3000)
    capped = build(tmp_path / "a", rows, tok, max_length=64)
    monkeypatch.setattr(encode, "MAX_CHARS_PER_TOKEN", 10**9)
    assert capped.train == build(tmp_path / "b", rows, tok, max_length=64).train


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


def test_tokenising_a_large_input_in_a_pipe_writes_progress_lines(tmp_path, tok, monkeypatch, caplog):
    import io
    import logging

    from rich.console import Console

    from qlora_kit.core import logs, pacing

    monkeypatch.setitem(logs._STDERR, "console", Console(file=io.StringIO(), force_terminal=False))
    monkeypatch.setenv(pacing.ENV_INTERVAL, "0")
    monkeypatch.setattr(encode, "PROGRESS_MIN_ROWS", 10)
    monkeypatch.setattr(encode, "ENCODE_CHUNK", 8)
    with caplog.at_level(logging.INFO, logger="qlora_kit"):
        build(tmp_path, arithmetic_rows(24), tok, val_fraction=0.0)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("tokenising")]
    assert [line.split(": ", 1)[1].split("  ")[0] for line in lines] == ["row 0/24", "row 8/24", "row 16/24",
                                                                          "row 24/24"], lines
    assert all("elapsed" in line and "eta" in line for line in lines)
