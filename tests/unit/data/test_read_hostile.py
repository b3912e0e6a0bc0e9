"""Hostile data paths: devices, FIFOs, files larger than memory, huge lines, runaway chat templates (issue 20, item 16).

The hostile reads run in a child process with a 4 GB address-space limit and a timeout, so
that a reader that is not bounded fails this test instead of eating the machine's memory.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from conftest import arithmetic_rows, write_jsonl
from data_rows import with_template

from qlora_kit.core.config import DataConfig
from qlora_kit.core.errors import DataError
from qlora_kit.data import build as D_build
from qlora_kit.data import labels
from qlora_kit.data import read as D_read

_CHILD = textwrap.dedent("""
    import json, resource, sys
    resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))
    from qlora_kit.core.errors import DataError
    from qlora_kit.data.read import read_source
    path, key = sys.argv[1], sys.argv[2]
    try:
        read_source(path, key=key)
        print(json.dumps({"read": True}))
    except DataError as exc:
        print(json.dumps({"message": exc.message, "hint": exc.hint}))
""")


def _read_in_child(path: Path, key: str = "data.path") -> dict[str, str]:
    try:
        done = subprocess.run([sys.executable, "-c", _CHILD, str(path), key], capture_output=True, text=True,
                              timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail(f"reading {path} did not stop within 60 s")
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _sparse(path: Path, size: int) -> Path:
    with open(path, "wb") as f:
        f.truncate(size)  # no disk used: zero bytes, no newline
    return path


@pytest.mark.parametrize("kind", ["dev_zero", "link_to_dev_zero", "fifo"])
def test_non_regular_data_files_are_refused_before_reading(tmp_path: Path, kind: str) -> None:
    if kind == "dev_zero":
        path = Path("/dev/zero")
    elif kind == "link_to_dev_zero":
        path = tmp_path / "data.jsonl"
        path.symlink_to("/dev/zero")
    else:
        path = tmp_path / "data.jsonl"
        os.mkfifo(path)
    result = _read_in_child(path, key="data.val_path")  # a read that blocks or never ends is killed in the child
    assert "not a regular file" in result.get("message", ""), result
    assert ("character device" if kind != "fifo" else "FIFO") in result["message"]
    assert "data.val_path" in result["hint"] and ".jsonl" in result["hint"]


@pytest.mark.parametrize("suffix", [".json", ".jsonl", ".csv", ".parquet"])
def test_a_file_far_larger_than_memory_is_refused_before_reading(tmp_path: Path, suffix: str) -> None:
    path = _sparse(tmp_path / f"huge{suffix}", 1 << 40)  # 1 TiB
    result = _read_in_child(path)
    assert "larger than" in result.get("message", "") and "memory" in result["message"], result
    assert "1.10 TB" in result["message"] and result["hint"]


def test_a_huge_jsonl_line_is_refused_without_reading_it_whole(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(D_read, "MAX_LINE_BYTES", 1 << 20)
    path = write_jsonl(tmp_path / "data.jsonl", arithmetic_rows(3))
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps({"text": "x" * (2 << 20)}) + "\n")
    with pytest.raises(DataError, match=r"line 4 is longer than 1.05 MB") as err:
        D_read.read_source(str(path))
    assert "split" in err.value.hint or "shorten" in err.value.hint


def test_the_real_line_limit_reads_a_long_row(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "data.jsonl", [{"text": "y" * (3 << 20)}, {"text": "z"}])
    source = D_read.read_source(str(path))
    assert [n for n, _ in source.records] == [1, 2] and len(source.records[0][1]["text"]) == 3 << 20


_RUNAWAY = ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
            "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}")


def test_a_runaway_chat_template_is_stopped_after_the_time_limit(tmp_path: Path, tok,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(labels, "TEMPLATE_SECONDS", 0.5)
    path = write_jsonl(tmp_path / "data.jsonl", arithmetic_rows(8))
    with_template(tok, _RUNAWAY)
    started = time.monotonic()
    with pytest.raises(DataError, match=r"chat template ran for more than 0.5 s") as err:
        D_build.build_data(DataConfig(path=str(path)), tok, 64, 0)
    assert time.monotonic() - started < 120  # stopped, not hours (the loop runs 10**10 times); not a speed check
    assert "chat_template" in err.value.hint


def test_the_template_time_limit_restores_the_previous_alarm_handler(tok) -> None:
    import signal

    before = signal.getsignal(signal.SIGALRM)
    with_template(tok, "{% for m in messages %}{{ m['content'] }}{% endfor %}")
    assert labels.template_takes_system(tok)
    assert signal.getsignal(signal.SIGALRM) is before and signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)


_RUNAWAY_ON_BOOM = ("{% for m in messages %}{% if 'boom' in m['content'] %}{% for i in range(100000) %}"
                    "{% for j in range(100000) %}{% endfor %}{% endfor %}{% endif %}"
                    "{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}")


def test_the_time_limit_names_the_row_whose_rendering_runs_away(tmp_path: Path, tok,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(labels, "TEMPLATE_SECONDS", 0.5)
    rows = arithmetic_rows(8)
    rows[4]["messages"][0]["content"] = "boom"
    path = write_jsonl(tmp_path / "data.jsonl", rows)
    with_template(tok, _RUNAWAY_ON_BOOM)
    with pytest.raises(DataError, match=r"ran for more than 0.5 s on row 5 and was stopped"):
        D_build.build_data(DataConfig(path=str(path), val_fraction=0.0), tok, 64, 0)
