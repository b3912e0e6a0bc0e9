"""``qlora-kit export``: read the run, merge, write HF or GGUF into a staging directory, verify, publish.

    run dir ──► rundir.read_run ──► merge.plan_export ──► hf.write_weights        (--format hf)
                                                      └─► gguf_file.write_gguf   (--format gguf)
            ──► verify / verify_gguf ──► card (README, export_report.json) ──► publish.commit
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from qlora_kit.core import diskspace
from qlora_kit.core.errors import EXIT_VERIFY_FAILED, ModelError, Preempted, QloraKitError, short_repr
from qlora_kit.core.files import publish_dir
from qlora_kit.export import card, gguf_file, hf, llamacpp
from qlora_kit.export.gguf_vocab import read_vocab
from qlora_kit.export.merge import MERGE_BASES, MergeContext, Plan, plan_export
from qlora_kit.export.modelfile import chat_format, write_modelfile
from qlora_kit.export.publish import Terminated, check_target, sigterm_unwinds, staging_dir
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
               show_progress: bool = True) -> int:
    """Merge a run's adapter into an HF model directory or a GGUF file at ``out``; return the exit code.

    Returns 0, or ``EXIT_VERIFY_FAILED`` when verification is outside tolerance (the export is
    kept, with the failure in its report and README).

    Raises:
        QloraKitError: bad arguments; ModelError: unusable run/base/adapter; OutputError: bad ``out``;
        RunInUseError: the run is being written (or ``out`` exported to) by another process;
        DiskFullError: not enough space for the export; Preempted: SIGTERM (nothing left at ``out``).
    """
    dtype, quant = check_args(fmt, dtype, quant, merge_base)
    check_device(device)
    options = {"verify": verify, "prompts": verify_prompts, "progress": show_progress}
    try:
        with sigterm_unwinds(), runlock.shared(Path(run_dir), "export"):  # nobody writes the run meanwhile
            run = finished.read_run(run_dir)
            target = check_target(Path(out), run, overwrite)
            with runlock.exclusive(target, "export", option="--out"):
                compute, quant_device = resolve_devices(device, run)
                ctx = merge_context(run, merge_base, compute, quant_device)
                if fmt == "hf":
                    report = _export_hf(run, target, ctx, dtype, max_shard_bytes, options)
                else:
                    report = _export_gguf(run, target, ctx, quant, options)
    except Terminated:
        raise Preempted(f"export stopped by SIGTERM; nothing was written to {out}",
                        "run the same export command again") from None
    card.print_summary(report)
    for warning in (report.get("modelfile") or {}).get("warnings", []):
        log.warning("%s", warning)
    if report["verification"].get("status") == "failed":
        log.error("verification failed: %s", "; ".join(report["verification"]["failures"]))
        return EXIT_VERIFY_FAILED
    return 0


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
        card.write_readme(run, staging, report)
        card.write_report(staging, report)
        publish_dir(staging, target)
    return report


def _verify_hf(run: finished.RunInfo, staging: Path, report: dict[str, Any], device: torch.device,
               options: dict[str, Any]) -> dict[str, Any]:
    if not options["verify"]:
        return {"status": "skipped"}

    return verify_export(run.run_dir, staging, merge_base=report["merge_base"], dtype=report["dtype"],
                         device=device, max_prompts=options["prompts"])


def _export_gguf(run: finished.RunInfo, target: Path, ctx: MergeContext, quant: str,
                 options: dict[str, Any]) -> dict[str, Any]:
    from transformers import AutoConfig

    trust = run.config.model.trust_remote_code
    model = gguf_file.describe_model(AutoConfig.from_pretrained(run.source_dir, trust_remote_code=trust))
    tokenizer = load_saved_tokenizer(run.run_dir / rundir.TOKENIZER, trust)
    _, eos = hf.export_generation_config(run, tokenizer)
    vocab = read_vocab(run.run_dir / rundir.TOKENIZER, tokenizer, model.n_vocab, eos)
    chat = chat_format(tokenizer, eos, bos_added_by_runtime=vocab.add_bos)
    plan = plan_export(run, torch.float32)
    _require_space(run, target, _gguf_bytes(plan, quant))
    name = gguf_file.gguf_file_name(target, quant)
    base_name = run.manifest.get("base", {}).get("name_or_path")
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
        card.write_readme(run, staging, report)
        card.write_report(staging, report)
        publish_dir(staging, target)
    return report


def _verify_gguf(run: finished.RunInfo, path: Path, quant: str, vocab: Any, eos: list[int], ctx: MergeContext,
                 options: dict[str, Any]) -> dict[str, Any]:
    if not options["verify"]:
        return {"status": "skipped"}

    return verify_gguf(run.run_dir, path, quant, vocab, eos, merge_base=ctx.merge_base, device=ctx.compute_device,
                       max_prompts=options["prompts"])
