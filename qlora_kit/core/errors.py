"""User-facing errors: one line naming the problem and the fix, and an exit status.

Every failure a user can cause (bad config, missing file, wrong data, a run that
would not fit) raises a :class:`QloraKitError`.  The CLI prints ``error: <message>``
and, when set, ``fix: <hint>``, then exits with ``exit_code`` — no traceback unless
``--debug`` is given.  Anything else reaching the CLI is a bug: an internal error (exit 70), one
``error:`` line with the phase (:func:`phase`) and the exception's first line, and a ``fix:`` line
saying where its traceback was written (:func:`note` records the run's log file, how to resume).
"""

from __future__ import annotations

import errno
import sys
from contextlib import contextmanager
from typing import Any, Callable, Iterator

# Documented exit statuses (README "Exit codes").
EXIT_USER_ERROR = 2  # bad input: config, paths, data, arguments
EXIT_NONFINITE = 3  # training stopped on a non-finite loss or gradient
EXIT_OOM = 4  # CUDA out of memory, or the memory plan says it will not fit
EXIT_VERIFY_FAILED = 5  # export verification outside tolerance
EXIT_NO_SPACE = 6  # not enough disk space: nothing half-written was left; free space and run again
EXIT_PUSH_FAILED = 7  # the Hub could not be reached or refused the upload; the local export is complete
EXIT_INTERNAL = 70  # an exception nobody foresaw: a bug; the traceback is in the log (EX_SOFTWARE)
EXIT_PREEMPTED = 75  # SIGTERM/SIGINT: stopped cleanly; run again (train: with --resume) (EX_TEMPFAIL)


class QloraKitError(Exception):
    """An error the user can fix; carries a one-line fix hint and an exit status."""

    exit_code: int = EXIT_USER_ERROR

    def __init__(self, message: str, hint: str | None = None, exit_code: int | None = None, key: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.key = key  # the config key (e.g. "data.val_path") whose value caused it, when there is one
        if exit_code is not None:
            self.exit_code = exit_code

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message} (fix: {self.hint})"


class ConfigError(QloraKitError):
    """The config file or an override is missing, malformed or invalid."""


class DataError(QloraKitError):
    """The dataset is missing, malformed, or yields nothing to train on."""


class ModelError(QloraKitError):
    """The model or tokenizer cannot be found or does not fit the request."""


class OutputError(QloraKitError):
    """An output directory would be overwritten or is otherwise unusable."""


class RunInUseError(OutputError):
    """Another qlora-kit process holds the lock of a run directory (one writer per run)."""


class DiskFullError(OutputError):
    """Not enough disk space for what is about to be written (checked first, or ENOSPC)."""

    exit_code = EXIT_NO_SPACE


class NonFiniteLossError(QloraKitError):
    """Training produced a NaN/inf loss or gradient and was stopped."""

    exit_code = EXIT_NONFINITE


class OutOfMemoryError(QloraKitError):
    """The run does not fit in GPU memory (predicted or measured)."""

    exit_code = EXIT_OOM


class VerificationError(QloraKitError):
    """An exported model does not reproduce the trained one within tolerance."""

    exit_code = EXIT_VERIFY_FAILED


class PeerFailed(QloraKitError):
    """Another process of a multi-process run failed or stopped responding (its own message says why)."""

    exit_code = 1


class Preempted(QloraKitError):
    """A stop signal arrived; the command stopped cleanly (training: after a checkpoint) and can be rerun."""

    exit_code = EXIT_PREEMPTED


OOM_HINT = (
    "lower train.micro_batch_size or train.max_length (raise gradient_accumulation_steps to keep the batch), "
    "keep train.gradient_checkpointing on, or lower lora.r; `qlora-kit plan CONFIG` shows what fits"
)
NO_SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
ENVIRONMENT_ERRNOS = (*NO_SPACE_ERRNOS, errno.EACCES, errno.EPERM, errno.EROFS)


def as_known_error(exc: BaseException) -> QloraKitError | None:
    """A failure the modules did not foresee but the user can fix, as the error the CLI reports; else None.

    A full disk (``DiskFullError``, exit 6), a permission problem (``OutputError``) or CUDA out of
    memory (``OutOfMemoryError``, exit 4): one line instead of a traceback, for the CLI and the
    Python API alike.
    """
    if isinstance(exc, QloraKitError):
        return exc
    if isinstance(exc, OSError) and exc.errno in ENVIRONMENT_ERRNOS:
        message = f"{exc.strerror or exc}{f': {exc.filename}' if exc.filename else ''}"
        if exc.errno in NO_SPACE_ERRNOS:
            after = notes(exc).get("after")  # train: whether --resume can continue (a removed run has nothing)
            return DiskFullError(message, "free space on that disk, then run the same command again"
                                 + (f" ({after})" if after else ""))
        return OutputError(message, "check that you may write there, or choose another path")
    if _is_cuda_oom(exc):
        return OutOfMemoryError(f"CUDA out of memory: {str(exc).splitlines()[0]}", OOM_HINT)
    return None


def _is_cuda_oom(exc: BaseException) -> bool:
    if "CUDA out of memory" in str(exc):
        return True
    torch = sys.modules.get("torch")  # no torch loaded: no CUDA error either
    return torch is not None and isinstance(exc, torch.cuda.OutOfMemoryError)


def shorten(text: str, limit: int = 200) -> str:
    """``text`` cut to ``limit`` characters (with "...") and to its first line, for one-line messages."""
    first = text.splitlines()[0] if text else ""
    return first if len(first) <= limit else first[: limit - 3] + "..."


def short_repr(value: object, limit: int = 80) -> str:
    """``repr`` for messages, bounded in time and length whatever ``value`` holds (huge lists, strings)."""
    import reprlib

    r = reprlib.Repr()
    r.maxlevel, r.maxlist, r.maxtuple, r.maxdict, r.maxset = 3, 5, 5, 5, 5
    r.maxstring, r.maxother, r.maxlong = limit, limit, 40
    if isinstance(value, int) and value.bit_length() > 128:
        return f"<an integer of about {int(value.bit_length() * 0.30103) + 1} digits>"
    try:
        text = r.repr(value)
    except Exception:  # e.g. a repr that raises: name the type instead
        text = f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def note(exc: BaseException, key: str, value: Any) -> None:
    """Attach a fact to an exception on its way to the CLI (``phase``, ``log``, ``after``); the first one set wins.

    Only unforeseen exceptions carry notes (a :class:`QloraKitError` says everything in its lines).
    """
    if isinstance(exc, QloraKitError) or not isinstance(exc, Exception):
        return
    try:
        notes = exc.__dict__.setdefault("qlora_kit_notes", {})
    except AttributeError:  # an exception type without a __dict__
        return
    notes.setdefault(key, value)


def notes(exc: BaseException) -> dict[str, Any]:
    """The facts :func:`note` attached to ``exc``."""
    return dict(getattr(exc, "qlora_kit_notes", {}))


@contextmanager
def phase(name: str | Callable[[], str]) -> Iterator[None]:
    """Name what runs inside the block for an unforeseen exception leaving it (the innermost phase wins).

    ``name`` may be a function, called only when an exception leaves (e.g. the step being trained).
    """
    try:
        yield
    except Exception as exc:
        if "phase" not in notes(exc):
            try:
                note(exc, "phase", name() if callable(name) else name)
            except Exception:  # describing the phase must never replace the error
                pass
        raise
