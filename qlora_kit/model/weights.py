"""The base's weight files checked before anything loads them: complete, and of the shapes its config.json builds.

transformers reports a truncated file as a ``SafetensorError`` from deep inside its loader, and
with a 4-bit quantisation config it loads a tensor whose shape differs from the one
``config.json`` makes (an edited or mismatched config) without a word: the model trains and
generates on weights that are not the checkpoint's.  Both are caught here from the
safetensors headers and a weightless (meta) model, before any tensor data is read.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from qlora_kit.core.errors import ModelError, shorten
from qlora_kit.core.safetensors import HeaderError, check_complete, read_source_index, source_files

REDOWNLOAD = ("download the model again (an interrupted download or copy leaves a short file), or point "
              "model.name_or_path at an intact copy")


def require_loadable_weights(source: Path, trust_remote_code: bool = False) -> None:
    """Refuse a base whose weight files are incomplete, whose architecture cannot be built, or whose
    tensors do not have the shapes its ``config.json`` gives them.

    Raises:
        ModelError: naming the file or tensor and what to do.
    """
    files = source_files(source)
    for path in files:
        try:
            check_complete(path)
        except HeaderError as exc:
            raise ModelError(f"the base's weight file {path} {exc}", REDOWNLOAD, key="model.name_or_path") from exc
    expected = expected_shapes(source, trust_remote_code)
    wrong = [(t, expected[t.name]) for t in read_source_index(files)
             if t.name in expected and tuple(t.shape) != expected[t.name]]
    if wrong:
        tensor, shape = wrong[0]
        raise ModelError(
            f"{source / 'config.json'} does not match the base's weights: {tensor.name} is {list(tensor.shape)} in "
            f"{tensor.file.name}, the config makes it {list(shape)} ({len(wrong)} tensor(s) differ)",
            "use the config.json that came with these weights (download the model again), or point "
            "model.name_or_path at the model this config belongs to", key="model.name_or_path")


def expected_shapes(source: Path, trust_remote_code: bool = False) -> dict[str, tuple[int, ...]]:
    """Every parameter's and buffer's shape as ``config.json`` builds the model (on the meta device: no memory).

    Raises:
        ModelError: an unknown ``model_type``, or the model's own code (``trust_remote_code``) fails.
    """
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    except Exception as exc:  # a model's own code may raise anything
        raise _architecture_error(source, exc, trust_remote_code, transformers.__version__) from exc
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def _architecture_error(source: Path, exc: Exception, trust_remote_code: bool, version: str) -> ModelError:
    text = shorten(str(exc), 240)
    if "does not recognize this architecture" in text or "Unrecognized model" in text:
        named = re.search(r"model type `([^`]*)`", text)
        what = f"model_type {named.group(1)!r}" if named else f"the architecture ({text})"
        return ModelError(
            f"transformers {version} does not know {what} of {source / 'config.json'}",
            "upgrade transformers (pip install -U transformers) if the model is newer than it; for a model that ships "
            "its own code, read that code and set model.trust_remote_code: true", key="model.name_or_path")
    if trust_remote_code:
        return ModelError(
            f"the model's own code (model.trust_remote_code) failed to build {source}: {type(exc).__name__}: {text}",
            f"the model's code in {source} does not work with transformers {version}: use a revision of the model "
            "(model.revision) made for it, or a model transformers supports natively", key="model.name_or_path")
    return ModelError(f"cannot build the architecture of {source} from its config.json: {type(exc).__name__}: {text}",
                      "check config.json (download the model again), or point model.name_or_path at another model",
                      key="model.name_or_path")
