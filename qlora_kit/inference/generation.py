"""Token generation: greedy or sampled, streamed, stopped at the end of the turn."""

from __future__ import annotations

import copy
from typing import Any

import torch

from qlora_kit.inference.chat import cut_after_stop, encode_chat, eos_token_ids, strip_stop
from qlora_kit.inference.load import Loaded, set_inference_mode


def greedy_or_sampling_config(model: Any, eos_ids: list[int], pad_id: int | None, max_new_tokens: int,
                              temperature: float = 0.0):
    """The model's generation config with our stop tokens: plain argmax at temperature 0, else sampling.

    Greedy switches off everything that would bend the argmax (sampling knobs, repetition
    penalties from the base's generation_config.json), so two models compared greedily are
    compared on their logits alone.
    """
    gen = copy.deepcopy(model.generation_config)
    pad = pad_id if pad_id is not None else (eos_ids[0] if eos_ids else None)
    gen.update(max_new_tokens=max_new_tokens, eos_token_id=list(eos_ids) or None, pad_token_id=pad)
    if temperature > 0:
        gen.update(do_sample=True, temperature=temperature)
    else:
        gen.update(do_sample=False, temperature=None, top_p=None, top_k=None, min_p=None, repetition_penalty=None,
                   no_repeat_ngram_size=None)
    return gen


def generate_tokens(model: Any, prompts: list[list[int]], eos_ids: list[int], pad_id: int | None,
                    max_new_tokens: int, temperature: float = 0.0, batch_size: int = 1,
                    streamer: Any = None) -> list[list[int]]:
    """New token ids for each prompt, greedy at temperature 0 (the one generation helper of qlora-kit).

    Prompts are run ``batch_size`` at a time, left-padded.  Each result ends at, and keeps,
    its first stop token (``eos_ids``); nothing after it (batch padding) is returned.
    """
    gen = greedy_or_sampling_config(model, eos_ids, pad_id, max_new_tokens, temperature)
    device = next(model.parameters()).device
    results: list[list[int]] = []
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start:start + batch_size]
        width = max(len(p) for p in batch)
        ids = torch.tensor([[gen.pad_token_id or 0] * (width - len(p)) + p for p in batch], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch], device=device)
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=mask, generation_config=gen, streamer=streamer)
        results += [cut_after_stop(row[width:].tolist(), eos_ids) for row in out]
    return results


def generate_ids(loaded: Loaded, prompt_ids: list[int], max_new_tokens: int, temperature: float = 0.0,
                 streamer: Any = None) -> list[int]:
    """New token ids for one prompt (stops after an EOS id, which is kept)."""
    pad = loaded.tokenizer.pad_token_id
    return generate_tokens(loaded.model, [prompt_ids], loaded.eos_ids, pad, max_new_tokens, temperature,
                           streamer=streamer)[0]


def streamer(tokenizer: Any):
    from transformers import TextStreamer

    return TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)


def generate_greedy(model: Any, tokenizer: Any, prompts: list[list[dict[str, str]]], max_new_tokens: int,
                    batch_size: int = 8) -> list[str]:
    """Greedy replies through the chat template, stopped at EOS / end of turn; left-padded batches."""

    set_inference_mode(model)
    eos = eos_token_ids(tokenizer, getattr(model.generation_config, "eos_token_id", None))
    ids = generate_tokens(model, [encode_chat(tokenizer, p) for p in prompts], eos, tokenizer.pad_token_id,
                          max_new_tokens, batch_size=batch_size)
    return [tokenizer.decode(strip_stop(reply, eos), skip_special_tokens=True).strip() for reply in ids]
