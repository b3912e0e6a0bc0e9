"""Prove that a GGUF export is the trained model — checked by llama.cpp itself when it is installed.

Reference: the trained model rebuilt as in training (NF4 base + adapter, float32 compute; for
``--merge-base original`` the original 16-bit base + adapter), i.e. the float32 merge the GGUF
was written from.  On the run's held-out prompts (``verify.load_prompts``):

with llama.cpp (``llama-cpp-python``, extra ``[llamacpp]``):
  * tokenisation: llama.cpp tokenises each rendered prompt to exactly the ids the run's
    tokenizer gives (vocabulary, merges/scores, pre-tokenizer and special tokens all at once);
  * next-token log-probabilities: prompt + reference answer teacher-forced through llama.cpp
    (logits of every position) against the reference;
  * greedy answers through llama.cpp's own chat handling (``create_chat_completion`` on the
    template stored in the GGUF, temperature 0): same text and same stop as the reference's
    greedy answer;
without llama.cpp:
  * the GGUF's tokenizer metadata read back and compared with what was meant to be written,
  * the weights read back with transformers' GGUF loader (dequantised, q/k permutation undone)
    into the base's architecture, compared with the reference like an HF export,
  and the report says that llama.cpp did not run.

Tolerance per quant type (``gguf_tolerance``; the values used are written to the report).
Drift is measured as for the HF export (``verify``): |Δlogit| relative to the spread of the
reference logits (``rel_max``, ``rel_mean``), and the mean KL(reference || GGUF) of the
next-token distributions.  f16 / bf16 use ``verify``'s rounding model (64u / 8u with u the unit
roundoff of the larger of the weight format and the run's training dtype; llama.cpp rounds the
activations of f16 matrix products to f16 too).  The block formats have no such model: their
limits (``BLOCK_LIMITS``) are set at 2-3x what correct exports of SmolLM2-135M measured through
llama.cpp (``benchmarks/gguf_verify.py``; a 135M model quantises worse than a 7B one, so the
limits are generous for 7B models), with the KL limit below what two known-wrong models
measured (``benchmarks/results/gguf-verify-20261125T035904Z.json``):

  =================  =========  ========  =========  ==============  =================
  SmolLM2-135M       rel_max    rel_mean  KL (nats)  greedy exact/8  KL / KL(untuned)
  =================  =========  ========  =========  ==============  =================
  f16                0.017      0.0015    7.3e-6     8               ~1e-5
  bf16               0.097      0.011     3.7e-4     8               ~5e-4
  q8_0               0.37       0.047     8.8e-3     8               0.011
  q6_k               0.92       0.068     0.020      7               0.026
  q5_k_m             1.44       0.164     0.074      7               0.095
  q4_k_m             2.88       0.220     0.117      6               0.15
  q4_0               4.28       0.428     0.653      4               0.85
  wrong: merged onto
  original weights   2.80       0.389     0.443      5 (3 diverged)  0.57
  wrong: no adapter  3.98       0.382     0.773      0 (8 diverged)  1.0
  =================  =========  ========  =========  ==============  =================

A quantised model can drift as far as a wrong one when the fine-tune changed the model less
than quantisation noise does, so one more criterion asks whether the fine-tune survived: the
reference's base with its adapter switched off (the untuned model) is run too, and the GGUF
must be much closer to the trained model than the untuned model is: KL(trained || GGUF) <=
``UNTUNED_KL_MAX_RATIO`` x KL(trained || untuned) (the "no LoRA effect" failure).  q4_0 of
SmolLM2-135M fails it (0.85): at 4 bits that model loses most of what it was taught, and the
export says so (exit 5) rather than shipping it silently.

Also required: exact tokenisation and tokenizer metadata; top-1 kept where the reference is
decisive (top-1 ahead by more than twice ``rel_max``); greedy answers identical except where
the reference itself was at a near tie (top-2 within twice ``rel_max``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from qlora_kit.export import llamacpp
from qlora_kit.export.gguf_vocab import GgufVocab, vocab_round_trip
from qlora_kit.export.verify import (
    MAX_FACTOR,
    MEAN_FACTOR,
    UNIT_ROUNDOFF,
    Outputs,
    Prompt,
    _free,
    check_meter,
    collect,
    compare_logits,
    drift_failures,
    greedy_agreement,
    load_prompts,
    run_original_adapter,
    run_reference,
)
from qlora_kit.inference.chat import strip_stop
from qlora_kit.inference.load import set_inference_mode
from qlora_kit.model.base import load_saved_tokenizer, pick_device
from qlora_kit.rundir import finished
from qlora_kit.rundir import layout as rundir

log = logging.getLogger("qlora_kit")


# Limits of the block formats: rel_max, rel_mean (of the logit std) and mean KL (nats), see above.
BLOCK_LIMITS = {"q8_0": (1.0, 0.12, 0.03), "q6_k": (2.5, 0.2, 0.06), "q5_k_m": (4.0, 0.35, 0.15),
                "q4_k_m": (8.0, 0.5, 0.25), "q4_0": (8.0, 0.5, 0.25)}
FLOAT_ROUNDOFF = {"f16": 2.0**-11, "bf16": 2.0**-8}
FLOAT_KL_MAX = {"f16": 1e-3, "bf16": 3e-3}
UNTUNED_KL_MAX_RATIO = 0.4
_UNTUNED_KL_MIN = 1e-4  # below this the adapter does not measurably change the model: nothing to keep


def gguf_tolerance(quant: str, trained_dtype: str) -> dict[str, float]:
    """Allowed ``rel_max`` / ``rel_mean`` / ``kl_mean`` for a GGUF of type ``quant`` (see the module docstring).

    The same with and without llama.cpp: llama.cpp rounds f16 matrix products' activations to
    f16 (the weights' own unit roundoff) and quantised ones' to 8-bit blocks (inside the block
    formats' measured limits).
    """
    u = UNIT_ROUNDOFF.get(trained_dtype, 0.0)
    if quant in FLOAT_ROUNDOFF:
        u = max(u, FLOAT_ROUNDOFF[quant])
        return {"rel_max": MAX_FACTOR * u, "rel_mean": MEAN_FACTOR * u, "kl_mean": FLOAT_KL_MAX[quant]}
    rel_max, rel_mean, kl = BLOCK_LIMITS[quant]
    return {"rel_max": max(rel_max, MAX_FACTOR * u), "rel_mean": max(rel_mean, MEAN_FACTOR * u), "kl_mean": kl}


def untuned_check(ref: Outputs, export: float) -> dict[str, Any]:
    """How close the GGUF (mean KL ``export`` from the trained model) is compared with the untuned base.

    ``judged`` is False when the adapter changes the next-token distributions by less than
    ``_UNTUNED_KL_MIN`` nats (an untrained adapter): there is no fine-tune effect to lose.
    """
    untuned = ref.untuned_kl if ref.untuned_kl is not None else 0.0
    judged = untuned >= _UNTUNED_KL_MIN
    return {"kl_mean_untuned": untuned, "kl_mean_export": export, "ratio": export / untuned if judged else None,
            "max_ratio": UNTUNED_KL_MAX_RATIO, "judged": judged}


@dataclass
class LlamaCppOutputs:
    """What llama.cpp produced for every prompt."""

    logits: list[torch.Tensor]
    token_ids: list[list[int]]  # llama.cpp's tokenisation of each rendered prompt
    answers: list[str]
    answer_ids: list[list[int]]  # the tokens llama.cpp's greedy sampler chose (argmax of its logits)
    reference_texts: list[str]  # the reference's greedy tokens detokenised by llama.cpp, for a like-for-like match
    finish: list[str]
    prompt_tokens: list[int]
    chat_format: str


def verify_gguf(run_dir: Path, gguf_path: Path, quant: str, vocab: GgufVocab, eos_ids: list[int],
                merge_base: str = "dequantized", device: torch.device | None = None, max_prompts: int = 8,
                max_new_tokens: int = 24, show_progress: bool = True) -> dict[str, Any]:
    """Compare the GGUF at ``gguf_path`` with the trained model; return the report's ``verification``.

    ``status`` is ``passed`` or ``failed`` (with ``failures``); ``llama_cpp`` says whether
    llama.cpp itself ran.  ``show_progress``: each check's progress on stderr (``pacing.Meter``).
    """
    device = device or pick_device()
    run = finished.read_run(run_dir)
    tokenizer = load_saved_tokenizer(run.run_dir / rundir.TOKENIZER)
    pad = tokenizer.pad_token_id
    prompts, origin = load_prompts(run.run_dir, tokenizer, max_prompts)
    reference = run_reference if merge_base == "dequantized" else run_original_adapter
    ref = reference(run.run_dir, prompts, eos_ids, pad, device, max_new_tokens, untuned=True, show=show_progress)
    trained = run.quant.get("load_dtype", "float32")
    result: dict[str, Any] = {
        "prompts": len(prompts), "prompt_source": origin, "max_new_tokens": max_new_tokens, "quant": quant,
        "reference": ("NF4 base + adapter as trained" if merge_base == "dequantized"
                      else "original 16-bit base + adapter") + f", float32 compute on {device}",
    }
    stored = vocab_round_trip(gguf_path, vocab)
    result["tokenizer_metadata"] = {"identical": not stored, "differences": stored}
    tol = gguf_tolerance(quant, trained)
    if llamacpp.available():
        result.update(_check_with_llamacpp(gguf_path, prompts, ref, tokenizer, eos_ids, tol, max_new_tokens,
                                           show_progress))
    else:
        result.update(_check_with_transformers(gguf_path, run, prompts, ref, eos_ids, pad, device, tol,
                                               max_new_tokens, show_progress))
    result["criteria"] = {**{f"{k}_max": v for k, v in tol.items()}, "decisive_agreement_min": 1.0,
                          "kl_vs_untuned_ratio_max": UNTUNED_KL_MAX_RATIO,
                          "greedy": "no answer diverges from the reference except at a near-tie",
                          "tokenization": "exact"}
    failures = _failures(result)
    result["status"] = "failed" if failures else "passed"
    result["failures"] = failures
    return result


def _failures(result: dict[str, Any]) -> list[str]:
    failures = []
    if not result["tokenizer_metadata"]["identical"]:
        failures.append("tokenizer metadata read back differs: " + ", ".join(result["tokenizer_metadata"]
                                                                            ["differences"]))
    tok = result.get("tokenization")
    if tok and tok["identical"] < tok["total"]:
        failures.append(f"llama.cpp tokenises {tok['total'] - tok['identical']} of {tok['total']} prompts "
                        "differently from the run's tokenizer")
    if tok and tok["chat_prompt_lengths_identical"] < tok["total"]:
        failures.append("llama.cpp's chat handling builds prompts of a different length than the run's template")
    m, tol = result["next_token"], result["next_token"]["tolerance"]
    failures += drift_failures(m)
    if m["kl_mean"] > tol["kl_mean"]:
        failures.append(f"mean KL divergence {m['kl_mean']:.3g} nats (tolerance {tol['kl_mean']:.3g})")
    u = result["untuned"]
    if u["judged"] and u["ratio"] > u["max_ratio"]:
        failures.append(f"the fine-tune is largely lost: KL(trained || GGUF) is {u['ratio']:.2f}x KL(trained || "
                        f"untuned base) (limit {u['max_ratio']}); {result['quant']} rounds away more than the adapter "
                        "changed (a larger --quant keeps it), or the adapter was not merged")
    g = result["greedy"]
    if g["greedy_diverged"]:
        failures.append(f"greedy answers diverge from the reference on {g['greedy_diverged']}/{g['greedy_total']} "
                        "prompts where the reference was not near a tie")
    return failures


def _check_with_llamacpp(path: Path, prompts: list[Prompt], ref: Outputs, tokenizer: Any, eos_ids: list[int],
                         tol: dict[str, float], max_new_tokens: int, show: bool = True) -> dict[str, Any]:
    answers = [strip_stop(ids, eos_ids) for ids in ref.greedy]
    out = run_llamacpp(path, prompts, max_new_tokens, answers, show)
    next_token = compare_logits(ref.logits, out.logits, tol)
    greedy = greedy_agreement(ref, out.answer_ids, 2 * tol["rel_max"] * next_token["logit_std"])
    ref_stopped = [bool(ids) and ids[-1] in eos_ids for ids in ref.greedy]
    greedy["chat_text_identical"] = sum(a.strip() == b.strip() for a, b in zip(out.reference_texts, out.answers))
    greedy["examples"] = [{"reference": tokenizer.decode(ids, skip_special_tokens=True).strip(),
                           "llama_cpp": text.strip(), "reference_stopped": stopped, "llama_cpp_finish": finish}
                          for ids, text, stopped, finish in zip(answers, out.answers, ref_stopped, out.finish)]
    same_ids = sum(p.prompt_ids == ids for p, ids in zip(prompts, out.token_ids))
    same_len = sum(len(p.prompt_ids) == n for p, n in zip(prompts, out.prompt_tokens))
    return {
        "llama_cpp": f"ran (llama-cpp-python {llamacpp.version()}, chat format {out.chat_format!r})",
        "backend": "llama.cpp",
        "tokenization": {"identical": same_ids, "total": len(prompts), "chat_prompt_lengths_identical": same_len},
        "next_token": next_token,
        "untuned": untuned_check(ref, next_token["kl_mean"]),
        "greedy": greedy,
    }


def run_llamacpp(path: Path, prompts: list[Prompt], max_new_tokens: int,
                 reference_answers: list[list[int]], show: bool = True) -> LlamaCppOutputs:
    """Tokenise, teacher-force and chat every prompt in llama.cpp (one model load, CPU threads as torch's).

    The reference's answer tokens are detokenised by llama.cpp too, exactly as its completion
    text is made (after the prompt, invalid UTF-8 dropped), so texts compare token for token.
    """
    longest = max(max(len(p.full_ids), len(p.prompt_ids) + max_new_tokens) for p in prompts)
    with check_meter("the GGUF in llama.cpp", len(prompts), show) as meter:
        llm = llamacpp.load(path, n_ctx=max(256, -(-(longest + 8) // 256) * 256), threads=torch.get_num_threads())
        try:
            return _run_prompts(llm, prompts, max_new_tokens, reference_answers, meter.advance)
        finally:
            llm.close()


def _run_prompts(llm: Any, prompts: list[Prompt], max_new_tokens: int, reference_answers: list[list[int]],
                 advance: Callable[[], None]) -> LlamaCppOutputs:
    """What ``run_llamacpp`` measures, prompt by prompt, in the loaded model (``advance()`` after each)."""
    import numpy as np

    logits, ids, answers, answer_ids, texts, finish, used = [], [], [], [], [], [], []
    for p, reference in zip(prompts, reference_answers):
        texts.append(llm.detokenize(reference, prev_tokens=p.prompt_ids).decode("utf-8", errors="ignore"))
        ids.append(llm.tokenize(p.text.encode("utf-8"), add_bos=p.messages is None, special=True))
        llm.reset()
        llm.eval(p.full_ids)
        logits.append(torch.from_numpy(np.array(llm.scores[: len(p.full_ids)], dtype=np.float32)))
        llm.reset()
        chosen: list[int] = []
        reply = _chat(llm, p, max_new_tokens, chosen)
        choice = reply["choices"][0]
        # llama-cpp-python may sample past max_tokens to complete a UTF-8 character: compare the first ones
        generated = reply["usage"]["completion_tokens"] + (choice.get("finish_reason") == "stop")
        answer_ids.append(chosen[:min(generated, max_new_tokens)])
        answers.append(choice["message"]["content"] if "message" in choice else choice["text"])
        finish.append(choice.get("finish_reason") or "")
        used.append(reply["usage"]["prompt_tokens"])
        advance()
    return LlamaCppOutputs(logits, ids, answers, answer_ids, texts, finish, used, str(llm.chat_format))


def _chat(llm: Any, prompt: Prompt, max_new_tokens: int, chosen: list[int]) -> dict[str, Any]:
    """Greedy: temperature 0 and no repetition penalty, so llama.cpp takes the argmax of its logits.

    A pass-through logits processor records that argmax at every step: the answer's token ids
    (the stop token included), which the completion text alone would not give.
    """
    import numpy as np

    def record(input_ids: Any, scores: Any) -> Any:
        chosen.append(int(np.argmax(scores)))
        return scores

    greedy = {"temperature": 0.0, "top_k": 1, "top_p": 1.0, "min_p": 0.0, "repeat_penalty": 1.0,
              "max_tokens": max_new_tokens, "seed": 0, "logits_processor": [record]}
    if prompt.messages is not None:
        tools = {"tools": prompt.tools} if prompt.tools else {}
        return llm.create_chat_completion(messages=prompt.messages, **tools, **greedy)
    return llm.create_completion(prompt=prompt.text, **greedy)


def _check_with_transformers(path: Path, run: finished.RunInfo, prompts: list[Prompt], ref: Outputs,
                             eos_ids: list[int], pad: int | None, device: torch.device, tol: dict[str, float],
                             max_new_tokens: int, show: bool = True) -> dict[str, Any]:
    with check_meter("the GGUF (transformers' GGUF loader)", len(prompts), show) as meter:
        model = load_gguf_with_transformers(path, run.source_dir, device)
        other = collect(model, prompts, eos_ids, pad, max_new_tokens, meter.advance)
    _free(model)
    metrics = compare_logits(ref.logits, other.logits, tol)
    greedy = greedy_agreement(ref, other.greedy, 2 * tol["rel_max"] * metrics["logit_std"])
    return {
        "llama_cpp": f"did not run: llama-cpp-python is not installed ({llamacpp.INSTALL_HINT})",
        "backend": "transformers GGUF loader (weights dequantised and un-permuted by transformers)",
        "next_token": metrics,
        "untuned": untuned_check(ref, metrics["kl_mean"]),
        "greedy": greedy,
    }


def load_gguf_with_transformers(path: Path, source_dir: Path, device: torch.device) -> Any:
    """The GGUF's weights, dequantised to float32 by transformers, in the base's own architecture config.

    The config comes from the base (RoPE scaling and other facts transformers' GGUF reader
    does not parse; Mistral as the Llama it is written as); the weights, their names and the
    q/k layout come from the GGUF alone.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(source_dir)
    if config.model_type == "mistral":  # written as llama.cpp's "llama" architecture, read back the same way
        from transformers import LlamaConfig

        fields = {k: v for k, v in config.to_dict().items() if k not in ("model_type", "architectures", "sliding_window")}
        config = LlamaConfig(**fields)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, config=config,
                                                 dtype=torch.float32, device_map={"": device})
    set_inference_mode(model)
    return model
