"""``qlora-kit`` command line: train, export, generate, chat, plan, doctor.

Each command is a thin shell over one module.  Errors the user can fix are printed as
one line (``error: ...`` / ``fix: ...``) with a documented exit status; ``--debug``
shows the traceback instead.
"""

from __future__ import annotations

import errno
import os
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import typer

from qlora_kit.core.errors import (
    EXIT_INTERNAL,
    EXIT_NO_SPACE,
    EXIT_OOM,
    EXIT_USER_ERROR,
    QloraKitError,
    notes,
    phase,
    shorten,
)
from qlora_kit.core.logs import echo, flush_streams, setup_logging

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="QLoRA fine-tuning of chat models on one 24 GB GPU, and a verified fp16 export.",
)

_DEBUG = {"on": False}
OOM_HINT = (
    "lower train.micro_batch_size or train.max_length (raise gradient_accumulation_steps to keep the batch), "
    "keep train.gradient_checkpointing on, or lower lora.r; `qlora-kit plan CONFIG` shows what fits"
)


def _run(fn: Callable[[], int | None], command: str) -> None:
    """Run a command body, turning known failures into one-line messages and exit codes.

    An exception nobody foresaw is an internal error (exit 70): see :func:`_report_internal_error`.
    """
    try:
        with phase(command):
            code = fn()
    except QloraKitError as exc:
        if _DEBUG["on"]:
            raise
        if not getattr(exc, "silent", False):  # multi-process runs: another rank prints it (train/distributed.py)
            label = getattr(exc, "rank_label", None)
            echo(f"error: {f'[{label}] ' if label else ''}{exc.message}")
            if exc.hint:
                echo(f"fix: {exc.hint}")
        raise typer.Exit(exc.exit_code) from None
    except KeyboardInterrupt:
        echo("aborted.")
        raise typer.Exit(130) from None
    except (typer.Exit, typer.Abort):
        raise
    except Exception as exc:
        if _DEBUG["on"]:
            raise
        if isinstance(exc, OSError) and exc.errno in _ENVIRONMENT_ERRNOS:
            _report_os_error(exc)
        if _is_cuda_oom(exc):
            echo(f"error: CUDA out of memory: {str(exc).splitlines()[0]}")
            echo(f"fix: {OOM_HINT}")
            raise typer.Exit(EXIT_OOM) from None
        _report_internal_error(exc, command)
    raise typer.Exit(code or 0)


def _report_internal_error(exc: Exception, command: str) -> None:
    """A bug: one ``error:`` line (phase, exception, its first line), a ``fix:`` line, exit 70.

    The traceback is in the run's ``train.log`` when the run wrote one (``note(exc, "log", ...)``),
    else in a file of its own in the temporary directory; ``--debug`` shows it on the terminal.
    """
    facts = notes(exc)
    where = facts.get("phase") or command
    rank = os.environ.get("RANK", "0") if os.environ.get("WORLD_SIZE", "1") not in ("", "1") else "0"
    label = f"[rank {rank}] " if rank not in ("", "0") else ""
    echo(f"error: {label}internal error in {where}: {type(exc).__name__}: {shorten(str(exc), 300)}".rstrip())
    log_file = facts.get("log") or _save_traceback(exc, command)
    told = f"the traceback is in {log_file}; " if log_file else ""
    after = f"; {facts['after']}" if facts.get("after") else ""
    echo(f"fix: this is a bug in qlora-kit or a library it uses, please report it: {told}"
         f"`qlora-kit --debug {command} ...` shows it on the terminal{after}")
    raise typer.Exit(EXIT_INTERNAL) from None


def _save_traceback(exc: BaseException, command: str) -> Path | None:
    """Write ``exc``'s traceback to a new file in the temporary directory; None when that fails."""
    import tempfile
    import traceback

    try:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        fd, name = tempfile.mkstemp(prefix=f"qlora-kit-{command}-{stamp}-", suffix=".traceback.txt")
        with os.fdopen(fd, "w", encoding="utf-8", errors="replace") as f:
            f.write("".join(traceback.format_exception(type(exc), exc, exc.__traceback__)))
        return Path(name)
    except OSError:
        return None


_ENVIRONMENT_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS)


def _report_os_error(exc: OSError) -> None:
    """A full disk or a permission problem the modules did not foresee: one line, not a traceback."""
    where = f": {exc.filename}" if exc.filename else ""
    echo(f"error: {exc.strerror or exc}{where}")
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        after = notes(exc).get("after")  # train: whether --resume can continue (nothing to resume from a removed run)
        echo("fix: free space on that disk, then run the same command again" + (f" ({after})" if after else ""))
        raise typer.Exit(EXIT_NO_SPACE) from None
    echo("fix: check that you may write there, or choose another path")
    raise typer.Exit(EXIT_USER_ERROR) from None


def _one_process_only(command: str) -> None:
    """export, generate and chat run in one process: two ranks would write or print the same thing twice.

    Raises:
        ConfigError: started by a launcher with several processes.
    """
    if os.environ.get("WORLD_SIZE", "1") not in ("", "1"):
        from qlora_kit.core.errors import ConfigError

        if os.environ.get("RANK", "0") != "0":
            time.sleep(1)  # rank 0 says why; the launcher stops the others as soon as one exits
            raise typer.Exit(2)
        raise ConfigError(f"`qlora-kit {command}` runs in one process, not under accelerate launch / torchrun",
                          f"run `qlora-kit {command} ...` directly (it works on runs trained with any number "
                          "of processes)")


def _is_cuda_oom(exc: BaseException) -> bool:
    import torch

    return isinstance(exc, torch.cuda.OutOfMemoryError) or "CUDA out of memory" in str(exc)


def version() -> str:
    """The installed qlora-kit version ("unknown" when running from a source tree that is not installed)."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as package_version

    try:
        return package_version("qlora-kit")
    except PackageNotFoundError:
        return "unknown"


def _print_version(value: bool) -> None:
    if value:
        echo(f"qlora-kit {version()}", err=False)
        raise typer.Exit(0)


@app.callback()
def _main(
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks and library logs."),
    _version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                  help="Print the version and exit."),
) -> None:
    _DEBUG["on"] = debug
    setup_logging(debug)


@app.command()
def train(
    config: Path = typer.Argument(..., help="YAML config (see configs/)."),
    set_: Optional[list[str]] = typer.Option(None, "--set", help="Override: section.key=value (YAML value)."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the newest complete checkpoint."),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Start afresh in an existing output_dir (the old one is moved aside, not deleted)."
    ),
    skip_memory_check: bool = typer.Option(
        False, "--skip-memory-check", help="Train even when the memory plan predicts it will not fit."
    ),
) -> None:
    """Fine-tune: NF4 base + LoRA adapters, SFT on your data; writes OUTPUT_DIR/adapter."""

    def body() -> int:
        from qlora_kit.train import distributed
        from qlora_kit.train.recipe import run_training

        with distributed.session():  # one process, or one rank of `accelerate launch` / `torchrun`
            return run_training(config, set_ or [], resume=resume, overwrite=overwrite,
                                skip_memory_check=skip_memory_check)

    _run(body, "train")


@app.command()
def export(
    run_dir: Path = typer.Argument(..., help="output_dir of a finished `qlora-kit train`."),
    out: Path = typer.Option(..., "--out", help="Directory for the merged model (HF) or the .gguf + Modelfile."),
    fmt: str = typer.Option("hf", "--format", help="hf (safetensors for transformers/vLLM; default) or gguf "
                                                   "(one .gguf file + Ollama Modelfile for llama.cpp/Ollama)."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="--format hf: float16 (default) or bfloat16."),
    quant: Optional[str] = typer.Option(
        None, "--quant", help="--format gguf: f16, bf16, q8_0 (default), q4_0; q4_k_m, q5_k_m, q6_k need "
                              "llama-cpp-python (the extra qlora-kit\\[llamacpp]).",  # \\[: not rich markup
    ),
    merge_base: str = typer.Option(
        "dequantized", "--merge-base", help="dequantized (what was trained; default) or original (16-bit source)."
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a non-empty --out."),
    verify: bool = typer.Option(True, "--verify/--no-verify", help="Compare the export with NF4+adapter "
                                                                   "(GGUF: in llama.cpp when installed)."),
    device: Optional[str] = typer.Option(None, "--device", help="cpu or cuda (default: cuda when available)."),
) -> None:
    """Merge the adapter into a plain fp16 HF checkpoint or a GGUF, and prove it matches the trained model."""

    def body() -> int:
        _one_process_only("export")
        from qlora_kit.export.command import export_run

        return export_run(run_dir, out, dtype=dtype, merge_base=merge_base, overwrite=overwrite, verify=verify,
                          device=device, fmt=fmt, quant=quant)

    _run(body, "export")


@app.command()
def generate(
    path: Path = typer.Argument(..., help="A run directory (NF4 + adapter), an exported model directory, or a .gguf file."),
    prompt: str = typer.Argument(..., help="User message."),
    system: Optional[str] = typer.Option(None, "--system", help="System message."),
    max_new_tokens: int = typer.Option(256, "--max-new-tokens", min=1),
    temperature: float = typer.Option(0.0, "--temperature", min=0.0, help="0 = greedy."),
) -> None:
    """Answer one prompt through the chat template, streaming tokens."""

    def body() -> int:
        _one_process_only("generate")
        from qlora_kit.commands.generate import generate_once

        return generate_once(path, prompt, system=system, max_new_tokens=max_new_tokens, temperature=temperature)

    _run(body, "generate")


@app.command()
def chat(
    path: Path = typer.Argument(..., help="A run directory (NF4 + adapter), an exported model directory, or a .gguf file."),
    system: Optional[str] = typer.Option(None, "--system", help="System message."),
    max_new_tokens: int = typer.Option(512, "--max-new-tokens", min=1),
    temperature: float = typer.Option(0.0, "--temperature", min=0.0, help="0 = greedy."),
) -> None:
    """Interactive chat (type /exit to quit, /reset to clear history)."""

    def body() -> int:
        _one_process_only("chat")
        from qlora_kit.commands.generate import chat_loop

        return chat_loop(path, system=system, max_new_tokens=max_new_tokens, temperature=temperature)

    _run(body, "chat")


@app.command()
def plan(
    config: Path = typer.Argument(..., help="YAML config."),
    set_: Optional[list[str]] = typer.Option(None, "--set", help="Override: section.key=value."),
    gpu_memory: Optional[float] = typer.Option(
        None, "--gpu-memory", help="Card memory in GiB, 1 GiB of it taken as held by a desktop and other processes "
                                   "(default: what this GPU has free)."),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON object instead of a table."),
    num_gpus: int = typer.Option(1, "--num-gpus", help="GPUs training together: the plan is per GPU."),
    strategy: str = typer.Option(
        "ddp", "--strategy", help="With --num-gpus: ddp (whole model per GPU), fsdp (sharded), fsdp-offload."
    ),
) -> None:
    """Predict peak GPU memory from the model's config.json alone (no weights loaded)."""

    def body() -> int:
        from qlora_kit.plan.report import run_plan

        return run_plan(config, set_ or [], gpu_memory=gpu_memory, as_json=as_json, num_gpus=num_gpus,
                        strategy=strategy)

    _run(body, "plan")


@app.command()
def doctor() -> None:
    """Check the stack (versions, CUDA, bf16, bitsandbytes, memory, disk) and say how to fix problems."""

    def body() -> int:
        from qlora_kit.commands.doctor import run_doctor

        return run_doctor()

    _run(body, "doctor")


@app.command()
def demo(
    workdir: Path = typer.Option(Path("demo-run"), "--workdir", help="Where the demo writes data and its run."),
    steps: Optional[int] = typer.Option(None, "--steps", min=1, help="Override the number of training steps."),
) -> None:
    """CPU demo: fine-tune SmolLM2-135M-Instruct (GGUF, from PyPI) on a generated task; exact match before/after."""

    def body() -> int:
        from qlora_kit.commands.demo import run_demo

        return run_demo(workdir, steps=steps)

    _run(body, "demo")


def main() -> None:
    """Console-script entry point; a closed stdout/stderr never changes the exit status."""
    try:
        app(prog_name="qlora-kit")
    finally:
        flush_streams()


if __name__ == "__main__":
    sys.exit(main())
