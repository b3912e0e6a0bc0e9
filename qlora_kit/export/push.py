"""``qlora-kit push PATH ORG/NAME``: a run's adapter alone, or a finished export, to the Hugging Face Hub.

A run directory pushes its adapter (``adapter_model.safetensors`` and an ``adapter_config.json``
naming the base by its hub id), the training tokenizer (the chat template) and a model card;
an export directory (``export_report.json``) is pushed as it is, e.g. after
``export --push-to-hub`` could not reach the Hub.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from pathlib import Path

from qlora_kit.core.config import load_config
from qlora_kit.core.errors import ModelError
from qlora_kit.core.files import read_json
from qlora_kit.export import card, hub
from qlora_kit.export.portable import base_model_id, local_paths, machine_paths
from qlora_kit.rundir import finished
from qlora_kit.rundir import layout as rundir
from qlora_kit.rundir import lock as runlock

log = logging.getLogger("qlora_kit")


def push_path(path: str | Path, repo_id: str, private: bool = False) -> str:
    """Push a run's adapter, or an export directory as it is, to ``repo_id``; return the repository URL.

    Raises:
        ConfigError: a bad repository id, offline mode or no token (before anything is read);
        ModelError: ``path`` is neither a finished run nor an export, an export that failed
            verification, or an adapter that needs the run's residual base;
        OutputError: a file would publish a local path; PushError: no network, or the Hub refused.
    """
    token = hub.check_can_push(repo_id)
    p = Path(path).expanduser()
    again = f"qlora-kit push {path} {repo_id}" + (" --private" if private else "")
    if (p / card.REPORT).is_file():
        _check_export(p)
        return hub.push_folder(p, repo_id, token, private, machine_paths(p), f"qlora-kit export {p.absolute().name}",
                               again, exported=True)
    if not p.is_dir() or not rundir.is_run_dir(p):
        raise ModelError(f"{p} is neither a qlora-kit run nor an export (no {rundir.MANIFEST}, no {card.REPORT})",
                         "pass the output_dir of `qlora-kit train` (pushes the adapter) or an export's --out")
    with runlock.shared(p, "push"):
        run = read_adapter_run(p)
        with tempfile.TemporaryDirectory(prefix="qlora-kit-push-") as tmp:
            folder = Path(tmp)
            adapter_folder(run, folder, repo_id)
            url = hub.push_folder(folder, repo_id, token, private, local_paths(p, run.manifest, run.config),
                                  f"qlora-kit adapter of {p.absolute().name}", again)
    card.record_push(p, repo_id, url)
    log.info("pushed the adapter to the Hub: %s", url)
    return url


def _check_export(export: Path) -> None:
    """An export directory may be pushed unless its verification failed.

    Raises:
        ModelError: its report says verification failed.
    """
    report = read_json(export / card.REPORT)
    verification = (report.get("verification") or {}) if isinstance(report, dict) else {}
    if verification.get("status") == "failed":
        raise ModelError(f"{export} failed its verification ({'; '.join(verification.get('failures') or [])}); "
                         "a model that does not reproduce the trained one is not published",
                         "see its README's Verification section; export again (e.g. another --merge-base)")


def read_adapter_run(run_dir: Path) -> finished.RunInfo:
    """A finished run whose adapter can be used on its own (the base is not needed here).

    Raises:
        ModelError: unfinished or damaged run, or an adapter trained against a residual base
            (``lora.init`` pissa/olora/lora_ga/loftq with more iterations) that only an export carries.
    """
    manifest = finished.require_finished_run(run_dir)
    if manifest.get("status") not in (None, "completed"):
        log.warning("run status is %r, not 'completed': pushing the adapter it saved last", manifest.get("status"))
    if (manifest.get("lora") or {}).get("residual_base"):
        raise ModelError(f"the adapter of {run_dir} was trained against a changed base (a residual NF4 base from "
                         "its lora.init), which is not part of the adapter: on the original base it is a different "
                         "model", f"push a merged export instead: qlora-kit export {run_dir} --out DIR --push-to-hub "
                                  "ORG/NAME")
    cfg, _ = load_config(run_dir / rundir.CONFIG)
    source = Path(str((manifest.get("base") or {}).get("source_dir") or ""))
    return finished.RunInfo(run_dir, manifest, cfg, source, manifest.get("quant") or {})


def adapter_folder(run: finished.RunInfo, folder: Path, repo_id: str) -> None:
    """Fill ``folder`` with what an adapter repository holds: adapter, public adapter config, tokenizer, card."""
    adapter = run.run_dir / rundir.ADAPTER
    shutil.copy2(adapter / "adapter_model.safetensors", folder / "adapter_model.safetensors")
    config = read_json(adapter / "adapter_config.json")
    config["base_model_name_or_path"] = base_model_id(
        str((run.manifest.get("base") or {}).get("name_or_path") or run.config.model.name_or_path))
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    for path in sorted((run.run_dir / rundir.TOKENIZER).iterdir()):
        if path.is_file():
            shutil.copy2(path, folder / path.name)
    card.write_adapter_card(run, folder, repo_id)
