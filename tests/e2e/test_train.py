"""Training on a tiny random chat model: 4-bit base frozen, adapters trained, outputs complete."""

from __future__ import annotations

import json
from pathlib import Path

import bitsandbytes as bnb
import pytest
import torch
from conftest import arithmetic_rows, gpu, run_cli, write_config, write_jsonl
from safetensors.torch import load_file

from qlora_kit.core.config import dump_config, load_config
from qlora_kit.core.signals import StopRequest
from qlora_kit.rundir.target import Start
from qlora_kit.train.loop import train
from qlora_kit.train.outputs import begin
from qlora_kit.train.setup import setup

pytestmark = pytest.mark.e2e


def _setup_run(tmp_path: Path, model: Path, **sections):
    data = write_jsonl(tmp_path / "data.jsonl", arithmetic_rows(48))
    cfg_path = write_config(tmp_path / "cfg.yaml", model, data, tmp_path / "out", **sections)
    cfg, sources = load_config(cfg_path)
    start = Start(Path(cfg.output_dir), "fresh")
    run = setup(cfg, dump_config(cfg, sources), Path(cfg.output_dir), start, skip_memory_check=True)
    begin(run, start)
    return run


@pytest.mark.parametrize("arch, expected", [
    ("llama", {"q_proj", "k_proj", "v_proj", "o_proj"}),
    ("qwen2", {"q_proj", "k_proj", "v_proj", "o_proj"}),
    ("mistral", {"q_proj", "k_proj", "v_proj", "o_proj"}),
    ("phi3", {"qkv_proj", "o_proj"}),
])
def test_base_frozen_in_4bit_and_adapters_trained(tmp_path: Path, tiny_models, arch: str, expected: set) -> None:
    run = _setup_run(tmp_path, tiny_models(arch), train={"max_steps": 3, "save_steps": 3})
    linears = {n: m for n, m in run.model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert linears, "base linear layers must be bitsandbytes 4-bit"
    assert all(m.weight.quant_state.quant_type == "nf4" and m.weight.quant_state.nested for m in linears.values())
    base_before = {n: (m.weight.data.clone(), m.weight.quant_state.absmax.clone()) for n, m in linears.items()}
    lora_before = {n: p.detach().clone() for n, p in run.model.named_parameters() if p.requires_grad}
    # Default targets: the attention projections only, with B zero-initialised.
    assert set(run.model.peft_config["default"].target_modules) == expected
    assert {n.split(".")[-4] for n in lora_before} == expected
    assert all(torch.count_nonzero(p) == 0 for n, p in lora_before.items() if "lora_B" in n)
    assert all(not p.requires_grad for n, p in run.model.named_parameters() if "lora_" not in n)

    with StopRequest() as stop:
        train(run, stop)

    for name, m in linears.items():
        assert torch.equal(m.weight.data, base_before[name][0]), f"4-bit weights of {name} changed"
        assert torch.equal(m.weight.quant_state.absmax, base_before[name][1]), f"absmax of {name} changed"
    changed = [n for n, p in run.model.named_parameters() if p.requires_grad and not torch.equal(p, lora_before[n])]
    assert len(changed) == len(lora_before), "every adapter matrix should have been updated"


def test_all_linear_and_explicit_targets(tmp_path: Path, tiny_llama: Path) -> None:
    run = _setup_run(tmp_path, tiny_llama, lora={"target_modules": "all-linear"})
    assert set(run.model.peft_config["default"].target_modules) == {
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    run = _setup_run(tmp_path / "b", tiny_llama, lora={"target_modules": ["q_proj", "v_proj"], "use_rslora": True,
                                                        "use_dora": True})
    assert set(run.model.peft_config["default"].target_modules) == {"q_proj", "v_proj"}
    assert run.model.peft_config["default"].use_dora and run.model.peft_config["default"].use_rslora


def test_cli_train_end_to_end(tmp_path: Path, tiny_llama: Path) -> None:
    data = write_jsonl(tmp_path / "data.jsonl", arithmetic_rows(64))
    cfg = write_config(tmp_path / "cfg.yaml", tiny_llama, data, tmp_path / "run",
                       train={"max_steps": 24, "save_steps": 8, "logging_steps": 2, "learning_rate": 1e-2,
                              "optimizer": "paged_adamw_8bit"})
    proc = run_cli("train", str(cfg), "--set", "train.lr_scheduler=linear")
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "run"
    for name in ("config.yaml", "manifest.json", "metrics.jsonl", "loss.png", "data_summary.json", "heldout.jsonl",
                 "adapter/adapter_model.safetensors", "adapter/adapter_config.json", "tokenizer/tokenizer.json",
                 "checkpoint-24/state.json", "checkpoint-16/optimizer.safetensors"):
        assert (run / name).is_file(), f"{name} missing"
    assert not (run / "checkpoint-8").exists(), "save_total_limit=2 keeps the newest two"
    pickles = [p for p in run.rglob("*") if p.suffix in {".bin", ".pt", ".pth", ".pkl", ".pickle"}]
    assert not pickles
    tok_cfg = json.loads((run / "tokenizer/tokenizer_config.json").read_text())
    assert "chat_template" in tok_cfg or (run / "tokenizer/chat_template.jinja").is_file()
    assert "lr_scheduler: linear  # override --set" in (run / "config.yaml").read_text()

    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["status"] == "completed" and manifest["end_time"]
    assert manifest["versions"]["torch"] and manifest["versions"]["bitsandbytes"]
    assert manifest["device"]["type"] == "cpu" and len(manifest["data"]["sha256"]) == 64
    assert manifest["quant"] == {"quant_type": "nf4", "double_quant": True, "blocksize": 64,
                                 "compute_dtype": "float32", "load_dtype": "float32", "quant_storage": "uint8"}

    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train_records = [r for r in records if "loss" in r]
    assert [r["step"] for r in train_records] == list(range(2, 25, 2))
    assert all({"step", "loss", "learning_rate", "tokens_per_second"} <= r.keys() for r in train_records)
    assert any("eval_loss" in r for r in records)
    first, last = train_records[0]["loss"], train_records[-1]["loss"]
    assert last < first - 0.25, f"loss did not fall: {first} -> {last}"
    assert "float32" in proc.stderr  # the CPU dtype choice is logged

    # The adapter loads with plain peft onto the NF4 base and changes the outputs.
    from peft import PeftModel

    from qlora_kit.model import base as qmodel

    model_cfg = load_config(run / "config.yaml")[0].model
    base = qmodel.load_quantized_base(tiny_llama, model_cfg, torch.float32, torch.device("cpu"))
    ids = torch.tensor([[4, 10, 20, 30, 5]])
    before = base(ids).logits
    tuned = PeftModel.from_pretrained(base, run / "adapter")
    assert not torch.allclose(tuned(ids).logits, before)
    adapter = load_file(run / "adapter/adapter_model.safetensors")
    assert all(torch.isfinite(t).all() for t in adapter.values())


def test_packing_run(tmp_path: Path, tiny_llama: Path) -> None:
    run = _setup_run(tmp_path, tiny_llama, data={"packing": True}, train={"max_steps": 2, "max_length": 128})
    with StopRequest() as stop:
        train(run, stop)
    assert run.step == 2
    assert run.manifest["memory"]["packing"] and run.manifest["memory"]["attention"] == "qlora_kit_varlen"


def test_memory_techniques_train_like_the_plain_path(tmp_path: Path, tiny_llama: Path, monkeypatch) -> None:
    """Fused loss + tiled MLP + every-2nd-layer checkpointing: the same training as the plain path."""
    from qlora_kit.ops import tiled_mlp

    monkeypatch.setattr(tiled_mlp, "MLP_TILE_TOKENS", 16)  # tiny rows: make the tiling happen
    tiled_calls = []
    apply = tiled_mlp.TiledMLPFunction.apply
    monkeypatch.setattr(tiled_mlp.TiledMLPFunction, "apply", lambda *a: tiled_calls.append(1) or apply(*a))
    common = {"lora": {"target_modules": "all-linear"}}
    plain = _setup_run(tmp_path / "plain", tiny_llama, train={"fused_loss": False, "tiled_mlp": False,
                                                               "checkpoint_every_n_layers": 1}, **common)
    fast = _setup_run(tmp_path / "fast", tiny_llama, train={"fused_loss": True, "tiled_mlp": True,
                                                             "checkpoint_every_n_layers": 2}, **common)
    assert fast.manifest["memory"] | {"fused_loss": True, "tiled_mlp": True, "checkpoint_every_n_layers": 2} == \
        fast.manifest["memory"]
    for run in (plain, fast):
        with StopRequest() as stop:
            train(run, stop)
    want = [r["loss"] for r in plain.metrics.read() if "loss" in r]
    got = [r["loss"] for r in fast.metrics.read() if "loss" in r]
    assert len(got) == len(want) == 6 and tiled_calls
    assert got == pytest.approx(want, rel=1e-4, abs=1e-5)
    for (name, a), b in zip(plain.model.named_parameters(), fast.model.parameters()):
        if a.requires_grad:
            torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-4, msg=name)


@gpu
def test_cuda_fp32_adapters_autocast_and_8bit_optimizer(tmp_path: Path, tiny_llama: Path) -> None:
    run = _setup_run(tmp_path, tiny_llama, train={"optimizer": "adamw_8bit", "max_steps": 2})
    trainable = [p for p in run.model.parameters() if p.requires_grad]
    assert all(p.dtype == torch.float32 and p.is_cuda for p in trainable)
    assert run.precision.autocast and run.precision.compute_dtype in (torch.bfloat16, torch.float16)
    assert type(run.optimizer).__name__ == "AdamW8bit"
    with StopRequest() as stop:
        train(run, stop)
    assert run.step == 2
    paged = _setup_run(tmp_path / "paged", tiny_llama, train={"optimizer": "paged_adamw_8bit", "max_steps": 1})
    assert type(paged.optimizer).__name__ == "PagedAdamW8bit"


def _host_syncs_in_step(optimizer: torch.optim.Optimizer, params: list[torch.Tensor], monkeypatch) -> int:
    """Explicit ``torch.cuda.synchronize`` calls in a second ``optimizer.step()`` (the first creates the states);
    implicit syncs (``.item()``, blocking copies) raise under the sync debug mode."""
    calls = []
    for p in params:
        p.grad = torch.randn_like(p)
    optimizer.step()
    for p in params:
        p.grad = torch.randn_like(p)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *args, **kwargs: calls.append(args))  # looked up per call
    torch.cuda.set_sync_debug_mode("error")
    try:
        optimizer.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
        monkeypatch.undo()
    return len(calls)


@gpu
def test_auto_optimizer_steps_without_a_host_sync_on_cuda(tmp_path: Path, tiny_llama: Path, monkeypatch) -> None:
    """Issue 8 item 5: with room to spare, ``auto`` is torch's fused AdamW, whose step never waits for the GPU;
    bitsandbytes 0.50's 8-bit step synchronises once per parameter (the control that shows the check works)."""
    run = _setup_run(tmp_path, tiny_llama, train={"optimizer": "auto", "max_steps": 1})
    assert run.cfg.train.optimizer == "adamw_torch" and run.optimizer.defaults.get("fused") is True
    trainable = [p for p in run.model.parameters() if p.requires_grad]
    assert _host_syncs_in_step(run.optimizer, trainable, monkeypatch) == 0
    eight = _setup_run(tmp_path / "8bit", tiny_llama, train={"optimizer": "adamw_8bit", "max_steps": 1})
    trainable = [p for p in eight.model.parameters() if p.requires_grad]
    assert _host_syncs_in_step(eight.optimizer, trainable, monkeypatch) >= len(trainable)


def test_epochs_decide_the_step_count_when_max_steps_is_unset(tmp_path: Path, tiny_llama: Path) -> None:
    from qlora_kit.train.builders import compute_total_steps, warmup_steps

    cfg, _ = load_config(write_config(tmp_path / "c.yaml", tiny_llama, tmp_path / "d.jsonl", tmp_path / "o"),
                         ["train.max_steps=null", "train.num_epochs=2.5", "train.gradient_accumulation_steps=4",
                          "train.warmup_steps=null", "train.warmup_ratio=0.1"])
    assert compute_total_steps(cfg, micro_per_epoch=10) == 7  # ceil(2.5 * 10 / 4)
    assert warmup_steps(cfg, 7) == 0 and warmup_steps(cfg, 30) == 3  # floor: no step spent at LR 0 in short runs
    run = _setup_run(tmp_path / "e", tiny_llama, train={"max_steps": None, "num_epochs": 1,
                                                         "gradient_accumulation_steps": 2})
    assert run.total_steps == -(-run.micro_per_epoch // 2)
