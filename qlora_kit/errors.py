"""User-facing errors: one line naming the problem and the fix, and an exit status.

Every failure a user can cause (bad config, missing file, wrong data, a run that
would not fit) raises a :class:`QloraKitError`.  The CLI prints ``error: <message>``
and, when set, ``fix: <hint>``, then exits with ``exit_code`` — no traceback unless
``--debug`` is given.  Anything else reaching the CLI is a bug and shows a traceback.
"""

from __future__ import annotations

# Documented exit statuses (README "Exit codes").
EXIT_USER_ERROR = 2  # bad input: config, paths, data, arguments
EXIT_NONFINITE = 3  # training stopped on a non-finite loss or gradient
EXIT_OOM = 4  # CUDA out of memory, or the memory plan says it will not fit
EXIT_VERIFY_FAILED = 5  # export verification outside tolerance
EXIT_PREEMPTED = 75  # SIGTERM/SIGINT: checkpoint saved, resume with --resume (EX_TEMPFAIL)


class QloraKitError(Exception):
    """An error the user can fix; carries a one-line fix hint and an exit status."""

    exit_code: int = EXIT_USER_ERROR

    def __init__(self, message: str, hint: str | None = None, exit_code: int | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint
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
    """A stop signal arrived; a checkpoint was saved and the run can be resumed."""

    exit_code = EXIT_PREEMPTED
