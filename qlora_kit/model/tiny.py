"""Tiny random chat models built in code: for tests, CI smoke runs and benchmarks.

No hub access is needed: a byte-level BPE tokenizer is trained locally with
``tokenizers`` and given a ChatML chat template (without generation markers, so
qlora-kit's own assistant masking is exercised), and a model of the requested
architecture is created with random weights and saved as a normal HF directory.
"""

from __future__ import annotations

import random
from pathlib import Path

import torch

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<pad>", "<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
_WORDS = (
    "the a of to and in is you that it he was for on are as with his they at be this from have or by one had "
    "not but what all were when we there can an your which their said if do will each about how up out them "
    "then she many some so these would other into has more her two like him see time could no make than first "
    "been its who now people my made over did down only way find use may water long little very after words "
    "called just where most know get through back much before go good new write our used me man too any day "
    "same right look think also around another came come work three word must because does part even place "
    "well such here take why things help put years different away again off went old number great tell men "
    "say small every found still between name should home big give air line set own under read last never us "
    "left end along while might next sound below saw something thought both few those always looked show "
    "large often together asked house don world going want school important until form food keep children "
    "feet land side without boy once animals life enough took sometimes four head above kind began almost "
    "live page got earth need far hand high year mother light parts country father let night following "
    "picture being study second eyes soon times story boys since white days ever paper hard near sentence "
    "better best across during today others however sure means knew its try told young miles sun ways thing "
    "whole hear example heard several change answer room sea against top turned learn point city play toward "
    "five using himself usually user assistant system hello question reply 0 1 2 3 4 5 6 7 8 9 + - = ? ! . ,"
).split()

ARCHITECTURES = ("llama", "qwen2", "mistral", "gemma", "phi3", "gemma2", "gemma3_text", "qwen3")


def _corpus(n_lines: int = 2000, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    lines = []
    for _ in range(n_lines):
        words = rng.choices(_WORDS, k=rng.randint(4, 16))
        lines.append(" ".join(words))
    return lines


def build_tokenizer(out_dir: str | Path, vocab_size: int = 512):
    """Train a byte-level BPE tokenizer with a ChatML template; save it to ``out_dir``.

    Returns the ``PreTrainedTokenizerFast``.  Every string is encodable (byte-level),
    ``<|im_end|>`` is EOS and ``<pad>`` is a distinct pad token.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="<|im_end|>",
        unk_token="<unk>",
        pad_token="<pad>",
        additional_special_tokens=["<|im_start|>"],
    )
    fast.chat_template = CHATML_TEMPLATE
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(out)
    return fast


def tiny_config(arch: str, vocab_size: int, **overrides):
    """A ~100k-parameter config of the given architecture (2 layers, GQA where supported)."""
    from transformers import AutoConfig

    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown tiny architecture {arch!r}; choose from {ARCHITECTURES}")
    kwargs = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=False,
    )
    if arch in ("gemma", "gemma2", "gemma3_text", "qwen3"):
        kwargs["head_dim"] = 16
    kwargs.update(overrides)
    return AutoConfig.for_model(arch, **kwargs)


def build_tiny_model(
    out_dir: str | Path, arch: str = "llama", seed: int = 0, dtype: torch.dtype = torch.float32, **overrides
) -> Path:
    """Write a random tiny ``arch`` chat model plus tokenizer to ``out_dir``; return the path."""
    from transformers import AutoModelForCausalLM

    out = Path(out_dir)
    tokenizer = build_tokenizer(out)
    ids = dict(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    config = tiny_config(arch, vocab_size=len(tokenizer), **{**ids, **overrides})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out)
    return out
