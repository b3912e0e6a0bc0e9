"""Reading training rows: local .jsonl/.json/.parquet/.csv files and hub datasets."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Iterator

from qlora_kit.core.diskspace import format_bytes
from qlora_kit.core.errors import DataError
from qlora_kit.core.files import file_sha256

LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")
MAX_LINE_BYTES = 64 * 1024**2  # one .jsonl line (one training row); far above any row a 7B model trains on
MEMORY_SHARE = 4  # a data file may take at most 1/4 of the memory available: parsed rows take several times the bytes


_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?$")


@dataclass
class Source:
    """Raw records of one data file or hub split, numbered from 1."""

    label: str
    records: list[tuple[int, Any]]
    unit: str
    sha256: str


def read_source(path: str, split: str = "train", key: str = "data.path") -> Source:
    """Read the records of a local data file, or of a hub dataset split (``key``: the config key naming it).

    Raises:
        DataError: missing file, directory, unsupported type, unreadable or empty file,
            invalid JSON (with the line), or a hub dataset that cannot be loaded.
    """
    p = Path(path).expanduser()
    if p.exists():
        return read_local(p, key)
    if p.suffix.lower() in LOCAL_SUFFIXES or path.startswith((".", "/", "~")) or not _HUB_NAME.match(path):
        where = "" if p.is_absolute() else f" (relative to the current directory {Path.cwd()})"
        raise DataError(f"data file {p} does not exist{where}", f"check {key}", key=key)
    return read_hub(path, split)


def read_local(p: Path, key: str = "data.path") -> Source:
    """Read a local .jsonl/.json/.parquet/.csv file into numbered records.

    Raises:
        DataError: directory, device/FIFO/socket, unsupported suffix, a file too large for the memory,
            undecodable/invalid content, or no rows.
    """
    if p.is_dir():
        found = sorted(x.name for x in p.iterdir() if x.suffix.lower() in LOCAL_SUFFIXES)[:5]
        hint = f"point {key} at a file inside it, e.g. {p / found[0]}" if found else f"point {key} at a file"
        raise DataError(f"data path {p} is a directory, not a data file", hint)
    check_regular_file(p, key)
    check_size(p, key)
    readers = {".jsonl": read_jsonl, ".json": read_json, ".parquet": read_parquet, ".csv": read_csv}
    reader = readers.get(p.suffix.lower())
    if reader is None:
        kind = p.suffix or "(none)"
        raise DataError(f"unsupported data file type {kind!r}: {p}", "use .jsonl, .json, .parquet or .csv")
    records = reader(p)
    if not records:
        raise DataError(f"data file {p} is empty (no rows)", "add rows, e.g. one JSON object per line in .jsonl")
    unit = "line" if p.suffix.lower() == ".jsonl" else "row"
    return Source(str(p.absolute()), records, unit, file_sha256(p))


_KINDS = ((stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
          (stat.S_ISSOCK, "a socket"))


def check_regular_file(p: Path, key: str) -> None:
    """Refuse a device (``/dev/zero``), FIFO or socket before opening it: reading one never ends or blocks.

    Raises:
        DataError: ``p`` (after symlinks) is not a regular file.
    """
    mode = os.stat(p).st_mode
    if stat.S_ISREG(mode):
        return
    kind = next((name for test, name in _KINDS if test(mode)), "not a file")
    raise DataError(f"data path {p} is {kind}, not a regular file", f"point {key} at a .jsonl, .json, .parquet or "
                    ".csv file (a pipe or device can be saved to a file first)", key=key)


def memory_limit() -> int:
    """The largest data file read: a ``MEMORY_SHARE`` of the memory available now."""
    import psutil

    return psutil.virtual_memory().available // MEMORY_SHARE


def check_size(p: Path, key: str) -> None:
    """Refuse a file too large to read into memory (its parsed rows take several times its bytes).

    Raises:
        DataError: with the file's size and the limit.
    """
    size, limit = p.stat().st_size, memory_limit()
    if size > limit:
        raise DataError(f"data file {p} is {format_bytes(size)}, larger than the {format_bytes(limit)} it may take "
                        f"(1/{MEMORY_SHARE} of the {format_bytes(limit * MEMORY_SHARE)} of memory available)",
                        f"point {key} at a smaller file (e.g. a sample of its rows), or run where more memory is "
                        "free", key=key)


def _lines(f: BinaryIO, p: Path) -> Iterator[tuple[int, bytes]]:
    """Numbered lines of ``f``, each read with at most ``MAX_LINE_BYTES`` in memory.

    Raises:
        DataError: a line longer than that.
    """
    number = 0
    while raw := f.readline(MAX_LINE_BYTES + 1):
        number += 1
        if len(raw) > MAX_LINE_BYTES:
            raise DataError(f"{p}: line {number} is longer than {format_bytes(MAX_LINE_BYTES)} (the longest row "
                            "read)", "split or shorten that row, or check that the file is really .jsonl text")
        yield number, raw


def read_jsonl(p: Path) -> list[tuple[int, Any]]:
    """One JSON value per non-blank line, numbered by file line (each line bounded by ``MAX_LINE_BYTES``).

    Raises:
        DataError: a line that is too long, not UTF-8 or not valid JSON (naming the line).
    """
    records = []
    with p.open("rb") as f:
        for number, raw in _lines(f, p):
            try:
                line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as exc:
                msg = f"{p}: line {number} is not UTF-8 text ({exc.reason})"
                raise DataError(msg, "save the file as UTF-8") from exc
            if not line.strip():
                continue
            try:
                records.append((number, json.loads(line)))
            except json.JSONDecodeError as exc:
                raise DataError(
                    f"{p}: line {number} is not valid JSON ({exc.msg}, column {exc.colno})", _jsonl_hint(number, line)
                ) from exc
            except RecursionError:
                raise DataError(f"{p}: line {number} nests JSON too deeply to be a training row",
                                "fix or remove that line (a row is a few levels of objects and lists)") from None
    return records


def _jsonl_hint(number: int, line: str) -> str:
    if number == 1 and line.lstrip().startswith("["):
        return "the file looks like one JSON array: rename it to .json, or write one object per line"
    return "fix or remove that line (.jsonl needs exactly one JSON object per line)"


def _read_bounded(p: Path, limit: int) -> bytearray:
    """The file's bytes, read in chunks and never more than ``limit`` (its size may lie: /proc, a growing file).

    Raises:
        DataError: the file holds more than ``limit`` bytes.
    """
    data = bytearray()
    with p.open("rb") as f:
        while chunk := f.read(16 * 1024**2):
            data += chunk
            if len(data) > limit:
                raise DataError(f"{p} holds more than the {format_bytes(limit)} of memory a data file may take",
                                "point data.path at a smaller file (e.g. a sample of its rows)")
    return data


def read_json(p: Path) -> list[tuple[int, Any]]:
    """A JSON list of rows, or an object with the rows under ``"data"``.

    Raises:
        DataError: invalid JSON (with line/column) or a top level that holds no row list.
    """
    try:
        text = _read_bounded(p, memory_limit()).decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(f"{p} is not UTF-8 text ({exc.reason})", "save the file as UTF-8") from exc
    if not text.strip():
        return []
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(
            f"{p}: invalid JSON at line {exc.lineno}, column {exc.colno} ({exc.msg})",
            "fix the JSON there (one row per line needs the .jsonl suffix)",
        ) from exc
    except RecursionError:
        raise DataError(f"{p} nests JSON too deeply to hold training rows",
                        "fix the file (a row is a few levels of objects and lists)") from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        keys = sorted(data)[:8] if isinstance(data, dict) else type(data).__name__
        raise DataError(f"{p}: expected a list of rows or {{\"data\": [...]}}, found {keys}", "wrap the rows in a list")
    return list(enumerate(data, 1))


def read_parquet(p: Path) -> list[tuple[int, Any]]:
    """Rows of a parquet file as dicts (nested lists/structs become lists/dicts).

    Raises:
        DataError: the file is not valid parquet.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        meta = pq.ParquetFile(p).metadata
        unpacked = sum(meta.row_group(i).total_byte_size for i in range(meta.num_row_groups))
        if unpacked > (limit := memory_limit()):
            raise DataError(f"parquet file {p} unpacks to {format_bytes(unpacked)}, more than the "
                            f"{format_bytes(limit)} of memory a data file may take",
                            "point data.path at a smaller file (e.g. a sample of its rows)")
        table = pq.read_table(p)
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"cannot read parquet file {p}: {exc}", "check that it is a complete parquet file") from exc
    return list(enumerate(table.to_pylist(), 1))


def read_csv(p: Path) -> list[tuple[int, Any]]:
    """Rows of a CSV file with a header line, as dicts of strings.

    Raises:
        DataError: the file is not UTF-8 or not parseable CSV.
    """
    try:
        with p.open(newline="", encoding="utf-8-sig") as f:
            return list(enumerate(csv.DictReader(f), 1))
    except (UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"cannot read CSV file {p}: {exc}", "save it as UTF-8 CSV with a header line") from exc


def read_hub(name: str, split: str) -> Source:
    """Load a hub dataset split with ``datasets.load_dataset``.

    Raises:
        DataError: the dataset or split does not exist, or the hub cannot be reached.
    """
    import datasets
    from datasets.exceptions import DatasetNotFoundError

    try:
        ds = datasets.load_dataset(name, split=split)
    except DatasetNotFoundError as exc:
        raise DataError(f"dataset {name!r} not found: not a local file and not on the hub", _HUB_HINT) from exc
    except ConnectionError as exc:
        raise DataError(
            f"data.path {name!r} is not a local file and the hub cannot be reached (offline?)",
            "check the path, or download the dataset while online so it is cached",
        ) from exc
    except (ValueError, KeyError) as exc:
        if "split" in str(exc).lower():
            msg = f"dataset {name!r} has no split {split!r}: {exc}"
            raise DataError(msg, "set data.split to an existing split") from exc
        raise DataError(f"cannot load dataset {name!r}: {exc}", _HUB_HINT) from exc
    except (OSError, datasets.exceptions.DatasetsError) as exc:
        raise DataError(f"cannot load dataset {name!r}: {exc}", _HUB_HINT) from exc
    if not hasattr(ds, "to_list"):
        raise DataError(f"dataset {name!r} split {split!r} did not load as one table", "set data.split")
    records = list(enumerate(ds.to_list(), 1))
    if not records:
        raise DataError(f"dataset {name!r} split {split!r} is empty", "choose another data.split")
    token = f"{name}|{split}|{getattr(ds, '_fingerprint', '')}"
    return Source(f"{name} [{split}]", records, "row", hashlib.sha256(token.encode()).hexdigest())


_HUB_HINT = "check data.path: a local .jsonl/.json/.parquet/.csv file or a hub dataset name like org/name"
