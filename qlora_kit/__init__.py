"""qlora-kit: QLoRA fine-tuning of chat models on one 24 GB GPU, and a verified fp16 / GGUF export.

The Python API (``qlora_kit/api.py``; README "Python API")::

    import qlora_kit
    run = qlora_kit.train("configs/smollm2-135m_qlora_cpu.yaml", overrides={"train.max_steps": 20})
    merged = qlora_kit.export(run, "merged")
    model, tokenizer = qlora_kit.load(merged)

``import qlora_kit`` stays fast (no torch): the API module is loaded on first use.  ``train`` and
``export`` are also the names of two subpackages (the recipe, the export steps), whose modules
Python binds on this package as ``qlora_kit.train`` / ``qlora_kit.export`` once imported.  Those
two package modules are therefore made callable: ``qlora_kit.train(...)`` runs ``api.train``,
while ``qlora_kit.train.recipe`` and ``from qlora_kit.train import loop`` keep naming the
modules.  Their ``__init__`` files import nothing, so this costs nothing at import.
"""

from __future__ import annotations

import types
from typing import Any

from qlora_kit import export as _export_package
from qlora_kit import train as _train_package

__all__ = ["ExportResult", "TrainResult", "export", "load", "train"]
_API_NAMES = frozenset(__all__)


class _CallablePackage(types.ModuleType):
    """A subpackage whose module, called, runs the API function of the same name."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        from qlora_kit import api  # torch, transformers: loaded when first called, not on import

        return getattr(api, self.__name__.rpartition(".")[2])(*args, **kwargs)


_train_package.__class__ = _CallablePackage
_export_package.__class__ = _CallablePackage


def __getattr__(name: str) -> Any:
    """``qlora_kit.load``, ``qlora_kit.TrainResult``, ...: from ``qlora_kit.api``, imported on first use."""
    if name in _API_NAMES:
        from qlora_kit import api

        return getattr(api, name)
    raise AttributeError(f"module 'qlora_kit' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | _API_NAMES)
