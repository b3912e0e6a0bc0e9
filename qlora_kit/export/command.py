"""``qlora-kit export``: read the run, merge, write HF or GGUF into a staging directory, verify, publish.

    run dir ──► rundir.read_run ──► merge.plan_export ──► hf.write_weights        (--format hf)
                                                      └─► gguf_file.write_gguf   (--format gguf)
            ──► verify / verify_gguf ──► card (README, export_report.json) ──► publish.commit
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from qlora_kit.core import diskspace
from qlora_kit.core.errors import EXIT_VERIFY_FAILED, ModelError, Preempted, QloraKitError, short_repr
from qlora_kit.core.files import publish_dir, restore_moved_aside
from qlora_kit.core.signals import StopNow, StopRequest
from qlora_kit.export import card, gguf_file, hf, hub, llamacpp
from qlora_kit.export.gguf_vocab import read_vocab
from qlora_kit.export.merge import MERGE_BASES, MergeContext, Plan, plan_export
from qlora_kit.export.modelfile import chat_format, note_tools, use_run_system, write_modelfile
from qlora_kit.export.portable import base_model_id, local_paths
from qlora_kit.export.publish import check_target, staging_dir
from qlora_kit.export.verify import verify_export
from qlora_kit.export.verify_gguf import verify_gguf
from qlora_kit.model.base import DTYPES, load_saved_tokenizer
from qlora_kit.rundir import finished
from qlora_kit.rundir import layout as rundir
from qlora_kit.rundir import lock as runlock
from qlora_kit.variants.merge import check_merge_base
from qlora_kit.variants.residual import check_residual, residual_modules

log = logging.getLogger("qlora_kit")

FORMATS = ("hf", "gguf")
EXPORT_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}
DEFAULT_GGUF_QUANT = "q8_0"


def resolve_devices(device: str | None, run: finished.RunInfo) -> tuple[torch.device, torch.device]:
    """(compute device, quantisation device); quantise on the training device type when possible.

    Raises:
        ModelError: ``--device cuda`` without a GPU, or an unknown device.
    """
    check_device(device)
    if device == "cuda" and not torch.cuda.is_available():
        raise ModelError("--device cuda requested but no CUDA GPU is available", "drop --device or use --device cpu")
    compute = torch.device("cuda", 0) if (device or ("cuda" if torch.cuda.is_available() else "cpu")) == "cuda" \
        else torch.device("cpu")
    trained = run.manifest.get("device", {}).get("type", "cpu")
    if trained == "cuda" and torch.cuda.is_available():
        return compute, torch.device("cuda", 0)
    if trained == "cuda":
        log.warning("training quantised the base on CUDA; reproducing it on CPU (bitsandbytes' CPU and CUDA kernels "
                    "may round a few weights differently; verification measures the effect)")
    return compute, torch.device("cpu")


def check_device(device: str | None) -> None:
    """Refuse a ``--device`` other than cpu or cuda (before anything is read).

    Raises:
        QloraKitError: naming the values that work.
    """
    if device not in (None, "cpu", "cuda"):
        raise QloraKitError(f"--device {short_repr(device, 40)} is not cpu or cuda",
                            "use --device cpu or --device cuda, or leave it out (cuda when a GPU is available)")


def check_args(fmt: str, dtype: str | None, quant: str | None, merge_base: str) -> tuple[str, str | None]:
    """Validate the option combination; return (dtype or None, quant or None) with defaults filled in.

    Raises:
        QloraKitError: an unknown value, or an option that belongs to the other format.
    """
    if fmt not in FORMATS:
        raise QloraKitError(f"--format {fmt!r} is not supported", f"use one of {', '.join(FORMATS)}")
    if merge_base not in MERGE_BASES:
        raise QloraKitError(f"--merge-base {merge_base!r} is not supported", f"use one of {', '.join(MERGE_BASES)}")
    if fmt == "hf":
        if quant is not None:
            raise QloraKitError("--quant applies to --format gguf", "drop --quant, or add --format gguf")
        dtype = dtype or "float16"
        if dtype not in EXPORT_DTYPES:
            raise QloraKitError(f"--dtype {dtype!r} is not supported", f"use one of {', '.join(EXPORT_DTYPES)}")
        return dtype, None
    if dtype is not None:
        raise QloraKitError("--dtype applies to --format hf; a GGUF's number format is its --quant",
                            f"use --quant ({', '.join(gguf_file.QUANTS)})")
    quant = quant or DEFAULT_GGUF_QUANT
    gguf_file.check_quant(quant)
    if quant in gguf_file.LLAMACPP_QUANTS:
        llamacpp.require(f"--quant {quant} (a K-quant, made by llama.cpp's own quantiser)")
    return None, quant


def export_run(run_dir: str | Path, out: str | Path, dtype: str | None = None, merge_base: str = "dequantized",
               overwrite: bool = False, verify: bool = True, device: str | None = None, *, fmt: str = "hf",
               quant: str | None = None, max_shard_bytes: int = hf.DEFAULT_SHARD_BYTES, verify_prompts: int = 8,
               show_progress: bool = True, push_to_hub: str | None = None, private: bool = False) -> int:
    """``qlora-kit export``: :func:`export_model`, then the exit code.

    Returns 0, or ``EXIT_VERIFY_FAILED`` when verification is outside tolerance (the export is
    kept, with the failure in its report and README, and not pushed).
    """
    report = export_model(run_dir, out, dtype, merge_base, overwrite, verify, device, fmt=fmt, quant=quant,
                          max_shard_bytes=max_shard_bytes, verify_prompts=verify_prompts, show_progress=show_progress,
                          push_to_hub=push_to_hub, private=private)
    failure = verification_failure(report)
    if failure is not None:
        log.error("%s", failure)
        return EXIT_VERIFY_FAILED
    return 0


def export_model(run_dir: str | Path, out: str | Path, dtype: str | None = None, merge_base: str = "dequantized",
                 overwrite: bool = False, verify: bool = True, device: str | None = None, *, fmt: str = "hf",
                 quant: str | None = None, max_shard_bytes: int = hf.DEFAULT_SHARD_BYTES, verify_prompts: int = 8,
                 show_progress: bool = True, push_to_hub: str | None = None, private: bool = False
                 ) -> dict[str, Any]:
    """Merge a run's adapter into an HF model directory or a GGUF file at ``out``; return the export report.

    A failed verification is in the report (see :func:`verification_failure`), not raised: the
    export is kept, with the failure in its report and README, and not pushed.  ``push_to_hub``
    (``org/name``): upload the finished export there (``private`` when the repository is new).
    An ``out`` that already holds this very export is left as it is (its report is returned).

    Raises:
        QloraKitError: bad arguments; ModelError: unusable run/base/adapter; OutputError: bad ``out``;
        RunInUseError: the run is being written (or ``out`` exported to) by another process;
        DiskFullError: not enough space for the export; Preempted: SIGTERM or a first Ctrl-C before the
            final rename (nothing left at ``out``; after it, the complete export stays and 0 is returned);
        ConfigError: ``push_to_hub`` is not ORG/NAME, offline mode, or no token (before exporting);
        PushError: no network or a refusal from the Hub (after exporting: the export is complete).
    """
    dtype, quant = check_args(fmt, dtype, quant, merge_base)
    check_device(device)
    token = hub.check_can_push(push_to_hub) if push_to_hub else None  # before the long part
    with StopRequest(immediate=True) as stop:  # SIGTERM or a first Ctrl-C: unwind, the staging directory goes
        options = {"verify": verify, "prompts": verify_prompts, "progress": show_progress, "stop": stop,
                   "repo_id": push_to_hub}
        try:
            with runlock.shared(Path(run_dir), "export"):  # nobody writes the run meanwhile
                run = finished.read_run(run_dir)
                wanted = {"format": fmt, "merge_base": merge_base, "dtype": dtype, "quant": quant}
                done = None if overwrite else _already_exported(Path(out), run, wanted, verify)
                if done is not None:
                    target, report = done
                    if push_to_hub and token:  # the export is there: publish it
                        card.record_export(run, target, report, _push(run, target, push_to_hub, token, private))
                    return report
                target = check_target(Path(out), run, overwrite)
                with runlock.exclusive(target, "export", option="--out"):
                    compute, quant_device = resolve_devices(device, run)
                    ctx = merge_context(run, merge_base, compute, quant_device)
                    if fmt == "hf":
                        report = _export_hf(run, target, ctx, dtype, max_shard_bytes, options)
                    else:
                        report = _export_gguf(run, target, ctx, quant, options)
        except StopNow as exc:
            raise Preempted(f"export stopped by {exc.signal_name}; nothing was written to {out}",
                            "run the same export command again") from None
        card.print_summary(report, target)
        for warning in (report.get("modelfile") or {}).get("warnings", []):
            log.warning("%s", warning)
        if stop.requested:  # deferred by _publish: the export was complete when it came
            log.warning("%s arrived after the export was complete: %s is complete; nothing to run again",
                        stop.signal_name, target)
    if verification_failure(report) is not None:
        card.record_export(run, target, report)
        if push_to_hub:
            log.error("not pushed to %s: a model that failed verification is not published", push_to_hub)
        return report
    url = None
    if push_to_hub and report["verification"].get("status") == "skipped":
        log.warning("pushing an export that was not verified (--no-verify); its model card says so")
    try:
        if push_to_hub and token:
            url = _push(run, target, push_to_hub, token, private)
    finally:
        card.record_export(run, target, report, url)
    return report


def verification_failure(report: dict[str, Any]) -> str | None:
    """The line saying why the export does not match the trained model, or None when it does (or was not checked)."""
    if report["verification"].get("status") != "failed":
        return None
    return f"verification failed: {'; '.join(report['verification']['failures'])}"


def _push(run: finished.RunInfo, target: Path, repo_id: str, token: str, private: bool) -> str:
    """Upload the finished export; a failure leaves it complete and names the command that retries."""
    again = f"qlora-kit push {target} {repo_id}" + (" --private" if private else "")
    url = hub.push_folder(target, repo_id, token, private, local_paths(run.run_dir, run.manifest, run.config, target),
                          f"qlora-kit export {target.name}", again, exported=True)
    log.info("pushed to the Hub: %s", url)
    return url


def _already_exported(out: Path, run: finished.RunInfo, wanted: dict[str, Any], verify: bool
                      ) -> tuple[Path, dict[str, Any]] | None:
    """``--out`` and its report when it already holds this very export (a rerun after a stop that came once it
    was complete), else None."""
    target = out.expanduser().resolve()
    restore_moved_aside(target)
    report = card.same_export(target, run, wanted, verify)
    if report is None:
        return None
    status = report["verification"].get("status")
    log.warning("%s already holds this export of %s (made %s, verification %s): nothing to do; --overwrite makes it "
                "again", out, run.run_dir, report.get("created", "earlier"), status)
    return target, report


def _publish(staging: Path, target: Path, options: dict[str, Any]) -> None:
    """Rename the finished export into place; a stop signal from now on only records (the export is complete)."""
    options["stop"].defer(note=None)  # export_run says it once the export is in place
    publish_dir(staging, target)


def merge_context(run: finished.RunInfo, merge_base: str, compute: torch.device, quant_device: torch.device
                  ) -> MergeContext:
    """How every tensor is made: merge base, quantisation spec, devices, and a base-changing init's residual base.

    Raises:
        ModelError: ``--merge-base original`` for an init fitted to the NF4 weights, or a missing/changed
            residual base file.
    """

    lora = run.manifest.get("lora") or {}
    check_merge_base(lora, merge_base)
    residual = check_residual(run.run_dir, lora.get("residual_base")) if merge_base == "dequantized" else None
    modules = frozenset(residual_modules(residual)) if residual else frozenset()
    return MergeContext(merge_base, run.quant, DTYPES[run.quant["load_dtype"]], compute, quant_device, residual,
                        modules)


_NO_SPACE_FIX = "free space on that disk, or choose --out on another one"


# bytes per parameter of a GGUF file, by --quant
_GGUF_BYTES_PER_PARAM = {"f16": 2.0, "bf16": 2.0, "q8_0": 1.07, "q4_0": 0.57}
_K_QUANT_BYTES_PER_PARAM = 6.6 / 8 + 2.0  # at most q6_k's 6.6 bits, plus the f16 file llama.cpp quantises from


def _require_space(run: finished.RunInfo, target: Path, weight_bytes: int) -> None:
    """Fail before writing when ``target``'s disk lacks room for the weights and the tokenizer.

    Raises:
        DiskFullError: with the numbers.
    """
    needed = weight_bytes + diskspace.tree_bytes(run.run_dir / rundir.TOKENIZER)
    diskspace.require_free(target.parent, needed, "the export", _NO_SPACE_FIX)


def _gguf_bytes(plan: Plan, quant: str) -> int:
    params = plan.total_bytes // 4  # planned in float32
    per_param = _GGUF_BYTES_PER_PARAM.get(quant, _K_QUANT_BYTES_PER_PARAM)
    return int(params * per_param)


def _export_hf(run: finished.RunInfo, target: Path, ctx: MergeContext, dtype: str, max_shard_bytes: int,
               options: dict[str, Any]) -> dict[str, Any]:
    plan = plan_export(run, EXPORT_DTYPES[dtype])
    _require_space(run, target, plan.total_bytes)
    with staging_dir(target) as staging, diskspace.no_space_as_error(target.parent, "the export", _NO_SPACE_FIX):
        stats, shards = hf.write_weights(plan, staging, ctx, options["progress"], max_shard_bytes)
        eos = hf.write_model_files(run, staging, dtype)
        report = card.base_report(run, target, "hf", ctx, plan, stats, eos)
        report.update(dtype=dtype, shards=shards, largest_shard_bytes=stats.largest_shard_bytes)
        report["verification"] = _verify_hf(run, staging, report, ctx.compute_device, options)
        card.write_readme(run, staging, report, options["repo_id"])
        card.write_report(staging, report)
        _publish(staging, target, options)
    return report


def _verify_hf(run: finished.RunInfo, staging: Path, report: dict[str, Any], device: torch.device,
               options: dict[str, Any]) -> dict[str, Any]:
    if not options["verify"]:
        return {"status": "skipped"}

    return verify_export(run.run_dir, staging, merge_base=report["merge_base"], dtype=report["dtype"],
                         device=device, max_prompts=options["prompts"], show_progress=options["progress"])


def _export_gguf(run: finished.RunInfo, target: Path, ctx: MergeContext, quant: str,
                 options: dict[str, Any]) -> dict[str, Any]:
    from transformers import AutoConfig

    trust = run.config.model.trust_remote_code
    model = gguf_file.describe_model(AutoConfig.from_pretrained(run.source_dir, trust_remote_code=trust))
    tokenizer = load_saved_tokenizer(run.run_dir / rundir.TOKENIZER, trust)
    _, eos = hf.export_generation_config(run, tokenizer)
    vocab = read_vocab(run.run_dir / rundir.TOKENIZER, tokenizer, model.n_vocab, eos)
    chat = use_run_system(chat_format(tokenizer, eos, bos_added_by_runtime=vocab.add_bos),
                          run.config.data.default_system_prompt)
    chat = note_tools(chat, _trained_tools(run))
    plan = plan_export(run, torch.float32)
    _require_space(run, target, _gguf_bytes(plan, quant))
    name = gguf_file.gguf_file_name(target, quant)
    base_name = base_model_id(str(run.manifest.get("base", {}).get("name_or_path") or run.config.model.name_or_path))
    with staging_dir(target) as staging, diskspace.no_space_as_error(target.parent, "the export", _NO_SPACE_FIX):
        path = staging / name
        if quant in gguf_file.NUMPY_QUANTS:
            stats, info = gguf_file.write_gguf(path, plan, ctx, model, vocab, quant, target.name, base_name,
                                               options["progress"])
            quantizer = "gguf-py numpy quantisers" if quant in ("q8_0", "q4_0") else "none (16-bit floats)"
        else:
            f16 = staging / f".{name}.f16.gguf"
            stats, info = gguf_file.write_gguf(f16, plan, ctx, model, vocab, quant, target.name, base_name,
                                               options["progress"])
            if options["progress"]:  # llama.cpp's quantiser reports nothing until it is done
                log.info("quantising to %s with llama.cpp (no progress until it finishes)", quant)
            llamacpp.quantize(f16, path, gguf_file.file_type(quant), max(1, torch.get_num_threads()))
            f16.unlink()
            info.tensor_types = gguf_file.tensor_type_counts(path)
            quantizer = f"llama.cpp llama_model_quantize (llama-cpp-python {llamacpp.version()}) from F16"
        (staging / "Modelfile").write_text(write_modelfile(chat, name, target.name))
        report = card.base_report(run, target, "gguf", ctx, plan, stats, eos)
        report["bytes_written"] = path.stat().st_size
        report["gguf"] = {"file": name, "quant": quant, "quantizer": quantizer, "arch": info.arch,
                          "permuted_qk": info.permuted_qk, "tensor_types": info.tensor_types,
                          "tokenizer_model": info.tokenizer_model, "tokenizer_pre": info.tokenizer_pre,
                          "notes": info.notes}
        report["modelfile"] = {"family": chat.family, "stops": chat.stops, "system": chat.system,
                               "warnings": [chat.warning] if chat.warning else []}
        report["verification"] = _verify_gguf(run, path, quant, vocab, eos, ctx, options)
        card.write_readme(run, staging, report, options["repo_id"])
        card.write_report(staging, report)
        _publish(staging, target, options)
    return report


def _trained_tools(run: finished.RunInfo) -> bool:
    """Whether the run's data held tool calls or results (its data_summary.json says so)."""
    try:
        summary = json.loads((run.run_dir / rundir.DATA_SUMMARY).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(summary, dict) and bool(summary.get("tool_rows"))


def _verify_gguf(run: finished.RunInfo, path: Path, quant: str, vocab: Any, eos: list[int], ctx: MergeContext,
                 options: dict[str, Any]) -> dict[str, Any]:
    if not options["verify"]:
        return {"status": "skipped"}

    return verify_gguf(run.run_dir, path, quant, vocab, eos, merge_base=ctx.merge_base, device=ctx.compute_device,
                       max_prompts=options["prompts"], show_progress=options["progress"])
