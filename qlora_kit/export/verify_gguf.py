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

Tolerance per quant type.  As for the HF export (``verify``), drift is measured relative to
the spread of the reference logits and allowed ``MAX_FACTOR`` / ``MEAN_FACTOR`` times a
rounding unit u: here the larger of the weight format's ``QUANT_ROUNDOFF`` (the unit
roundoff of f16/bf16; for block formats about half a quantisation step relative to the
block's largest weight), the run's training dtype, and — in llama.cpp — the precision its
matrix products round activations to (f16 for f16 weights, 8-bit blocks for quantised ones).
Positions where the reference is decisive (top-1 ahead by more than twice the allowed error)
must keep their top-1 token; greedy answers must be identical on ``MIN_GREEDY_EXACT[quant]``
of the prompts (4-6 bit formats shift near-ties, so they are allowed more divergence);
tokenisation must be exact.  The measured values are in ``export_report.json`` and the
calibration runs are quoted in docs/CONTRACTS.md.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from qlora_kit import rundir
from qlora_kit.export import llamacpp
from qlora_kit.export.gguf_vocab import GgufVocab, vocab_round_trip
from qlora_kit.export.verify import (MAX_FACTOR, MEAN_FACTOR, UNIT_ROUNDOFF, Outputs, Prompt, collect, compare_logits,
                                     greedy_agreement, load_prompts, run_original_adapter, run_reference)

log = logging.getLogger("qlora_kit")

QUANT_ROUNDOFF = {"f16": 2.0**-11, "bf16": 2.0**-8, "q8_0": 2.0**-8, "q6_k": 2.0**-6, "q5_k_m": 2.0**-5,
                  "q4_k_m": 2.0**-4, "q4_0": 2.0**-4}
# Mean KL(reference || GGUF) of the next-token distributions, nats per position.
KL_MEAN_MAX = {"f16": 1e-3, "bf16": 3e-3, "q8_0": 1e-2, "q6_k": 3e-2, "q5_k_m": 5e-2, "q4_k_m": 0.1, "q4_0": 0.15}
_LLAMACPP_ACTIVATIONS = {"f16": 2.0**-11, "bf16": 2.0**-8}  # everything else: 8-bit blocks (≈ 2^-8)


def gguf_tolerance(quant: str, trained_dtype: str, in_llamacpp: bool) -> dict[str, float]:
    """Allowed ``rel_max`` / ``rel_mean`` / ``kl_mean`` for a GGUF of type ``quant`` (see the module docstring)."""
    u = max(QUANT_ROUNDOFF[quant], UNIT_ROUNDOFF.get(trained_dtype, 0.0))
    if in_llamacpp:
        u = max(u, _LLAMACPP_ACTIVATIONS.get(quant, 2.0**-8))
    return {"rel_max": MAX_FACTOR * u, "rel_mean": MEAN_FACTOR * u, "kl_mean": KL_MEAN_MAX[quant]}


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


# --------------------------------------------------------------------------- entry point


def verify_gguf(run_dir: Path, gguf_path: Path, quant: str, vocab: GgufVocab, eos_ids: list[int],
                merge_base: str = "dequantized", device: torch.device | None = None, max_prompts: int = 8,
                max_new_tokens: int = 24) -> dict[str, Any]:
    """Compare the GGUF at ``gguf_path`` with the trained model; return the report's ``verification``.

    ``status`` is ``passed`` or ``failed`` (with ``failures``); ``llama_cpp`` says whether
    llama.cpp itself ran.
    """
    from transformers import AutoTokenizer

    from qlora_kit.model import pick_device

    device = device or pick_device()
    run = rundir.read_run(run_dir)
    tokenizer = AutoTokenizer.from_pretrained(run.run_dir / rundir.TOKENIZER)
    pad = tokenizer.pad_token_id
    prompts, origin = load_prompts(run.run_dir, tokenizer, max_prompts)
    reference = run_reference if merge_base == "dequantized" else run_original_adapter
    ref = reference(run.run_dir, prompts, eos_ids, pad, device, max_new_tokens)
    trained = run.quant.get("load_dtype", "float32")
    result: dict[str, Any] = {
        "prompts": len(prompts), "prompt_source": origin, "max_new_tokens": max_new_tokens, "quant": quant,
        "reference": ("NF4 base + adapter as trained" if merge_base == "dequantized"
                      else "original 16-bit base + adapter") + f", float32 compute on {device}",
    }
    stored = vocab_round_trip(gguf_path, vocab)
    result["tokenizer_metadata"] = {"identical": not stored, "differences": stored}
    if llamacpp.available():
        tol = gguf_tolerance(quant, trained, in_llamacpp=True)
        result.update(_check_with_llamacpp(gguf_path, prompts, ref, tokenizer, eos_ids, tol, max_new_tokens))
    else:
        tol = gguf_tolerance(quant, trained, in_llamacpp=False)
        result.update(_check_with_transformers(gguf_path, run, prompts, ref, eos_ids, pad, device, tol,
                                               max_new_tokens))
    result["criteria"] = {**{f"{k}_max": v for k, v in tol.items()}, "decisive_agreement_min": 1.0,
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
    for key, label in (("rel_max", "max |Δlogit|"), ("rel_mean", "mean |Δlogit|")):
        if m[key] > tol[key]:
            failures.append(f"{label} is {m[key]:.3g} of the logit std (tolerance {tol[key]:.3g})")
    if m["kl_mean"] > tol["kl_mean"]:
        failures.append(f"mean KL divergence {m['kl_mean']:.3g} nats (tolerance {tol['kl_mean']:.3g})")
    if m["decisive_agreement"] < 1.0:
        wrong = m["decisive_positions"] - round(m["decisive_agreement"] * m["decisive_positions"])
        failures.append(f"top-1 token differs at {wrong} position(s) where the reference is decisive")
    g = result["greedy"]
    if g["greedy_diverged"]:
        failures.append(f"greedy answers diverge from the reference on {g['greedy_diverged']}/{g['greedy_total']} "
                        "prompts where the reference was not near a tie")
    return failures


# --------------------------------------------------------------------------- llama.cpp


def _check_with_llamacpp(path: Path, prompts: list[Prompt], ref: Outputs, tokenizer: Any, eos_ids: list[int],
                         tol: dict[str, float], max_new_tokens: int) -> dict[str, Any]:
    from qlora_kit.generate import strip_stop

    answers = [strip_stop(ids, eos_ids) for ids in ref.greedy]
    out = run_llamacpp(path, prompts, max_new_tokens, answers)
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
        "greedy": greedy,
    }


def run_llamacpp(path: Path, prompts: list[Prompt], max_new_tokens: int,
                 reference_answers: list[list[int]]) -> LlamaCppOutputs:
    """Tokenise, teacher-force and chat every prompt in llama.cpp (one model load, CPU threads as torch's).

    The reference's answer tokens are detokenised by llama.cpp too, exactly as its completion
    text is made (after the prompt, invalid UTF-8 dropped), so texts compare token for token.
    """
    import numpy as np

    longest = max(max(len(p.full_ids), len(p.prompt_ids) + max_new_tokens) for p in prompts)
    llm = llamacpp.load(path, n_ctx=max(256, -(-(longest + 8) // 256) * 256), threads=torch.get_num_threads())
    try:
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
        return LlamaCppOutputs(logits, ids, answers, answer_ids, texts, finish, used, str(llm.chat_format))
    finally:
        llm.close()


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
        return llm.create_chat_completion(messages=prompt.messages, **greedy)
    return llm.create_completion(prompt=prompt.text, **greedy)


# --------------------------------------------------------------------------- without llama.cpp


def _check_with_transformers(path: Path, run: rundir.RunInfo, prompts: list[Prompt], ref: Outputs,
                             eos_ids: list[int], pad: int | None, device: torch.device, tol: dict[str, float],
                             max_new_tokens: int) -> dict[str, Any]:
    from qlora_kit.export.verify import _free

    model = load_gguf_with_transformers(path, run.source_dir, device)
    other = collect(model, prompts, eos_ids, pad, max_new_tokens)
    _free(model)
    metrics = compare_logits(ref.logits, other.logits, tol)
    greedy = greedy_agreement(ref, other.greedy, 2 * tol["rel_max"] * metrics["logit_std"])
    return {
        "llama_cpp": f"did not run: llama-cpp-python is not installed ({llamacpp.INSTALL_HINT})",
        "backend": "transformers GGUF loader (weights dequantised and un-permuted by transformers)",
        "next_token": metrics,
        "greedy": greedy,
    }


def load_gguf_with_transformers(path: Path, source_dir: Path, device: torch.device) -> Any:
    """The GGUF's weights, dequantised to float32 by transformers, in the base's own architecture config.

    The config comes from the base (RoPE scaling and other facts transformers' GGUF reader
    does not parse; Mistral as the Llama it is written as); the weights, their names and the
    q/k layout come from the GGUF alone.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    from qlora_kit.model import set_inference_mode

    config = AutoConfig.from_pretrained(source_dir)
    if config.model_type == "mistral":  # written as llama.cpp's "llama" architecture, read back the same way
        from transformers import LlamaConfig

        fields = {k: v for k, v in config.to_dict().items() if k not in ("model_type", "architectures", "sliding_window")}
        config = LlamaConfig(**fields)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, config=config,
                                                 dtype=torch.float32, device_map={"": device})
    set_inference_mode(model)
    return model
