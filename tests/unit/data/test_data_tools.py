"""Tool-calling rows through chat templates shaped like Llama-3.1's, Qwen2.5's and Mistral-v0.3's (issue 21)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from conftest import arithmetic_rows, write_jsonl
from data_rows import trained_runs
from tool_rows import (
    LLAMA31_SPECIAL,
    LLAMA31_TOOLS,
    MISTRAL_SPECIAL,
    MISTRAL_TOOLS,
    QWEN25_DEFAULT_SYSTEM,
    QWEN25_TOOLS,
    TIME_TOOL,
    two_question_row,
    weather_row,
)

from qlora_kit.core.config import DataConfig
from qlora_kit.core.errors import DataError
from qlora_kit.data.build import DataBundle, build_data

TEMPLATES = {"llama3.1": (LLAMA31_TOOLS, LLAMA31_SPECIAL), "qwen2.5": (QWEN25_TOOLS, []),
             "mistral": (MISTRAL_TOOLS, MISTRAL_SPECIAL)}
# what each template writes for the assistant's call of get_weather(city="Town1") (trained, with end of turn)
CALL_TEXT = {
    "llama3.1": '{"name": "get_weather", "parameters": {"city": "Town1"}}<|eot_id|>',
    "qwen2.5": '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Town1"}}\n</tool_call><|im_end|>',
    "mistral": '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Town1"}, "id": "call00001"}]<|im_end|>',
}
ANSWER_TEXT = {"llama3.1": "It is 1 degrees in Town1.<|eot_id|>", "qwen2.5": "It is 1 degrees in Town1.<|im_end|>",
               "mistral": " It is 1 degrees in Town1.<|im_end|>"}


def with_template(tokenizer: Any, name: str) -> Any:
    template, special = TEMPLATES[name]
    if special:
        tokenizer.add_tokens(special, special_tokens=True)
    tokenizer.chat_template = template
    return tokenizer


def build(tmp_path: Path, rows: list[Any], tokenizer: Any, model_name: str | None = None, **data: Any) -> DataBundle:
    path = write_jsonl(tmp_path / "rows.jsonl", rows)
    return build_data(DataConfig(path=str(path), **{"val_fraction": 0.0, **data}), tokenizer, 1024, 0,
                      model_name=model_name)


@pytest.mark.parametrize("name", list(TEMPLATES))
def test_tool_calls_are_trained_and_tool_results_are_not(tmp_path, fresh_tokenizer, name):
    tok = with_template(fresh_tokenizer, name)
    bundle = build(tmp_path, [weather_row(1)], tok)
    sample = bundle.train[0]
    assert trained_runs(tok, sample) == [CALL_TEXT[name], ANSWER_TEXT[name]]
    prompt = tok.decode([t for t, lab in zip(sample["input_ids"], sample["labels"]) if lab == -100])
    assert '"celsius": 1' in prompt  # the tool result is there, as context only
    assert "Current weather of a city." in prompt  # the tool list was rendered through the template
    assert bundle.summary.tool_rows == 1 and bundle.summary.bad_rows == []


@pytest.mark.parametrize("name", list(TEMPLATES))
def test_arguments_as_json_text_or_object_render_the_same(tmp_path, fresh_tokenizer, name):
    tok = with_template(fresh_tokenizer, name)
    as_text = build(tmp_path / "a", [weather_row(1, arguments_as_text=True)], tok).train
    as_object = build(tmp_path / "b", [weather_row(1, arguments_as_text=False)], tok).train
    assert as_text == as_object


def test_mistral_tool_list_before_the_last_question_falls_back_to_search(tmp_path, fresh_tokenizer, caplog):
    """Mistral moves the tool list (and system prompt) to the last user turn, so earlier renders are no prefix."""
    tok = with_template(fresh_tokenizer, "mistral")
    with caplog.at_level("INFO", logger="qlora_kit"):
        sample = build(tmp_path, [two_question_row(1)], tok).train[0]
    assert trained_runs(tok, sample) == [" Hi 1!<|im_end|>", CALL_TEXT["mistral"], ANSWER_TEXT["mistral"]]
    assert "located by text search" in caplog.text


def test_template_rules_make_bad_rows(tmp_path, fresh_tokenizer):
    """Mistral's nine-character call ids, Llama-3.1's one call per turn: the template's own refusals."""
    tok = with_template(fresh_tokenizer, "mistral")
    rows = [weather_row(i) for i in range(9)] + [weather_row(9, call_id="call_123456789")]
    bundle = build(tmp_path, rows, tok, max_bad_fraction=0.2)
    assert bundle.summary.bad_rows == [10] and "length 9" in bundle.summary.bad_row_reasons[0]


def test_malformed_tool_parts_are_bad_rows_with_reasons(tmp_path, fresh_tokenizer):
    tok = with_template(fresh_tokenizer, "qwen2.5")
    broken_args = weather_row(2)
    broken_args["messages"][1]["tool_calls"][0]["function"]["arguments"] = '{"city": "Town'
    no_name = weather_row(3)
    no_name["messages"][1]["tool_calls"][0]["function"].pop("name")
    user_calls = weather_row(4)
    user_calls["messages"][0]["tool_calls"] = user_calls["messages"][1]["tool_calls"]
    bad_tools = {**weather_row(5), "tools": "not a list"}
    rows = [weather_row(1)] * 16 + [broken_args, no_name, user_calls, bad_tools]
    bundle = build(tmp_path, rows, tok, max_bad_fraction=0.25)
    reasons = "\n".join(bundle.summary.bad_row_reasons)
    assert bundle.summary.bad_rows == [17, 18, 19, 20]
    assert "arguments are not valid JSON" in reasons and "needs a function name" in reasons
    assert "only assistant turns call tools" in reasons and "'tools' must be a list" in reasons


def test_template_without_tool_support_is_refused_naming_the_model(tmp_path, fresh_tokenizer):
    """The tiny model's plain ChatML template ignores tools and tool_calls: training would silently lose them."""
    with pytest.raises(DataError) as err:
        build(tmp_path, [weather_row(i) for i in range(4)] + arithmetic_rows(4), fresh_tokenizer,
              model_name="org/tiny-base")
    message = err.value.message
    assert "4 rows call tools" in message and "org/tiny-base" in message and "tool list and tool calls" in message
    assert "model.chat_template: chatml, llama3 or mistral" in err.value.hint and "\n" not in message
    assert err.value.key == "model.chat_template"
    assert build(tmp_path, arithmetic_rows(4), fresh_tokenizer).train  # rows without tools: as before


def test_sharegpt_function_call_and_observation_turns(tmp_path, fresh_tokenizer):
    """ShareGPT tool sets: a function_call turn holds the call's JSON, an observation turn the result,
    ``tools`` is a JSON string of bare function definitions."""
    tok = with_template(fresh_tokenizer, "qwen2.5")
    row = {"conversations": [
        {"from": "human", "value": "Time in Town1?"},
        {"from": "function_call", "value": json.dumps({"name": "get_time", "arguments": {"city": "Town1"}})},
        {"from": "observation", "value": json.dumps({"time": "10:00"})},
        {"from": "gpt", "value": "It is 10:00."}], "tools": json.dumps([TIME_TOOL])}
    sample = build(tmp_path, [row], tok).train[0]
    assert trained_runs(tok, sample) == [
        '<tool_call>\n{"name": "get_time", "arguments": {"city": "Town1"}}\n</tool_call><|im_end|>',
        "It is 10:00.<|im_end|>"]
    assert "Local time of a city." in tok.decode(sample["input_ids"])


def test_heldout_tool_rows_keep_tools_and_the_rendered_call_as_reference(tmp_path, fresh_tokenizer):
    """The export check prompts with the tool list and teacher-forces the call text the model was trained on."""
    tok = with_template(fresh_tokenizer, "llama3.1")
    rows = []
    for i in range(10):
        row = weather_row(i)
        row["messages"] = row["messages"][:2]  # ends with the call
        rows.append(row)
    bundle = build(tmp_path, rows, tok, val_fraction=0.2)
    assert len(bundle.heldout) == 2
    for held in bundle.heldout:
        assert held["tools"][0]["function"]["name"] == "get_weather"
        assert [m["role"] for m in held["messages"]] == ["user"]
        assert held["reference"].startswith('{"name": "get_weather", "parameters": {"city": "Town')
        assert not held["reference"].endswith("<|eot_id|>")
    from qlora_kit.inference.chat import render_chat

    prompt = render_chat(tok, bundle.heldout[0]["messages"], bundle.heldout[0]["tools"])
    assert "Current weather of a city." in prompt and prompt.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")


def test_qwen_default_system_prompt_with_tools_is_reported(tmp_path, fresh_tokenizer):
    tok = with_template(fresh_tokenizer, "qwen2.5")
    bundle = build(tmp_path, [weather_row(1), *arithmetic_rows(3)], tok)
    assert bundle.summary.default_system_prompt == QWEN25_DEFAULT_SYSTEM
    assert "inserts its default system prompt into 4 rows" in bundle.summary.system_prompt_note
