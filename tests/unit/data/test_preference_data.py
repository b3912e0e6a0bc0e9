"""Preference rows: detection, parsing, bad rows, SFT-identical rendering, the pair cut, batches and the audit."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import write_jsonl

from qlora_kit.core.config import DataConfig
from qlora_kit.core.errors import DataError
from qlora_kit.data.pairs import parse_pair
from qlora_kit.data import preference as pref
from qlora_kit.data.build import build_data
from qlora_kit.data.formats import RowProblem
from qlora_kit.data.summary import summary_rows

IGNORE = -100


@pytest.fixture(scope="module")
def tokenizer(tiny_llama: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_llama)


def chat_pair(a: int, good: str, bad: str, system: str | None = None) -> dict:
    prompt = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": f"{a} ?"}]
    return {"prompt": prompt, "chosen": [{"role": "assistant", "content": good}],
            "rejected": [{"role": "assistant", "content": bad}]}


def build(path: Path, tokenizer, max_length: int = 64, **data) -> object:
    return build_data(DataConfig(path=str(path), **{"val_fraction": 0.0, **data}), tokenizer, max_length, 0)


def test_rows_are_detected_and_both_sides_render_exactly_as_sft_rows(tmp_path: Path, tokenizer) -> None:
    pairs = write_jsonl(tmp_path / "p.jsonl", [chat_pair(i, f"{i} is it", f"no {i + 1}") for i in range(6)])
    bundle = build(pairs, tokenizer)
    assert bundle.summary.format == "preference" and bundle.summary.format_detected
    sft_rows = [{"messages": chat_pair(i, "", "")["prompt"] + [{"role": "assistant", "content": side}]}
                for i in range(6) for side in (f"{i} is it", f"no {i + 1}")]
    sft = build(write_jsonl(tmp_path / "s.jsonl", sft_rows), tokenizer, format="messages").train
    for k, sample in enumerate(bundle.train):
        (ci, cl), (ri, rl) = pref.split_pair(sample)
        assert (ci, cl) == (sft[2 * k]["input_ids"], sft[2 * k]["labels"])
        assert (ri, rl) == (sft[2 * k + 1]["input_ids"], sft[2 * k + 1]["labels"])


def test_string_rows_train_on_the_completion_only(tmp_path: Path, tokenizer) -> None:
    rows = [{"prompt": f"say {i}", "chosen": f" yes {i}", "rejected": f" no {i}"} for i in range(4)]
    bundle = build(write_jsonl(tmp_path / "p.jsonl", rows), tokenizer)
    (ci, cl), _ = pref.split_pair(bundle.train[0])
    trained = tokenizer.decode([t for t, lab in zip(ci, cl) if lab != IGNORE])
    assert "yes 0" in trained and "say" not in trained  # the chat template's assistant turn, not the prompt


@pytest.mark.parametrize("row, reason", [
    ({"prompt": "a", "rejected": "b"}, "missing field 'chosen'"),
    ({"prompt": "a", "chosen": "b"}, "missing field 'rejected'"),
    ({"prompt": "a", "chosen": "  ", "rejected": "b"}, "field 'chosen' is empty"),
    ({"prompt": "a", "chosen": "b", "rejected": "b "}, "chosen and rejected are the same"),
    ({"prompt": [{"role": "user", "content": "a"}], "chosen": [{"role": "assistant", "content": ""}],
      "rejected": [{"role": "assistant", "content": "x"}]}, "field 'chosen' has no text"),
    ({"prompt": [{"role": "user", "content": "a"}], "chosen": "b", "rejected": [{"role": "assistant", "content": "c"}]},
     "field 'chosen' must be a list of turns"),
    ({"prompt": [{"role": "user", "content": "a"}], "chosen": [{"role": "user", "content": "b"}],
      "rejected": [{"role": "assistant", "content": "c"}]}, "chosen has no assistant turn"),
])
def test_bad_rows_name_their_reason(row: dict, reason: str) -> None:
    with pytest.raises(RowProblem, match=reason):
        parse_pair(1, row, chat_template=True)


def test_bad_rows_are_skipped_and_listed(tmp_path: Path, tokenizer) -> None:
    rows = [chat_pair(i, f"{i}", f"{i + 1}") for i in range(40)]
    rows[3] = {"prompt": "x", "chosen": "same", "rejected": "same"}
    rows[7] = {"prompt": "x", "rejected": "y"}
    bundle = build(write_jsonl(tmp_path / "p.jsonl", rows), tokenizer, max_bad_fraction=0.1)
    assert bundle.summary.bad_rows == [4, 8] and len(bundle.train) == 38
    assert "line 4: chosen and rejected are the same" in bundle.summary.bad_row_reasons[0]
    with pytest.raises(DataError, match="2 of 40 rows"):
        build(write_jsonl(tmp_path / "p.jsonl", rows), tokenizer)  # default max_bad_fraction 0.01


def test_a_long_pair_is_cut_the_same_way_on_both_sides_prompt_first(tmp_path: Path, tokenizer) -> None:
    long_prompt = " ".join(["hello"] * 60)
    rows = [{"prompt": [{"role": "user", "content": long_prompt}], "chosen": [{"role": "assistant", "content": "yes 1"}],
             "rejected": [{"role": "assistant", "content": "no 2 no"}]}]
    bundle = build(write_jsonl(tmp_path / "p.jsonl", rows), tokenizer, max_length=48)
    (ci, cl), (ri, rl) = pref.split_pair(bundle.train[0])
    assert max(len(ci), len(ri)) == 48 and bundle.summary.truncated == 1
    prompt_c = [t for t, lab in zip(ci, cl) if lab == IGNORE]
    first_c = next(i for i, lab in enumerate(cl) if lab != IGNORE)
    first_r = next(i for i, lab in enumerate(rl) if lab != IGNORE)
    assert first_c == first_r and ci[:first_c] == ri[:first_r], "the same prompt tokens on both sides"
    assert "yes 1" in tokenizer.decode([t for t, lab in zip(ci, cl) if lab != IGNORE]), "completion kept whole"
    assert "no 2 no" in tokenizer.decode([t for t, lab in zip(ri, rl) if lab != IGNORE])
    assert tokenizer.decode(prompt_c).rstrip().endswith("assistant"), "the prompt keeps its end (next to the answer)"


def test_completions_are_cut_at_the_same_length_and_identical_cuts_are_dropped(tokenizer) -> None:
    def side(prompt: int, completion: list[int]) -> pref.Encoded:
        ids = list(range(100, 100 + prompt)) + completion
        return pref.Encoded(1, {"input_ids": ids, "labels": [IGNORE] * prompt + completion}, False)

    pair = pref.join_sides(1, side(20, list(range(40))), side(20, list(range(1, 36))), 24)
    (ci, cl), (ri, rl) = pref.split_pair(pair.sample)
    # the prompt loses its oldest tokens down to max_length // 2, then both completions keep 12 tokens
    assert pair.truncated and pair.prompt_tokens == 12
    assert ci == list(range(108, 120)) + list(range(12)) and ri == list(range(108, 120)) + list(range(1, 13))
    assert cl == [IGNORE] * 12 + list(range(12)) and rl == [IGNORE] * 12 + list(range(1, 13))
    same = pref.join_sides(2, side(10, list(range(40)) + [1]), side(10, list(range(40)) + [2]), 24)
    assert same.sample is None and same.dropped == "chosen and rejected are the same after truncation"


def test_summary_counts_pairs_tokens_per_side_and_truncation(tmp_path: Path, tokenizer) -> None:
    rows = [chat_pair(i, f"{i} yes", f"{i} no no no") for i in range(10)]
    rows.append({"prompt": [{"role": "user", "content": " ".join(["hi"] * 300)}],
                 "chosen": [{"role": "assistant", "content": "a"}], "rejected": [{"role": "assistant", "content": "b"}]})
    bundle = build(write_jsonl(tmp_path / "p.jsonl", rows), tokenizer, max_length=40, val_fraction=0.2)
    s = bundle.summary
    assert (s.train_rows, s.val_rows, s.truncated) == (9, 2, 1)
    assert s.pairs["chosen_tokens"] < s.pairs["rejected_tokens"]
    assert s.pairs["chosen_trained"] < s.pairs["rejected_trained"]
    table = dict(summary_rows(s))
    assert table["pairs train / val"] == "9 / 2" and "tokens chosen / rejected" in table
    assert json.loads(json.dumps(s.to_json()))["pairs"]["dropped"] == {}
    assert bundle.heldout[0]["rejected"] and "reference" in bundle.heldout[0]


def test_packed_and_padded_batches_hold_the_same_sequences(tmp_path: Path, tokenizer) -> None:
    bundle = build(write_jsonl(tmp_path / "p.jsonl", [chat_pair(i, f"{i}", f"{i} x y") for i in range(3)]), tokenizer)
    packed = pref.collate_pairs(bundle.train, [[0, 1, 2]], tokenizer.pad_token_id, packing=True)
    padded = pref.collate_pairs(bundle.train, [[0], [1], [2]], tokenizer.pad_token_id, packing=False)
    assert packed["pair_weight"].tolist() == padded["pair_weight"].tolist() == [1.0] * 3
    assert padded["input_ids"].shape[0] == 6 and "attention_mask" in padded and "attention_mask" not in packed
    for k in range(6):
        row = packed["sequence_index"][0] == k
        keep = padded["attention_mask"][k].bool()
        assert torch.equal(packed["input_ids"][0][row], padded["input_ids"][k][keep])
        assert torch.equal(packed["labels"][0][row], padded["labels"][k][keep])
    assert packed["packed_seq_lens"] == tuple(int(m.sum()) for m in padded["attention_mask"])


def test_format_mismatches_are_config_errors(tmp_path: Path, tiny_llama: Path) -> None:
    from qlora_kit.core.config import validate
    from qlora_kit.core.errors import ConfigError

    base = {"model": {"name_or_path": str(tiny_llama)}, "data": {"path": "x.jsonl"}, "output_dir": "o"}
    with pytest.raises(ConfigError, match="set train.method"):
        validate({**base, "data": {"path": "x.jsonl", "format": "preference"}})
    with pytest.raises(ConfigError, match="set data.format to preference or auto"):
        validate({**base, "data": {"path": "x.jsonl", "format": "messages"}, "train": {"method": "dpo"}})
    with pytest.raises(ConfigError, match="train.beta applies to train.method dpo or orpo"):
        validate({**base, "train": {"beta": 0.5}})
    with pytest.raises(ConfigError, match="train.dpo_loss applies to train.method=dpo"):
        validate({**base, "train": {"method": "orpo", "dpo_loss": "ipo"}})
    with pytest.raises(ConfigError, match="needs lora.init=default"):
        validate({**base, "train": {"method": "dpo"}, "lora": {"init": "pissa"}})
    cfg = validate({**base, "train": {"method": "dpo"}})
    assert (cfg.train.beta, cfg.train.dpo_loss) == (0.1, "sigmoid")
