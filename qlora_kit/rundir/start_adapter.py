"""A run that starts from another run's adapter (``model.adapter: RUN_DIR``), e.g. DPO after SFT.

The adapter is only right on the weights it was trained against, and only with the LoRA
shape it has.  So the start run must be a completed qlora-kit run whose adapter files still
match the sizes and sha256 its manifest recorded (``rundir.finished``), trained with plain
LoRA (DoRA and rsLoRA included) and no base-changing ``lora.init`` (its base is then the
plain NF4 base, checked against the fingerprint the start run recorded, in ``train.setup``).
Its LoRA shape (type, r, alpha, targets, rsLoRA, DoRA) and quantisation are adopted
(:func:`adopt_start_adapter`): given in the new config they must be equal.

What the new run records (``manifest.json`` ``method.start_adapter``): the start run's path,
its adapter files (sizes and sha256) and its method.  The new run trains a full copy of the
adapter (initialised with the start weights), so its own adapter is the whole policy: export,
GGUF and generate merge or load exactly what was trained, and never need the start run.  A
resume re-checks the start adapter's files (DPO's reference is that adapter).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qlora_kit.core.config import Config, load_config
from qlora_kit.core.errors import ConfigError, ModelError, QloraKitError
from qlora_kit.rundir.finished import require_finished_run
from qlora_kit.rundir.integrity import CorruptCheckpoint, file_hashes, verify_files
from qlora_kit.rundir.layout import ADAPTER, ADAPTER_FILES, CONFIG

ADOPTED_LORA = ("type", "r", "alpha", "target_modules", "use_rslora", "use_dora")
ADOPTED_MODEL = ("quant_type", "double_quant")
KEY = "model.adapter"


@dataclass
class StartAdapter:
    """The finished run a new run starts from: where it is, its config and its manifest."""

    run: Path
    config: Config
    manifest: dict[str, Any]

    @property
    def adapter_dir(self) -> Path:
        return self.run / ADAPTER

    def record(self) -> dict[str, Any]:
        """What the new run's manifest keeps of it."""
        return {"run": str(self.run), "method": self.config.train.method,
                "base_fingerprint": (self.manifest.get("base") or {}).get("fingerprint"),
                "adapter_files": self.manifest.get(ADAPTER_FILES) or file_hashes(self.adapter_dir)}


def read_start_adapter(path: str) -> StartAdapter:
    """The completed run at ``path`` with its adapter verified, if it can be started from.

    Raises:
        ConfigError: not a completed run, a damaged adapter, or an adapter kind that cannot be continued.
    """
    run = Path(path).expanduser().resolve()
    try:
        manifest = require_finished_run(run)
        config, _ = load_config(run / CONFIG)
    except QloraKitError as exc:
        raise ConfigError(f"model.adapter: {exc.message}", exc.hint or "point model.adapter at a finished run",
                          key=KEY) from exc
    lora = config.lora
    if lora.type != "lora":
        raise ConfigError(f"model.adapter: {run} trained a lora.type={lora.type} adapter; only plain LoRA adapters "
                          "(DoRA and rsLoRA included) can be trained further", "start from a lora.type=lora run",
                          key=KEY)
    if (manifest.get("lora") or {}).get("residual_base") or lora.init != "default":
        raise ConfigError(f"model.adapter: {run} used lora.init={lora.init}, which trains against its own re-quantised "
                          "base; continuing it is not supported", "start from a run with lora.init=default", key=KEY)
    return StartAdapter(run, config, manifest)


def adopt_start_adapter(cfg: Config, sources: dict[str, str]) -> tuple[Config, dict[str, str]]:
    """``cfg`` with the LoRA shape and quantisation of ``model.adapter``'s run (unchanged without one).

    Raises:
        ConfigError: the start run cannot be used, is this run's own output_dir, or the config sets
            one of the adopted settings to another value (all listed at once).
    """
    if cfg.model.adapter is None:
        return cfg, sources
    start = read_start_adapter(cfg.model.adapter)
    if start.run == Path(cfg.output_dir).expanduser().resolve():
        raise ConfigError(f"model.adapter is this run's own output_dir ({start.run})",
                          "write the new run to another output_dir", key=KEY)
    conflicts = _conflicts(cfg.lora, start.config.lora, "lora", ADOPTED_LORA)
    conflicts += _conflicts(cfg.model, start.config.model, "model", ADOPTED_MODEL)
    if conflicts:
        raise ConfigError(f"model.adapter {start.run} fixes the adapter's shape, and the config differs: "
                          + "; ".join(conflicts), "drop those settings (they are taken from the start run)")
    cfg = cfg.model_copy(deep=True)
    sources = dict(sources)
    for section, keys in (("lora", ADOPTED_LORA), ("model", ADOPTED_MODEL)):
        for key in keys:
            setattr(getattr(cfg, section), key, getattr(getattr(start.config, section), key))
            sources[f"{section}.{key}"] = f"from model.adapter {start.run}"
    return cfg, sources


def _conflicts(mine: Any, theirs: Any, section: str, keys: tuple[str, ...]) -> list[str]:
    """``section.key: X here, Y in the start run`` for every adopted key the config sets to another value."""
    return [f"{section}.{k}: {getattr(mine, k)!r} here, {getattr(theirs, k)!r} in the start run"
            for k in keys if k in mine.model_fields_set and getattr(mine, k) != getattr(theirs, k)]


def check_start_unchanged(recorded: dict[str, Any] | None) -> None:
    """On resume: the start run's adapter must still be the one the run started from (DPO's reference).

    Raises:
        ModelError: it is gone or its files changed since the run started.
    """
    if not recorded:
        return
    adapter = Path(recorded["run"]) / ADAPTER
    try:
        verify_files(adapter, recorded.get("adapter_files") or {})
    except CorruptCheckpoint as exc:
        raise ModelError(f"the adapter this run started from ({adapter}) changed since it started ({exc})",
                         "restore that run's adapter, or start this run again with --overwrite", key=KEY) from exc
