"""State safety (issue 9): one writer per run, failures that delete nothing, resume past corrupt checkpoints,
full disks, prompt stop signals — with real processes, real signals and a real full disk where it matters."""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from conftest import (
    RESUME_LORA,
    assert_same_result,
    interrupted_copy,
    reseal_checkpoint,
    resume_config,
    run_cli,
    snapshot,
    wait_for_step,
    write_config,
    write_jsonl,
)
from conftest import RESUME_TRAIN as TRAIN

from qlora_kit.core import diskspace
from qlora_kit.core.errors import (
    EXIT_NO_SPACE,
    EXIT_PREEMPTED,
    EXIT_USER_ERROR,
    DiskFullError,
    OutputError,
    Preempted,
    RunInUseError,
)
from qlora_kit.core.signals import StopRequest
from qlora_kit.rundir import checkpoint as ckpt
from qlora_kit.rundir import lock as runlock
from qlora_kit.train import loop, order, recipe, setup

pytestmark = pytest.mark.e2e




def test_lock_is_released_by_kill9(tmp_path: Path) -> None:
    run = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        from qlora_kit.rundir import lock as runlock
        runlock.exclusive(__import__("pathlib").Path({str(run)!r}), "train").acquire()
        print("locked", flush=True)
        time.sleep(600)
    """)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(RunInUseError, match=f"PID {holder.pid}"):
        runlock.exclusive(run, "train").acquire()
    holder.kill()
    holder.wait(timeout=30)
    with runlock.exclusive(run, "train"):  # the kernel dropped the lock; the stale file is reused
        pass


_AT_THE_BARRIER = """
import os, sys, time
from qlora_kit import cli
from qlora_kit.train import recipe  # imports first, so that both processes reach the lock together
barrier = sys.argv[1]
open(f"{barrier}.ready-{os.getpid()}", "w").close()
while not os.path.exists(barrier):
    time.sleep(0.001)
sys.argv = ["qlora-kit", "train", sys.argv[2]]
cli.main()
"""


def test_two_trains_started_together_exactly_one_runs(tmp_path: Path, tiny_llama: Path, data_file: Path) -> None:
    cfg = write_config(tmp_path / "cfg.yaml", tiny_llama, data_file, tmp_path / "run",
                       train={"max_steps": 6, "save_steps": 3, "logging_steps": 1})
    barrier = tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, "-c", _AT_THE_BARRIER, str(barrier), str(cfg)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    deadline = time.time() + 300
    while time.time() < deadline and len(list(tmp_path.glob("go.ready-*"))) < 2:
        assert all(p.poll() is None for p in procs)
        time.sleep(0.05)
    barrier.touch()
    results = [(p, *p.communicate(timeout=600)) for p in procs]
    codes = sorted(p.returncode for p, _, _ in results)
    assert codes == [0, EXIT_USER_ERROR], [err[-1500:] for _, _, err in results]
    winner = next(p for p, _, _ in results if p.returncode == 0)
    loser_err = next(err for p, _, err in results if p.returncode != 0)
    assert f"error: {tmp_path / 'run'} is in use by another qlora-kit process (PID {winner.pid}: train" in loser_err
    assert "fix: wait until it finishes or stop it" in loser_err and "Traceback" not in loser_err
    steps = [json.loads(line)["step"] for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()
             if '"loss"' in line]
    assert steps == [1, 2, 3, 4, 5, 6], "exactly one writer logged the steps"


def test_a_busy_run_refuses_second_writers_and_readers(tmp_path: Path, tiny_llama: Path, data_file: Path) -> None:
    """--resume, a second run failing on its data, export and generate: all refused, nothing of A's touched."""
    from typer.testing import CliRunner

    from qlora_kit.cli import app

    run = tmp_path / "run"
    cfg = write_config(tmp_path / "cfg.yaml", tiny_llama, data_file, run,
                       train={"max_steps": 100_000, "save_steps": 2, "logging_steps": 1, "save_total_limit": 1})
    a = subprocess.Popen([sys.executable, "-m", "qlora_kit.cli", "train", str(cfg)], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    try:
        wait_for_step(run, 2, a)
        held = f"(PID {a.pid}: train"
        broken = write_config(tmp_path / "broken.yaml", tiny_llama, tmp_path / "missing.jsonl", run)
        writer, reader = "is in use by another qlora-kit process", "is being written by another process"
        for args, refusal in ((["train", str(cfg), "--resume"], writer),
                              (["train", str(broken), "--overwrite"], writer),
                              (["export", str(run), "--out", str(tmp_path / "exp")], reader),
                              (["generate", str(run), "hi"], reader)):
            result = CliRunner().invoke(app, args)
            assert result.exit_code == EXIT_USER_ERROR, result.output
            assert result.output.startswith(f"error: {run} {refusal} {held}"), result.output
            assert "fix: wait until it finishes" in result.output
        assert run.is_dir() and a.poll() is None, "the first run must be untouched and still training"
    finally:
        a.send_signal(signal.SIGTERM)
        _, err = a.communicate(timeout=120)
    assert a.returncode == EXIT_PREEMPTED, err[-2000:]
    assert json.loads((run / "manifest.json").read_text())["status"] == "preempted"
    assert not (tmp_path / "exp").exists() and not list(tmp_path.glob(".*.lock"))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-64])


def _set_state(key: str, value: object, reseal: bool):
    def damage(checkpoint: Path) -> None:
        state = json.loads((checkpoint / "state.json").read_text())
        state[key] = value
        (checkpoint / "state.json").write_text(json.dumps(state))
        if reseal:  # also defeat the digest: the structural checks must catch it
            reseal_checkpoint(checkpoint)
    return damage


def _bad_optimizer_json(reseal: bool):
    def damage(checkpoint: Path) -> None:
        (checkpoint / "optimizer.json").write_text('{"__dict__": [["state", {"__tensor__": "nope"}]]}')
        if reseal:
            reseal_checkpoint(checkpoint)
    return damage


CORRUPTIONS = {
    "truncated adapter": lambda c: _truncate(c / "adapter_model.safetensors"),
    "deleted adapter": lambda c: (c / "adapter_model.safetensors").unlink(),
    "truncated optimizer tensors": lambda c: _truncate(c / "optimizer.safetensors"),
    "bad optimizer.json": _bad_optimizer_json(reseal=False),
    "bad optimizer.json (resealed)": _bad_optimizer_json(reseal=True),
    "missing rng.safetensors": lambda c: (c / "rng.safetensors").unlink(),
    "binary state.json": lambda c: (c / "state.json").write_bytes(os.urandom(300)),
    "string as scheduler state": _set_state("scheduler", "garbage", reseal=False),
    "string as scheduler state (resealed)": _set_state("scheduler", "garbage", reseal=True),
}


@pytest.mark.parametrize("case", list(CORRUPTIONS))
def test_resume_skips_a_corrupt_checkpoint(case: str, tmp_path: Path, tiny_llama: Path, data_file: Path,
                                           reference_run: Path, caplog: pytest.LogCaptureFixture) -> None:
    run = interrupted_copy(reference_run, tmp_path / "run", last_step=12)
    CORRUPTIONS[case](run / "checkpoint-12")
    with caplog.at_level(logging.INFO, logger="qlora_kit"):
        assert recipe.run_training(resume_config(tmp_path / "cfg.yaml", tiny_llama, data_file, run), [], resume=True) == 0
    assert "checkpoint-12" in caplog.text and "resumed from checkpoint-8" in caplog.text, caplog.text[-2000:]
    assert (run / "checkpoint-12.corrupt").is_dir(), "the corrupt checkpoint is kept aside for inspection"
    assert_same_result(run, reference_run)


def test_no_checkpoint_verifies_is_one_line_and_changes_nothing(tmp_path: Path, tiny_llama: Path,
                                                                data_file: Path, reference_run: Path) -> None:
    run = interrupted_copy(reference_run, tmp_path / "run", last_step=8)
    for _, path in ckpt.list_checkpoints(run):
        _truncate(path / "adapter_model.safetensors")
    before = snapshot(run)
    proc = run_cli("train", str(resume_config(tmp_path / "cfg.yaml", tiny_llama, data_file, run)), "--resume")
    assert proc.returncode == EXIT_USER_ERROR
    lines = proc.stderr.strip().splitlines()
    assert lines[-2].startswith("error: no checkpoint in") and "verifies" in lines[-2] and "checkpoint-8" in lines[-2]
    assert lines[-1].startswith("fix: start afresh with --overwrite")
    assert snapshot(run) == before


def test_final_metrics_are_complete_after_a_kill_at_the_end(tmp_path: Path, tiny_llama: Path, data_file: Path,
                                                             reference_run: Path) -> None:
    """Killed after the last checkpoint, before the adapter was published: the resume finishes with both losses."""
    expected = json.loads((reference_run / "manifest.json").read_text())["final_metrics"]
    assert expected["train_loss"] is not None and expected["eval_loss"] is not None
    for legacy in (False, True):
        run = interrupted_copy(reference_run, tmp_path / f"run-{legacy}", last_step=16, status="running")
        if legacy:  # a checkpoint without the saved losses: they come from metrics.jsonl
            state = json.loads((run / "checkpoint-16/state.json").read_text())
            del state["last_train_loss"], state["last_eval_loss"]
            (run / "checkpoint-16/state.json").write_text(json.dumps(state))
            reseal_checkpoint(run / "checkpoint-16")
        cfg = write_config(tmp_path / f"cfg-{legacy}.yaml", tiny_llama, data_file, run, train=TRAIN, lora=RESUME_LORA)
        assert recipe.run_training(cfg, [], resume=True) == 0
        manifest = json.loads((run / "manifest.json").read_text())
        assert manifest["status"] == "completed"
        # from the checkpoint: exact; from metrics.jsonl (legacy): as logged, rounded to 6 decimals
        assert manifest["final_metrics"] == (pytest.approx(expected, abs=1e-6) if legacy else expected)
        assert_same_result(run, reference_run)


_KILL_WHILE_PRUNING = """
import os, shutil, signal, sys
from qlora_kit import cli
real = shutil.rmtree
def rmtree(path, *args, **kwargs):
    if os.path.basename(str(path)).startswith(".old-checkpoint-4"):
        os.unlink(os.path.join(path, "state.json"))  # half deleted, then killed
        os.kill(os.getpid(), signal.SIGKILL)
    return real(path, *args, **kwargs)
shutil.rmtree = rmtree
sys.argv = ["qlora-kit", "train", sys.argv[1]]
cli.main()
"""


def test_kill9_while_pruning_leaves_no_half_checkpoint(tmp_path: Path, tiny_llama: Path, data_file: Path,
                                                       reference_run: Path) -> None:
    run = tmp_path / "run"
    cfg = resume_config(tmp_path / "cfg.yaml", tiny_llama, data_file, run, save_total_limit=1)
    proc = subprocess.run([sys.executable, "-c", _KILL_WHILE_PRUNING, str(cfg)], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    names = sorted(p.name for p in run.iterdir() if "checkpoint" in p.name)
    assert names[0].startswith(".old-checkpoint-4") and names[1:] == ["checkpoint-8"], names
    (run / "checkpoint-3").mkdir()  # an unfinished checkpoint as older versions could leave it
    assert recipe.run_training(cfg, [], resume=True) == 0
    assert sorted(p.name for p in run.iterdir() if "checkpoint" in p.name) == ["checkpoint-16"]
    assert_same_result(run, reference_run)


def _raise_enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_full_disk_at_a_checkpoint_then_resume(tmp_path: Path, tiny_llama: Path, data_file: Path,
                                               reference_run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """ENOSPC inside the safetensors write of checkpoint-8: one line, nothing half-written, resumable, exact."""
    run = tmp_path / "run"
    cfg = resume_config(tmp_path / "cfg.yaml", tiny_llama, data_file, run)
    real_save_file = ckpt.save_file
    monkeypatch.setattr(ckpt, "save_file", lambda tensors, path: _raise_enospc() if "checkpoint-8" in path
                        else real_save_file(tensors, path))
    with pytest.raises(DiskFullError, match="filled up while writing checkpoint-8") as err:
        recipe.run_training(cfg, [])
    assert err.value.exit_code == EXIT_NO_SPACE and "--resume (it continues from checkpoint-4)" in err.value.hint
    assert not [p.name for p in run.iterdir() if p.name.startswith(".")], "no temporary files or directories"
    assert [s for s, _ in ckpt.list_checkpoints(run)] == [4]
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["status"] == "failed" and "DiskFullError" in manifest["error"]
    monkeypatch.setattr(ckpt, "save_file", real_save_file)
    assert recipe.run_training(cfg, [], resume=True) == 0
    assert_same_result(run, reference_run)


def test_full_disk_at_the_final_adapter_then_resume(tmp_path: Path, tiny_llama: Path, data_file: Path,
                                                    reference_run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run = tmp_path / "run"
    cfg = resume_config(tmp_path / "cfg.yaml", tiny_llama, data_file, run)
    real_save_adapter = ckpt.save_adapter
    monkeypatch.setattr(ckpt, "save_adapter", lambda model, d, state=None: _raise_enospc() if d.name == ".tmp-adapter"
                        else real_save_adapter(model, d, state))
    with pytest.raises(DiskFullError, match="filled up while writing the final adapter"):
        recipe.run_training(cfg, [])
    assert not (run / ".tmp-adapter").exists() and not (run / "adapter").exists()
    assert json.loads((run / "manifest.json").read_text())["status"] == "failed"
    monkeypatch.setattr(ckpt, "save_adapter", real_save_adapter)
    assert recipe.run_training(cfg, [], resume=True) == 0
    expected = json.loads((reference_run / "manifest.json").read_text())["final_metrics"]
    assert json.loads((run / "manifest.json").read_text())["final_metrics"] == expected
    assert_same_result(run, reference_run)


def test_free_space_is_checked_before_writing(tmp_path: Path, tiny_llama: Path, data_file: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    run = tmp_path / "run"
    cfg = resume_config(tmp_path / "cfg.yaml", tiny_llama, data_file, run)
    monkeypatch.setattr(diskspace, "free_bytes", lambda path: 100_000)
    with pytest.raises(DiskFullError, match=r"not enough disk space for the run's files, a checkpoint and the "
                                            r"adapter in .*: needs about \d+\.\d\d MB, 100\.00 kB free"):
        recipe.run_training(cfg, [])
    assert not run.exists(), "a run refused for space creates nothing"
    calls = {"n": 0}

    def shrinking(path: Path) -> int:  # plenty at the start, then the disk fills up
        calls["n"] += 1
        return 10**12 if calls["n"] == 1 else 999

    monkeypatch.setattr(diskspace, "free_bytes", shrinking)
    with pytest.raises(DiskFullError, match=r"for checkpoint-4 in .*: needs about .* MB, 999 B free"):
        recipe.run_training(cfg, [])
    assert not run.exists(), "a fresh run that fails before its first checkpoint leaves nothing"


_FILL_DISK_AT = """
import json, os, sys
from pathlib import Path
from qlora_kit import cli
from qlora_kit.core import diskspace
from qlora_kit.train import loop
diskspace.require_free = lambda *args, **kwargs: None  # let the write itself hit the full disk
mount, step = Path(sys.argv[1]), int(sys.argv[2])
real_save = loop.save
def save(run):
    if run.step == step:
        with open(mount / "filler", "wb") as fh:
            try:
                while True:
                    fh.write(b"x" * 65536)
                    fh.flush()
            except OSError:
                pass
    return real_save(run)
loop.save = save
sys.argv = ["qlora-kit", "train", *sys.argv[3:]]
cli.main()
"""


_IN_TMPFS = """
set -u
mount -t tmpfs -o size=1m tmpfs "$SMALL" && mount -t tmpfs -o size=120m tmpfs "$BIG" || exit 99
"$PY" -m qlora_kit.cli train "$CFG" ; echo "rc1=$?"
"$PY" -c "$FILL" "$BIG" 4 "$CFG2" ; echo "rc2=$?"
echo "listing: $(ls -A "$BIG/run2" | tr '\\n' ' ')"
echo "manifest: $(tr -d '\\n' < "$BIG/run2/manifest.json")"
rm -f "$BIG/filler"
"$PY" -m qlora_kit.cli train "$CFG2" --resume ; echo "rc3=$?"
echo "final: $(ls -A "$BIG/run2" | tr '\\n' ' ')"
"""


def _tmpfs_possible() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /tmp && echo ok"],
                           capture_output=True, text=True)
    return probe.stdout.strip() == "ok"


@pytest.mark.skipif(not _tmpfs_possible(), reason="needs `unshare -rm` to mount a private tmpfs")
def test_real_full_disk_on_a_tmpfs(tmp_path: Path, tiny_llama: Path, data_file: Path) -> None:
    """Real kernel ENOSPC on private tmpfs mounts: a 1 MiB disk is refused before anything is written, with the
    real numbers; a 120 MiB disk that fills up right before checkpoint-4 fails with one line, leaves no temporary
    files and a `failed` manifest, and `--resume` after freeing space finishes the run."""
    small, big = tmp_path / "small", tmp_path / "big"
    for d in (small, big):
        d.mkdir()
    short = {"max_steps": 4, "save_steps": 2, "logging_steps": 1}
    cfg = write_config(tmp_path / "cfg1.yaml", tiny_llama, data_file, small / "run1", train=short)
    cfg2 = write_config(tmp_path / "cfg2.yaml", tiny_llama, data_file, big / "run2", train=short)
    env = {**os.environ, "SMALL": str(small), "BIG": str(big), "PY": sys.executable, "CFG": str(cfg),
           "CFG2": str(cfg2), "FILL": _FILL_DISK_AT}
    proc = subprocess.run(["unshare", "-rm", "sh", "-c", _IN_TMPFS], capture_output=True, text=True, env=env,
                          timeout=900)
    log = proc.stdout + proc.stderr
    assert "rc1=6" in log and "error: not enough disk space for the run's files" in log, log[-3000:]
    assert re.search(r"needs about \d+\.\d\d MB, \d+\.\d\d MB free", log), log[-3000:]
    assert "rc2=6" in log and "filled up while writing checkpoint-4" in log, log[-3000:]
    assert "fix: free space on that disk, then run the same command with --resume (it continues from " \
           "checkpoint-2)" in log
    listing = next(line for line in proc.stdout.splitlines() if line.startswith("listing:"))
    assert "checkpoint-2" in listing and ".tmp" not in listing and "checkpoint-4" not in listing, listing
    manifest = next(line for line in proc.stdout.splitlines() if line.startswith("manifest:"))
    assert '"status": "failed"' in manifest and "DiskFullError" in manifest, manifest
    assert "rc3=0" in log, log[-3000:]
    final = next(line for line in proc.stdout.splitlines() if line.startswith("final:"))
    assert "adapter" in final and "checkpoint-4" in final and ".tmp" not in final, final


def test_full_disk_during_export(reference_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from qlora_kit.cli import app
    from qlora_kit.export import hf as ex

    monkeypatch.setattr(diskspace, "free_bytes", lambda path: 5000)
    result = CliRunner().invoke(app, ["export", str(reference_run), "--out", str(tmp_path / "exp"), "--no-verify"])
    assert result.exit_code == EXIT_NO_SPACE, result.output
    assert "error: not enough disk space for the export in" in result.output and "5.00 kB free" in result.output
    monkeypatch.undo()
    monkeypatch.setattr(ex.ShardWriter, "write", _raise_enospc)
    result = CliRunner().invoke(app, ["export", str(reference_run), "--out", str(tmp_path / "exp"), "--no-verify"])
    assert result.exit_code == EXIT_NO_SPACE and "filled up while writing the export" in result.output
    assert "fix: free space on that disk" in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == [], "no partial export, no lock file"


_SIGTERM_IN = """
import os, signal, sys, time
import qlora_kit.{module} as target
real = target.{function}
def slow(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(60)  # a long load: the signal must not wait for it
    return real(*args, **kwargs)
setattr(target, "{function}", slow)
from qlora_kit import cli
sys.argv = ["qlora-kit", "train", *sys.argv[1:]]
cli.main()
"""


@pytest.mark.parametrize("module, function, resume", [("data.read", "read_jsonl", False),
                                                      ("model.base", "load_quantized_base", True)])
def test_sigterm_during_setup_changes_nothing(module: str, function: str, resume: bool, tmp_path: Path,
                                              tiny_llama: Path, data_file: Path, reference_run: Path) -> None:
    run = interrupted_copy(reference_run, tmp_path / "run", last_step=8) if resume else tmp_path / "run"
    before = snapshot(run) if resume else None
    cfg = resume_config(tmp_path / "cfg.yaml", tiny_llama, data_file, run)
    script = _SIGTERM_IN.format(module=module, function=function)
    started = time.time()
    proc = subprocess.run([sys.executable, "-c", script, str(cfg), *(["--resume"] if resume else [])],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == EXIT_PREEMPTED, proc.stderr[-2000:]
    assert time.time() - started < 55, "the stop must not wait for the load to finish"
    assert "error: stopped by SIGTERM before training started; nothing was written" in proc.stderr
    assert "fix: run the same command again" in proc.stderr and "Traceback" not in proc.stderr
    if resume:
        assert snapshot(run) == before
    else:
        assert not run.exists() and not list(tmp_path.glob(".*.lock"))


def test_sigterm_between_micro_batches_resumes_exactly(tmp_path: Path, tiny_llama: Path, data_file: Path,
                                                       reference_run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The signal arrives after the first of two micro-batches of step 6: step 5 is saved, the resume is exact."""
    run = tmp_path / "run"
    cfg = resume_config(tmp_path / "cfg.yaml", tiny_llama, data_file, run)
    real_batches = loop._step_batches

    def signal_after_first(run_, stream, stop):
        batches = real_batches(run_, stream, stop)
        if run_.step == 5:
            yield next(batches)
            os.kill(os.getpid(), signal.SIGTERM)
        yield from batches

    monkeypatch.setattr(loop, "_step_batches", signal_after_first)
    with pytest.raises(Preempted, match="stopped by SIGTERM at step 5 of 16"):
        recipe.run_training(cfg, [])
    assert [s for s, _ in ckpt.list_checkpoints(run)] == [4, 5]
    monkeypatch.setattr(loop, "_step_batches", real_batches)
    assert recipe.run_training(cfg, [], resume=True) == 0
    assert_same_result(run, reference_run)


def test_huge_gradient_accumulation_is_lazy_and_stops_promptly(tmp_path: Path, tiny_llama: Path,
                                                               data_file: Path) -> None:
    """gradient_accumulation_steps=1e6 used to collate every micro-batch first (6 GB) and ignore SIGTERM."""
    import psutil

    run = tmp_path / "run"
    cfg = write_config(tmp_path / "cfg.yaml", tiny_llama, data_file, run,
                       train={"max_steps": 1, "gradient_accumulation_steps": 1_000_000})
    proc = subprocess.Popen([sys.executable, "-m", "qlora_kit.cli", "train", str(cfg)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and not (run / "manifest.json").exists():
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        time.sleep(0.1)
    time.sleep(5)  # well into the step's micro-batches
    rss = psutil.Process(proc.pid).memory_info().rss
    proc.send_signal(signal.SIGTERM)
    sent = time.time()
    _, err = proc.communicate(timeout=120)
    took = time.time() - sent
    assert proc.returncode == EXIT_PREEMPTED, err[-2000:]
    assert took < 15, f"SIGTERM took {took:.1f} s to be honoured"
    assert rss < 2 * 1024**3, f"RSS {rss / 2**30:.1f} GiB: micro-batches are not collated lazily"
    assert "stopped by SIGTERM before the first step finished; nothing was kept" in err
    assert not run.exists(), "a fresh run stopped before its first step leaves nothing"


def test_only_one_micro_batch_is_collated_before_the_first_forward(tmp_path: Path, tiny_llama: Path,
                                                                   data_file: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = resume_config(tmp_path / "cfg.yaml", tiny_llama, data_file, tmp_path / "run", max_steps=1, gradient_accumulation_steps=20)
    collated, at_first_forward = [], []
    real_collate = loop.collate
    monkeypatch.setattr(loop, "collate", lambda *a, **k: collated.append(1) or real_collate(*a, **k))
    real_count = loop._count_step

    def count(run, plans, stop):  # called at the start of each step, before its first micro-batch is collated
        before = len(collated)  # setup's fused-loss check collates one batch of its own
        run.model.register_forward_pre_hook(lambda *a: at_first_forward.append(len(collated) - before) or None)
        return real_count(run, plans, stop)

    monkeypatch.setattr(loop, "_count_step", count)
    assert recipe.run_training(cfg, []) == 0
    assert at_first_forward[0] == 1 and len(collated) >= 20


@pytest.mark.parametrize("packing", [False, True])
def test_targets_counted_up_front_match_the_collated_batches(packing: bool, tmp_path: Path, tiny_llama: Path,
                                                             data_file: Path) -> None:
    from qlora_kit.core.config import load_config
    from qlora_kit.data.batching import collate
    from qlora_kit.model.base import load_tokenizer
    from qlora_kit.model.sources import resolve_source

    cfg_path = write_config(tmp_path / "cfg.yaml", tiny_llama, data_file, tmp_path / "run",
                            data={"packing": packing}, train={"micro_batch_size": 3, "gradient_accumulation_steps": 5})
    cfg, _ = load_config(cfg_path)
    tokenizer = load_tokenizer(resolve_source(cfg.model), cfg.model)
    data = setup._setup_data(cfg, tokenizer)
    plans = order.EpochPlans(cfg, data)
    for index in range(0, 60, 5):
        run = type("R", (), {"cfg": cfg, "data": data, "micro_index": index})()
        targets, _tokens = loop._count_step(run, plans, StopRequest())
        micro = [rows for _, (_, rows) in zip(range(5), order.micro_batches_from(cfg, data, index))]
        batches = [collate(data.train, rows, tokenizer.pad_token_id, cfg.train.max_length) for rows in micro]
        assert targets == sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)


def test_export_stops_on_sigterm_with_75(reference_run: Path, tmp_path: Path) -> None:
    script = textwrap.dedent("""
        import sys, time
        import qlora_kit.export.hf as ex
        write = ex.ShardWriter.write
        def slow(self, name, tensor):
            time.sleep(0.2)
            return write(self, name, tensor)
        ex.ShardWriter.write = slow
        from qlora_kit import cli
        sys.argv = ["qlora-kit", "export", sys.argv[1], "--out", sys.argv[2], "--no-verify"]
        cli.main()
    """)
    target = tmp_path / "exp"
    proc = subprocess.Popen([sys.executable, "-c", script, str(reference_run), str(target)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and not list(tmp_path.glob(".exp.partial-*/model.safetensors")):
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == EXIT_PREEMPTED, err[-2000:]
    assert "error: export stopped by SIGTERM; nothing was written to" in err and "fix: run the same export" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == [], "no partial export, no lock file"


def test_failed_overwrite_restores_the_old_run(tmp_path: Path, tiny_llama: Path, data_file: Path,
                                               reference_run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--overwrite moves the old run aside only once everything else is ready, and puts it back on failure."""
    run = tmp_path / "run"
    shutil.copytree(reference_run, run)
    before = snapshot(run)
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"messages": "nope"}] * 10)
    proc = run_cli("train", str(write_config(tmp_path / "bad.yaml", tiny_llama, bad, run)), "--overwrite")
    assert proc.returncode == EXIT_USER_ERROR
    assert snapshot(run) == before and not list(tmp_path.glob("run.old-*")), "nothing moved for a data error"

    def crash(*args, **kwargs):
        raise RuntimeError("boom at step 1")

    monkeypatch.setattr(loop, "forward_loss", crash)
    with pytest.raises(RuntimeError, match="boom"):
        recipe.run_training(resume_config(tmp_path / "cfg.yaml", tiny_llama, data_file, run), [], overwrite=True)
    assert snapshot(run) == before and not list(tmp_path.glob("run.old-*")), "the old run is back in place"


def test_resume_before_the_first_checkpoint_starts_again(tmp_path: Path, tiny_llama: Path, data_file: Path,
                                                         reference_run: Path) -> None:
    """A run killed before its first checkpoint: --resume accepts it and trains from step 0."""
    run = interrupted_copy(reference_run, tmp_path / "run", last_step=0, status="running")
    (run / ".tmp-checkpoint-4-999").mkdir()
    assert recipe.run_training(resume_config(tmp_path / "cfg.yaml", tiny_llama, data_file, run), [], resume=True) == 0
    assert_same_result(run, reference_run)
    assert not (run / ".tmp-checkpoint-4-999").exists()


def test_resume_when_nothing_to_resume(tmp_path: Path, tiny_llama: Path, data_file: Path) -> None:
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes/mine.txt").write_text("keep")
    cfg = write_config(tmp_path / "cfg.yaml", tiny_llama, data_file, tmp_path / "notes")
    with pytest.raises(OutputError, match="holds files that are not from qlora-kit"):
        recipe.run_training(cfg, [], resume=True)
    assert (tmp_path / "notes/mine.txt").read_text() == "keep"


def test_resume_republishes_a_damaged_adapter_of_a_finished_run(tmp_path: Path, tiny_llama: Path, data_file: Path,
                                                                 reference_run: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(reference_run, run)
    weights = run / "adapter/adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0xFF  # the header still parses: only the recorded sha256 tells
    weights.write_bytes(bytes(data))
    assert recipe.run_training(resume_config(tmp_path / "cfg.yaml", tiny_llama, data_file, run), [], resume=True) == 0
    assert_same_result(run, reference_run)
    assert json.loads((run / "manifest.json").read_text())["status"] == "completed"
