"""Reading local files and hub datasets (data.read)."""

from __future__ import annotations

import csv
import json

import pytest
from conftest import arithmetic_rows
from data_rows import (
    build,
    rows_in_format,
)

from qlora_kit.core.config import DataConfig
from qlora_kit.core.errors import DataError
from qlora_kit.data import build as D_build


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


def test_deeply_nested_json_row_is_a_data_error(tmp_path, tok):
    path = tmp_path / "deep.jsonl"
    path.write_text(json.dumps(arithmetic_rows(1)[0]) + "\n" + "[" * 100_000 + "]" * 100_000 + "\n")
    with pytest.raises(DataError, match="line 2: nests JSON too deeply"):
        D_build.build_data(DataConfig(path=str(path), val_fraction=0.0), tok, 64, 0)
    (tmp_path / "deep.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(DataError, match="nests JSON too deeply"):
        D_build.build_data(DataConfig(path=str(tmp_path / "deep.json"), val_fraction=0.0), tok, 64, 0)
