"""ops.offload: gradients are the same with checkpointed layer inputs offloaded and prefetched."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from conftest import (
    adapter_grads,
    arithmetic_rows,
    assert_grads_close,
    gpu,
    make_qlora_model,
    write_config,
    write_jsonl,
)

from qlora_kit.ops.offload import ActivationOffload, enable_offload, offloading_checkpoint

LAYERS = 2  # tiny models


def _train_steps(model, steps: int = 2) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Two micro-batches (gradient accumulation), dropout active: RNG and ordering both matter."""
    ids = torch.randint(6, 400, (2, 23), generator=torch.Generator().manual_seed(0))
    loss = None
    for step in range(steps):
        torch.manual_seed(100 + step)
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
    return loss.detach(), adapter_grads(model)


@pytest.mark.parametrize("every_n_layers", [1, 2])
def test_offloaded_gradients_equal_plain_checkpointing(tiny_llama, one_thread, every_n_layers: int) -> None:
    plain = make_qlora_model(tiny_llama, targets="all-linear", dropout=0.1, every_n_layers=every_n_layers)
    want_loss, want = _train_steps(plain)

    model = make_qlora_model(tiny_llama, targets="all-linear", dropout=0.1, every_n_layers=every_n_layers)
    offload = ActivationOffload(torch.device("cpu"), min_bytes=0)
    enable_offload(model, offload, every_n_layers)
    got_loss, got = _train_steps(model)

    torch.testing.assert_close(got_loss, want_loss, atol=0, rtol=0)
    assert_grads_close(got, want, atol=0, rtol=0)
    checkpointed = len(range(0, LAYERS, every_n_layers))
    assert offload.stats["offloaded"] == 2 * checkpointed  # one input per checkpointed layer and micro-batch
    # in each backward the last layer's input is fetched when needed, every earlier one was prefetched
    assert offload.stats["fetched_on_demand"] == 2
    assert offload.stats["prefetched"] == 2 * (checkpointed - 1)


def test_fractional_every_n_checkpoints_the_planned_layers_with_the_same_gradients(tmp_path: Path,
                                                                                  one_thread) -> None:
    """n = 4/3 on 4 layers: layers 0, 2 and 3 are checkpointed (what the planner counts), 1 keeps its
    activations; losses and adapter gradients equal those without checkpointing, offloaded or not."""
    from qlora_kit.model.tiny import build_tiny_model
    from qlora_kit.ops.checkpointing import checkpointed_layers, every_n_for, set_checkpointed_layers

    source = build_tiny_model(tmp_path / "four", "llama", num_hidden_layers=4)
    n = every_n_for(4, 3)
    assert checkpointed_layers(4, n) == [0, 2, 3]
    want_loss, want = _train_steps(make_qlora_model(source, targets="all-linear", dropout=0.1, checkpointing=False))
    for offloaded in (False, True):
        model = make_qlora_model(source, targets="all-linear", dropout=0.1, every_n_layers=n)
        layers = model.get_base_model().model.layers
        assert [i for i, layer in enumerate(layers) if layer.gradient_checkpointing] == [0, 2, 3]
        offload = ActivationOffload(torch.device("cpu"), min_bytes=0)
        if offloaded:
            enable_offload(model, offload, n)
            assert set_checkpointed_layers(model.get_base_model(), n) == [0, 2, 3]
        got_loss, got = _train_steps(model)
        torch.testing.assert_close(got_loss, want_loss, atol=1e-6, rtol=1e-6)
        assert_grads_close(got, want, atol=1e-6, rtol=1e-5)
        assert offload.stats["offloaded"] == (2 * 3 if offloaded else 0)  # 3 checkpointed inputs, 2 micro-batches


def test_pack_keeps_a_host_copy_only(one_thread) -> None:
    offload = ActivationOffload(torch.device("cpu"), min_bytes=0)
    x = torch.randn(3, 5)
    original = x.clone()
    handle = offload.pack(x)
    assert handle.host.data_ptr() != x.data_ptr() and torch.equal(handle.host, x)
    x.add_(1)  # the original may be reused once packed: the saved copy is unaffected
    assert torch.equal(offload.unpack(handle), original)
    small = ActivationOffload(torch.device("cpu"))  # default threshold: small tensors are left alone
    assert small.pack(x) is x and small.stats["offloaded"] == 0
    param = torch.nn.Parameter(torch.randn(2048, 1024))
    assert small.pack(param) is param


def test_checkpoint_function_offloads_only_the_layer_input(one_thread) -> None:
    """Inside the checkpointed function the checkpoint's own hook wins: only its saved input is offloaded."""
    offload = ActivationOffload(torch.device("cpu"), min_bytes=0)
    layer = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.GELU(), torch.nn.Linear(32, 8))
    x = torch.randn(4, 8, requires_grad=True)
    out = offloading_checkpoint(offload)(layer, x)
    assert offload.stats["offloaded"] == 1 and offload.stats["offloaded_bytes"] == x.numel() * 4
    out.sum().backward()
    want = torch.autograd.grad(layer(x).sum(), x)[0]
    torch.testing.assert_close(x.grad, want)


def test_offload_true_on_cpu_is_a_logged_no_op(tmp_path: Path, tiny_llama: Path, caplog) -> None:
    from qlora_kit.core.config import dump_config, load_config
    from qlora_kit.core.signals import StopRequest
    from qlora_kit.rundir.target import Start
    from qlora_kit.train.loop import train
    from qlora_kit.train.outputs import begin
    from qlora_kit.train.setup import setup

    data = write_jsonl(tmp_path / "data.jsonl", arithmetic_rows(24))
    cfg_path = write_config(tmp_path / "cfg.yaml", tiny_llama, data, tmp_path / "out",
                            train={"activation_offload": True, "max_steps": 2, "save_steps": 2})
    cfg, sources = load_config(cfg_path)
    start = Start(Path(cfg.output_dir), "fresh")
    with caplog.at_level(logging.INFO, logger="qlora_kit"):
        run = setup(cfg, dump_config(cfg, sources), Path(cfg.output_dir), start, skip_memory_check=True)
        begin(run, start)
        with StopRequest() as stop:
            train(run, stop)
    assert "activation_offload: nothing to do on CPU" in caplog.text
    assert run.manifest["memory"]["activation_offload"] is False


@gpu
def test_cuda_offload_matches_and_frees_device_memory(tiny_models) -> None:
    """On CUDA: same gradients, and the checkpointed inputs leave the device (side-stream copies)."""
    from qlora_kit.core.config import LoraConfig, ModelConfig
    from qlora_kit.model.base import load_quantized_base
    from qlora_kit.model.lora import attach_lora
    from qlora_kit.model.tiny import build_tiny_model

    source = build_tiny_model(Path(tiny_models("llama")).parent / "llama-deep", "llama", num_hidden_layers=8,
                              hidden_size=256, intermediate_size=512)
    device = torch.device("cuda")
    ids = torch.randint(6, 400, (1, 4096), device=device)

    def run(offload: bool):
        torch.manual_seed(0)
        base = load_quantized_base(source, ModelConfig(name_or_path=str(source)), torch.bfloat16, device)
        model = attach_lora(base, LoraConfig(r=8, dropout=0.0), torch.float32, True)
        hooks = ActivationOffload(device) if offload else None
        if hooks:
            enable_offload(model, hooks)
        model.train()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        torch.cuda.synchronize()
        torch.empty(1, device=device)  # lets the allocator process the blocks released after their copies
        after_forward = torch.cuda.memory_allocated() - before
        loss.backward()
        torch.cuda.synchronize()
        return after_forward, adapter_grads(model), hooks

    kept, want, _ = run(False)
    kept_offloaded, got, hooks = run(True)
    assert hooks.stats["offloaded"] == 8
    assert kept_offloaded < kept - 6 * 4096 * 256 * 2  # at least 6 of the 8 layer inputs left the device
    assert_grads_close(got, want, atol=1e-3, rtol=1e-2)


def test_all_techniques_together_equal_the_plain_path(tiny_llama, one_thread) -> None:
    """Packed row + fused loss + tiled MLP + offloaded checkpoints: the plain path's loss and gradients."""
    from qlora_kit.data import batching as D
    from qlora_kit.ops.loss import causal_lm_loss, count_targets
    from qlora_kit.ops.packing import use_packed_attention
    from qlora_kit.ops.tiled_mlp import tile_mlps

    g = torch.Generator().manual_seed(4)
    samples = []
    for n in (14, 9, 20):
        ids = torch.randint(6, 400, (n,), generator=g).tolist()
        samples.append({"input_ids": ids, "labels": [-100] * 4 + ids[4:]})
    batch = D.collate(samples, [[0, 1], [2]], pad_id=0, max_length=64, packing=True)
    n_items = count_targets(batch["labels"])

    plain = make_qlora_model(tiny_llama, targets="all-linear")
    use_packed_attention(plain)
    causal_lm_loss(plain, batch, n_items, fused=False).backward()

    model = make_qlora_model(tiny_llama, targets="all-linear", fused_loss=True)
    use_packed_attention(model)
    tile_mlps(model, tile_tokens=8)
    offload = ActivationOffload(torch.device("cpu"), min_bytes=0)
    enable_offload(model, offload)
    causal_lm_loss(model, batch, n_items, fused=True).backward()

    assert offload.stats["offloaded"] == LAYERS
    assert_grads_close(adapter_grads(model), adapter_grads(plain), atol=1e-6, rtol=1e-5)
