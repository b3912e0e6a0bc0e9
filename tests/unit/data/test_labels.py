"""Assistant-only labels through chat templates (data.labels)."""

from __future__ import annotations

import logging

from conftest import arithmetic_rows, require_demo_gguf
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
    build,
    chat,
    trained_runs,
    untrained_text,
    with_template,
)

from qlora_kit.data import batching, encode, formats, labels


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


def test_train_on_inputs_trains_every_token_but_the_first(tmp_path, tok):
    sample = build(tmp_path, [{"messages": MULTI_TURN}], tok, train_on_inputs=True).train[0]
    assert sample["labels"] == [-100] + sample["input_ids"][1:]
    batch = batching.collate([sample, {"input_ids": [7, 8], "labels": [-100, 8]}], [[0], [1]], tok.pad_token_id, 64)
    assert (batch["labels"][1, 2:] == -100).all() and (batch["attention_mask"][1, 2:] == 0).all()


def test_llama2_inst_template(tmp_path, tok):
    with_template(tok, LLAMA2_TEMPLATE)
    sample = build(tmp_path, [{"messages": MULTI_TURN}], tok).train[0]
    assert trained_runs(tok, sample) == [" 2 + 3 = 5 <|im_end|>", " 4 + 4 = 8 <|im_end|>"]
    assert untrained_text(tok, sample).count("[INST]") == 2


def test_llama2_template_errors_make_bad_rows(tmp_path, tok):
    with_template(tok, LLAMA2_TEMPLATE)
    good = [{"messages": chat(("user", "hi"), ("assistant", "hello"))}] * 9
    broken = {"messages": chat(("user", "hi"), ("user", "again"), ("assistant", "hello"))}
    bundle = build(tmp_path, good + [broken], tok, max_bad_fraction=0.2)
    assert bundle.summary.bad_rows == [10]
    assert "must alternate" in bundle.summary.bad_row_reasons[0]


def test_template_without_system_role_gets_the_system_prompt_in_the_first_user_turn(tmp_path, tok, caplog):
    with_template(tok, NO_SYSTEM_TEMPLATE)
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
    assert labels.template_takes_system(with_template(tok, LLAMA2_TEMPLATE))


def test_llama3_header_template_trims_content(tmp_path, tok):
    with_template(tok, LLAMA3_TEMPLATE, LLAMA3_SPECIAL)
    turns = chat(("system", "be brief"), ("user", "2 + 3 ?"), ("assistant", "  2 + 3 = 5 \n"))
    sample = build(tmp_path, [{"messages": turns}], tok).train[0]
    assert trained_runs(tok, sample) == ["2 + 3 = 5<|eot_id|>"]
    assert untrained_text(tok, sample).endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")


def test_template_with_default_system_prompt(tmp_path, tok):
    with_template(tok, DEFAULT_SYSTEM_TEMPLATE)
    sample = build(tmp_path, [{"messages": chat(("user", "hi"), ("assistant", "hello"))}], tok).train[0]
    assert trained_runs(tok, sample) == ["hello<|im_end|>"]
    assert DEFAULT_SYSTEM in untrained_text(tok, sample)


def test_template_rendering_earlier_turns_differently_falls_back_to_search(tmp_path, tok, caplog):
    with_template(tok, THINK_TEMPLATE)
    with caplog.at_level(logging.INFO, logger="qlora_kit"):
        sample = build(tmp_path, [{"messages": MULTI_TURN}], tok).train[0]
    assert trained_runs(tok, sample) == ["2 + 3 = 5<|im_end|>", "<think>\n\n</think>\n\n4 + 4 = 8<|im_end|>"]
    assert "text search" in caplog.text


def test_system_prompt_in_last_user_turn_template(tmp_path, tok):
    with_template(tok, SYSTEM_LAST_TEMPLATE)
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
