"""LoRA variants on tiny models: LoRA+, LoRA-GA, LoftQ, PiSSA, OLoRA, AdaLoRA, VeRA.

Each variant trains through the real recipe on the NF4 base (loss falls), resumes exactly
after a preemption, exports onto the weights it was trained against with verification
passing, and its adapter loads with plain peft.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from qlora_kit.core.config import validate
from qlora_kit.core.errors import ConfigError, ModelError
from qlora_kit.model import base as qmodel_base
from qlora_kit.model import lora as qmodel_lora
from qlora_kit.ops import checkpointing


def _summed_loss(model: Any):
    return lambda batch: model(**batch, num_items_in_batch=1, use_cache=False).loss


def test_loraga_gradient_estimate_equals_autograd_on_the_dequantised_weights(tiny_llama: Path, one_thread) -> None:
    import bitsandbytes as bnb
    from transformers import AutoModelForCausalLM

    from qlora_kit.variants.init import dequantised, estimate_gradients

    cfg = validate({"model": {"name_or_path": str(tiny_llama)}, "data": {"path": "x"}, "output_dir": "o"})
    base = qmodel_base.load_quantized_base(tiny_llama, cfg.model, torch.float32, torch.device("cpu"))
    checkpointing.enable_gradient_checkpointing(base)  # the hooks must see each layer once despite recomputation
    ids = torch.randint(6, 300, (2, 12), generator=torch.Generator().manual_seed(0))
    batches = [{"input_ids": ids, "labels": ids, "attention_mask": torch.ones_like(ids)}] * 2
    n_items = 2 * 2 * 11
    modules = {n: m for n, m in base.named_modules()
               if isinstance(m, bnb.nn.Linear4bit) and n.rsplit(".", 1)[-1] in ("q_proj", "v_proj")}
    grads = estimate_gradients(base, modules, batches, _summed_loss(base), n_items)

    ref = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    for name, module in base.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            ref.get_submodule(name).weight.data = dequantised(module)
    ref.requires_grad_(False)
    for name in grads:
        ref.get_submodule(name).weight.requires_grad_(True)
    for batch in batches:
        ref(**batch, num_items_in_batch=n_items).loss.backward()
    assert set(grads) == {f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")}
    for name, grad in grads.items():
        expected = ref.get_submodule(name).weight.grad
        assert torch.allclose(grad, expected, rtol=1e-4, atol=1e-6 * expected.abs().max()), name


def _loraga_model(tiny_llama: Path, lora: dict[str, Any], tiled: bool = False, fused: bool = False
                  ) -> tuple[Any, Any]:
    """A LoRA-GA model built in train.build_model's order (fused loss head before the adapters)."""
    from qlora_kit.ops import loss, packing, tiled_mlp

    cfg = validate({"model": {"name_or_path": str(tiny_llama)}, "lora": {"init": "lora_ga", "r": 4, **lora},
                    "data": {"path": "x"}, "output_dir": "o"})
    base = qmodel_base.load_quantized_base(tiny_llama, cfg.model, torch.float32, torch.device("cpu"))
    if fused:
        loss.add_fused_loss(base)
    model = qmodel_lora.attach_lora(base, cfg.lora, torch.float32, True)
    packing.use_packed_attention(model)
    if tiled:
        tiled_mlp.tile_mlps(model, tile_tokens=5)
    return cfg, model


def test_loraga_in_passes_and_on_the_training_path_gives_the_same_init(tiny_llama: Path, one_thread) -> None:
    """Splitting LoRA-GA's gradients into groups (less memory) changes nothing in the factors; the estimate runs
    with the adapters disabled (a trained adapter does not change it) on packed rows, through tiled MLPs and
    through the fused loss head (the loop's ``causal_lm_loss``, summed)."""
    from qlora_kit.ops.loss import causal_lm_loss
    from qlora_kit.ops.packing import pack_batch
    from qlora_kit.variants.init import loraga_factors

    gen = torch.Generator().manual_seed(0)
    pieces = [(ids := torch.randint(6, 300, (n,), generator=gen).tolist(), [-100] + ids[1:]) for n in (9, 14, 6)]
    batches = [pack_batch(pieces)]
    targets = "all-linear"
    results = []
    for passes, tiled, fused in ((1, False, False), (3, False, False), (2, True, False), (1, False, True)):
        cfg, model = _loraga_model(tiny_llama, {"loraga_passes": passes, "target_modules": targets}, tiled, fused)
        if passes == 3:  # non-zero adapters must not leak into the base model's gradient
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.data.normal_()
        summed = (lambda batch, m=model: causal_lm_loss(m, batch, 1, True)) if fused else _summed_loss(model)
        torch.manual_seed(0)  # peft's LoRA-GA SVD is randomised
        results.append(loraga_factors(model, cfg.lora, batches, summed, 26, tiny_llama))
    assert len(results[0]) == 2 * 7
    for other in results[1:]:
        assert other.keys() == results[0].keys()
        for name, (a, b) in results[0].items():
            (a, b), (a2, b2) = _signs_fixed(a, b), _signs_fixed(*other[name])
            assert torch.allclose(a, a2, atol=1e-5) and torch.allclose(b, b2, atol=1e-5), name


def _signs_fixed(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """LoRA-GA's A rows and B columns are singular vectors, each defined up to its sign (last-bit differences in
    the gradient, e.g. fused vs full-logits loss, can flip one): make each one's largest entry positive."""
    def fix(m: torch.Tensor) -> torch.Tensor:  # rows of m
        return m * m.gather(1, m.abs().argmax(1, keepdim=True)).sign()

    return fix(a), fix(b.T).T


@pytest.mark.parametrize("lora,train,both", [
    ({"type": "vera", "use_dora": True}, {}, ("lora.type=vera", "lora.use_dora")),
    ({"type": "vera", "use_rslora": True}, {}, ("lora.type=vera", "lora.use_rslora")),
    ({"type": "adalora", "use_dora": True}, {}, ("lora.type=adalora", "lora.use_dora")),
    ({"type": "adalora", "init": "pissa"}, {}, ("lora.type=adalora", "lora.init=pissa")),
    ({"type": "vera", "init": "loftq"}, {}, ("lora.type=vera", "lora.init=loftq")),
    ({"type": "adalora", "r": 4, "adalora_target_r": 8}, {}, ("lora.adalora_target_r", "lora.r")),
    ({"type": "adalora", "adalora_tinit_ratio": 0.5, "adalora_tfinal_ratio": 0.5}, {},
     ("lora.adalora_tinit_ratio", "lora.adalora_tfinal_ratio")),
    ({"type": "vera"}, {"loraplus_lr_ratio": 16}, ("train.loraplus_lr_ratio", "lora.type=vera")),
])
def test_invalid_variant_combinations_name_both_settings(lora: dict, train: dict, both: tuple[str, str]) -> None:
    raw = {"model": {"name_or_path": "m"}, "lora": lora, "data": {"path": "d"}, "train": train, "output_dir": "o"}
    with pytest.raises(ConfigError) as err:
        validate(raw)
    message = err.value.message
    assert "\n" not in message and all(setting in message for setting in both), message


def test_variant_settings_validate() -> None:
    raw = {"model": {"name_or_path": "m"}, "data": {"path": "d"}, "output_dir": "o"}
    with pytest.raises(ConfigError, match="lora.init"):
        validate({**raw, "lora": {"init": "gaussian"}})
    with pytest.raises(ConfigError, match="loraplus_lr_ratio"):
        validate({**raw, "train": {"loraplus_lr_ratio": 0.5}})
    cfg = validate({**raw, "lora": {"init": "lora_ga", "use_dora": True}, "train": {"loraplus_lr_ratio": 16}})
    assert cfg.lora.init == "lora_ga" and cfg.train.loraplus_lr_ratio == 16


@pytest.mark.parametrize("lora", [
    {"type": "lora", "use_dora": True}, {"type": "adalora", "r": 8, "adalora_target_r": 4},
    {"type": "vera", "r": 32}])
def test_planner_counts_each_variants_trainable_parameters(tiny_llama: Path, lora: dict) -> None:
    from qlora_kit.plan.estimate import estimate
    from qlora_kit.plan.shape import load_shape_file

    cfg = validate({"model": {"name_or_path": str(tiny_llama)}, "lora": {**lora, "target_modules": "all-linear"},
                    "data": {"path": "d"}, "train": {"max_steps": 10}, "output_dir": "o"})
    plan = estimate(cfg, load_shape_file(tiny_llama / "config.json"))
    base = qmodel_base.load_quantized_base(tiny_llama, cfg.model, torch.float32, torch.device("cpu"))
    model = qmodel_lora.attach_lora(base, cfg.lora, torch.float32, False, total_steps=10)
    assert plan.trainable_parameters == qmodel_lora.count_parameters(model)[0]
    parts = plan.phases["loss"]
    assert ("vera_projections" in parts) == (lora["type"] == "vera")
    assert ("adalora_importance" in parts) == (lora["type"] == "adalora")


def test_planner_accounts_for_the_init(tiny_llama: Path) -> None:
    from qlora_kit.plan.estimate import estimate
    from qlora_kit.plan.shape import linear_layers, load_shape_file

    shape = load_shape_file(tiny_llama / "config.json")
    raw = {"model": {"name_or_path": str(tiny_llama)}, "data": {"path": "d"}, "output_dir": "o"}
    assert "init" not in estimate(validate(raw), shape).phases
    ga = estimate(validate({**raw, "lora": {"init": "lora_ga"}}), shape).phases["init"]
    attention = sum(lin.numel for lin in linear_layers(shape).values() if lin.group.startswith("attn"))
    assert ga["loraga_gradients"] == 4 * shape.num_layers * attention
    pissa = estimate(validate({**raw, "lora": {"init": "pissa"}}), shape).phases["init"]
    assert pissa["init_working"] > 0 and "loraga_gradients" not in pissa


def test_merge_refuses_what_it_cannot_merge_exactly() -> None:
    from qlora_kit.variants import merge

    with pytest.raises(ModelError, match="IA3 is not merged"):
        merge.peft_type({"peft_type": "IA3"})
    with pytest.raises(ModelError, match="save_projection=false"):
        merge.peft_type({"peft_type": "VERA", "save_projection": False})
    config = {"peft_type": "ADALORA", "init_r": 8, "lora_alpha": 16,
              "rank_pattern": {"model.layers.0.self_attn.q_proj.lora_E": [True, False] * 4}}
    shapes = {"A": [3, 64], "B": [64, 3], "E": [3, 1]}
    with pytest.raises(ModelError, match="rank 3, its rank pattern says 4"):
        merge.module_scale(config, "ADALORA", "model.layers.0.self_attn.q_proj", shapes)
    assert merge.module_scale(config, "ADALORA", "model.layers.0.self_attn.q_proj",
                              {"A": [4, 64], "B": [64, 4], "E": [4, 1]}) == 16 / (8 + 1e-5)


def test_peft_inits_on_a_4bit_base_behave_as_documented(tiny_llama: Path) -> None:
    """What qlora_kit.variants documents about peft's own inits on a bitsandbytes 4-bit base.

    If a peft upgrade changes this, revisit variants/init.py (it may then be able to use peft directly).
    """
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora.config import LoraGAConfig
    from peft.tuners.lora.loraga import preprocess_loraga

    cfg = validate({"model": {"name_or_path": str(tiny_llama)}, "data": {"path": "d"}, "output_dir": "o"})

    def base() -> Any:
        return qmodel_base.load_quantized_base(tiny_llama, cfg.model, torch.float32, torch.device("cpu"))

    with pytest.raises(TypeError, match="PiSSA"):
        get_peft_model(base(), LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights="pissa"))
    with pytest.raises(ValueError, match="quantized"):
        preprocess_loraga(base(), LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights="lora_ga",
                                             lora_ga_config=LoraGAConfig()), lambda: None)
