"""Publishing a trained run: what reaches the Hub, exactly, and that nothing local is in any file.

The run is trained by the real trainer on a tiny model kept where the HF cache keeps a hub
model (so the card can name its hub id); ``HfApi.create_repo`` / ``HfApi.upload_folder`` are
replaced by recorders that keep their arguments and every byte of the folder they were given:
that is the boundary with ``huggingface_hub``, whose transport is its own.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from conftest import arithmetic_rows, run_cli, write_config, write_jsonl
from huggingface_hub import HfApi, RepoUrl, constants

from qlora_kit.core.errors import ConfigError, ModelError
from qlora_kit.export import hub
from qlora_kit.export.command import export_run
from qlora_kit.export.push import push_path
from qlora_kit.model.tiny import build_tiny_model

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.e2e]

HUB_BASE = "tiny-org/tiny-chat"
HF_FILES = {"README.md", "chat_template.jinja", "config.json", "export_report.json", "generation_config.json",
            "model.safetensors", "tokenizer.json", "tokenizer_config.json"}
ADAPTER_FILES = {"README.md", "adapter_config.json", "adapter_model.safetensors", "chat_template.jinja",
                 "tokenizer.json", "tokenizer_config.json"}
ENV = {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run trained on a base in a hub-cache snapshot, with data in a folder whose path must stay here."""
    from qlora_kit.train.recipe import run_training

    root = tmp_path_factory.mktemp("publish")
    base = build_tiny_model(root / "hf-home" / "hub" / "models--tiny-org--tiny-chat" / "snapshots" / "0123abc",
                            "llama")
    data = write_jsonl(root / "private data" / "support-chats.jsonl", arithmetic_rows(48))
    config = write_config(root / "cfg.yaml", base, data, root / "runs" / "chat-run",
                          train={"max_steps": 2, "save_steps": 2})
    assert run_training(config, [], resume=False, overwrite=False, skip_memory_check=True) == 0
    return root / "runs" / "chat-run"


@pytest.fixture
def hub_calls(monkeypatch: pytest.MonkeyPatch) -> dict[str, list[dict]]:
    """Online with a token; every create_repo / upload_folder recorded (upload: the folder's files, read then)."""
    calls: dict[str, list[dict]] = {"create": [], "upload": []}

    def create_repo(self: HfApi, repo_id: str, **kwargs) -> RepoUrl:
        calls["create"].append({"repo_id": repo_id, "token": self.token, **kwargs})
        return RepoUrl(f"https://huggingface.co/{repo_id}")

    def upload_folder(self: HfApi, *, repo_id: str, folder_path: str, **kwargs) -> None:
        files = {str(p.relative_to(folder_path)): p.read_bytes() for p in Path(folder_path).rglob("*") if p.is_file()}
        calls["upload"].append({"repo_id": repo_id, "token": self.token, "files": files, **kwargs})

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    return calls


def card_of(text: str) -> tuple[dict, str]:
    """(YAML metadata, body) of a model card."""
    _, meta, body = text.split("---\n", 2)
    return yaml.safe_load(meta), body


def local_strings(run: Path) -> list[str]:
    """Where this test's files are (base, data, run, caches: all under pytest's base temp) and the home dir."""
    return [str(run.parents[2]), str(run.parents[2].resolve()), str(Path.home())]


def assert_nothing_local(files: dict[str, bytes], run: Path) -> None:
    for name, data in files.items():
        for local in local_strings(run):
            assert local.encode() not in data, f"{name} holds the local path {local}"


def files_of(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_export_push_uploads_the_export_exactly(run: Path, tmp_path: Path, hub_calls: dict) -> None:
    out = tmp_path / "support-bot"
    assert export_run(run, out, show_progress=False, push_to_hub="me/support-bot", private=True) == 0
    assert hub_calls["create"] == [{"repo_id": "me/support-bot", "token": "hf_test_token", "private": True,
                                    "repo_type": "model", "exist_ok": True}]
    [upload] = hub_calls["upload"]
    assert upload["repo_id"] == "me/support-bot" and upload["repo_type"] == "model"
    assert set(upload["files"]) == HF_FILES and upload["files"] == files_of(out)  # the local export, byte for byte

    meta, body = card_of(upload["files"]["README.md"].decode())
    assert meta == {"base_model": HUB_BASE, "library_name": "transformers", "pipeline_tag": "text-generation",
                    "tags": ["qlora", "lora", "qlora-kit"]}
    assert "`support-chats.jsonl`" in body and "private data" not in body
    assert "generation stops at: `<|im_end|>`" in body and "chat template: the one used in training" in body
    assert "## Export" in body and "Status: **passed**" in body and 'path = "me/support-bot"' in body
    report = json.loads(upload["files"]["export_report.json"])
    assert report["base"]["model"] == HUB_BASE and report["data"] == ["support-chats.jsonl"]
    assert report["eos_tokens"] == ["<|im_end|>"] and report["run"]["name"] == "chat-run"
    assert_nothing_local(upload["files"], run)

    manifest = json.loads((run / "manifest.json").read_text())  # the local facts stay with the run
    entry = manifest["exports"][-1]
    assert entry["dir"] == str(out) and entry["hub"] == "https://huggingface.co/me/support-bot"
    assert entry["base_source_dir"] == manifest["base"]["source_dir"] and entry["verification"] == "passed"


def test_gguf_export_push(run: Path, tmp_path: Path, hub_calls: dict) -> None:
    out = tmp_path / "support-gguf"
    assert export_run(run, out, fmt="gguf", show_progress=False, push_to_hub="me/support-gguf") == 0
    [upload] = hub_calls["upload"]
    assert set(upload["files"]) == {"README.md", "Modelfile", "export_report.json", "support-gguf-Q8_0.gguf"}
    assert upload["files"] == files_of(out) and hub_calls["create"][0]["private"] is False
    meta, body = card_of(upload["files"]["README.md"].decode())
    assert meta["base_model"] == HUB_BASE and meta["library_name"] == "gguf" and "gguf" in meta["tags"]
    assert "`<|im_end|>`" in body and "tokenizer.chat_template" in body and "llama-cli -hf me/support-gguf" in body
    assert_nothing_local(upload["files"], run)


def test_adapter_push(run: Path, hub_calls: dict, tmp_path: Path) -> None:
    from peft import PeftConfig

    assert push_path(run, "me/support-adapter", private=True) == "https://huggingface.co/me/support-adapter"
    [upload] = hub_calls["upload"]
    files = upload["files"]
    assert set(files) == ADAPTER_FILES and hub_calls["create"][0]["private"] is True
    assert files["adapter_model.safetensors"] == (run / "adapter" / "adapter_model.safetensors").read_bytes()
    meta, body = card_of(files["README.md"].decode())
    assert meta["base_model"] == HUB_BASE and meta["library_name"] == "peft"
    assert 'PeftModel.from_pretrained(base, "me/support-adapter")' in body and "`support-chats.jsonl`" in body
    assert "generation stops at: `<|im_end|>`" in body and "generation_config.json" not in body
    assert_nothing_local(files, run)
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    assert PeftConfig.from_pretrained(str(tmp_path)).base_model_name_or_path == HUB_BASE  # not the local path
    assert json.loads(files["adapter_config.json"]) | {"base_model_name_or_path": None} \
        == json.loads((run / "adapter" / "adapter_config.json").read_text()) | {"base_model_name_or_path": None}
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["pushes"][-1]["repo_id"] == "me/support-adapter"


def test_no_local_path_in_any_exported_file(run: Path, tmp_path: Path) -> None:
    """Local exports too: every byte of every file, weights included."""
    assert export_run(run, tmp_path / "hf", show_progress=False) == 0
    assert export_run(run, tmp_path / "gguf", fmt="gguf", quant="f16", show_progress=False) == 0
    for folder in (tmp_path / "hf", tmp_path / "gguf"):
        assert_nothing_local(files_of(folder), run)


def test_failed_push_leaves_the_export_complete(run: Path, tmp_path: Path, hub_calls: dict,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    import httpx2

    def refused(self: HfApi, *args, **kwargs):
        raise httpx2.ConnectError("[Errno 111] Connection refused")

    monkeypatch.setattr(HfApi, "create_repo", refused)
    out = tmp_path / "kept"
    with pytest.raises(hub.PushError) as err:
        export_run(run, out, verify=False, show_progress=False, push_to_hub="me/kept")
    assert f"the export in {out} is complete" in err.value.message
    assert err.value.hint.endswith(f"qlora-kit push {out} me/kept")
    assert set(files_of(out)) == HF_FILES and json.loads((out / "export_report.json").read_text())["format"] == "hf"
    entry = json.loads((run / "manifest.json").read_text())["exports"][-1]
    assert entry["dir"] == str(out) and entry["hub"] is None


def test_push_without_token_refused_before_exporting(run: Path, tmp_path: Path, hub_calls: dict,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HF_TOKEN")
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "none"))
    with pytest.raises(ConfigError, match="no Hugging Face token"):
        export_run(run, tmp_path / "never", show_progress=False, push_to_hub="me/never")
    assert not (tmp_path / "never").exists() and hub_calls == {"create": [], "upload": []}


def test_cli_push_errors(run: Path, tmp_path: Path) -> None:
    """Through the CLI: one error line and one fix line, with the documented exit codes."""
    no_login = {**ENV, "HF_HOME": str(tmp_path / "hf-empty"), "HF_TOKEN": ""}
    offline = run_cli("push", str(run), "me/x", env={**no_login, "HF_HUB_OFFLINE": "1"})
    assert offline.returncode == 2 and "error: cannot push: HF_HUB_OFFLINE is set" in offline.stderr
    assert "fix:" in offline.stderr
    no_token = run_cli("push", str(run), "me/x", env={**no_login, "HF_HUB_OFFLINE": "0"})
    assert no_token.returncode == 2 and "no Hugging Face token" in no_token.stderr and "fix:" in no_token.stderr
    private = run_cli("export", str(run), "--out", str(tmp_path / "x"), "--private", env=ENV)
    assert private.returncode == 2 and "--push-to-hub" in private.stderr
    # no network: a real connection to a closed port; the export is kept and the retry named
    out = tmp_path / "net"
    unreachable = {**ENV, "HF_HUB_OFFLINE": "0", "HF_TOKEN": "hf_x", "HF_ENDPOINT": "http://127.0.0.1:9"}
    done = run_cli("export", str(run), "--out", str(out), "--no-verify", "--push-to-hub", "me/net", env=unreachable)
    assert done.returncode == 7, done.stderr
    assert "error: cannot reach the Hub to push to me/net" in done.stderr
    assert f"fix: check the network (and HF_ENDPOINT / proxy settings), then: qlora-kit push {out} me/net" \
        in done.stderr
    assert set(files_of(out)) == HF_FILES and "Traceback" not in done.stderr
    again = run_cli("push", str(out), "me/net", env=unreachable)
    assert again.returncode == 7 and "cannot reach the Hub" in again.stderr


def test_an_export_that_failed_verification_is_not_pushed(run: Path, tmp_path: Path, hub_calls: dict,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    from qlora_kit.export import command

    monkeypatch.setattr(command, "verify_export", lambda *a, **k: {"status": "failed", "failures": ["made up"]})
    out = tmp_path / "bad"
    assert export_run(run, out, show_progress=False, push_to_hub="me/bad") == 5
    assert hub_calls == {"create": [], "upload": []} and (out / "export_report.json").is_file()
    with pytest.raises(ModelError, match="failed its verification"):
        push_path(out, "me/bad")
    assert hub_calls == {"create": [], "upload": []}
