"""Reading training rows: local .jsonl/.json/.parquet/.csv files and hub datasets."""

from __future__ import annotations

import csv
import hashlib
import json
import random
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Iterator

from qlora_kit.core.diskspace import format_bytes
from qlora_kit.core.errors import DataError, shorten
from qlora_kit.core.files import file_sha256

LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")
MAX_LINE_BYTES = 64 * 1024**2  # one .jsonl line (one training row); far above any row a 7B model trains on
MEMORY_SHARE = 4  # a data file may take at most 1/4 of the memory available: parsed rows take several times the bytes


_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?$")


@dataclass(frozen=True)
class BadLine:
    """A line of a .jsonl file that could not be read as JSON: it becomes a bad row, not the end of the run."""

    reason: str


@dataclass
class Source:
    """Raw records of one data file or hub split, numbered from 1 (a :class:`BadLine` for an unreadable line)."""

    label: str
    records: list[tuple[int, Any]]
    unit: str
    sha256: str


def read_source(path: str, split: str = "train", key: str = "data.path", subset: str | None = None,
                max_rows: int | None = None, seed: int = 0) -> Source:
    """Read the records of a local data file, or of a hub dataset split (``key``: the config key naming it).

    ``max_rows``: keep a seeded random choice of at most that many records (:func:`choose_rows`), numbered as
    in the file; ``subset``: the hub dataset's configuration name.

    Raises:
        DataError: missing file, directory, unsupported type, unreadable or empty file,
            a .json file that does not parse, or a hub dataset that cannot be loaded.
    """
    p = Path(path).expanduser()
    if p.exists():
        if subset is not None:
            raise DataError(f"{key} is the local file {p}, which has no subsets", f"remove the subset of {key}",
                            key=key)
        source = read_local(p, key)
        if max_rows is not None and max_rows < len(source.records):
            keep = choose_rows(len(source.records), max_rows, seed)
            source.records = [source.records[i] for i in keep]
        return source
    if p.suffix.lower() in LOCAL_SUFFIXES or path.startswith((".", "/", "~")) or not _HUB_NAME.match(path):
        where = "" if p.is_absolute() else f" (relative to the current directory {Path.cwd()})"
        raise DataError(f"data file {p} does not exist{where}", f"check {key}", key=key)
    return read_hub(path, split, subset, max_rows, seed, key)


def choose_rows(total: int, max_rows: int, seed: int) -> list[int]:
    """Indices of a seeded random choice of ``max_rows`` of ``total`` rows, in their original order."""
    return sorted(random.Random(f"max_rows:{seed}").sample(range(total), max_rows))


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
    """One JSON value per non-blank line, numbered by file line (each line bounded by ``MAX_LINE_BYTES``); a line
    that is not UTF-8 JSON is a :class:`BadLine` (skipped and listed like any bad row, counted against
    ``data.max_bad_fraction``).

    Raises:
        DataError: a line that is too long; the file is one JSON array (its first line opens a list and is not
            JSON on its own).
    """
    records: list[tuple[int, Any]] = []
    with p.open("rb") as f:
        for number, raw in _lines(f, p):
            try:
                line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as exc:
                records.append((number, BadLine(f"not UTF-8 text ({exc.reason}); save the file as UTF-8")))
                continue
            if not line.strip():
                continue
            try:
                records.append((number, json.loads(line)))
            except json.JSONDecodeError as exc:
                if not records and line.lstrip().startswith("["):
                    raise DataError(f"{p}: line {number} is not valid JSON ({exc.msg}, column {exc.colno})",
                                    "the file looks like one JSON array: rename it to .json, or write one object per "
                                    "line") from exc
                records.append((number, BadLine(f"not valid JSON ({exc.msg}, column {exc.colno})")))
            except RecursionError:
                records.append((number, BadLine("nests JSON too deeply to be a training row")))
    return records


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


def read_hub(name: str, split: str, subset: str | None = None, max_rows: int | None = None, seed: int = 0,
             key: str = "data.path") -> Source:
    """Load a hub dataset split (of configuration ``subset``) with ``datasets.load_dataset``; with ``max_rows``,
    only a seeded choice of rows (``Dataset.select``) is converted. ``key``: the config key naming it.

    Raises:
        DataError: the dataset, subset or split does not exist, or the hub cannot be reached.
    """
    import datasets
    from datasets.exceptions import DatasetNotFoundError

    shown = name if subset is None else f"{name} ({subset})"
    try:
        ds = datasets.load_dataset(name, split=split) if subset is None else \
            datasets.load_dataset(name, subset, split=split)
    except DatasetNotFoundError as exc:
        raise DataError(f"dataset {name!r} not found: not a local file and not on the hub", _hub_hint(key),
                        key=key) from exc
    except ConnectionError as exc:
        raise DataError(
            f"{key} {name!r} is not a local file and the hub cannot be reached (offline?)",
            "check the path, or download the dataset while online so it is cached", key=key,
        ) from exc
    except (ValueError, KeyError) as exc:
        first = shorten(str(exc).splitlines()[0] if str(exc) else type(exc).__name__, 300)
        if subset is not None and "config" in str(exc).lower():
            raise DataError(f"dataset {name!r} has no subset {subset!r}: {first}",
                            "set the subset to one of the dataset's configurations", key=key) from exc
        if "split" in str(exc).lower():
            raise DataError(f"dataset {shown!r} has no split {split!r}: {first}",
                            "set the split to an existing one (data.split, or the entry's split)", key=key) from exc
        raise DataError(f"cannot load dataset {shown!r}: {first}", _hub_hint(key), key=key) from exc
    except (OSError, datasets.exceptions.DatasetsError) as exc:
        raise DataError(f"cannot load dataset {shown!r}: {shorten(str(exc), 300)}", _hub_hint(key), key=key) from exc
    if not hasattr(ds, "to_list"):
        raise DataError(f"dataset {shown!r} split {split!r} did not load as one table", "set data.split", key=key)
    fingerprint = getattr(ds, "_fingerprint", "")  # datasets' hash of the loaded split's content
    numbers = list(range(len(ds)))
    if max_rows is not None and max_rows < len(ds):
        numbers = choose_rows(len(ds), max_rows, seed)
        ds = ds.select(numbers)
    records = [(i + 1, rec) for i, rec in zip(numbers, ds.to_list())]
    if not records:
        raise DataError(f"dataset {shown!r} split {split!r} is empty", "choose another data.split")
    token = f"{name}|{split}|{fingerprint}"  # as before subsets: runs that resume keep their sha256
    if subset is not None or max_rows is not None:
        token = f"{name}|{subset or ''}|{split}|{max_rows or ''}|{fingerprint}"
    label = f"{name} [{split}]" if subset is None else f"{name} [{subset}/{split}]"
    return Source(label, records, "row", hashlib.sha256(token.encode()).hexdigest())


def _hub_hint(key: str) -> str:
    return f"check {key}: a local .jsonl/.json/.parquet/.csv file or a hub dataset name like org/name"
