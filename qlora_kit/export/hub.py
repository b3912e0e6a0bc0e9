"""Publishing to the Hugging Face Hub with ``huggingface_hub``: an export, or a run's adapter alone.

What is uploaded is a finished folder on disk, checked first for local paths
(``portable.check_portable``); ``huggingface_hub`` does the transport (``HfApi.create_repo``,
``HfApi.upload_folder``).  What can be known before a long export is checked first
(:func:`check_can_push`: the repository id, offline mode, a token); what only the Hub can say
(a refusal, no network) comes after the local export is complete, as one :class:`PushError`
whose fix is the command that pushes the same folder again without exporting again.
"""

from __future__ import annotations

import logging
from pathlib import Path

from qlora_kit.core.errors import EXIT_PUSH_FAILED, ConfigError, QloraKitError
from qlora_kit.export.portable import check_portable

log = logging.getLogger("qlora_kit")

TOKEN_FIX = ("set HF_TOKEN to a token with write access, or run `hf auth login` "
             "(tokens: https://huggingface.co/settings/tokens)")
REPO_FIX = "name it ORG/NAME or USER/NAME, e.g. my-org/llama31-support-bot"


class PushError(QloraKitError):
    """The Hub could not be reached or refused the upload; what was exported locally is complete."""

    exit_code = EXIT_PUSH_FAILED


def check_can_push(repo_id: str) -> str:
    """Check what can be checked without the network; return the token to push with.

    The token is ``huggingface_hub``'s own: ``HF_TOKEN``, else the stored login (``hf auth login``).

    Raises:
        ConfigError: ``repo_id`` is not ``org/name``, offline mode is on, or there is no token
            (exit 2: nothing was exported or pushed yet).
    """
    import huggingface_hub
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    if repo_id.count("/") != 1:
        raise ConfigError(f"{repo_id!r} is not a Hub repository id of the form ORG/NAME", REPO_FIX)
    try:
        validate_repo_id(repo_id)
    except HFValidationError as exc:
        raise ConfigError(f"{repo_id!r} is not a valid Hub repository id ({str(exc).splitlines()[0][:160]})",
                          REPO_FIX) from None
    if huggingface_hub.is_offline_mode():
        raise ConfigError("cannot push: HF_HUB_OFFLINE is set, so the Hub is not contacted",
                          "run with HF_HUB_OFFLINE=0 to push (exporting without --push-to-hub works offline)")
    try:
        token = huggingface_hub.get_token()
    except Exception as exc:  # an OIDC exchange (HF_OIDC_RESOURCE) that failed
        raise ConfigError(f"cannot push: no usable Hugging Face token ({type(exc).__name__}: "
                          f"{str(exc).splitlines()[0][:160] if str(exc) else ''})", TOKEN_FIX) from None
    if not token:
        raise ConfigError("cannot push: no Hugging Face token (HF_TOKEN is not set and there is no stored login)",
                          TOKEN_FIX)
    return token


def push_folder(folder: Path, repo_id: str, token: str, private: bool, local: list[str], message: str,
                again: str, *, exported: bool = False) -> str:
    """Create ``repo_id`` if needed (``private`` when new) and upload every file of ``folder``; return its URL.

    ``local``: absolute paths that must not appear in any uploaded file.  ``again``: the command
    that retries the upload, named in the error.  ``exported``: ``folder`` is a finished local
    export (the error says it is complete).

    Raises:
        OutputError: a file names a local path (nothing is uploaded).
        PushError: no network, or the Hub refused (its status and reason, and the fix).
    """
    from huggingface_hub import HfApi

    check_portable(folder, local, again)
    api = HfApi(token=token)
    log.info("pushing %s to the Hub repository %s ...", folder, repo_id)
    try:
        url = api.create_repo(repo_id, private=private, repo_type="model", exist_ok=True)
        api.upload_folder(repo_id=repo_id, folder_path=str(folder), repo_type="model", commit_message=message)
    except Exception as exc:
        error = push_error(exc, repo_id, again, folder if exported else None)
        if error is None:
            raise
        raise error from exc
    return str(url)


def push_error(exc: BaseException, repo_id: str, again: str, export: Path | None = None) -> PushError | None:
    """The one-line error for a failed upload; None for an exception that is not about the Hub (a bug)."""
    from huggingface_hub import errors

    kept = f"; the export in {export} is complete" if export is not None else ""
    if isinstance(exc, errors.OfflineModeIsEnabled):
        return PushError(f"cannot push to {repo_id}: HF_HUB_OFFLINE is set{kept}",
                         f"run with HF_HUB_OFFLINE=0: {again}")
    if isinstance(exc, errors.HfHubHTTPError):
        status = getattr(getattr(exc, "response", None), "status_code", None)
        reason = _first_line(getattr(exc, "server_message", None) or str(exc))
        said = f"the Hub refused the push to {repo_id} (HTTP {status}: {reason}){kept}"
        return PushError(said, _refusal_fix(status, repo_id, again))
    transport = getattr(errors, "HTTPError", None)  # the HTTP client's base error (huggingface_hub >= 1.0)
    if isinstance(exc, (ConnectionError, TimeoutError, OSError)) or (transport and isinstance(exc, transport)):
        return PushError(f"cannot reach the Hub to push to {repo_id} ({type(exc).__name__}: "
                         f"{_first_line(str(exc))}){kept}",
                         f"check the network (and HF_ENDPOINT / proxy settings), then: {again}")
    return None


def _refusal_fix(status: int | None, repo_id: str, again: str) -> str:
    owner = repo_id.split("/")[0]
    if status == 401:
        return f"the token was not accepted: {TOKEN_FIX}; then: {again}"
    if status == 403:
        return f"use a token with write access to {owner} (a write or fine-grained token); then: {again}"
    if status == 404:
        return f"check that the user or organisation {owner} exists and that your token may write to it; then: {again}"
    if status == 409:
        return f"{repo_id} conflicts with an existing repository (another type, or a commit in progress); " \
               f"choose another name or try again: {again}"
    if status == 429 or (status or 0) >= 500:
        return f"the Hub is busy or failing; try again later: {again}"
    return f"check the repository name and your rights on it, then: {again}"


def _first_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[0][:200] if lines else "no reason given"
