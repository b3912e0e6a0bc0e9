"""What may leave this machine: public names for the base and the data, and a check for local paths.

Exports and Hub uploads name the base by its hub id (or its directory's name) and the data
by their dataset ids or file names, never by local paths: the home directory, the HF/GGUF
cache, the data folder and the run directory mean nothing elsewhere and tell too much.  The
local facts stay in the run's own ``manifest.json``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Iterable

from qlora_kit.core.errors import OutputError
from qlora_kit.model.sources import HUB_ID, base_model_id, cache_root

__all__ = ["HUB_ID", "base_model_id", "check_portable", "data_names", "hub_datasets", "leaks", "local_paths", "machine_paths"]

TEXT_SUFFIXES = {".json", ".md", ".txt", ".jinja", ".yaml", ".yml", ""}  # "" = Modelfile
MAX_SCANNED_BYTES = 64 * 2**20
DATA_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")  # data/read.py reads these as local files


def public_data_name(label: str) -> str:
    """A hub dataset by its id (``org/name``, the split dropped); a local file by its name only.

    ``label`` is what the manifest records (``data.path``): an absolute path for a local file,
    ``name [split]`` for a hub dataset.
    """
    name = label.split(" [")[0]
    return name if _is_hub_dataset(label) else Path(label).name or label


def data_labels(manifest: dict[str, Any], cfg: Any) -> list[str]:
    """Every training and validation data label of a run as recorded (one source, or each of ``data.datasets``)."""
    data = manifest.get("data") or {}
    labels = [data.get("path") or cfg.data.path, data.get("val_path") or cfg.data.val_path]
    for entry in data.get("sources") or []:
        if isinstance(entry, dict):
            labels += [entry.get("path"), entry.get("val_path")]
    for entry in cfg.data.datasets or []:
        labels += [entry.path, entry.val_path]
    return list(dict.fromkeys(str(label) for label in labels if label))


def data_names(manifest: dict[str, Any], cfg: Any) -> list[str]:
    """The training (and separate validation) data's public names."""
    return list(dict.fromkeys(public_data_name(label) for label in data_labels(manifest, cfg)))


def hub_datasets(manifest: dict[str, Any], cfg: Any) -> list[str]:
    """The data that are hub datasets (a model card's ``datasets:`` metadata links them)."""
    labels = data_labels(manifest, cfg)
    return list(dict.fromkeys(label.split(" [")[0] for label in labels if _is_hub_dataset(label)))


def _is_hub_dataset(label: str) -> bool:
    name = label.split(" [")[0]
    local = Path(label).is_absolute() or label.startswith(("~", ".")) or Path(name).suffix.lower() in DATA_SUFFIXES
    return not local and (HUB_ID.match(name) is not None or "/" not in name)


def local_paths(run_dir: Path, manifest: dict[str, Any], cfg: Any, *extra: Path | str) -> list[str]:
    """Absolute local paths that must not appear in anything published from a run: base, data, run, caches, home."""
    base = manifest.get("base") or {}
    candidates: list[Path | str] = [run_dir, str(base.get("source_dir") or ""), *extra]
    for source in data_labels(manifest, cfg):
        path = Path(str(source or "")).expanduser()
        if source and path.exists():
            candidates += [path, path.parent]
    name = str(base.get("name_or_path") or "")
    if name and Path(name).expanduser().exists():
        candidates.append(Path(name).expanduser())
    return machine_paths(*candidates)


def machine_paths(*extra: Path | str) -> list[str]:
    """This machine's paths (home, HF and qlora-kit caches) and ``extra``, absolute and resolved.

    Only paths at least two levels deep (``/home/me``, not ``/tmp`` or ``/data``, which a
    tokenizer's vocabulary may well hold as text).  Longest first, so that the most specific
    one is named when one is found.
    """
    from huggingface_hub import constants

    candidates = [Path.home(), constants.HF_HOME, cache_root(),
                  *(os.environ.get(k, "") for k in ("HF_HOME", "HF_HUB_CACHE", "XDG_CACHE_HOME")), *extra]
    found: set[str] = set()
    for candidate in candidates:
        if candidate and str(candidate) not in ("None", "."):
            path = Path(candidate).expanduser()
            found |= {str(path.absolute()), str(path.resolve())}
    return sorted((p for p in found if len(Path(p).parts) >= 3), key=len, reverse=True)


def _text_files(folder: Path) -> Iterable[Path]:
    for path in sorted(folder.rglob("*")):
        if path.is_file() and (path.suffix.lower() in TEXT_SUFFIXES or path.name == "Modelfile"):
            yield path


def leaks(folder: Path, paths: list[str]) -> list[tuple[str, str]]:
    """(file, local path) for every text file of ``folder`` (and GGUF's metadata) that names one of ``paths``."""
    found = []
    patterns = [(p, re.compile(r"(?<![\w.-])" + re.escape(p) + r"(?![\w.-])")) for p in paths]
    for path in list(_text_files(folder)) + sorted(folder.rglob("*.gguf")):
        with open(path, "rb") as fh:
            data = fh.read(MAX_SCANNED_BYTES).decode("utf-8", errors="replace")
        for local, pattern in patterns:
            if pattern.search(data):
                found.append((str(path.relative_to(folder)), local))
                break
    return found


def check_portable(folder: Path, paths: list[str], again: str) -> None:
    """Refuse to publish ``folder`` when one of its files names a local path (``again``: the retry command).

    Raises:
        OutputError: naming the file and the path.
    """
    found = leaks(folder, paths)
    if found:
        name, local = found[0]
        raise OutputError(f"{folder / name} names the local path {local}, which would be published; nothing "
                          "was uploaded", f"remove that path from the file, then: {again} (if qlora-kit wrote "
                                          "it, please report it as a bug)")
