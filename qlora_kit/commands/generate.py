"""`qlora-kit generate` / `qlora-kit chat`."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Callable

import torch

from qlora_kit.inference.chat import encode_chat, strip_stop
from qlora_kit.inference.generation import generate_ids, streamer
from qlora_kit.inference.load import load_for_generation

log = logging.getLogger("qlora_kit")


def generate_once(path: str | Path, prompt: str, system: str | None = None, max_new_tokens: int = 256,
                  temperature: float = 0.0, device: torch.device | None = None) -> int:
    """Answer one prompt through the chat template, streaming to stdout; return the exit code.

    Raises:
        ModelError: ``path`` is neither a run nor a model directory.
    """
    loaded = load_for_generation(path, device)
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    ids = generate_ids(loaded, encode_chat(loaded.tokenizer, messages), max_new_tokens, temperature,
                       streamer=streamer(loaded.tokenizer))
    sys.stdout.flush()
    if ids and ids[-1] not in loaded.eos_ids and len(ids) >= max_new_tokens:
        log.info("stopped at --max-new-tokens=%d before an end-of-turn token", max_new_tokens)
    return 0


def chat_loop(path: str | Path, system: str | None = None, max_new_tokens: int = 512, temperature: float = 0.0,
              device: torch.device | None = None, read: Callable[[str], str] = input) -> int:
    """Interactive chat: ``/exit`` (or EOF) quits, ``/reset`` clears the history; return the exit code.

    Raises:
        ModelError: ``path`` is neither a run nor a model directory.
    """
    loaded = load_for_generation(path, device)
    print(f"loaded {loaded.kind} model from {path}; /exit to quit, /reset to clear the history", flush=True)
    history = _fresh_history(system)
    while True:
        try:
            line = read("you> ").strip()
        except EOFError:
            print()
            return 0
        if line in ("/exit", "/quit"):
            return 0
        if line == "/reset":
            history = _fresh_history(system)
            print("(history cleared)", flush=True)
            continue
        if not line:
            continue
        history.append({"role": "user", "content": line})
        print("assistant> ", end="", flush=True)
        ids = generate_ids(loaded, encode_chat(loaded.tokenizer, history), max_new_tokens, temperature,
                           streamer=streamer(loaded.tokenizer))
        reply = loaded.tokenizer.decode(strip_stop(ids, loaded.eos_ids), skip_special_tokens=True)
        history.append({"role": "assistant", "content": reply.strip()})


def _fresh_history(system: str | None) -> list[dict[str, str]]:
    return [{"role": "system", "content": system}] if system else []
