"""``qlora-kit doctor --gpu``: every GPU path a run takes, checked end to end on this card, in about a minute.

The checks (``commands/gpu_checks.py``) run one after the other on a small model built in
code; each gives one row of the table: the path, its result (passed, failed, not
applicable), the measured difference (against its tolerance) and the time it took.  Every
failure is followed by a ``fix:`` line; the exit status is 1 when any check failed.
``--json FILE`` writes the same rows (``-``: to stdout), with the device and versions.
Without CUDA it says so in one line, checks nothing and exits 0.
"""

from __future__ import annotations

import json
import platform
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from qlora_kit.commands.gpu_checks import CHECKS, FAILED, NOT_APPLICABLE, PASSED, Check, NotApplicable, Rig, Row
from qlora_kit.core.files import write_json_atomic
from qlora_kit.rundir.manifest import package_versions

NO_CUDA = "doctor --gpu: no CUDA GPU visible to torch: nothing checked (run it on the machine that will train)"


def run_gpu_doctor(json_path: str | None = None, device: torch.device | None = None,
                   checks: Sequence[tuple[str, Check, str]] | None = None) -> int:
    """Run the GPU checks on ``device`` (default: ``cuda:0``), print the table, write the JSON; the exit status.

    0 when nothing failed (or without CUDA: nothing checked), 1 when a check failed.
    """
    if device is None and not torch.cuda.is_available():
        print(NO_CUDA)
        if json_path:
            _write(json_path, report([], None, 0.0, NO_CUDA))
        return 0
    device = device or torch.device("cuda", 0)
    rig = Rig.for_device(device)
    started = time.perf_counter()
    try:
        rows = run_checks(rig, checks if checks is not None else CHECKS, progress=json_path != "-")
    finally:
        rig.close()
    seconds = time.perf_counter() - started
    result = report(rows, rig, seconds)
    if json_path != "-":
        print_table(rows, rig, seconds)
    if json_path:
        _write(json_path, result)
    return 1 if result["failed"] else 0


def run_checks(rig: Rig, checks: Sequence[tuple[str, Check, str]], progress: bool = False) -> list[Row]:
    """Every check's rows; a check that raises gives one failed row with its fix (never raises itself)."""
    rows: list[Row] = []
    for name, check, fix in checks:
        if progress:
            print(f"checking {name} ...", file=sys.stderr, flush=True)
        started = time.perf_counter()
        try:
            found = check(rig)
        except NotApplicable as exc:
            found = [Row(name, NOT_APPLICABLE, detail=str(exc))]
        except Exception as exc:  # a kernel that crashes is what this command is for
            text = str(exc).splitlines()[0][:300] if str(exc) else ""
            found = [Row(name, FAILED, detail=f"{type(exc).__name__}: {text}" if text else type(exc).__name__)]
        elapsed = time.perf_counter() - started
        for row in found:
            if not row.seconds and row.result != NOT_APPLICABLE:
                row.seconds = elapsed / len(found)
            if row.result == FAILED and not row.fix:
                row.fix = fix
        rows += found
    return rows


def report(rows: list[Row], rig: Rig | None, seconds: float, message: str | None = None) -> dict[str, Any]:
    """The JSON document: what ran where, and every row."""
    failed = [r.path for r in rows if r.result == FAILED]
    return {
        "command": "qlora-kit doctor --gpu",
        "cuda": torch.cuda.is_available(),
        "device": _device(rig),
        "versions": {k: v for k, v in package_versions().items()
                     if k in ("qlora-kit", "torch", "transformers", "peft", "bitsandbytes", "trl")},
        "seconds": round(seconds, 2),
        "checked": sum(r.result != NOT_APPLICABLE for r in rows),
        "passed": sum(r.result == PASSED for r in rows),
        "failed": len(failed),
        "failed_paths": failed,
        "message": message or _verdict(rows),
        "checks": [r.to_json() for r in rows],
    }


def print_table(rows: list[Row], rig: Rig, seconds: float) -> None:
    """One table (path, result, difference, time), a ``fix:`` line per failure, the verdict."""
    from rich.console import Console
    from rich.table import Table

    colours = {PASSED: "green", FAILED: "red", NOT_APPLICABLE: "dim"}
    console = Console()
    device = _device(rig)
    table = Table(title=f"qlora-kit doctor --gpu: {device.get('name')} ({rig.dtype_name}, {seconds:.0f} s)")
    for column in ("path", "result", "difference", "time"):
        table.add_column(column, justify="right" if column in ("difference", "time") else "left")
    for r in rows:
        diff = "" if r.difference is None else f"{r.difference:.1e} / {r.tolerance:g}"
        table.add_row(r.path, f"[{colours[r.result]}]{r.result}[/]", diff, f"{r.seconds:.2f} s")
    console.print(table)
    for r in rows:
        if r.result == FAILED:
            console.print(f"[red]FAIL[/] {r.path}: {r.detail}", markup=True, highlight=False)
            console.print(f"fix: {r.fix}", highlight=False)
    console.print(f"verdict: {_verdict(rows)}", highlight=False)


def _verdict(rows: list[Row]) -> str:
    failed = [r.path for r in rows if r.result == FAILED]
    checked = sum(r.result != NOT_APPLICABLE for r in rows)
    if failed:
        return f"{len(failed)} of {checked} GPU checks failed: {', '.join(failed)}"
    return f"all {checked} GPU checks passed"


def _device(rig: Rig | None) -> dict[str, Any]:
    if rig is None:
        return {"type": "cpu", "name": platform.processor() or platform.machine()}
    if rig.device.type != "cuda":
        return {"type": rig.device.type, "name": platform.processor() or platform.machine(),
                "compute_dtype": rig.dtype_name}
    props = torch.cuda.get_device_properties(rig.device)
    return {"type": "cuda", "name": props.name, "capability": f"{props.major}.{props.minor}",
            "memory_gib": round(props.total_memory / 2**30, 1), "cuda": torch.version.cuda,
            "compute_dtype": rig.dtype_name}


def _write(path: str, document: dict[str, Any]) -> None:
    if path == "-":
        print(json.dumps(document, indent=2))
        return
    target = Path(path).expanduser()
    target.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(target, document)
