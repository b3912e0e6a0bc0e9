"""``qlora-kit`` command line: train, export, generate, chat, plan, doctor.

Each command is a thin shell over one module.  Errors the user can fix are printed as
one line (``error: ...`` / ``fix: ...``) with a documented exit status; ``--debug``
shows the traceback instead.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Callable, Optional

import typer

from qlora_kit.errors import EXIT_OOM, QloraKitError

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


def _setup_logging(debug: bool) -> None:
    from rich.console import Console
    from rich.logging import RichHandler

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    level = logging.DEBUG if debug else logging.INFO
    handler = RichHandler(console=Console(stderr=True), show_path=False, show_time=False, markup=False,
                          rich_tracebacks=False)
    logging.basicConfig(level=logging.WARNING, format="%(message)s", handlers=[handler], force=True)
    logging.getLogger("qlora_kit").setLevel(level)
    if not debug:
        for noisy in ("transformers", "bitsandbytes", "peft", "accelerate", "datasets", "httpx", "huggingface_hub"):
            logging.getLogger(noisy).setLevel(logging.ERROR)
        try:
            from transformers.utils import logging as hf_logging

            hf_logging.set_verbosity_error()
            hf_logging.disable_progress_bar()
        except ImportError:
            pass
        import warnings

        warnings.filterwarnings("ignore", category=UserWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)


def _run(fn: Callable[[], int | None]) -> None:
    """Run a command body, turning known failures into one-line messages and exit codes."""
    try:
        code = fn()
    except QloraKitError as exc:
        if _DEBUG["on"]:
            raise
        typer.echo(f"error: {exc.message}", err=True)
        if exc.hint:
            typer.echo(f"fix: {exc.hint}", err=True)
        raise typer.Exit(exc.exit_code) from None
    except KeyboardInterrupt:
        typer.echo("aborted.", err=True)
        raise typer.Exit(130) from None
    except Exception as exc:
        if _is_cuda_oom(exc) and not _DEBUG["on"]:
            typer.echo(f"error: CUDA out of memory: {str(exc).splitlines()[0]}", err=True)
            typer.echo(f"fix: {OOM_HINT}", err=True)
            raise typer.Exit(EXIT_OOM) from None
        raise
    raise typer.Exit(code or 0)


def _is_cuda_oom(exc: BaseException) -> bool:
    import torch

    return isinstance(exc, torch.cuda.OutOfMemoryError) or "CUDA out of memory" in str(exc)


@app.callback()
def _main(debug: bool = typer.Option(False, "--debug", help="Show full tracebacks and library logs.")) -> None:
    _DEBUG["on"] = debug
    _setup_logging(debug)


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
        from qlora_kit.train import run_training

        return run_training(config, set_ or [], resume=resume, overwrite=overwrite, skip_memory_check=skip_memory_check)

    _run(body)


@app.command()
def export(
    run_dir: Path = typer.Argument(..., help="output_dir of a finished `qlora-kit train`."),
    out: Path = typer.Option(..., "--out", help="Directory for the merged model (HF) or the .gguf + Modelfile."),
    fmt: str = typer.Option("hf", "--format", help="hf (safetensors for transformers/vLLM; default) or gguf "
                                                   "(one .gguf file + Ollama Modelfile for llama.cpp/Ollama)."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="--format hf: float16 (default) or bfloat16."),
    quant: Optional[str] = typer.Option(
        None, "--quant", help="--format gguf: f16, bf16, q8_0 (default), q4_0; q4_k_m, q5_k_m, q6_k need "
                              "llama-cpp-python (pip install 'qlora-kit[llamacpp]')."),
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
        from qlora_kit.export import export_run

        return export_run(run_dir, out, dtype=dtype, merge_base=merge_base, overwrite=overwrite, verify=verify,
                          device=device, fmt=fmt, quant=quant)

    _run(body)


@app.command()
def generate(
    path: Path = typer.Argument(..., help="A run directory (NF4 + adapter) or an exported model directory."),
    prompt: str = typer.Argument(..., help="User message."),
    system: Optional[str] = typer.Option(None, "--system", help="System message."),
    max_new_tokens: int = typer.Option(256, "--max-new-tokens", min=1),
    temperature: float = typer.Option(0.0, "--temperature", min=0.0, help="0 = greedy."),
) -> None:
    """Answer one prompt through the chat template, streaming tokens."""

    def body() -> int:
        from qlora_kit.generate import generate_once

        return generate_once(path, prompt, system=system, max_new_tokens=max_new_tokens, temperature=temperature)

    _run(body)


@app.command()
def chat(
    path: Path = typer.Argument(..., help="A run directory (NF4 + adapter) or an exported model directory."),
    system: Optional[str] = typer.Option(None, "--system", help="System message."),
    max_new_tokens: int = typer.Option(512, "--max-new-tokens", min=1),
    temperature: float = typer.Option(0.0, "--temperature", min=0.0, help="0 = greedy."),
) -> None:
    """Interactive chat (type /exit to quit, /reset to clear history)."""

    def body() -> int:
        from qlora_kit.generate import chat_loop

        return chat_loop(path, system=system, max_new_tokens=max_new_tokens, temperature=temperature)

    _run(body)


@app.command()
def plan(
    config: Path = typer.Argument(..., help="YAML config."),
    set_: Optional[list[str]] = typer.Option(None, "--set", help="Override: section.key=value."),
    gpu_memory: Optional[float] = typer.Option(None, "--gpu-memory", help="Card memory in GiB (default: this GPU)."),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON object instead of a table."),
) -> None:
    """Predict peak GPU memory from the model's config.json alone (no weights loaded)."""

    def body() -> int:
        from qlora_kit.plan import run_plan

        return run_plan(config, set_ or [], gpu_memory=gpu_memory, as_json=as_json)

    _run(body)


@app.command()
def doctor() -> None:
    """Check the stack (versions, CUDA, bf16, bitsandbytes, memory, disk) and say how to fix problems."""

    def body() -> int:
        from qlora_kit.doctor import run_doctor

        return run_doctor()

    _run(body)


@app.command()
def demo(
    workdir: Path = typer.Option(Path("demo-run"), "--workdir", help="Where the demo writes data and its run."),
    steps: Optional[int] = typer.Option(None, "--steps", min=1, help="Override the number of training steps."),
) -> None:
    """CPU demo: fine-tune SmolLM2-135M-Instruct (GGUF, from PyPI) on a generated task; exact match before/after."""

    def body() -> int:
        from qlora_kit.demo import run_demo

        return run_demo(workdir, steps=steps)

    _run(body)


def main() -> None:
    """Console-script entry point."""
    app(prog_name="qlora-kit")


if __name__ == "__main__":
    sys.exit(main())
