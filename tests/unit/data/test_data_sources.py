"""Several data sources in one run (data.datasets), bad .jsonl lines, hub subsets and row limits (issue 21)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
from conftest import arithmetic_rows, write_jsonl
from data_rows import rows_in_format

from qlora_kit.core.config import DataConfig
from qlora_kit.core.errors import DataError
from qlora_kit.data.build import DataBundle, build_data
from qlora_kit.data.sources import validation_counts


def three_files(tmp_path: Path) -> dict[str, Path]:
    """A messages, a ShareGPT and an Alpaca file (the Alpaca one as .json)."""
    alpaca = tmp_path / "alpaca.json"
    alpaca.write_text(json.dumps(rows_in_format("alpaca", 30)))
    return {"messages": write_jsonl(tmp_path / "chat.jsonl", arithmetic_rows(40)),
            "sharegpt": write_jsonl(tmp_path / "share.jsonl", rows_in_format("sharegpt", 20)), "alpaca": alpaca}


def mixed(files: dict[str, Path], tokenizer: Any, seed: int = 0, entries: list[dict[str, Any]] | None = None,
          **data: Any) -> DataBundle:
    entries = entries or [{"path": str(p)} for p in files.values()]
    return build_data(DataConfig(datasets=entries, **{"val_fraction": 0.1, **data}), tokenizer, 256, seed)


def test_each_source_keeps_its_format_and_is_audited_on_its_own(tmp_path, fresh_tokenizer):
    files = three_files(tmp_path)
    with files["messages"].open("a") as f:
        f.write('{"messages": [{"role": "user", "content": "cut off\n')  # line 41: truncated JSON
    bundle = mixed(files, fresh_tokenizer, max_bad_fraction=0.05)
    s = bundle.summary
    assert [(x.key, x.format, x.rows, x.bad_rows) for x in s.sources] == [
        ("data.datasets[1]", "messages", 41, [41]), ("data.datasets[2]", "sharegpt", 20, []),
        ("data.datasets[3]", "alpaca", 30, [])]
    assert s.format == "messages+sharegpt+alpaca" and s.bad_total == 1 and s.rows == 91
    assert "data.datasets[1] line 41: not valid JSON" in s.bad_row_reasons[0]
    assert sum(x.train_rows + x.val_rows for x in s.sources) == len(bundle.train) + len(bundle.val) == 90
    assert s.tokens == sum(x.tokens for x in s.sources) and s.trainable_tokens == sum(x.trainable_tokens for x in s.sources)
    assert all(x.preview for x in s.sources)  # a masked preview per source
    json.dumps(s.to_json())


def test_one_source_over_max_bad_fraction_stops_the_run_naming_it(tmp_path, fresh_tokenizer):
    """The 60 % of the issue: a wrong format in one file is that file's problem, not diluted by the others."""
    files = three_files(tmp_path)
    entries = [{"path": str(files["messages"])}, {"path": str(files["sharegpt"]), "format": "alpaca"}]
    with pytest.raises(DataError, match="share.jsonl have fields"):
        mixed(files, fresh_tokenizer, entries=entries)
    broken = write_jsonl(tmp_path / "broken.jsonl", rows_in_format("sharegpt", 10) + [{"conversations": "x"}] * 3)
    with pytest.raises(DataError, match=r"3 of 13 rows of .*broken.jsonl are malformed"):
        mixed(files, fresh_tokenizer, entries=[{"path": str(files["messages"])}, {"path": str(broken)}])


def test_weights_repeat_or_subsample_deterministically(tmp_path, fresh_tokenizer):
    files = three_files(tmp_path)
    entries = [{"path": str(files["messages"]), "weight": 2}, {"path": str(files["sharegpt"]), "weight": 0.5},
               {"path": str(files["alpaca"]), "weight": 1.5}]
    a = mixed(files, fresh_tokenizer, entries=entries)
    used = [(x.train_rows, x.used_rows) for x in a.summary.sources]
    assert used == [(36, 72), (18, 9), (27, 27 + 14)]  # 2x; a seeded half; once plus a seeded half
    assert len(a.train) == sum(u for _, u in used)
    assert mixed(files, fresh_tokenizer, entries=entries).train == a.train  # same seed: the same mix
    other = mixed(files, fresh_tokenizer, seed=1, entries=entries)
    assert other.train != a.train and len(other.train) == len(a.train)


def test_validation_rows_come_from_every_source_in_proportion(tmp_path, fresh_tokenizer):
    files = three_files(tmp_path)
    bundle = mixed(files, fresh_tokenizer, val_fraction=0.2, val_max_rows=9)
    assert [x.val_rows for x in bundle.summary.sources] == [4, 2, 3]  # wanted 8/4/6, capped at 9 in proportion
    assert len(bundle.heldout) == len(bundle.val) == 9
    assert validation_counts([40, 20, 30], 0.2, 9, [False] * 3) == [4, 2, 3]
    assert validation_counts([100], 0.05, 200, [False]) == [5]  # one source: as data.path always did
    assert validation_counts([2, 1, 50], 0.01, 200, [False, False, True]) == [1, 0, 50]


def test_per_source_and_shared_validation_files(tmp_path, fresh_tokenizer):
    files = three_files(tmp_path)
    val = write_jsonl(tmp_path / "val.jsonl", arithmetic_rows(5, seed=7))
    entries = [{"path": str(files["messages"]), "val_path": str(val)}, {"path": str(files["sharegpt"])}]
    bundle = mixed(files, fresh_tokenizer, entries=entries)
    assert [(x.train_rows, x.val_rows) for x in bundle.summary.sources] == [(40, 5), (18, 2)]
    shared = mixed(files, fresh_tokenizer, entries=[{"path": str(files["messages"])}, {"path": str(files["sharegpt"])}],
                   val_path=str(val))
    assert [(x.key, x.train_rows, x.val_rows) for x in shared.summary.sources] == [
        ("data.datasets[1]", 40, 0), ("data.datasets[2]", 20, 0), ("data.val_path", 0, 5)]
    assert shared.fingerprint["val_sha256"] == hashlib.sha256(val.read_bytes()).hexdigest()


def test_max_rows_takes_a_seeded_choice(tmp_path, fresh_tokenizer):
    files = three_files(tmp_path)
    entries = [{"path": str(files["messages"]), "max_rows": 10}, {"path": str(files["alpaca"])}]
    a = mixed(files, fresh_tokenizer, entries=entries, val_fraction=0.0)
    assert [x.rows for x in a.summary.sources] == [10, 30]
    assert mixed(files, fresh_tokenizer, entries=entries, val_fraction=0.0).train == a.train


def test_fingerprint_names_each_source_by_content(tmp_path, fresh_tokenizer):
    files = three_files(tmp_path)
    bundle = mixed(files, fresh_tokenizer)
    sources = bundle.fingerprint["sources"]
    assert [s["key"] for s in sources] == ["data.datasets[1]", "data.datasets[2]", "data.datasets[3]"]
    assert sources[2]["sha256"] == hashlib.sha256(files["alpaca"].read_bytes()).hexdigest()
    moved = tmp_path / "moved"
    moved.mkdir()
    copies = {k: Path(moved / p.name) for k, p in files.items()}
    for k, p in files.items():
        copies[k].write_bytes(p.read_bytes())
    assert mixed(copies, fresh_tokenizer).fingerprint["sha256"] == bundle.fingerprint["sha256"]  # content, not place
    write_jsonl(copies["sharegpt"], rows_in_format("sharegpt", 21))
    assert mixed(copies, fresh_tokenizer).fingerprint["sha256"] != bundle.fingerprint["sha256"]


def test_single_path_is_unchanged(tmp_path, fresh_tokenizer):
    """data.path: the same samples, split and fingerprint keys as before data.datasets existed."""
    path = write_jsonl(tmp_path / "t.jsonl", arithmetic_rows(30))
    one = build_data(DataConfig(path=str(path), val_fraction=0.2), fresh_tokenizer, 64, 3)
    listed = build_data(DataConfig(datasets=[{"path": str(path)}], val_fraction=0.2), fresh_tokenizer, 64, 3)
    assert one.train == listed.train and one.val == listed.val
    assert set(one.fingerprint) == {"path", "sha256", "val_path", "val_sha256", "format"}


def test_bad_jsonl_lines_are_skipped_and_listed(tmp_path, fresh_tokenizer, caplog):
    path = tmp_path / "rows.jsonl"
    lines = [json.dumps(r).encode() for r in arithmetic_rows(200)]
    lines[9] = lines[9][:25]  # line 10: cut off
    lines[99] = b"\xff\xfe not text"  # line 100: not UTF-8
    path.write_bytes(b"\n".join(lines) + b"\n")
    with caplog.at_level("WARNING", logger="qlora_kit"):
        bundle = build_data(DataConfig(path=str(path), val_fraction=0.0), fresh_tokenizer, 64, 0)
    assert bundle.summary.bad_rows == [10, 100] and len(bundle.train) == 198
    assert "not valid JSON" in bundle.summary.bad_row_reasons[0] and "not UTF-8" in bundle.summary.bad_row_reasons[1]
    assert "lines 10, 100" in caplog.text


def test_json_array_that_does_not_parse_is_one_error(tmp_path, fresh_tokenizer):
    path = tmp_path / "rows.json"
    path.write_text(json.dumps(arithmetic_rows(5))[:-20])
    with pytest.raises(DataError) as err:
        build_data(DataConfig(path=str(path)), fresh_tokenizer, 64, 0)
    assert "invalid JSON at line 1" in err.value.message and "\n" not in err.value.message


def test_hub_subset_and_max_rows_go_through_load_dataset(fresh_tokenizer, monkeypatch):
    import datasets

    calls = []

    def fake_load(name, *args, split):
        calls.append((name, *args, split))
        return datasets.Dataset.from_list(rows_in_format("prompt_completion", 30))

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    cfg = DataConfig(datasets=[{"path": "org/tools", "subset": "en", "split": "dev", "max_rows": 12},
                               {"path": "org/chat"}], val_fraction=0.0)
    bundle = build_data(cfg, fresh_tokenizer, 64, 0)
    assert calls == [("org/tools", "en", "dev"), ("org/chat", "train")]
    assert [(x.source, x.rows) for x in bundle.summary.sources] == [("org/tools [en/dev]", 12), ("org/chat [train]", 30)]
    assert build_data(cfg, fresh_tokenizer, 64, 0).train == bundle.train


def test_hub_missing_subset_or_offline_is_one_line(fresh_tokenizer, monkeypatch):
    import datasets

    def no_config(name, *args, split):
        raise ValueError("BuilderConfig 'xx' not found. Available: ['en', 'de']")

    monkeypatch.setattr(datasets, "load_dataset", no_config)
    with pytest.raises(DataError) as err:
        build_data(DataConfig(path="org/set", subset="xx"), fresh_tokenizer, 64, 0)
    assert "has no subset 'xx'" in err.value.message and "'en', 'de'" in err.value.message

    def offline(name, *args, split):
        raise ConnectionError("offline")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError) as err:
        build_data(DataConfig(datasets=[{"path": "org/set", "subset": "en"}]), fresh_tokenizer, 64, 0)
    assert "hub cannot be reached" in err.value.message and "\n" not in err.value.message
    assert err.value.key == "data.datasets[1].path"


def test_local_file_with_a_subset_is_refused(tmp_path, fresh_tokenizer):
    path = write_jsonl(tmp_path / "t.jsonl", arithmetic_rows(5))
    with pytest.raises(DataError, match="has no subsets"):
        build_data(DataConfig(datasets=[{"path": str(path), "subset": "en"}]), fresh_tokenizer, 64, 0)
