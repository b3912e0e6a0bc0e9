"""Chat templates by name: model.chat_template: chatml | llama3 | mistral (issue 21)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import arithmetic_rows, write_jsonl
from data_rows import trained_runs
from tool_rows import two_question_row, weather_row

from qlora_kit.core.config import CHAT_TEMPLATE_NAMES, DataConfig, ModelConfig
from qlora_kit.core.errors import ConfigError, DataError
from qlora_kit.data.build import build_data
from qlora_kit.data.system_prompt import template_default_system
from qlora_kit.data.tools import tool_support_problem
from qlora_kit.export.modelfile import chat_format, write_modelfile
from qlora_kit.inference.chat import eos_token_ids
from qlora_kit.model import templates
from qlora_kit.model.base import load_tokenizer

LLAMA3_TOKENS = ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
# family the Modelfile recognises, end-of-turn token, reply text the template trains on
EXPECTED = {"chatml": ("chatml", "<|im_end|>", "4<|im_end|>"), "llama3": ("llama3", "<|eot_id|>", "4<|eot_id|>"),
            "mistral": ("mistral", "<|im_end|>", " 4<|im_end|>")}


@pytest.fixture
def base_model(tiny_llama: Path, tmp_path: Path) -> Path:
    """The tiny model as a *base* model: its tokenizer has no chat template, but Llama-3's header tokens."""
    from transformers import AutoTokenizer

    out = tmp_path / "base"
    out.mkdir()
    for f in tiny_llama.iterdir():
        if f.is_file():
            (out / f.name).write_bytes(f.read_bytes())
    tok = AutoTokenizer.from_pretrained(out)
    tok.chat_template = None
    tok.add_tokens(LLAMA3_TOKENS, special_tokens=True)
    tok.save_pretrained(out)
    config = json.loads((out / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (out / "tokenizer_config.json").write_text(json.dumps(config))
    (out / "chat_template.jinja").unlink(missing_ok=True)
    return out


def test_every_name_the_config_accepts_has_a_template_file() -> None:
    assert set(CHAT_TEMPLATE_NAMES) == set(templates.MARKERS) == {p.stem for p in templates.TEMPLATE_DIR.glob("*.jinja")}


@pytest.mark.parametrize("name", CHAT_TEMPLATE_NAMES)
def test_named_template_trains_renders_tools_and_carries_its_stop_into_the_export(name, base_model, tmp_path):
    tok = load_tokenizer(base_model, ModelConfig(name_or_path=str(base_model), chat_template=name))
    family, end_of_turn, reply = EXPECTED[name]
    assert tok.chat_template == templates.named_template(name)
    rows = [{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2 + 2 ?"},
                          {"role": "assistant", "content": "4"}]}]
    path = write_jsonl(tmp_path / "rows.jsonl", rows + [weather_row(1), two_question_row(2)])
    bundle = build_data(DataConfig(path=str(path), val_fraction=0.0), tok, 2048, 0)
    assert trained_runs(tok, bundle.train[0]) == [reply]
    assert [len(trained_runs(tok, s)) for s in bundle.train[1:]] == [2, 3]  # call + answer; greeting + call + answer
    assert tool_support_problem(tok, {"tools", "calls", "results"}) is None
    assert template_default_system(tok) is None
    # generation_config.json's EOS ids and the Modelfile's stops follow the template's end of turn
    eos = eos_token_ids(tok)
    assert tok.convert_tokens_to_ids(end_of_turn) in eos
    fmt = chat_format(tok, eos, bos_added_by_runtime=True)
    assert fmt.family == family and fmt.warning is None and end_of_turn in fmt.stops
    assert f'PARAMETER stop "{end_of_turn}"' in write_modelfile(fmt, "m.gguf", "m")


def test_named_template_whose_markers_the_tokenizer_lacks_is_refused(tiny_llama) -> None:
    """The tiny tokenizer has no <|eot_id|>: llama3 would end replies with pieces of text nothing stops on."""
    with pytest.raises(ConfigError) as err:
        load_tokenizer(tiny_llama, ModelConfig(name_or_path="org/tiny", chat_template="llama3"))
    assert "llama3 needs <|start_header_id|>, <|end_header_id|>, <|eot_id|>" in err.value.message
    assert "org/tiny" in err.value.message and "model.chat_template: mistral" in err.value.hint
    assert err.value.key == "model.chat_template" and "\n" not in err.value.message
    assert load_tokenizer(tiny_llama, ModelConfig(name_or_path="x", chat_template="chatml")).chat_template \
        == templates.named_template("chatml")


def test_jinja_text_is_used_as_given(tiny_llama) -> None:
    jinja = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    assert load_tokenizer(tiny_llama, ModelConfig(name_or_path="x", chat_template=jinja)).chat_template == jinja


@pytest.mark.parametrize(("value", "said"), [("chatm", "did you mean 'chatml'?"), ("vicuna", "names: chatml, llama3"),
                                             ("  ", "is empty")])
def test_unknown_names_are_config_errors(value: str, said: str) -> None:
    from qlora_kit.core.config import validate

    with pytest.raises(ConfigError) as err:
        validate({"model": {"name_or_path": "x", "chat_template": value}, "data": {"path": "d.jsonl"},
                  "output_dir": "o"})
    assert said in err.value.message and "model.chat_template" in err.value.message


def test_base_model_without_template_is_refused_pointing_at_the_setting(base_model, tmp_path) -> None:
    tok = load_tokenizer(base_model, ModelConfig(name_or_path=str(base_model)))
    path = write_jsonl(tmp_path / "rows.jsonl", arithmetic_rows(4))
    with pytest.raises(DataError) as err:
        build_data(DataConfig(path=str(path)), tok, 64, 0)
    assert "no chat template" in err.value.message and "\n" not in err.value.message
    assert "model.chat_template: chatml, llama3 or mistral" in err.value.hint
