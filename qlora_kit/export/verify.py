"""Prove that an HF export is the trained model: logits and greedy generations vs NF4 base + adapter.

What is compared, on the first ``max_prompts`` held-out rows of the run (``heldout.jsonl``;
a few fixed prompts when it is missing): the prompt rendered through the chat template,
followed by the reference answer, teacher-forced through both models (every position's
logits), and a greedy continuation of ``max_new_tokens`` tokens from each model.

* reference: the run rebuilt as in training (``model.load_run_for_inference``: the same NF4
  weights), computing in float32.  On CPU, bitsandbytes' inference-only repacking (block
  scales rounded to bfloat16) is switched off so that the reference uses exactly the weights
  training used.
* export: loaded with plain transformers in float32 when that fits in memory (the stored
  16-bit weights are upcast exactly, so only the export's own rounding is measured), else in
  the export dtype (then its compute rounding is part of the measured drift).
* ``--merge-base original`` is checked against the original base + adapter (what it claims
  to be), and its drift from the trained model is reported as the cost of that choice.

Tolerance.  A correct dequantised merge differs from the trained model only by rounding
each merged weight to the export dtype: relative error ≤ u, the unit roundoff (2^-11 for
float16, 2^-8 for bfloat16).  u is the largest of the export dtype, the dtype the export is
checked in (float32 when it fits) and the run's ``quant.load_dtype``: training materialises
the dequantised weights in that dtype (bfloat16 on a GPU), so a bfloat16-trained model is
itself only defined to bfloat16 precision, while the float32 reference is not rounded.

Drift is measured relative to the spread of the logits: ``rel_max`` = max |Δlogit| over
every position and vocabulary entry, ``rel_mean`` = mean |Δlogit|, both divided by the
standard deviation of the reference logits.  Measured on CPU (u of the row's tolerance):

  ============================  =======================  =======================
  model / export                rel_max                  rel_mean
  ============================  =======================  =======================
  tiny Llama, float16           0.0023 (4.6 u)           0.0004 (0.8 u)
  tiny Llama, bfloat16          0.016 (4.1 u)            0.0028 (0.7 u)
  SmolLM2-135M (30 layers) fp16 0.0090 (18 u)            0.00094 (1.9 u)
  SmolLM2-135M, bfloat16        0.084 (21 u)             0.0092 (2.3 u)
  SmolLM2-135M, float32 export  2.1e-5 (summation order) 1.9e-6
  synthetic 25M, trained bf16,  0.021 (5.4 u bf16)       0.0041 (1.0 u bf16)
  float16 export (benchmark)
  merged onto the original      0.57 (tiny), 3.1 (Smol)  0.087 (tiny), 0.33 (Smol)
  16-bit weights (wrong base)
  ============================  =======================  =======================

so the limits sit 3-4x above correct merges and well below a wrong merge base, scale or a
dropped adapter.  The export passes when, against its reference:

* ``rel_max <= MAX_FACTOR * u`` (float16: 0.031, bfloat16: 0.25) and
  ``rel_mean <= MEAN_FACTOR * u`` (float16: 0.0039, bfloat16: 0.031);
* every *decisive* position agrees: where the reference's top-1 logit beats its top-2 by
  more than twice the allowed error, the export picks the same token (``decisive_agreement == 1``);
* greedy generations are identical on at least ``MIN_GREEDY_EXACT`` of the prompts (near-tie
  tokens may flip under rounding and make a long continuation diverge).
"""

from __future__ import annotations

import gc
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from qlora_kit.core.errors import ModelError
from qlora_kit.core.pacing import Meter, counted
from qlora_kit.inference.chat import encode_chat, render_chat
from qlora_kit.inference.generation import generate_tokens
from qlora_kit.inference.load import load_run_for_inference, set_inference_mode
from qlora_kit.model.base import pick_device
from qlora_kit.rundir import finished
from qlora_kit.rundir import layout as rundir

log = logging.getLogger("qlora_kit")

UNIT_ROUNDOFF = {"float16": 2.0**-11, "bfloat16": 2.0**-8, "float32": 2.0**-24}
MAX_FACTOR = 64.0
MEAN_FACTOR = 8.0
MIN_GREEDY_EXACT = 0.75
FALLBACK_PROMPTS = ["Hello! Who are you?", "Write one sentence about the sea.", "What is 12 + 7?",
                    "Name three colours."]


@dataclass
class Prompt:
    """One verification case: prompt ids (for generation) and prompt + reference ids (teacher forcing).

    ``messages`` holds the chat turns (``None`` for a raw-text row) and ``text`` the rendered
    prompt, so that other runtimes (llama.cpp) can be given the same conversation.
    """

    prompt_ids: list[int]
    full_ids: list[int]
    messages: list[dict[str, Any]] | None = None
    text: str = ""
    tools: list[dict[str, Any]] | None = None  # the tool list of a tool-calling row


@dataclass
class Outputs:
    """Per prompt: teacher-forced logits (float32, CPU), greedy continuation ids, and at each greedy
    step the lead of the chosen token's logit over the runner-up (how close that choice was to a tie).

    ``untuned_kl`` (optional): mean KL(these logits || the same model with its adapter switched
    off), nats per position: how much the fine-tune changed the model.
    """

    logits: list[torch.Tensor]
    greedy: list[list[int]]
    margins: list[list[float]]
    untuned_kl: float | None = None


def tolerance(dtype: str, compute_dtype: str = "float32", trained_dtype: str = "float32") -> dict[str, float]:
    """Allowed ``rel_max`` / ``rel_mean`` for an export stored in ``dtype`` and run in ``compute_dtype``.

    ``trained_dtype`` is the run's ``quant.load_dtype``: training materialises the dequantised
    weights in it, so a bfloat16 run is itself only defined to bfloat16 precision.
    """
    u = max(UNIT_ROUNDOFF[dtype], UNIT_ROUNDOFF.get(compute_dtype, 0.0), UNIT_ROUNDOFF.get(trained_dtype, 0.0))
    return {"rel_max": MAX_FACTOR * u, "rel_mean": MEAN_FACTOR * u}


def load_prompts(run_dir: Path, tokenizer: Any, max_prompts: int) -> tuple[list[Prompt], str]:
    """Held-out prompts of the run (or fixed fallbacks), encoded; returns (prompts, where they came from)."""

    rows = _heldout_rows(run_dir / rundir.HELDOUT, max_prompts)
    origin = rundir.HELDOUT
    if not rows:
        rows = [{"messages": [{"role": "user", "content": p}], "reference": ""} for p in FALLBACK_PROMPTS]
        origin = "fallback prompts (no held-out rows in the run)"
    prompts = []
    for row in rows[:max_prompts]:
        messages = row.get("messages")
        if messages:
            tools = row.get("tools") or None  # a tool-calling row: the prompt renders its tool list too
            text, ids = render_chat(tokenizer, messages, tools), encode_chat(tokenizer, messages, tools)
        else:
            text = row.get("prompt", "")
            ids = tokenizer(text)["input_ids"]
        answer = tokenizer(row.get("reference") or "", add_special_tokens=False)["input_ids"]
        prompts.append(Prompt(ids, ids + answer, messages or None, text, row.get("tools") or None))
    return prompts, origin


def _heldout_rows(path: Path, limit: int) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    if not path.is_file():
        return rows
    for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        if line.strip():
            try:
                row = json.loads(line)
            except (ValueError, RecursionError) as exc:
                raise ModelError(f"{path} line {number} is damaged (not JSON)",
                                 "restore the file, or export with --no-verify") from exc
            if isinstance(row, dict) and (row.get("messages") or row.get("prompt")):
                rows.append(row)
        if len(rows) >= limit:
            break
    return rows


def collect(model: Any, prompts: list[Prompt], eos_ids: list[int], pad_id: int | None,
            max_new_tokens: int, advance: Callable[[], None] = lambda: None) -> Outputs:
    """Teacher-forced logits and greedy continuations of ``model`` for every prompt, one prompt at a time
    (``advance()`` after each, for the progress meter)."""

    device = next(model.parameters()).device
    logits, greedy, margins = [], [], []
    with torch.inference_mode():
        for p in prompts:
            answer = generate_tokens(model, [p.prompt_ids], eos_ids, pad_id, max_new_tokens)[0]
            logits.append(model(input_ids=torch.tensor([p.full_ids], device=device)).logits[0].float().cpu())
            path = model(input_ids=torch.tensor([p.prompt_ids + answer], device=device)).logits[0].float().cpu()
            greedy.append(answer)
            margins.append(top2_margins(path[len(p.prompt_ids) - 1: len(p.prompt_ids) - 1 + len(answer)]))
            advance()
    return Outputs(logits, greedy, margins)


def check_meter(what: str, prompts: int, show: bool) -> Meter:
    """Progress of one verification check (its model load included): ``verifying WHAT: prompt i/n  elapsed ..``."""
    return Meter(f"verifying {what}", prompts, counted("prompt"), enabled=show)


def top2_margins(logits: torch.Tensor) -> list[float]:
    """Per position (rows of ``logits``): top-1 logit minus top-2 logit."""
    if logits.shape[0] == 0:
        return []
    top = logits.topk(2, dim=-1).values
    return (top[:, 0] - top[:, 1]).tolist()


def greedy_agreement(ref: Outputs, other: list[list[int]], margin: float) -> dict[str, Any]:
    """Greedy answers of ``other`` against the reference's: identical, diverging at a near-tie, or diverging.

    A divergence at step k is a near-tie when the reference's own top-1 led its runner-up by at
    most ``margin`` there: rounding may legitimately flip such a choice, and everything after
    it differs.  A divergence where the reference was decisive (or a different stop) is not.
    """
    exact = ties = 0
    first_divergence = []
    for ref_ids, ref_margins, ids in zip(ref.greedy, ref.margins, other):
        if ids == ref_ids:
            exact += 1
            first_divergence.append(None)
            continue
        k = next((i for i, (a, b) in enumerate(zip(ref_ids, ids)) if a != b), min(len(ref_ids), len(ids)))
        first_divergence.append(k)
        same_length_prefix = k < len(ref_ids) and k < len(ids)
        if same_length_prefix and ref_margins[k] <= margin:
            ties += 1
    total = len(ref.greedy)
    return {"greedy_exact": exact, "greedy_total": total, "greedy_near_tie": ties,
            "greedy_diverged": total - exact - ties, "tie_margin": margin, "first_divergence": first_divergence}


def run_reference(run_dir: Path, prompts: list[Prompt], eos_ids: list[int], pad_id: int | None,
                  device: torch.device, max_new_tokens: int, untuned: bool = False, show: bool = True) -> Outputs:
    """Outputs of the trained model (NF4 base + adapter, the training weights), computing in float32.

    ``untuned=True`` also measures how far the base alone (adapter switched off) is from it.
    """

    with check_meter("the trained model (NF4 base + adapter)", len(prompts), show) as meter:
        # load_quantized_base already keeps bitsandbytes from repacking the 4-bit weights on CPU.
        model, _, _ = load_run_for_inference(run_dir, device=device, compute_dtype=torch.float32)
        outputs = collect(model, prompts, eos_ids, pad_id, max_new_tokens, meter.advance)
    if untuned:
        outputs.untuned_kl = untuned_kl(model, prompts, outputs.logits, show)
    _free(model)
    return outputs


def untuned_kl(model: Any, prompts: list[Prompt], logits: list[torch.Tensor], show: bool = False) -> float:
    """Mean KL(``logits`` || a peft model's base alone, adapter switched off) over every position, nats.

    One prompt at a time, so only one extra set of logits is held.
    """
    device = next(model.parameters()).device
    kl = []
    with check_meter("the base without the adapter", len(prompts), show) as meter, torch.inference_mode(), \
            model.disable_adapter():
        for p, ref in zip(prompts, logits):
            kl.append(_kl(ref, model(input_ids=torch.tensor([p.full_ids], device=device)).logits[0].float().cpu()))
            meter.advance()
    return float(torch.cat(kl).mean())


def run_original_adapter(run_dir: Path, prompts: list[Prompt], eos_ids: list[int], pad_id: int | None,
                         device: torch.device, max_new_tokens: int, untuned: bool = False,
                         show: bool = True) -> Outputs:
    """Outputs of the unquantised source base + adapter (what ``--merge-base original`` claims to be)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run = finished.read_run(run_dir)
    with check_meter("the original base + adapter", len(prompts), show) as meter:
        dtype = torch.float32 if fits_in_float32(run.source_dir, device) else "auto"
        base = AutoModelForCausalLM.from_pretrained(run.source_dir, dtype=dtype, device_map={"": device},
                                                    trust_remote_code=run.config.model.trust_remote_code)
        model = PeftModel.from_pretrained(base, run_dir / rundir.ADAPTER, is_trainable=False)
        set_inference_mode(model)
        outputs = collect(model, prompts, eos_ids, pad_id, max_new_tokens, meter.advance)
    if untuned:
        outputs.untuned_kl = untuned_kl(model, prompts, outputs.logits, show)
    _free(model)
    return outputs


def fits_in_float32(model_dir: Path, device: torch.device) -> bool:
    """Whether the model in ``model_dir``, upcast to float32, fits comfortably in RAM / GPU memory."""
    import psutil

    stored = sum(f.stat().st_size for f in model_dir.glob("*.safetensors"))
    config = json.loads((model_dir / "config.json").read_text())
    dtype = config.get("dtype") or config.get("torch_dtype") or "float32"
    needed = stored * (4 // max(1, getattr(torch, dtype, torch.float32).itemsize))
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return needed < 0.8 * free
    return needed < 0.6 * psutil.virtual_memory().available


def run_export(export_dir: Path, prompts: list[Prompt], eos_ids: list[int], pad_id: int | None,
               device: torch.device, dtype: str, max_new_tokens: int, show: bool = True) -> tuple[Outputs, str]:
    """Outputs of the exported checkpoint loaded with plain transformers; returns (outputs, compute dtype)."""
    from transformers import AutoModelForCausalLM

    compute = "float32" if fits_in_float32(export_dir, device) else dtype
    with check_meter(f"the export ({compute} compute)", len(prompts), show) as meter:
        model = AutoModelForCausalLM.from_pretrained(export_dir, dtype=getattr(torch, compute),
                                                     device_map={"": device})
        set_inference_mode(model)
        outputs = collect(model, prompts, eos_ids, pad_id, max_new_tokens, meter.advance)
    _free(model)
    return outputs, compute


def _free(model: Any) -> None:
    del model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def compare(ref: Outputs, other: Outputs, tol: dict[str, float]) -> dict[str, Any]:
    """Logit drift and greedy agreement of ``other`` against ``ref``."""
    exact = sum(a == b for a, b in zip(ref.greedy, other.greedy))
    return {
        **compare_logits(ref.logits, other.logits, tol),
        "greedy_exact": exact,
        "greedy_total": len(ref.greedy),
        "greedy_token_agreement": _prefix_agreement(ref.greedy, other.greedy),
    }


def compare_logits(ref: list[torch.Tensor], other: list[torch.Tensor], tol: dict[str, float]) -> dict[str, Any]:
    """Teacher-forced drift of ``other`` from ``ref`` (lists of [positions, vocab] logits, one per prompt).

    Besides |Δlogit| (absolute and relative to the reference's logit spread) it reports the
    mean and largest KL(ref || other) of the next-token distributions, in nats per position.
    """
    diffs = [(a - b).abs() for a, b in zip(ref, other)]
    scale = float(torch.cat([r.reshape(-1) for r in ref]).std()) or 1.0
    max_abs = max(float(d.max()) for d in diffs)
    mean_abs = float(torch.cat([d.reshape(-1) for d in diffs]).mean())
    kl = torch.cat([_kl(a, b) for a, b in zip(ref, other)])
    decisive, agree = _decisive(ref, other, 2 * tol["rel_max"] * scale)
    return {
        "max_abs": max_abs,
        "mean_abs": mean_abs,
        "logit_std": scale,
        "rel_max": max_abs / scale,
        "rel_mean": mean_abs / scale,
        "kl_mean": float(kl.mean()),
        "kl_max": float(kl.max()),
        "tolerance": dict(tol),
        "top1_agreement": _top1(ref, other),
        "decisive_positions": decisive,
        "decisive_agreement": agree / decisive if decisive else 1.0,
    }


def _kl(ref: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """KL(softmax(ref) || softmax(other)) per position, float64."""
    p = torch.log_softmax(ref.double(), dim=-1)
    q = torch.log_softmax(other.double(), dim=-1)
    return (p.exp() * (p - q)).sum(-1).clamp_min(0.0)


def _top1(ref: list[torch.Tensor], other: list[torch.Tensor]) -> float:
    same = sum(int((a.argmax(-1) == b.argmax(-1)).sum()) for a, b in zip(ref, other))
    return same / sum(a.shape[0] for a in ref)


def _decisive(ref: list[torch.Tensor], other: list[torch.Tensor], margin: float) -> tuple[int, int]:
    """(positions where ref's top-1 leads top-2 by more than ``margin``, how many of them ``other`` matches)."""
    total = agree = 0
    for a, b in zip(ref, other):
        top2 = a.topk(2, dim=-1).values
        mask = (top2[:, 0] - top2[:, 1]) > margin
        total += int(mask.sum())
        agree += int((a.argmax(-1) == b.argmax(-1))[mask].sum())
    return total, agree


def _prefix_agreement(ref: list[list[int]], other: list[list[int]]) -> float:
    scores = []
    for a, b in zip(ref, other):
        n = 0
        while n < min(len(a), len(b)) and a[n] == b[n]:
            n += 1
        scores.append(n / max(len(a), len(b), 1))
    return sum(scores) / max(len(scores), 1)


def drift_failures(m: dict[str, Any]) -> list[str]:
    """Reasons the teacher-forced drift ``m`` (``compare_logits``) is outside its tolerance: |Δlogit|, decisive top-1."""
    failures = []
    tol = m["tolerance"]
    for key, label in (("rel_max", "max |Δlogit|"), ("rel_mean", "mean |Δlogit|")):
        if m[key] > tol[key]:
            failures.append(f"{label} is {m[key]:.3g} of the logit std (tolerance {tol[key]:.3g})")
    if m["decisive_agreement"] < 1.0:
        wrong = m["decisive_positions"] - round(m["decisive_agreement"] * m["decisive_positions"])
        failures.append(f"top-1 token differs at {wrong} position(s) where the reference is decisive")
    return failures


def judge(m: dict[str, Any], min_greedy_exact: float = MIN_GREEDY_EXACT) -> list[str]:
    """Reasons the metrics fall outside tolerance (empty when they pass)."""
    failures = drift_failures(m)
    if m["greedy_exact"] < min_greedy_exact * m["greedy_total"]:
        failures.append(f"greedy generations identical on only {m['greedy_exact']}/{m['greedy_total']} prompts "
                        f"(need {min_greedy_exact:.0%})")
    return failures


def verify_export(run_dir: str | Path, export_dir: str | Path, merge_base: str = "dequantized",
                  dtype: str = "float16", device: torch.device | None = None, max_prompts: int = 8,
                  max_new_tokens: int = 24, show_progress: bool = True) -> dict[str, Any]:
    """Compare an export with the trained model; return the ``verification`` section of the report.

    ``status`` is ``passed`` or ``failed`` (with ``failures``).  For ``merge_base='original'``
    the pass/fail check is against original base + adapter, and ``vs_trained`` is the cost.
    ``show_progress``: each check's progress on stderr (``pacing.Meter``).
    """
    from transformers import AutoTokenizer, GenerationConfig

    run, export = Path(run_dir), Path(export_dir)
    device = device or pick_device()
    tokenizer = AutoTokenizer.from_pretrained(export)
    eos = GenerationConfig.from_pretrained(export).eos_token_id
    eos_ids = list(eos) if isinstance(eos, (list, tuple)) else [eos]
    pad = tokenizer.pad_token_id
    prompts, origin = load_prompts(run, tokenizer, max_prompts)
    ref = run_reference(run, prompts, eos_ids, pad, device, max_new_tokens, show=show_progress)
    exported, compute = run_export(export, prompts, eos_ids, pad, device, dtype, max_new_tokens, show_progress)
    trained = json.loads((run / rundir.MANIFEST).read_text()).get("quant", {}).get("load_dtype", "float32")
    tol = tolerance(dtype, compute, trained)
    result: dict[str, Any] = {
        "prompts": len(prompts), "prompt_source": origin, "max_new_tokens": max_new_tokens, "device": str(device),
        "reference": "NF4 base + adapter as trained, float32 compute", "export_compute_dtype": compute,
        "criteria": {**{f"{k}_max": v for k, v in tol.items()}, "decisive_agreement_min": 1.0,
                     "greedy_exact_fraction_min": MIN_GREEDY_EXACT},
    }
    result["vs_trained"] = checked = compare(ref, exported, tol)
    if merge_base == "original":
        original = run_original_adapter(run, prompts, eos_ids, pad, device, max_new_tokens, show=show_progress)
        result["vs_original_adapter"] = checked = compare(original, exported, tol)
        result["cost_of_original"] = _cost_text(result["vs_trained"])
    failures = judge(checked)
    result["status"] = "failed" if failures else "passed"
    result["failures"] = failures
    return result


def _cost_text(m: dict[str, Any]) -> str:
    return (f"the original-base merge is not the trained model: max |Δlogit| {m['max_abs']:.3g} "
            f"({m['rel_max']:.3g} of the logit std, {m['rel_max'] / m['tolerance']['rel_max']:.1f}x the tolerance "
            f"of a faithful export), mean |Δlogit| {m['mean_abs']:.3g}, "
            f"top-1 agreement {m['top1_agreement']:.3f}, greedy identical on {m['greedy_exact']}/{m['greedy_total']} "
            "prompts")
