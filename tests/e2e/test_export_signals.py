"""Signals during `qlora-kit export`, as the README's exit-code table says (issue 20, item 12).

Real subprocesses, real signals: one Ctrl-C exits 75 (HF and GGUF); with SIGINT ignored (a
background job) SIGTERM still stops it; SIGTERM during the imports exits 75 with nothing
written; SIGTERM after the final rename keeps the complete export and says so; an
``--overwrite`` killed between its two renames is put right by the next export.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from conftest import default_sigint
from run_fixture import ENV_1_THREAD, read_report, staging_leftovers

from qlora_kit.core.errors import EXIT_PREEMPTED
from qlora_kit.export.command import export_run

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.e2e]

# Slows the writing of each tensor (HF and GGUF), optionally stops after the final rename or between
# the two renames of --overwrite, then runs the CLI's entry point.
_SCRIPT = textwrap.dedent("""
    import os, signal, sys, time
    import qlora_kit.export.hf as hf, qlora_kit.export.gguf_file as gguf_file
    import qlora_kit.export.command as command, qlora_kit.core.files as files
    mode = sys.argv[1]
    write, encode = hf.ShardWriter.write, gguf_file.encode_tensor
    def slow_write(self, name, tensor):
        time.sleep(0.1)
        return write(self, name, tensor)
    def slow_encode(*args, **kwargs):
        time.sleep(0.1)
        return encode(*args, **kwargs)
    hf.ShardWriter.write, gguf_file.encode_tensor = slow_write, slow_encode
    publish = command.publish_dir
    def publish_then_sigterm(staging, final):
        publish(staging, final)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(1)
    if mode == "after-rename":
        command.publish_dir = publish_then_sigterm
    replace = files.os.replace
    def pause_between_renames(src, dst):
        replace(src, dst)
        if str(dst).rsplit("/", 1)[-1].startswith(".old-"):
            print("BETWEEN-RENAMES", file=sys.stderr, flush=True)
            time.sleep(float(os.environ["PAUSE_S"]))
    if mode == "between-renames":
        files.os.replace = pause_between_renames
    from qlora_kit.__main__ import main
    sys.argv = ["qlora-kit", *sys.argv[2:]]
    main()
""")


def _start(mode: str, *args: str, ignore_sigint: bool = False, pause_s: float = 0) -> subprocess.Popen[str]:
    def ignore() -> None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # what a shell does for a background job

    env = {**os.environ, **ENV_1_THREAD, "PAUSE_S": str(pause_s)}
    return subprocess.Popen([sys.executable, "-c", _SCRIPT, mode, *args], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, preexec_fn=ignore if ignore_sigint else default_sigint)


def _wait_for_staging(proc: subprocess.Popen[str], target: Path, name: str) -> None:
    deadline = time.time() + 120
    while time.time() < deadline:
        partial = staging_leftovers(target)
        if partial and list(partial[0].glob(name)):
            return
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        time.sleep(0.02)
    pytest.fail("the export never started writing")


@pytest.mark.parametrize("fmt", ["hf", "gguf"])
def test_one_ctrl_c_during_an_export_exits_75(llama_run: Path, tmp_path: Path, fmt: str) -> None:
    target = tmp_path / "out"
    proc = _start("plain", "export", str(llama_run), "--out", str(target), "--format", fmt, "--no-verify")
    _wait_for_staging(proc, target, "*.safetensors" if fmt == "hf" else "*.gguf")
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == EXIT_PREEMPTED, err[-3000:]
    assert f"error: export stopped by SIGINT; nothing was written to {target}" in err
    assert "fix: run the same export command again" in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == [], "no partial export, no lock file"


def test_with_sigint_ignored_an_export_still_stops_on_sigterm(llama_run: Path, tmp_path: Path) -> None:
    target = tmp_path / "out"
    proc = _start("plain", "export", str(llama_run), "--out", str(target), "--no-verify", ignore_sigint=True)
    _wait_for_staging(proc, target, "*.safetensors")
    proc.send_signal(signal.SIGINT)  # ignored, as the shell asked
    time.sleep(0.5)
    assert proc.poll() is None, "SIGINT was ignored when the export started: it must stay ignored"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == EXIT_PREEMPTED, err[-3000:]
    assert "error: export stopped by SIGTERM; nothing was written to" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == []


@pytest.mark.parametrize("entry, after", [("-m qlora_kit", "typer"), ("console script", "typer"),
                                          ("-m qlora_kit", "numpy")])
def test_sigterm_during_the_imports_exits_75_with_nothing_written(llama_run: Path, tmp_path: Path,
                                                                  entry: str, after: str) -> None:
    """`python -X importtime` reports each import as it finishes: SIGTERM right after typer's (the CLI module is
    being imported) or numpy's (torch, imported by the command), before any handler of the command's own."""
    target = tmp_path / "out"
    if entry == "console script":
        script = Path(sys.executable).with_name("qlora-kit")
        cmd = [sys.executable, "-X", "importtime", str(script)]
    else:
        cmd = [sys.executable, "-X", "importtime", "-m", "qlora_kit"]
    proc = subprocess.Popen([*cmd, "export", str(llama_run), "--out", str(target), "--no-verify"],
                            env={**os.environ, **ENV_1_THREAD}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    assert proc.stderr is not None
    seen = []
    for line in proc.stderr:
        seen.append(line)
        if line.rsplit("|", 1)[-1].strip() == after:
            break
    else:
        pytest.fail(f"{after} was never imported: " + "".join(seen[-20:]))
    proc.send_signal(signal.SIGTERM)
    err = proc.stderr.read()
    proc.wait(timeout=60)
    assert proc.returncode == EXIT_PREEMPTED, err[-3000:]
    assert "error: export stopped by SIGTERM; nothing was written" in err, err[-3000:]
    assert "fix: run the same command again" in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_sigterm_after_the_final_rename_keeps_the_complete_export(llama_run: Path, tmp_path: Path) -> None:
    target = tmp_path / "out"
    proc = _start("after-rename", "export", str(llama_run), "--out", str(target), "--no-verify")
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    said = " ".join(err.split())  # the console wraps long lines
    assert f"SIGTERM arrived after the export was complete: {target} is complete; nothing to run again" in said
    assert "checkpoint" not in said
    assert read_report(target)["format"] == "hf" and (target / "model.safetensors").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"], "no staging, no moved-aside copy, no lock"
    before = read_report(target)
    again = subprocess.run([sys.executable, "-m", "qlora_kit", "export", str(llama_run), "--out", str(target),
                            "--no-verify"], env={**os.environ, **ENV_1_THREAD}, capture_output=True, text=True,
                           timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]  # the same command again is not refused as "not empty"
    assert "already holds this export" in " ".join(again.stderr.split()) and read_report(target) == before
    for other in (["--format", "gguf"], ["--dtype", "bfloat16"], []):  # another export, or now verified
        export_args = ["export", str(llama_run), "--out", str(target), *(other or ["--verify"])]
        refused = subprocess.run([sys.executable, "-m", "qlora_kit", *export_args], capture_output=True, text=True,
                                 env={**os.environ, **ENV_1_THREAD}, timeout=300)
        assert refused.returncode == 2 and "exists and is not empty" in refused.stderr, refused.stderr[-2000:]


def _overwrite_paused_between_renames(llama_run: Path, tmp_path: Path, pause_s: float
                                      ) -> tuple[Path, subprocess.Popen[str]]:
    """An export to ``tmp_path/out``, then an ``--overwrite`` of it that pauses between its two renames."""
    target = tmp_path / "out"
    assert export_run(llama_run, target, verify=False, show_progress=False) == 0
    (target / "old-marker").write_text("the previous export")
    proc = _start("between-renames", "export", str(llama_run), "--out", str(target), "--no-verify", "--overwrite",
                  pause_s=pause_s)
    assert proc.stderr is not None
    for line in proc.stderr:
        if "BETWEEN-RENAMES" in line:
            break
    return target, proc


def test_overwrite_stopped_between_its_renames_finishes_them(llama_run: Path, tmp_path: Path) -> None:
    """SIGTERM between the two renames waits for the second: the new export is complete, the old one removed."""
    target, proc = _overwrite_paused_between_renames(llama_run, tmp_path, 1.0)
    proc.send_signal(signal.SIGTERM)
    err = proc.stderr.read()
    proc.wait(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    assert "export was complete" in " ".join(err.split()) and not (target / "old-marker").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"], "the previous export is not left behind"


def test_overwrite_killed_between_its_renames_is_put_right_by_the_next_export(llama_run: Path,
                                                                              tmp_path: Path) -> None:
    """SIGKILL (or a power cut) between the renames: the next export restores the previous one first."""
    target, proc = _overwrite_paused_between_renames(llama_run, tmp_path, 60)
    proc.kill()
    proc.communicate(timeout=60)
    assert not target.exists() and len(list(tmp_path.glob(".old-out-*"))) == 1  # the state a kill leaves
    # restored first: it is this very export, so there is nothing to do; another one is refused as not empty
    assert export_run(llama_run, target, verify=False, show_progress=False) == 0
    assert (target / "old-marker").read_text() == "the previous export"
    with pytest.raises(Exception, match="exists and is not empty"):
        export_run(llama_run, target, dtype="bfloat16", verify=False, show_progress=False)
    assert not list(tmp_path.glob(".old-out-*"))
    assert export_run(llama_run, target, verify=False, show_progress=False, overwrite=True) == 0
    assert not (target / "old-marker").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_leftovers_of_another_target_with_a_longer_name_are_left_alone(tmp_path: Path) -> None:
    from qlora_kit.core.files import restore_moved_aside

    other = tmp_path / ".old-out-2-999999999"  # what `out-2`'s killed replacement left (no such process)
    other.mkdir()
    restore_moved_aside(tmp_path / "out")
    assert other.exists() and not (tmp_path / "out").exists()
    restore_moved_aside(tmp_path / "out-2")
    assert not other.exists() and (tmp_path / "out-2").is_dir()
