"""llama.cpp itself, through the optional ``llama-cpp-python`` (extra ``qlora-kit[llamacpp]``).

Used for the two things only llama.cpp can vouch for: its own K-quant quantiser
(``llama_model_quantize``) and running the exported GGUF (tokeniser, chat template, graph) to
verify it.  ``llama-cpp-python`` has no wheel in the package index: installing it compiles
llama.cpp (about 17 minutes on 2 cores), so it stays out of the default install, and
everything here imports it lazily.
"""

from __future__ import annotations

import importlib.util
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from qlora_kit.core.errors import ModelError, QloraKitError

EXTRA = "llamacpp"
INSTALL_HINT = (f'in your qlora-kit clone: pip install -c constraints.txt -e ".[{EXTRA}]"  (compiles llama.cpp: '
                "about 17 minutes on 2 cores)")


def available() -> bool:
    """Whether llama-cpp-python is importable."""
    return importlib.util.find_spec("llama_cpp") is not None


def version() -> str | None:
    """The installed llama-cpp-python version, or None."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as pkg_version

    try:
        return pkg_version("llama-cpp-python")
    except PackageNotFoundError:
        return None


def require(what: str) -> Any:
    """Import ``llama_cpp`` for ``what``, or raise one line naming the extra.

    Raises:
        QloraKitError: llama-cpp-python is not installed.
    """
    if not available():
        raise QloraKitError(f"{what} needs llama.cpp (the optional llama-cpp-python package, not installed)",
                            INSTALL_HINT)
    import llama_cpp

    return llama_cpp


@contextmanager
def captured_stderr() -> Iterator[Path]:
    """Send the C library's stderr (llama.cpp's log) to a temporary file while the block runs."""
    with tempfile.NamedTemporaryFile("w+b", suffix=".log", delete=False) as log_file:
        path = Path(log_file.name)
    saved = os.dup(2)
    try:
        with open(path, "wb") as sink:
            os.dup2(sink.fileno(), 2)
            try:
                yield path
            finally:
                os.dup2(saved, 2)
    finally:
        os.close(saved)
        path.unlink(missing_ok=True)


def _tail(path: Path, lines: int = 5) -> str:
    return " | ".join(path.read_text(errors="replace").strip().splitlines()[-lines:])


def quantize(source: Path, target: Path, ftype: int, threads: int) -> None:
    """Quantise the GGUF ``source`` into ``target`` with llama.cpp's own quantiser (``llama_model_quantize``).

    Raises:
        QloraKitError: llama-cpp-python is missing; ModelError: llama.cpp reported a failure.
    """
    import ctypes

    llama_cpp = require("a K-quant (--quant q4_k_m, q5_k_m, q6_k)")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = threads
    with captured_stderr() as log_path:
        status = llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(), ctypes.byref(params))
        if status != 0:
            raise ModelError(f"llama.cpp's quantiser failed (status {status}): {_tail(log_path)}")


def load(path: Path, n_ctx: int, threads: int) -> Any:
    """The GGUF in llama.cpp with logits kept for every position (for teacher-forced comparisons).

    Raises:
        ModelError: llama.cpp refuses the file (with the end of its log).
    """
    llama_cpp = require("running the GGUF in llama.cpp")
    gpu_layers = -1 if llama_cpp.llama_supports_gpu_offload() else 0
    with captured_stderr() as log_path:
        try:
            model = llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=min(n_ctx, 512), logits_all=True,
                                    n_threads=threads, n_threads_batch=threads, n_gpu_layers=gpu_layers, seed=0,
                                    verbose=False)
        except (ValueError, RuntimeError) as exc:
            raise ModelError(f"llama.cpp cannot load {path.name}: {exc}: {_tail(log_path)}") from exc
    return model
