"""Each LoRA variant trains, resumes exactly, exports and reloads with peft."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import gpu, metrics_of, write_config
from safetensors.torch import load_file

from qlora_kit.core.config import dump_config, load_config
from qlora_kit.core.errors import ConfigError, ModelError, Preempted
from qlora_kit.export import command
from qlora_kit.export import command as ex
from qlora_kit.export.push import read_adapter_run
from qlora_kit.inference import load
from qlora_kit.model import base as qmodel_base
from qlora_kit.rundir import residual
from qlora_kit.rundir.target import Start
from qlora_kit.train.loop import train
from qlora_kit.train.outputs import begin
from qlora_kit.train.recipe import run_training
from qlora_kit.train.setup import setup

pytestmark = pytest.mark.e2e


STEPS, STOP_AT = 6, 4  # checkpoints every 3 steps; the stop comes after step 4 (between saves)


VARIANTS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "loraplus_8bit": ({}, {"loraplus_lr_ratio": 8.0, "optimizer": "paged_adamw_8bit"}),
    "lora_ga": ({"init": "lora_ga", "loraga_samples": 12}, {}),
    "loftq": ({"init": "loftq"}, {}),
    "loftq_iter2_dora": ({"init": "loftq", "loftq_iter": 2, "use_dora": True}, {}),
    "pissa": ({"init": "pissa"}, {}),
    "olora_rslora": ({"init": "olora", "use_rslora": True}, {}),
    "adalora": ({"type": "adalora", "r": 8, "adalora_target_r": 4, "adalora_tinit_ratio": 0.0,
                 "adalora_tfinal_ratio": 0.34}, {"learning_rate": 3e-2}),
    "vera": ({"type": "vera", "r": 32}, {"learning_rate": 2e-2}),
}


BASE_CHANGING = {"lora_ga", "loftq_iter2_dora", "pissa", "olora_rslora"}


class StopAt:
    """A StopRequest stand-in that asks for a checkpoint once the run reaches ``step``."""

    signal_name = "SIGTERM"

    def __init__(self, run: Any, step: int):
        self.run, self.step = run, step

    @property
    def requested(self) -> bool:
        return self.run.step >= self.step


def variant_config(root: Path, name: str, model: Path, data: Path, out: str, **train: Any) -> Path:
    lora, extra = VARIANTS[name]
    return write_config(root / f"{out}.yaml", model, data, root / out, lora=lora,
                        train={"max_steps": STEPS, "save_steps": 3, "save_total_limit": 5, **extra, **train})


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, tiny_llama: Path, data_file: Path):
    """Factory: an uninterrupted run of a variant (trained once per module)."""
    runs: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in runs:
            root = tmp_path_factory.mktemp(name)
            assert run_training(variant_config(root, name, tiny_llama, data_file, "run"), []) == 0
            runs[name] = root / "run"
        return runs[name]

    return get


def _interrupted_then_resumed(root: Path, name: str, model: Path, data: Path) -> tuple[Path, Any]:
    cfg_path = variant_config(root, name, model, data, "run")
    cfg, sources = load_config(cfg_path)
    out = Path(cfg.output_dir)
    start = Start(out, "fresh")
    run = setup(cfg, dump_config(cfg, sources), out, start, skip_memory_check=True)
    begin(run, start)
    with pytest.raises(Preempted):
        train(run, StopAt(run, STOP_AT))
    assert run_training(cfg_path, [], resume=True) == 0
    return out, run


def _logits(model: Any, ids: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(input_ids=ids).logits.float()


@pytest.mark.parametrize("name", list(VARIANTS))
def test_variant_trains_resumes_exports_and_loads_with_peft(name: str, trained, tiny_llama: Path, data_file: Path,
                                                            tmp_path: Path, one_thread) -> None:
    reference = trained(name)
    losses = [r["loss"] for r in metrics_of(reference) if "loss" in r]
    assert losses[-1] < losses[0] - 0.02, f"{name}: loss did not fall: {losses}"

    resumed, first_part = _interrupted_then_resumed(tmp_path, name, tiny_llama, data_file)
    a = load_file(reference / "adapter/adapter_model.safetensors")
    b = load_file(resumed / "adapter/adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f"{name}: resumed adapter differs"
    assert metrics_of(resumed) == metrics_of(reference), f"{name}: resumed losses differ"

    manifest = json.loads((reference / "manifest.json").read_text())
    variant = manifest["lora"]["variant"]
    lora, train_cfg = VARIANTS[name]
    assert variant["type"] == lora.get("type", "lora") and variant["init"] == lora.get("init", "default")
    assert variant["loraplus_lr_ratio"] == train_cfg.get("loraplus_lr_ratio")
    assert bool(manifest["lora"]["residual_base"]) == (name in BASE_CHANGING)
    if name == "loraplus_8bit":
        lrs = sorted({g["initial_lr"] for g in first_part.optimizer.param_groups if g["params"]})
        assert lrs == [5e-3, 8 * 5e-3] and type(first_part.optimizer).__name__ == "PagedAdamW8bit"

    out = tmp_path / "export"
    assert ex.export_run(reference, out, show_progress=False, verify_prompts=3) == 0
    report = json.loads((out / "export_report.json").read_text())
    assert report["verification"]["status"] == "passed", report["verification"]["failures"]
    assert report["adapter"]["residual_base_modules"] == (len(manifest["lora"]["target_modules"]) * 2
                                                           if name in BASE_CHANGING else 0)
    card = (out / "README.md").read_text()
    assert f"type={variant['type']}, init={variant['init']}" in card

    # Plain peft: the adapter loads onto the NF4 base (+ the stored residual for base-changing inits)
    # and computes what the verified export computes.
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    cfg = load_config(reference / "config.yaml")[0]
    base = qmodel_base.load_quantized_base(tiny_llama, cfg.model, torch.float32, torch.device("cpu"))
    residual.load_residual_base(base, reference, manifest)
    tuned = PeftModel.from_pretrained(base, reference / "adapter").eval()
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = torch.tensor([[4, 10, 20, 30, 5, 60, 7]])
    expected, got = _logits(merged, ids), _logits(tuned, ids)
    assert (expected - got).abs().max() <= 0.03 * expected.std(), f"{name}: plain peft differs from the export"


def test_adalora_reallocates_ranks_and_keeps_its_schedule(trained, tmp_path: Path, one_thread) -> None:
    run = trained("adalora")
    ranks = json.loads((run / "manifest.json").read_text())["lora"]["variant"]["ranks"]
    assert ranks["total"] < ranks["initial_total"] and ranks["min"] < ranks["max"], ranks
    config = json.loads((run / "adapter/adapter_config.json").read_text())
    stored = {k: v.shape[0] for k, v in load_file(run / "adapter/adapter_model.safetensors").items()
              if k.endswith("lora_A")}
    assert sorted(stored.values()) != [8] * len(stored), "the saved adapter was not pruned to the rank pattern"
    assert {sum(v) for v in config["rank_pattern"].values()} == set(stored.values())

    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    with pytest.raises(ConfigError, match="lora.type=adalora.*train.max_steps"):
        run_training(copy / "config.yaml", [f"output_dir={copy}", "train.max_steps=9"], resume=True)


def test_residual_base_is_what_the_merge_needs(trained, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               one_thread) -> None:
    run = trained("pissa")
    with pytest.raises(ModelError, match="--merge-base original cannot be merged exactly for lora.init=pissa"):
        ex.export_run(run, tmp_path / "orig", merge_base="original", show_progress=False)
    with pytest.raises(ModelError, match="trained against a changed base") as err:  # `qlora-kit push RUN`
        read_adapter_run(run)
    assert "--push-to-hub" in err.value.hint
    # merging onto NF4 of the original weights instead of the stored residual is caught by verification
    real = command.merge_context
    monkeypatch.setattr(command, "merge_context", lambda *a: dataclasses.replace(real(*a), residual_modules=frozenset()))
    assert ex.export_run(run, tmp_path / "wrong", show_progress=False, verify_prompts=3) == 5
    monkeypatch.undo()

    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    (copy / "base_residual.safetensors").write_bytes(b"x" + (copy / "base_residual.safetensors").read_bytes()[1:])
    with pytest.raises(ModelError, match="sha256"):
        load.load_run_for_inference(copy, device=torch.device("cpu"))
    (copy / "base_residual.safetensors").unlink()
    with pytest.raises(ModelError, match="missing"):
        ex.export_run(copy, tmp_path / "gone", show_progress=False)


def test_loraga_without_enough_rows_is_one_line(tmp_path: Path, tiny_llama: Path, data_file: Path) -> None:
    cfg = write_config(tmp_path / "c.yaml", tiny_llama, data_file, tmp_path / "run",
                       lora={"init": "lora_ga", "loraga_samples": 500})
    with pytest.raises(ConfigError, match=r"lora.init=lora_ga .*lora.loraga_samples=500.* only 43"):
        run_training(cfg, [])
    assert not (tmp_path / "run").exists()


@gpu
@pytest.mark.parametrize("name", ["lora_ga", "pissa", "adalora", "vera", "loraplus_8bit"])
def test_cuda_bf16_variants_train_and_reload(name: str, tiny_llama: Path, data_file: Path, tmp_path: Path) -> None:
    """bf16 adapters on CUDA (VeRA's shared projections cast with them), paged 8-bit LoRA+; export verifies."""
    cfg = variant_config(tmp_path, name, tiny_llama, data_file, "run")
    assert run_training(cfg, []) == 0
    out = tmp_path / "export"
    assert ex.export_run(tmp_path / "run", out, show_progress=False, verify_prompts=3) == 0
    report = json.loads((out / "export_report.json").read_text())
    assert report["verification"]["status"] == "passed", report["verification"]["failures"]
