"""Where output goes: one stderr console for log lines, progress bars and tables, and the run's log file.

- One rich ``Console`` is shared by the log handler and every progress bar, so a live bar is
  redrawn below log lines instead of being written through by them.
- Writing is best effort.  When stderr/stdout is a closed pipe (``qlora-kit train ... | tee log``
  after ``tee`` died, Ctrl-C on the whole pipeline) or a vanished terminal, the failed stream is
  pointed at /dev/null and the run goes on: a training run must still checkpoint on SIGINT/SIGTERM
  and exit with its own status.  (rich's default on a broken pipe is ``SystemExit(1)``.)
- Markup is off on every console: what qlora-kit prints (paths, install hints such as
  ``qlora-kit[llamacpp]``, messages of libraries) is text, and rich would eat its square
  brackets.  Styling is given as ``rich.text.Text`` styles instead.
- ``run_log`` appends every log line of a training run, with times, to ``OUTPUT_DIR/train.log``
  (across resumes), so nothing depends on the terminal staying alive.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, Iterator

from rich.console import Console
from rich.logging import RichHandler

from qlora_kit.core.errors import QloraKitError, note

log = logging.getLogger("qlora_kit")

NOISY_LOGGERS = ("transformers", "bitsandbytes", "peft", "accelerate", "datasets", "httpx", "huggingface_hub")
FILE_FORMAT = "%(asctime)s %(levelname)-7s %(message)s"


def silence(stream: IO[Any] | None) -> None:
    """Point ``stream``'s file descriptor at /dev/null (after a write to it failed); never raises."""
    try:
        fd = stream.fileno()  # type: ignore[union-attr]
        devnull = os.open(os.devnull, os.O_WRONLY)
    except (AttributeError, OSError, ValueError):
        return
    try:
        os.dup2(devnull, fd)
    except OSError:
        pass
    finally:
        os.close(devnull)


class _Console(Console):
    """A rich Console that drops its output, instead of exiting, when its stream is a dead pipe."""

    def on_broken_pipe(self) -> None:
        self.quiet = True
        silence(self.file)


_STDERR: dict[str, Console] = {}


def console() -> Console:
    """The process's stderr console (log lines, progress bars, the data summary)."""
    if "console" not in _STDERR:
        _STDERR["console"] = _Console(stderr=True, markup=False)
    return _STDERR["console"]


def stdout_console() -> Console:
    """A console for a command's results on stdout (no highlighting, no markup), as robust as ``console()``."""
    return _Console(highlight=False, markup=False)


class ConsoleHandler(RichHandler):
    """RichHandler on the shared console; a line that cannot be written is dropped silently.

    When the console is a pipe or a file (``| tee``, nohup, Slurm) a record is one plain line,
    ``LEVEL    message``: not wrapped at the console's width nor padded to it, so ``grep`` and
    ``tail`` see whole lines.
    """

    def emit(self, record: logging.LogRecord) -> None:
        if self.console.is_terminal or self.console.is_jupyter:
            super().emit(record)
            return
        try:
            self.console.print(f"{record.levelname:<8} {self.format(record)}", markup=False, highlight=False,
                               soft_wrap=True)
        except Exception:  # noqa: BLE001 (logging's contract: handleError, never raise)
            self.handleError(record)

    def handleError(self, record: logging.LogRecord) -> None:  # noqa: N802 (logging's name)
        silence(self.console.file)


def setup_logging(debug: bool) -> None:
    """qlora-kit's INFO lines (DEBUG with ``--debug``) on the shared console; libraries quiet unless debugging."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    handler = ConsoleHandler(console=console(), show_path=False, show_time=False, markup=False,
                             rich_tracebacks=False)
    logging.basicConfig(level=logging.WARNING, format="%(message)s", handlers=[handler], force=True)
    log.setLevel(logging.DEBUG if debug else logging.INFO)
    if debug:
        return
    for noisy in NOISY_LOGGERS:
        logging.getLogger(noisy).setLevel(logging.ERROR)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)


@contextmanager
def api_logging() -> Iterator[None]:
    """qlora-kit's INFO lines on the shared console while a Python API call runs, unless the caller set up logging.

    A script or notebook that configured ``logging`` (a handler on the root or ``qlora_kit``
    logger) keeps its own; otherwise the lines a CLI user sees (data summary, memory plan, one per
    logged step, where the files went) are shown, and everything is as it was afterwards.  In
    Jupyter the console renders into the cell's output (rich detects it; no live bar there).
    """
    if log.handlers or logging.getLogger().handlers:
        yield
        return
    handler = ConsoleHandler(console=console(), show_path=False, show_time=False, markup=False,
                             rich_tracebacks=False)
    log.addHandler(handler)
    level = log.level
    if level == logging.NOTSET:
        log.setLevel(logging.INFO)
    try:
        with quiet_libraries():
            yield
    finally:
        log.setLevel(level)
        log.removeHandler(handler)


@contextmanager
def quiet_libraries() -> Iterator[None]:
    """What the CLI does for good (``setup_logging``), for one block: library loggers at ERROR,
    transformers' progress bars off, UserWarning/FutureWarning hidden; all restored afterwards."""
    levels = {name: logging.getLogger(name).level for name in NOISY_LOGGERS}
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    bars = None
    try:
        from transformers.utils import logging as hf_logging

        bars = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()
    except ImportError:
        hf_logging = None
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=UserWarning)
            warnings.filterwarnings("ignore", category=FutureWarning)
            warnings.filterwarnings("ignore", message="IProgress not found")  # tqdm.auto in Jupyter: bars are off
            yield
    finally:
        for name, saved in levels.items():
            logging.getLogger(name).setLevel(saved)
        if hf_logging is not None and bars:
            hf_logging.enable_progress_bar()


_SAID: set[str] = set()


def info_once(message: str) -> None:
    """Log ``message`` at INFO the first time only (facts that do not change within a process)."""
    if message not in _SAID:
        _SAID.add(message)
        log.info(message)


def echo(text: str, err: bool = True) -> None:
    """Print one line to stderr (or stdout); a dead stream is silenced, not raised."""
    stream = sys.stderr if err else sys.stdout
    try:
        stream.write(text + "\n")
        stream.flush()
    except (OSError, ValueError):
        silence(stream)


def flush_streams() -> None:
    """Flush stdout and stderr at exit; silence the ones that fail so the interpreter's own flush cannot."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            silence(stream)


class RunLog(logging.Handler):
    """Appends log records to a run's log file; records before :meth:`open` are held in memory.

    A run writes nothing before every check passed (see rundir/target.py), so the lines of its setup
    are kept until the run's directory exists, then written first.  Never opened (a refused or
    stopped start), the held lines are dropped with the handler.
    """

    def __init__(self, path: Path) -> None:
        super().__init__(logging.DEBUG)
        self.path = path
        self.setFormatter(logging.Formatter(FILE_FORMAT))
        self._held: list[logging.LogRecord] = []
        self._file: logging.FileHandler | None = None

    @property
    def opened(self) -> bool:
        """Whether lines go to the file (else they are held, and dropped if it is never opened)."""
        return self._file is not None

    def open(self) -> None:
        """Start writing to the file (appending: a resumed run's lines follow the earlier ones)."""
        if self._file is not None:
            return
        self._file = logging.FileHandler(self.path, mode="a", encoding="utf-8")
        self._file.setFormatter(self.formatter)
        for record in self._held:
            self._file.handle(record)
        self._held.clear()

    def emit(self, record: logging.LogRecord) -> None:
        if self._file is None:
            self._held.append(record)
        else:
            self._file.handle(record)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        self._held.clear()
        super().close()


@contextmanager
def run_log(path: Path, header: str) -> Iterator[RunLog]:
    """Record qlora-kit's log lines for ``path`` while the block runs; the error ending it is recorded too.

    The file is written from :meth:`RunLog.open` on (the caller opens it once the run's
    directory is written).  The logger is raised to INFO for the block if it is quieter, so the
    file always has the run's progress.  The error that ends the block is written as the CLI
    prints it.
    """
    handler = RunLog(path)
    level = log.level
    if not log.isEnabledFor(logging.INFO):
        log.setLevel(logging.INFO)
    log.addHandler(handler)
    _to_file(handler, logging.INFO, header)
    try:
        yield handler
    except BaseException as exc:

        known = isinstance(exc, (QloraKitError, KeyboardInterrupt))
        _to_file(handler, logging.ERROR, describe_exit(exc), None if known else (type(exc), exc, exc.__traceback__))
        if not known and handler.opened:
            note(exc, "log", path)  # the CLI's internal-error line names the file holding the traceback
        raise
    finally:
        log.removeHandler(handler)
        handler.close()
        log.setLevel(level)


def _to_file(handler: logging.Handler, level: int, message: str, exc_info: Any = None) -> None:
    handler.handle(log.makeRecord(log.name, level, __file__, 0, message, None, exc_info))


def describe_exit(exc: BaseException) -> str:
    """The line a log file gets for the exception that ended a run."""

    if isinstance(exc, QloraKitError):
        return f"error: {exc.message}" + (f" | fix: {exc.hint}" if exc.hint else "")
    if isinstance(exc, KeyboardInterrupt):
        return "aborted (Ctrl-C)"
    return f"failed: {type(exc).__name__}: {exc}"
