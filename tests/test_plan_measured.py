"""The planner against measured memory: the real training step on CPU under torch's MemTracker.

A tiny Llama (small hidden size) with the real Llama-3 vocabulary (128,256) trains one step of
thousands of tokens through ``qlora_kit.train`` (``setup`` + ``train_step``: NF4 base, LoRA,
fused loss, packing, checkpointing).  ``torch.distributed._tools.mem_tracker.MemTracker``
records the live tensor bytes around every module; each component the planner models is
compared with what was measured, within ±15 %:

* decoder-layer activations kept for the backward pass (checkpoints, or whole layers when not
  checkpointed): growth across the decoder layers' forward;
* the recomputed layer: a decoder layer's peak during its backward, above what was alive when it
  started (plus the incoming gradient, which the planner counts in the layer's moment);
* the loss: the step's peak above what was alive after the last decoder layer (the loss's tiles,
  the labelled hidden states, their gradient, the final norm's backward);
* the whole step: the peak of everything but parameters, gradients and optimizer state.

``estimate(..., device="cpu")`` predicts the CPU run: fp32 (or bf16) compute, trl's torch-op
loss folding and CPU dropout masks; everything else is the formula used for CUDA.  CUDA-only
terms (flash backward buffers, Triton loss folding, offload, context, fragmentation) cannot be
measured here: benchmarks/train_bench.py compares them on a GPU.
"""

from __future__ import annotations

import contextlib
import io
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from qlora_kit import plan

VOCAB = 128_256
TOLERANCE = 0.15
MiB = 1024**2


@dataclass
class Measured:
    """Bytes measured for one training step (see the module docstring)."""

    tokens: int
    labelled: int
    layers: int
    recompute: int
    loss: int
    step: int


def build_long_vocab_model(root: Path, layers: int = 2, hidden: int = 64, intermediate: int = 256) -> Path:
    """A random tiny Llama with the Llama-3 vocabulary size and a long context, saved to ``root``."""
    from transformers import AutoModelForCausalLM

    from qlora_kit.tiny import build_tokenizer, tiny_config

    if (root / "config.json").exists():
        return root
    tok = build_tokenizer(root)
    config = tiny_config("llama", vocab_size=VOCAB, hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, max_position_embeddings=65536, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(root)
    return root


def write_long_prompt_rows(path: Path, tokens: int, reply_words: int = 200, rows: int = 2) -> Path:
    """Chat rows with a long user turn (~``tokens`` tokens) and a short assistant reply: long T,
    few labelled tokens (the fused loss then projects only the reply)."""
    from qlora_kit.tiny import _WORDS

    rng = random.Random(0)
    with open(path, "w", encoding="utf-8") as fh:
        for _ in range(rows):
            user = " ".join(rng.choices(_WORDS, k=int(tokens * 0.45)))
            reply = " ".join(rng.choices(_WORDS, k=reply_words))
            fh.write(json.dumps({"messages": [{"role": "user", "content": user},
                                              {"role": "assistant", "content": reply}]}) + "\n")
    return path


def _tracker() -> Any:
    """MemTracker that accepts frozen parameters (it hooks every parameter's gradient otherwise)."""
    from torch.distributed._tools.mem_tracker import MemTracker

    class _NoHook:
        def remove(self) -> None:
            pass

    class FrozenBaseMemTracker(MemTracker):
        def _track_module_params_and_buffers(self, module, install_grad_hooks=True):  # noqa: ANN001
            for p in module.parameters():
                if not p.requires_grad and p not in self._param_to_grad_hook_handles:
                    self._param_to_grad_hook_handles[p] = (_NoHook(), _NoHook())
            return super()._track_module_params_and_buffers(module, install_grad_hooks)

    return FrozenBaseMemTracker()


def measure_step(cfg: plan.Config, out: Path) -> tuple[Measured, Any]:
    """Run ``train.setup`` and one ``train.train_step`` under MemTracker; return what was measured."""
    from torch.distributed._tools.mem_tracker import _ModState as S

    from qlora_kit import train
    from qlora_kit.data import collate

    with contextlib.redirect_stdout(io.StringIO()):  # the data summary
        run = train.setup(cfg, "", out, None, True)
    rows = train._epoch_plan(run.cfg, run.data, 0)[0]
    batch = collate(run.data.train, rows, run.tokenizer.pad_token_id, run.cfg.train.max_length, run.cfg.data.packing)
    tracker = _tracker()
    tracker.track_external(run.model, run.optimizer)
    with tracker:
        train.train_step(run, [batch])

    def total(stats: Any, state: Any) -> int:
        return sum(v["Total"] for v in stats.snapshots[state][0].values())

    mods = {stats.mod_fqn: stats for stats in tracker.memory_tracking.values()}
    layers = sorted((k for k in mods if k.split(".")[-2:-1] == ["layers"]), key=lambda k: int(k.split(".")[-1]))
    peak = tracker.get_tracker_snapshot("peak")
    fixed = sum(snap[k] for snap in peak.values() for k in snap if str(k).split(".")[-1] in ("PARAM", "BUFFER",
                                                                                            "GRAD", "OPT"))
    tokens = batch["input_ids"].numel()
    s = 4 if run.precision.compute_dtype == torch.float32 else 2
    measured = Measured(
        tokens=tokens, labelled=int((batch["labels"][:, 1:] != -100).sum()),
        layers=total(mods[layers[-1]], S.POST_FW) - total(mods[layers[0]], S.PRE_FW),
        recompute=max(total(mods[k], S.PEAK_BW) - total(mods[k], S.PRE_BW) for k in layers)
        + s * run.model.config.hidden_size * tokens,
        loss=sum(v["Total"] for v in peak.values()) - total(mods[layers[-1]], S.POST_FW),
        step=sum(v["Total"] for v in peak.values()) - fixed,
    )
    return measured, run


STATIC = ("nf4_weights", "weights_16bit", "lora_parameters", "lora_gradients", "optimizer_state")
STORED = ("checkpoints", "layer_activations", "rotary_embeddings", "attention_mask", "final_norm",
          "autocast_weight_cache")


def predicted(cfg: plan.Config, shape: plan.ModelShape, m: Measured) -> dict[str, int]:
    """The planner's numbers for what :func:`measure_step` measured (same tokens, same labels)."""
    p = plan.estimate(cfg, shape, max_length=m.tokens, device="cpu", labelled_tokens=m.labelled)
    loss, back = p.phases["loss"], p.phases["backward"]
    return {
        "layers": loss["checkpoints"] + loss["layer_activations"],
        "recompute": sum(v for k, v in back.items() if k not in STATIC + STORED),
        "loss": sum(v for k, v in loss.items() if k not in STATIC + STORED),
        "step": max(sum(v for k, v in ph.items() if k not in STATIC) for ph in (loss, back)),
    }


def compare(measured: Measured, prediction: dict[str, int]) -> dict[str, tuple[int, int, float]]:
    """component -> (measured, predicted, predicted/measured - 1)."""
    return {k: (getattr(measured, k), v, v / getattr(measured, k) - 1) for k, v in prediction.items()}


def _config(model: Path, data: Path, out: Path, tokens: int, **sections: dict[str, Any]) -> plan.Config:
    from qlora_kit.config import validate

    raw: dict[str, Any] = {
        "model": {"name_or_path": str(model)},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": "all-linear"},
        "data": {"path": str(data), "val_fraction": 0.0},
        "train": {"max_steps": 1, "micro_batch_size": 1, "gradient_accumulation_steps": 1, "max_length": tokens,
                  "optimizer": "adamw_torch", "checkpoint_every_n_layers": 1, "tiled_mlp": False,
                  "activation_offload": False},
        "output_dir": str(out),
    }
    for key, value in sections.items():
        raw[key].update(value)
    return validate(raw)


def _check(tmp_path: Path, model: Path, tokens: int, **sections: dict[str, Any]) -> dict[str, tuple]:
    data = write_long_prompt_rows(tmp_path / "rows.jsonl", tokens)
    out = tmp_path / "run"
    out.mkdir()
    cfg = _config(model, data, out, tokens, **sections)
    measured, _ = measure_step(cfg, out)
    assert measured.tokens > 0.9 * tokens and 0 < measured.labelled < 0.2 * measured.tokens
    table = compare(measured, predicted(cfg, plan.load_shape_file(model / "config.json"), measured))
    report = "\n".join(f"{k:10s} measured {m / MiB:9.2f} MiB  predicted {p / MiB:9.2f} MiB  {err:+.1%}"
                       for k, (m, p, err) in table.items())
    for key, (_, _, err) in table.items():
        assert abs(err) <= TOLERANCE, f"{key} off by {err:+.1%}:\n{report}"
    return table


@pytest.fixture(scope="module")
def long_vocab_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_long_vocab_model(tmp_path_factory.mktemp("long-vocab") / "llama")


def test_planner_matches_measured_step_fp32(tmp_path: Path, long_vocab_model: Path):
    # 4096 tokens, ~250 labelled: checkpoints, the recomputed layer (all-linear LoRA) and the fused
    # loss's tiles over a 128K vocabulary, each within 15 % of MemTracker's figures.
    _check(tmp_path, long_vocab_model, 4096)


@pytest.mark.slow
@pytest.mark.parametrize("case", [
    {"model": {"compute_dtype": "bfloat16"}},  # 16-bit compute + fp32 adapters (autocast): the GPU's dtypes
    {"lora": {"dropout": 0.1}},  # per-adapter dropout copies and masks
    {"train": {"tiled_mlp": True}},  # 8192 tokens: two MLP tiles
    {"train": {"checkpoint_every_n_layers": 2}},  # half the layers keep all their activations
    {"lora": {"target_modules": "attention"}, "model": {"compute_dtype": "bfloat16"}},
], ids=["bf16-autocast", "dropout", "tiled-mlp", "every-2-layers", "attention-bf16"])
def test_planner_matches_measured_step_variants(tmp_path: Path, tmp_path_factory: pytest.TempPathFactory,
                                                case: dict[str, Any]):
    layers = 4 if case.get("train", {}).get("checkpoint_every_n_layers") == 2 else 2
    model = build_long_vocab_model(tmp_path_factory.getbasetemp() / f"long-vocab-{layers}", layers=layers)
    tokens = 8192 if case.get("train", {}).get("tiled_mlp") else 4096
    _check(tmp_path, model, tokens, **case)


def test_planner_constants_follow_the_code():
    from trl.kernels.chunked_logprob import TOKEN_CHUNK_SIZE

    from qlora_kit.ops import loss, offload, tiled_mlp

    assert plan.MLP_TILE_TOKENS == tiled_mlp.MLP_TILE_TOKENS
    assert plan.LOSS_VOCAB_CHUNK == loss.VOCAB_CHUNK and plan.LOSS_TOKEN_CHUNK == TOKEN_CHUNK_SIZE
    assert offload.MIN_OFFLOAD_BYTES <= 1 << 20  # the planner counts every checkpoint as offloaded
