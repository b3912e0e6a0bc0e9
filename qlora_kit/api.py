"""The Python API for scripts and notebooks: ``train``, ``export``, ``load`` (README "Python API").

A thin layer over the commands' own code paths: ``train`` is ``qlora-kit train``
(``train.recipe.train_command``), ``export`` is ``qlora-kit export``
(``export.command.export_model``), ``load`` is what ``qlora-kit generate`` loads
(``inference.load.load_for_generation``).  What differs is only how results and failures
reach the caller:

- results are returned (the run directory and its final metrics, the export's report, a model
  and tokenizer), not printed;
- every failure the CLI reports as ``error:``/``fix:`` lines and an exit status is raised as
  the same typed exception (``qlora_kit.core.errors``) with the same message and hint; never
  ``SystemExit``.  A full disk, a permission problem or CUDA out of memory become
  ``DiskFullError``, ``OutputError`` or ``OutOfMemoryError`` as in the CLI; a failed export
  verification is ``VerificationError`` (the export is kept, as with exit status 5);
- log lines go to the shared console while the call runs, unless the caller set up ``logging``;
  in Jupyter they render into the cell (no live progress bar there, one line per logged step).

SIGINT/SIGTERM: in the main thread (a script, a notebook cell) the commands' handlers are
installed for the call and the previous ones restored after it: interrupting the kernel stops
training at the next step boundary with a checkpoint and raises ``Preempted`` (train again
with ``resume=True``); a second interrupt aborts (``KeyboardInterrupt``).  From another thread
no handler is installed (Python delivers signals to the main thread only).
"""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Union

import torch

from qlora_kit.core import logs
from qlora_kit.core.config import ConfigSource, Overrides
from qlora_kit.core.errors import QloraKitError, VerificationError, as_known_error
from qlora_kit.core.files import read_json
from qlora_kit.export import command as export_command
from qlora_kit.inference.load import load_for_generation
from qlora_kit.rundir import layout as rundir
from qlora_kit.rundir.metrics import MetricsLog
from qlora_kit.train.recipe import train_command

log = logging.getLogger("qlora_kit")

PathLike = Union[str, "os.PathLike[str]"]


@dataclass(frozen=True)
class TrainResult:
    """A finished run: its directory and final metrics (``manifest.json``'s ``final_metrics``).

    Usable wherever a path is: ``qlora_kit.export(run, ...)``, ``qlora_kit.load(run)``, ``Path(run)``.
    """

    run_dir: Path
    metrics: dict[str, Any]  # step, train_loss, eval_loss (None without validation rows), skipped_steps
    status: str

    def history(self) -> list[dict[str, Any]]:
        """Every record of ``metrics.jsonl``: one per logged step (loss, learning rate, ...) and per evaluation."""
        return MetricsLog(self.run_dir / rundir.METRICS).read()

    def __fspath__(self) -> str:
        return str(self.run_dir)


@dataclass(frozen=True)
class ExportResult:
    """An export: its directory, the model in it (the directory, or the ``.gguf`` file) and its report."""

    out: Path
    model_path: Path
    report: dict[str, Any] = field(repr=False)

    @property
    def verification(self) -> dict[str, Any]:
        """The report's verification: status ``passed`` (or ``skipped`` with ``verify=False``) and the measurements."""
        return self.report["verification"]

    def __fspath__(self) -> str:
        return str(self.model_path)


def train(config: ConfigSource, overrides: Overrides = None, *, resume: bool = False, overwrite: bool = False,
          skip_memory_check: bool = False) -> TrainResult:
    """``qlora-kit train``: fine-tune as ``config`` says; return the run directory and final metrics.

    Args:
        config: a YAML config file, or a dict of the same sections (``model``, ``lora``, ``data``,
            ``train``, ``output_dir``); relative paths are taken from the current directory.
        overrides: like ``--set``: a dict of dotted keys (``{"train.max_steps": 20}``, values taken as
            they are) or a list of ``"section.key=value"`` strings (values read as YAML).
        resume, overwrite, skip_memory_check: the CLI options of the same names.

    Raises:
        QloraKitError: the CLI's error (a subclass: ConfigError, DataError, OutputError, Preempted, ...)
            with its message, ``hint`` (the ``fix:`` line) and ``exit_code``.
    """
    with _api_call():
        run_dir = train_command(config, overrides or [], resume=resume, overwrite=overwrite,
                                skip_memory_check=skip_memory_check)
    run_dir = run_dir.resolve()  # still right after the caller changes directory
    manifest = read_json(run_dir / rundir.MANIFEST)
    return TrainResult(run_dir, dict(manifest.get("final_metrics") or {}), str(manifest.get("status")))


def export(run: PathLike, out: PathLike, *, format: str = "hf", dtype: str | None = None, quant: str | None = None,
           merge_base: str = "dequantized", overwrite: bool = False, verify: bool = True,
           device: str | None = None) -> ExportResult:
    """``qlora-kit export RUN --out OUT``: merge the adapter into a fp16 HF model (or a GGUF file) and verify it.

    The keyword arguments are the CLI's options (``--format``, ``--dtype``, ``--quant``,
    ``--merge-base``, ``--overwrite``, ``--verify/--no-verify``, ``--device``), with its defaults.

    Raises:
        VerificationError: the export does not reproduce the trained model within tolerance (it is
            kept at ``out``; ``exc.report`` holds the measurements).
        QloraKitError: any other error of the CLI, with its message and hint.
    """
    with _api_call():
        report = export_command.export_model(os.fspath(run), os.fspath(out), dtype, merge_base, overwrite, verify,
                                             device, fmt=format, quant=quant)
    target = Path(os.fspath(out)).expanduser().resolve()  # as export.publish.check_target resolves it
    model_path = target / report["gguf"]["file"] if format == "gguf" else target
    failure = export_command.verification_failure(report)
    if failure is not None:
        error = VerificationError(failure)
        error.report = report  # type: ignore[attr-defined]
        raise error
    return ExportResult(target, model_path, report)


def load(path: PathLike, *, device: str | torch.device | None = None) -> tuple[Any, Any]:
    """A model and its tokenizer, ready to generate: a run (NF4 base + adapter), an HF export, or a ``.gguf`` file.

    What ``qlora-kit generate`` loads: in eval mode with the KV cache on, float32 on CPU; the
    model's generation config stops at the chat template's end of turn, so
    ``model.generate(**tokenizer.apply_chat_template(..., return_dict=True, return_tensors="pt"))``
    answers one turn.

    Raises:
        ModelError: ``path`` is none of these, or the run is damaged; RunInUseError: a training run
            is writing it.
    """
    with _api_call():
        loaded = load_for_generation(os.fspath(path), torch.device(device) if isinstance(device, str) else device)
    gen = loaded.model.generation_config
    gen.eos_token_id = list(loaded.eos_ids) or gen.eos_token_id
    if gen.pad_token_id is None:
        gen.pad_token_id = loaded.tokenizer.pad_token_id if loaded.tokenizer.pad_token_id is not None \
            else (loaded.eos_ids[0] if loaded.eos_ids else None)
    return loaded.model, loaded.tokenizer


@contextmanager
def _api_call() -> Iterator[None]:
    """Log lines on the console (unless logging is set up); the CLI's one-line failures raised as typed errors."""
    with logs.api_logging():
        try:
            yield
        except QloraKitError:
            raise
        except Exception as exc:
            known = as_known_error(exc)
            if known is None:
                raise
            raise known from exc
