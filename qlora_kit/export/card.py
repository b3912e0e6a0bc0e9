"""What an export says about itself: ``export_report.json``, the README model card, the terminal summary."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from qlora_kit.core.files import file_sha256
from qlora_kit.core.logs import console
from qlora_kit.export.merge import MergeContext, Plan, WeightStats
from qlora_kit.model.sources import base_model_id
from qlora_kit.rundir import finished
from qlora_kit.rundir import layout as rundir
from qlora_kit.variants import summary_line

REPORT = "export_report.json"


def base_report(run: finished.RunInfo, target: Path, fmt: str, ctx: MergeContext, plan: Plan, stats: WeightStats,
                eos: list[int]) -> dict[str, Any]:
    """The facts every export records (the writer adds its own section, verification its result)."""
    cfg = plan.adapter.config
    return {
        "qlora_kit_version": _version(),
        "format": fmt,
        "run_dir": str(run.run_dir.resolve()),
        "export_dir": str(target),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "merge_base": ctx.merge_base,
        "base": {"name_or_path": run.manifest.get("base", {}).get("name_or_path"), "source_dir": str(run.source_dir)},
        "quant": {**run.quant, "reproduced_on": ctx.quant_device.type,
                  "trained_on": run.manifest.get("device", {}).get("type")},
        "adapter": {"type": str(cfg.get("peft_type", "LORA")).lower(), "r": cfg.get("r"),
                    "lora_alpha": cfg.get("lora_alpha"), "use_rslora": bool(cfg.get("use_rslora")),
                    "use_dora": bool(cfg.get("use_dora")), "modules": len(plan.adapter.modules),
                    "scales": sorted({round(m.scale, 6) for m in plan.adapter.modules.values()}),
                    "variant": run.manifest.get("lora", {}).get("variant"),
                    "residual_base_modules": len(ctx.residual_modules)},
        "tensors": {"merged": stats.merged, "dequantised_unmerged": stats.dequantised, "copied": stats.copied},
        "bytes_written": stats.bytes_written,
        "largest_tensor_fp32_bytes": stats.largest_tensor_bytes,
        "weights_wall_s": round(stats.wall_s, 3),
        "weights_peak_rss_bytes": stats.peak_rss_bytes,
        "rss_before_weights_bytes": stats.rss_before_bytes,
        "compute_device": str(ctx.compute_device),
        "eos_token_ids": eos,
        "adapter_sha256": adapter_digest(run),  # what was merged: a rerun of the same export can tell it is done
    }


def same_export(target: Path, run: finished.RunInfo, options: dict[str, Any], verify: bool) -> dict[str, Any] | None:
    """The report of the complete export at ``target`` when it is what this export would make, else None.

    Same run directory, same adapter files (their sha256), same ``options`` (format, merge base,
    dtype or quant), its weights present, and verified when ``verify`` asks for it.  The report is
    written before the final rename, so a directory holding one is a complete export.
    """
    report = _read_report(target / REPORT)
    if report is None or not report.get("adapter_sha256") or report.get("adapter_sha256") != adapter_digest(run):
        return None
    if report.get("run_dir") != str(run.run_dir.resolve()) or report.get("export_dir") != str(target):
        return None
    stored = {"format": report.get("format"), "merge_base": report.get("merge_base"), "dtype": report.get("dtype"),
              "quant": (report.get("gguf") or {}).get("quant")}
    if stored != options:
        return None
    status = (report.get("verification") or {}).get("status")
    if status == "failed" or (verify and status != "passed"):
        return None
    weights = report.get("shards") or [(report.get("gguf") or {}).get("file")]
    return report if all(isinstance(w, str) and (target / w).is_file() for w in weights) else None


def adapter_digest(run: finished.RunInfo) -> dict[str, str]:
    """sha256 of each file of the run's adapter (megabytes: read in well under a second)."""
    adapter = run.run_dir / rundir.ADAPTER
    return {p.name: file_sha256(p) for p in sorted(adapter.iterdir()) if p.is_file()}


def _read_report(path: Path) -> dict[str, Any] | None:
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return report if isinstance(report, dict) else None


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("qlora-kit")
    except PackageNotFoundError:
        return "unknown"


def write_report(staging: Path, report: dict[str, Any]) -> None:
    """``export_report.json`` in the staging directory."""
    (staging / REPORT).write_text(json.dumps(report, indent=2) + "\n")


def write_readme(run: finished.RunInfo, staging: Path, report: dict[str, Any]) -> None:
    """A model card: base, data, hyperparameters, final metrics, export and verification, how to load."""
    cfg = run.config
    man = run.manifest

    base_name = man.get("base", {}).get("name_or_path", cfg.model.name_or_path)
    base = base_model_id(base_name)
    gguf = report.get("gguf")
    stored = f"a `{gguf['quant']}` GGUF file for llama.cpp / Ollama" if gguf else f"a plain `{report['dtype']}` checkpoint"
    lines = [
        "---", f"base_model: {base}", f"library_name: {'gguf' if gguf else 'transformers'}",
        "tags: [qlora, lora, qlora-kit" + (", gguf]" if gguf else "]"), "---", "",
        f"# {Path(report['export_dir']).name}", "",
        f"Fine-tuned from `{base}` (model.name_or_path `{base_name}`, loaded from "
        f"`{man.get('base', {}).get('source_dir', run.source_dir)}` on the training machine) with QLoRA (4-bit {run.quant.get('quant_type')} base, double quant "
        f"{run.quant.get('double_quant')}, blocksize {run.quant.get('blocksize')}) and merged by qlora-kit "
        f"{report['qlora_kit_version']} into {stored}.", "",
        "## Merge", "",
        f"- merge base: **{report['merge_base']}**" + (
            " (the dequantised NF4 weights the adapter was trained against)" if report["merge_base"] == "dequantized"
            else " (the original 16-bit weights; not the exact model that was trained, see the verification)"),
        f"- adapter: r={cfg.lora.r}, alpha={cfg.lora.alpha}, rsLoRA={cfg.lora.use_rslora}, DoRA={cfg.lora.use_dora}, "
        f"targets={man.get('lora', {}).get('target_modules', cfg.lora.target_modules)}",
        f"- variant: {variant_line(man.get('lora', {}), report['adapter']['residual_base_modules'])}",
        f"- end-of-sequence token ids: {report['eos_token_ids']}",
    ]
    if gguf:
        lines += _gguf_lines(report)
    lines += ["", *_data_lines(run), "", "## Hyperparameters", "", "| setting | value |", "| --- | --- |"]
    train = cfg.train
    for key in ("learning_rate", "lr_scheduler", "max_steps", "num_epochs", "micro_batch_size",
                "gradient_accumulation_steps", "max_length", "optimizer", "weight_decay", "loraplus_lr_ratio", "seed"):
        lines.append(f"| train.{key} | {getattr(train, key)} |")
    for key in ("type", "init", "dropout"):
        lines.append(f"| lora.{key} | {getattr(cfg.lora, key)} |")
    metrics = man.get("final_metrics") or {}
    lines += ["", "## Final metrics", ""]
    lines += [f"- {k}: {v}" for k, v in metrics.items()] or ["- (none recorded)"]
    lines += ["", "## Verification", ""]
    lines += verification_lines(report.get("verification", {}))
    lines += ["", "## Loading", ""] + (_gguf_loading(report) if gguf else _hf_loading())
    (staging / "README.md").write_text("\n".join(lines) + "\n")


def variant_line(lora: dict[str, Any], residual_modules: int) -> str:
    """The model card's line on the LoRA variant and, for base-changing inits, which base was merged."""

    line = summary_line(lora.get("variant") or {"type": "lora", "init": "default"})
    if residual_modules:
        line += (f"; merged onto the stored residual NF4 base of {residual_modules} modules (what the adapter was "
                 "trained against), not onto NF4 of the original weights")
    return line


def _gguf_lines(report: dict[str, Any]) -> list[str]:
    g, mf = report["gguf"], report["modelfile"]
    types = ", ".join(f"{n} {k}" for k, n in sorted(g["tensor_types"].items()))
    lines = [f"- GGUF: `{g['file']}`, architecture `{g['arch']}`, tensors {types}"
             + (", q/k permuted for llama.cpp's RoPE layout" if g["permuted_qk"] else ""),
             f"- quantised by: {g['quantizer']}",
             f"- tokenizer: `{g['tokenizer_model']}`, pre-tokenizer `{g['tokenizer_pre']}`; the training chat "
             "template is stored as `tokenizer.chat_template`",
             f"- Modelfile: {mf['family']} template, stop tokens {mf['stops']}"]
    lines += [f"- note: {n}" for n in g.get("notes", [])]
    lines += [f"- **Modelfile warning**: {w}" for w in mf.get("warnings", [])]
    return lines


def _data_lines(run: finished.RunInfo) -> list[str]:
    data = run.manifest.get("data", {})
    lines = ["## Data", "", f"- file: `{data.get('path', run.config.data.path)}` (sha256 `{data.get('sha256')}`), "
                           f"format {data.get('format')}"]
    try:
        summary = json.loads((run.run_dir / rundir.DATA_SUMMARY).read_text())
    except (OSError, ValueError):
        summary = {}
    if summary:
        lines.append(f"- rows: {summary.get('rows')}, tokens: {summary.get('tokens')}, "
                     f"truncated: {summary.get('truncated')}")
    return lines


def verification_lines(ver: dict[str, Any]) -> list[str]:
    """The verification section of the model card."""
    if not ver or ver.get("status") == "skipped":
        return ["Not verified (`--no-verify`)."]
    lines = [f"Status: **{ver['status']}** on {ver.get('prompts')} held-out prompts (see export_report.json)."]
    if "llama_cpp" in ver:
        lines.append(f"- llama.cpp: {ver['llama_cpp']}")
        tok = ver.get("tokenization")
        if tok:
            lines.append(f"- llama.cpp tokenisation identical on {tok['identical']}/{tok['total']} prompts")
        m, g = ver["next_token"], ver["greedy"]
        lines.append(f"- next-token distribution vs the trained model: max |Δlogit| {m['max_abs']:.3g} "
                     f"({m['rel_max']:.3g} of the logit std), mean KL {m['kl_mean']:.3g} nats, top-1 agreement "
                     f"{m['top1_agreement']:.3f}")
        lines.append(f"- greedy answers identical on {g['greedy_exact']}/{g['greedy_total']} prompts")
        u = ver.get("untuned")
        if u and u["judged"]:
            kept = "kept" if u["ratio"] <= u["max_ratio"] else "LOST"
            lines.append(f"- fine-tune {kept}: KL(trained || GGUF) is {u['ratio']:.3g}x KL(trained || untuned base) "
                         f"({u['kl_mean_export']:.3g} vs {u['kl_mean_untuned']:.3g} nats; limit {u['max_ratio']}x)")
    for label, key in (("vs the trained model (NF4 + adapter)", "vs_trained"),
                       ("vs original base + adapter", "vs_original_adapter")):
        m = ver.get(key)
        if m:
            lines.append(f"- {label}: max |Δlogit| {m['max_abs']:.3g} ({m['rel_max']:.3g} of the logit std), "
                         f"mean {m['mean_abs']:.3g}, greedy identical on {m['greedy_exact']}/{m['greedy_total']} "
                         "prompts")
    if ver.get("cost_of_original"):
        lines.append(f"- cost of merging onto the original weights: {ver['cost_of_original']}")
    if ver.get("failures"):
        lines.append(f"- **outside tolerance**: {'; '.join(ver['failures'])}")
    return lines


def _hf_loading() -> list[str]:
    return ["```python", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
            'path = "<this directory>"', "tokenizer = AutoTokenizer.from_pretrained(path)",
            'model = AutoModelForCausalLM.from_pretrained(path, dtype="auto", device_map="auto")',
            'messages = [{"role": "user", "content": "Hello!"}]',
            "ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors=\"pt\","
            " return_dict=True).to(model.device)",
            "out = model.generate(**ids, max_new_tokens=256)  # stops on generation_config.eos_token_id",
            "print(tokenizer.decode(out[0, ids['input_ids'].shape[1]:], skip_special_tokens=True))", "```", "",
            "Or: `qlora-kit generate <this directory> \"Hello!\"`."]


def _gguf_loading(report: dict[str, Any]) -> list[str]:
    name, file = Path(report["export_dir"]).name, report["gguf"]["file"]
    return ["```bash", f"ollama create {name} -f Modelfile && ollama run {name}   # in this directory",
            f"llama-cli -m {file} -cnv                 # llama.cpp, chat template from the GGUF",
            "```", "", "LM Studio: import the `.gguf` file; it reads the chat template stored in it."]


def print_summary(report: dict[str, Any]) -> None:
    """Terminal summary of an export (rich table), on the shared stderr console."""
    from rich.table import Table

    table = Table(title=f"export → {report['export_dir']}", show_header=False)
    stored = report["gguf"]["quant"] if report.get("gguf") else report.get("dtype")
    table.add_row("format / merge base", f"{report['format']} {stored} / {report['merge_base']}")
    t = report["tensors"]
    table.add_row("tensors", f"{t['merged']} merged, {t['dequantised_unmerged']} dequantised, {t['copied']} copied")
    where = f"{len(report['shards'])} shard(s)" if "shards" in report else report["gguf"]["file"]
    table.add_row("written", f"{report['bytes_written'] / 1e9:.3f} GB in {where}, {report['weights_wall_s']:.1f} s")
    table.add_row("peak RSS (weights)", f"{report['weights_peak_rss_bytes'] / 2**20:.0f} MiB "
                                        f"(before: {report['rss_before_weights_bytes'] / 2**20:.0f} MiB)")
    table.add_row("EOS ids", str(report["eos_token_ids"]))
    if report.get("modelfile"):
        mf = report["modelfile"]
        table.add_row("Modelfile", f"{mf['family']} template, stops {mf['stops']}")
    ver = report.get("verification", {})
    for line in verification_lines(ver)[1:]:
        table.add_row("", line.removeprefix("- "))
    table.add_row("verification", ver.get("status", "skipped") + (": " + "; ".join(ver["failures"])
                                                                  if ver.get("failures") else ""))
    console().print(table)
