"""What an export says about itself: ``export_report.json``, the README model card, the terminal summary.

Both are published as they are (``--push-to-hub``): they name the base and the data by their
public names and hold no local path (``export/portable.py``); the local facts of an export go
to the run's ``manifest.json`` (:func:`record_export`).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import yaml

from qlora_kit.core.files import file_sha256
from qlora_kit.core.logs import console
from qlora_kit.export.merge import MergeContext, Plan, WeightStats
from qlora_kit.export.portable import HUB_ID, base_model_id, data_names, hub_datasets
from qlora_kit.inference.chat import eos_token_ids
from qlora_kit.rundir import finished
from qlora_kit.rundir import layout as rundir
from qlora_kit.rundir import manifest as run_manifest
from qlora_kit.variants import summary_line

REPORT = "export_report.json"


def base_report(run: finished.RunInfo, target: Path, fmt: str, ctx: MergeContext, plan: Plan, stats: WeightStats,
                eos: list[int]) -> dict[str, Any]:
    """The facts every export records (the writer adds its own section, verification its result)."""
    cfg = plan.adapter.config
    return {
        "qlora_kit_version": _version(),
        "format": fmt,
        "name": target.name,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "merge_base": ctx.merge_base,
        "base": {"model": base_model_id(str(run.manifest.get("base", {}).get("name_or_path")
                                            or run.config.model.name_or_path)),
                 "revision": run.manifest.get("base", {}).get("revision")},
        "run": {"name": run.run_dir.absolute().name,
                "adapter_sha256": (run.manifest.get("adapter_files") or {}).get("adapter_model.safetensors", {})
                .get("sha256")},
        "data": data_names(run.manifest, run.config),
        "method": run.manifest.get("method") or {"name": "sft", "start_adapter": None},
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
        "eos_tokens": eos_tokens(run, eos),
        "adapter_sha256": adapter_digest(run),  # what was merged: a rerun of the same export can tell it is done
    }


def eos_tokens(run: finished.RunInfo, ids: list[int]) -> list[str]:
    """The end-of-sequence token ids as text (``<|im_end|>``), read from the run's tokenizer."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(run.run_dir / rundir.TOKENIZER,
                                                  trust_remote_code=run.config.model.trust_remote_code)
        return [str(t) for t in tokenizer.convert_ids_to_tokens(ids)]
    except (OSError, ValueError):
        return []


def record_export(run: finished.RunInfo, target: Path, report: dict[str, Any], hub_url: str | None = None) -> None:
    """Keep the local facts of an export in the run's ``manifest.json`` (``exports``), never in the export.

    Where it is, where the base was read from, and where it was pushed (best effort: see
    ``rundir.manifest.append_record``).
    """
    entry = {"dir": str(target.absolute()), "format": report.get("format"), "created": report.get("created"),
             "base_source_dir": str(run.source_dir), "merge_base": report.get("merge_base"),
             "verification": (report.get("verification") or {}).get("status"), "hub": hub_url}
    run_manifest.append_record(run.run_dir, "exports", entry, "export (recording it in the manifest)")


def record_push(run_dir: Path, repo_id: str, url: str) -> None:
    """Note in the run's ``manifest.json`` (``pushes``) that its adapter was pushed (best effort)."""
    entry = {"what": "adapter", "repo_id": repo_id, "url": url, "time": run_manifest.now_iso()}
    run_manifest.append_record(run_dir, "pushes", entry, "push (recording it in the manifest)")


def same_export(target: Path, run: finished.RunInfo, options: dict[str, Any], verify: bool) -> dict[str, Any] | None:
    """The report of the complete export at ``target`` when it is what this export would make, else None.

    Same adapter files (their sha256: the report holds no local path to compare), same ``options`` (format, merge base,
    dtype or quant), its weights present, and verified when ``verify`` asks for it.  The report is
    written before the final rename, so a directory holding one is a complete export.
    """
    report = _read_report(target / REPORT)
    if report is None or not report.get("adapter_sha256") or report.get("adapter_sha256") != adapter_digest(run):
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
    """An export's ``export_report.json`` as a dict, or None when it is missing or not a JSON object."""
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


def write_readme(run: finished.RunInfo, staging: Path, report: dict[str, Any], repo_id: str | None = None) -> None:
    """A model card: base, data, hyperparameters, final metrics, export and verification, how to load.

    ``repo_id``: the Hub repository it will be pushed to (the loading examples name it).
    """
    cfg = run.config
    man = run.manifest
    base = report["base"]["model"]
    gguf = report.get("gguf")
    stored = f"a `{gguf['quant']}` GGUF file for llama.cpp / Ollama" if gguf else f"a plain `{report['dtype']}` checkpoint"
    lines = [*card_metadata(run, "gguf" if gguf else "transformers", ["gguf"] if gguf else []),
             f"# {report['name']}", "",
             f"Fine-tuned from `{base}` with QLoRA (4-bit {run.quant.get('quant_type')} base, double quant "
             f"{run.quant.get('double_quant')}, blocksize {run.quant.get('blocksize')}) and merged by qlora-kit "
             f"{report['qlora_kit_version']} into {stored}.", "",
             *objective_lines(man.get("method")),
             "## Merge", "",
             f"- merge base: **{report['merge_base']}**" + (
                 " (the dequantised NF4 weights the adapter was trained against)"
                 if report["merge_base"] == "dequantized"
                 else " (the original 16-bit weights; not the exact model that was trained, see the verification)"),
             f"- adapter: r={cfg.lora.r}, alpha={cfg.lora.alpha}, rsLoRA={cfg.lora.use_rslora}, "
             f"DoRA={cfg.lora.use_dora}, targets={man.get('lora', {}).get('target_modules', cfg.lora.target_modules)}",
             f"- variant: {variant_line(man.get('lora', {}), report['adapter']['residual_base_modules'])}"]
    if gguf:
        lines += _gguf_lines(report)
    lines += ["", *chat_lines(report["eos_token_ids"], report.get("eos_tokens") or [], "gguf" if gguf else "hf"), ""]
    lines += [*_data_lines(run), "", *training_lines(run)]
    lines += ["", "## Export", "", *_export_lines(report)]
    lines += ["", "## Verification", ""]
    lines += verification_lines(report.get("verification", {}))
    lines += ["", "## Loading", ""] + (_gguf_loading(report, repo_id) if gguf else _hf_loading(repo_id))
    (staging / "README.md").write_text("\n".join(lines) + "\n")


def objective_lines(method: dict[str, Any] | None) -> list[str]:
    """The model card's lines on the objective (SFT, DPO, ORPO) and the adapter the run started from."""
    method = method or {"name": "sft"}
    name = method.get("name", "sft")
    if name == "sft" and not method.get("start_adapter"):
        return []
    what = {"sft": "supervised fine-tuning (next-token loss on the replies)",
            "dpo": f"DPO (loss {method.get('loss_type')}, beta {method.get('beta')}; reference: {method.get('reference')})",
            "orpo": f"ORPO (beta {method.get('beta')}, no reference model)"}.get(name, name)
    lines = ["## Training", "", f"- objective: {what}"]
    start = method.get("start_adapter")
    if start:
        lines.append(f"- started from the adapter of the run `{start.get('run')}` (train.method {start.get('method')}, "
                     "same base, checked by fingerprint); the adapter merged here is the whole trained adapter, "
                     "so that run is not needed to use this model")
    else:
        lines.append("- started from a new adapter on the base model")
    return lines + [""]


def write_adapter_card(run: finished.RunInfo, folder: Path, repo_id: str) -> None:
    """The model card of an adapter-only repository: base, data, training, chat facts, loading with peft."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(run.run_dir / rundir.TOKENIZER,
                                              trust_remote_code=run.config.model.trust_remote_code)
    eos = eos_token_ids(tokenizer, None)
    base = base_model_id(str(run.manifest.get("base", {}).get("name_or_path") or run.config.model.name_or_path))
    lines = [*card_metadata(run, "peft", ["peft"]), f"# {repo_id.split('/')[-1]}", "",
             f"A LoRA adapter for `{base}`, trained by qlora-kit {_version()} with QLoRA against the 4-bit "
             f"{run.quant.get('quant_type')} base (double quant {run.quant.get('double_quant')}, blocksize "
             f"{run.quant.get('blocksize')}): loading the base in 4-bit the same way gives the model that was "
             "trained; `qlora-kit export` makes a merged fp16 checkpoint verified against it.", "",
             f"- adapter: {variant_line(run.manifest.get('lora', {}), 0)}, targets "
             f"{run.manifest.get('lora', {}).get('target_modules')}", "",
             *chat_lines(eos, [str(t) for t in tokenizer.convert_ids_to_tokens(eos)], "adapter"), "",
             *_data_lines(run), "", *training_lines(run), "", "## Loading", "", "```python",
             "import torch", "from peft import PeftModel",
             "from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig", "",
             f'quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="{run.quant.get("quant_type", "nf4")}", '
             f'bnb_4bit_use_double_quant={run.quant.get("double_quant", True)}, '
             f'bnb_4bit_compute_dtype=torch.{run.quant.get("compute_dtype", "bfloat16")})',
             f'base = AutoModelForCausalLM.from_pretrained("{base}", quantization_config=quant, device_map="auto")'
             + ("" if HUB_ID.match(base) else "  # the base model: its hub id or local directory"),
             f'model = PeftModel.from_pretrained(base, "{repo_id}")',
             f'tokenizer = AutoTokenizer.from_pretrained("{repo_id}")  # the training chat template', "```"]
    (folder / "README.md").write_text("\n".join(lines) + "\n")


def card_metadata(run: finished.RunInfo, library: str, tags: list[str]) -> list[str]:
    """The card's YAML header: base model, library, pipeline, tags, hub datasets (never a local path).

    ``base_model`` only when the base has a hub id: the Hub links it, and a bare directory name
    would name some other repository or none.
    """
    base = base_model_id(str(run.manifest.get("base", {}).get("name_or_path") or run.config.model.name_or_path))
    meta: dict[str, Any] = {"base_model": base} if HUB_ID.match(base) else {}
    meta.update(library_name=library, pipeline_tag="text-generation", tags=["qlora", "lora", "qlora-kit", *tags])
    datasets = hub_datasets(run.manifest, run.config)
    if datasets:
        meta["datasets"] = datasets
    return ["---", yaml.safe_dump(meta, sort_keys=False, allow_unicode=True).rstrip("\n"), "---", ""]


def chat_lines(eos_ids: list[int], eos_text: list[str], kind: str) -> list[str]:
    """Chat template and end-of-turn facts (``kind``: hf, gguf or adapter): what a runtime must use."""
    shown = ", ".join(f"`{t}` ({i})" for t, i in zip(eos_text, eos_ids)) if eos_text else str(eos_ids)
    where = {"gguf": "stored in the GGUF as `tokenizer.chat_template` (the Modelfile's TEMPLATE renders the same)"}
    stops = {"hf": " (`generation_config.json` `eos_token_id`)",
             "adapter": " (pass them as `eos_token_id` to `generate`: the base's own may differ)"}
    return ["## Chat template and end of turn", "",
            f"- chat template: the one used in training, "
            f"{where.get(kind, 'in the tokenizer files (`chat_template.jinja` / `tokenizer_config.json`)')}; "
            "prompts rendered without it are not what the model learned",
            f"- generation stops at: {shown}{stops.get(kind, '')}"]


def training_lines(run: finished.RunInfo) -> list[str]:
    """Hyperparameters and final metrics of the run."""
    cfg = run.config
    lines = ["## Hyperparameters", "", "| setting | value |", "| --- | --- |"]
    for key in ("learning_rate", "lr_scheduler", "max_steps", "num_epochs", "micro_batch_size",
                "gradient_accumulation_steps", "max_length", "optimizer", "weight_decay", "loraplus_lr_ratio", "seed"):
        lines.append(f"| train.{key} | {getattr(cfg.train, key)} |")
    if cfg.train.method != "sft":
        lines += [f"| train.{key} | {getattr(cfg.train, key)} |" for key in ("method", "beta")]
        lines += [f"| train.dpo_loss | {cfg.train.dpo_loss} |"] if cfg.train.method == "dpo" else []
    for key in ("type", "init", "r", "alpha", "dropout"):
        lines.append(f"| lora.{key} | {getattr(cfg.lora, key)} |")
    metrics = run.manifest.get("final_metrics") or {}
    lines += ["", "## Final metrics", ""]
    return lines + ([f"- {k}: {v}" for k, v in metrics.items()] or ["- (none recorded)"])


def _export_lines(report: dict[str, Any]) -> list[str]:
    stored = report["gguf"]["quant"] if report.get("gguf") else report.get("dtype")
    t = report["tensors"]
    return [f"- format: {report['format']} ({stored}), {report['bytes_written'] / 1e9:.3f} GB, made "
            f"{report['created']} by qlora-kit {report['qlora_kit_version']}",
            f"- tensors: {t['merged']} merged, {t['dequantised_unmerged']} dequantised, {t['copied']} copied",
            "- every fact of the export and its verification: `export_report.json`"]


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
    names = data_names(run.manifest, run.config)
    digest = f" (sha256 `{data['sha256']}`)" if data.get("sha256") and len(names) == 1 else ""
    lines = ["## Data", "", f"- training data: {', '.join(f'`{n}`' for n in names)}{digest}, format "
                           f"{data.get('format')}"]
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


def _hf_loading(repo_id: str | None) -> list[str]:
    return ["```python", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
            f'path = "{repo_id}"' if repo_id else 'path = "<this directory>"', "tokenizer = AutoTokenizer.from_pretrained(path)",
            'model = AutoModelForCausalLM.from_pretrained(path, dtype="auto", device_map="auto")',
            'messages = [{"role": "user", "content": "Hello!"}]',
            "ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors=\"pt\","
            " return_dict=True).to(model.device)",
            "out = model.generate(**ids, max_new_tokens=256)  # stops on generation_config.eos_token_id",
            "print(tokenizer.decode(out[0, ids['input_ids'].shape[1]:], skip_special_tokens=True))", "```", "",
            f"Or: `qlora-kit generate {'<a local copy>' if repo_id else '<this directory>'} \"Hello!\"`."]


def _gguf_loading(report: dict[str, Any], repo_id: str | None) -> list[str]:
    name, file = report["name"], report["gguf"]["file"]
    hub = [f"llama-cli -hf {repo_id} -cnv        # llama.cpp, straight from the Hub"] if repo_id else []
    return ["```bash", f"ollama create {name} -f Modelfile && ollama run {name}   # in a local copy of this directory",
            f"llama-cli -m {file} -cnv                 # llama.cpp, chat template from the GGUF", *hub,
            "```", "", "LM Studio: import the `.gguf` file; it reads the chat template stored in it."]


def print_summary(report: dict[str, Any], target: Path) -> None:
    """Terminal summary of an export (rich table), on the shared stderr console."""
    from rich.table import Table

    table = Table(title=f"export → {target}", show_header=False)
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
