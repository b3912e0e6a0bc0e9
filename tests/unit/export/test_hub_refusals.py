"""Publishing to the Hub: every refusal is one error line with its fix, checked offline.

The Hub's answers are real ``huggingface_hub`` exceptions, made by its own
``hf_raise_for_status`` from HTTP responses, raised where ``HfApi`` would raise them.
"""

from __future__ import annotations

from pathlib import Path

import httpx2
import pytest
from huggingface_hub import HfApi, constants
from huggingface_hub.errors import OfflineModeIsEnabled
from huggingface_hub.utils import hf_raise_for_status

from qlora_kit.core.errors import EXIT_PUSH_FAILED, EXIT_USER_ERROR, ConfigError, OutputError
from qlora_kit.export import hub
from qlora_kit.export.portable import leaks, machine_paths, public_data_name

AGAIN = "qlora-kit push out/x me/x"


@pytest.fixture
def online(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Online mode, a token in HF_TOKEN and no stored login (this machine's own is never read)."""
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-login" / "token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(tmp_path / "no-login" / "stored_tokens"))
    for name in ("HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_TOKEN", "hf_from_env")


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    out = tmp_path / "export"
    out.mkdir()
    (out / "README.md").write_text("---\nlibrary_name: transformers\n---\n# x\n")
    return out


def hub_answer(status: int, code: str | None = None) -> Exception:
    """The exception huggingface_hub raises for this HTTP answer of the Hub."""
    headers = {"X-Error-Message": "denied by the test"} | ({"X-Error-Code": code} if code else {})
    response = httpx2.Response(status, headers=headers, json={"error": "denied by the test"},
                               request=httpx2.Request("POST", "https://huggingface.co/api/repos/create"))
    try:
        hf_raise_for_status(response)
    except Exception as exc:
        return exc
    raise AssertionError("hf_raise_for_status did not raise")


def raise_(exc: BaseException):
    def fail(*args, **kwargs):
        raise exc
    return fail


@pytest.mark.parametrize("repo_id", ["just-a-name", "a/b/c", "org/bad name", "org/"])
def test_repository_id_must_be_org_slash_name(repo_id: str, online: None) -> None:
    with pytest.raises(ConfigError) as err:
        hub.check_can_push(repo_id)
    assert err.value.exit_code == EXIT_USER_ERROR and "ORG/NAME" in err.value.hint


def test_offline_mode_is_refused_before_anything(online: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ConfigError, match="HF_HUB_OFFLINE") as err:
        hub.check_can_push("me/model")
    assert "HF_HUB_OFFLINE=0" in err.value.hint


def test_no_token_is_one_line_with_the_fix(online: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HF_TOKEN")
    with pytest.raises(ConfigError, match="no Hugging Face token") as err:
        hub.check_can_push("me/model")
    assert "HF_TOKEN" in err.value.hint and "hf auth login" in err.value.hint


def test_token_from_env_then_stored_login(online: None, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert hub.check_can_push("me/model") == "hf_from_env"
    monkeypatch.delenv("HF_TOKEN")
    login = tmp_path / "login" / "token"
    login.parent.mkdir()
    login.write_text("hf_stored_login\n")
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(login))
    assert hub.check_can_push("me/model") == "hf_stored_login"


@pytest.mark.parametrize("status, code, says, fix", [
    (401, None, "HTTP 401", "token was not accepted"),
    (403, None, "HTTP 403", "write access to me"),
    (404, "RepoNotFound", "HTTP 404", "organisation me exists"),
    (409, None, "HTTP 409", "conflicts"),
    (500, None, "HTTP 500", "try again later"),
])
@pytest.mark.parametrize("where", ["create_repo", "upload_folder"])
def test_hub_refusals(status: int, code: str | None, says: str, fix: str, where: str, online: None, folder: Path,
                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(HfApi, "create_repo", lambda self, *a, **k: "https://huggingface.co/me/x")
    monkeypatch.setattr(HfApi, where, raise_(hub_answer(status, code)))
    with pytest.raises(hub.PushError) as err:
        hub.push_folder(folder, "me/x", "hf_token", False, [], "msg", AGAIN, exported=True)
    message, hint = err.value.message, err.value.hint
    assert err.value.exit_code == EXIT_PUSH_FAILED
    assert says in message and "me/x" in message and "denied by the test" in message
    assert f"the export in {folder} is complete" in message
    assert fix in hint and hint.endswith(AGAIN)
    assert "\n" not in message + hint


@pytest.mark.parametrize("exc, says", [
    (httpx2.ConnectError("[Errno 111] Connection refused"), "cannot reach the Hub"),
    (httpx2.ReadTimeout("timed out"), "cannot reach the Hub"),
    (ConnectionResetError(104, "Connection reset by peer"), "cannot reach the Hub"),
    (OfflineModeIsEnabled("offline"), "HF_HUB_OFFLINE is set"),
])
def test_no_network(exc: Exception, says: str, online: None, folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(HfApi, "create_repo", raise_(exc))
    with pytest.raises(hub.PushError, match=says) as err:
        hub.push_folder(folder, "me/x", "hf_token", False, [], "msg", AGAIN)
    assert err.value.hint.endswith(AGAIN) and "is complete" not in err.value.message


def test_a_bug_is_not_dressed_as_a_hub_error(online: None, folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(HfApi, "create_repo", raise_(KeyError("bug")))
    with pytest.raises(KeyError):
        hub.push_folder(folder, "me/x", "hf_token", False, [], "msg", AGAIN)


def test_a_local_path_in_any_file_stops_the_upload(online: None, folder: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    monkeypatch.setattr(HfApi, "create_repo", lambda self, *a, **k: calls.append(a))
    secret = tmp_path / "private" / "data"
    (folder / "sub").mkdir()
    (folder / "sub" / "notes.json").write_text(f'{{"data": "{secret}/rows.jsonl"}}')
    with pytest.raises(OutputError) as err:
        hub.push_folder(folder, "me/x", "hf_token", False, machine_paths(secret), "msg", AGAIN)
    assert "sub/notes.json" in err.value.message and str(secret) in err.value.message
    assert err.value.hint.startswith("remove that path") and AGAIN in err.value.hint
    assert calls == []  # nothing reached the Hub


def test_leak_scan_matches_whole_paths_only(tmp_path: Path) -> None:
    (tmp_path / "a.json").write_text('{"x": "/home/me/datasets-v2/b", "y": "/home/meg/c"}')
    assert leaks(tmp_path, ["/home/me/data"]) == []  # a longer name is another path
    assert leaks(tmp_path, ["/home/me"]) == [("a.json", "/home/me")]
    assert "/tmp" not in machine_paths("/tmp", "/data")  # too short to tell from text


@pytest.mark.parametrize("label, name", [
    ("/home/me/work/support-chats.jsonl", "support-chats.jsonl"),
    ("my-org/support-chats [train]", "my-org/support-chats"),
    ("squad [validation]", "squad"),
    ("data/rows.jsonl", "rows.jsonl"),
])
def test_data_is_named_never_located(label: str, name: str) -> None:
    assert public_data_name(label) == name
