"""What leaves the machine, and how: the upload policy shared by `Trap2HubMixin` and `trap2 card --push`.

- the update is saved locally first; uploads only read what is on disk;
- no pickle (optimizer/scheduler/RNG states included), no hidden or private (`_*`) entry and no
  `checkpoint-*` folder is uploaded, and a file that holds the Hub token is refused;
- training arguments are written as `training_args.json` without secrets (`training_args.bin`, a
  pickle that holds `hub_token`, is never written);
- a missing token or a missing write access is a `HubPushError` that says how to fix it, and re-running
  the push finishes an interrupted upload (files already on the Hub are skipped);
- huggingface_hub's notice that open files go over HTTP rather than xet is dropped during our commits.
"""

import contextlib
import importlib
import json
import logging
import os
from pathlib import Path

from huggingface_hub import CommitOperationAdd, HfApi, get_token
from huggingface_hub.errors import HfHubHTTPError, LocalTokenNotFoundError

from .._warnings import xet_fallback_notice_silenced

logger = logging.getLogger(__name__)

# Formats that can hold a pickle (arbitrary code on load): never uploaded.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".joblib", ".npy", ".npz")
TRAINER_STATE_PICKLES = ("optimizer.", "scheduler.", "scaler.", "rng_state")
SAFE_SUFFIXES = (".safetensors", ".json", ".md", ".png", ".txt", ".jinja", ".yaml", ".model")
TRAINING_ARGS_JSON = "training_args.json"


class HubPushError(RuntimeError):
    """A push to the Hub failed; the message says why and how to finish it. Nothing local is lost.

    `cli_message` says the same in command-line words (`hf auth login`, HF_TOKEN, the `trap2` command to re-run),
    for the commands, which print it instead (`cli_errors`)."""

    def __init__(self, message: str, cli_message: str | None = None):
        super().__init__(message)
        self.cli_message = cli_message or message


def _push_error(message: str, repo_id: str, folder: str) -> HubPushError:
    """A `HubPushError` from a message with `{login}` (where a token comes from) and `{resume}` (how to finish
    the push) left to fill: in Python's words, and in the command line's."""
    python = dict(
        login="Log in with `hf auth login`, set the HF_TOKEN environment variable, or pass hub_token=...",
        resume=f"the update and its card are kept in {folder!r}: run trainer.push_to_hub() again, or "
        f"`trap2 card {folder} --push {repo_id}`.",
    )
    command = dict(
        login="Log in with `hf auth login` or set the HF_TOKEN environment variable",
        resume=f"the update and its card are kept in {folder!r}: run `trap2 card {folder} --push {repo_id}` again.",
    )
    return HubPushError(message.format(**python), message.format(**command))


# ----------------------------------------------------------------------------- what may leave the machine
def uploadable_files(folder: str) -> list[str]:
    """Files under `folder` that may be uploaded, as repo paths: no pickles, no hidden or private
    (`_*`) entries, no `checkpoint-*` folders."""
    found = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith((".", "_", "checkpoint-")))
        for name in sorted(files):
            path = os.path.join(root, name)
            if name.startswith((".", "_")):
                continue
            if _is_pickle(path):
                # The Trainer's own resume state (optimizer, scheduler, RNG) is expected; anything else is news.
                log = logger.info if name.startswith(TRAINER_STATE_PICKLES) else logger.warning
                log("Not uploading %s: pickle files are never uploaded (use safetensors or json).", path)
                continue
            found.append(Path(os.path.relpath(path, folder)).as_posix())
    return found


def _is_pickle(path: str) -> bool:
    if path.endswith(PICKLE_SUFFIXES):
        return True
    if path.endswith(SAFE_SUFFIXES):
        return False
    with open(path, "rb") as f:
        head = f.read(4)
    # A pickle starts with PROTO (0x80, version 2-5); torch.save writes a zip of pickles.
    return (head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05")) or head == b"PK\x03\x04"


def training_args_json(args, secrets: tuple[str, ...] = ()) -> str:
    """Training arguments as JSON, with every key that contains 'token' removed and any known secret
    value redacted."""
    secrets = tuple(s for s in secrets if isinstance(s, str) and s)

    def clean(value):
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items() if "token" not in str(k).lower()}
        if isinstance(value, (list, tuple)):
            return [clean(v) for v in value]
        if isinstance(value, str) and any(s in value for s in secrets):
            return "<redacted>"
        return value

    return json.dumps(clean(args.to_dict()), indent=2, sort_keys=True, default=str) + "\n"


# ----------------------------------------------------------------------------- talking to the Hub
def resolve_token(token: str | None, repo_id: str, folder: str) -> str:
    token = token or get_token()
    if not token:
        raise _push_error(
            f"Cannot push to the Hugging Face Hub repo {_braced(repo_id)!r}: no token found. {{login}} (a token with "
            "write access). Nothing was uploaded; {resume}",
            repo_id,
            folder,
        )
    return token


def _braced(text: str) -> str:
    """`text` inside a message that is formatted later."""
    return str(text).replace("{", "{{").replace("}", "}}")


def _network_errors() -> tuple:
    """Connection errors and timeouts: OSError plus the HTTP client's (httpx2 for huggingface_hub 2, httpx for 1)."""
    errors = [OSError]
    for module in ("httpx2", "httpx"):
        with contextlib.suppress(ImportError):
            errors.append(importlib.import_module(module).HTTPError)
    return tuple(errors)


@contextlib.contextmanager
def hub_errors(repo_id: str, folder: str):
    """Turn Hub failures into a `HubPushError` that names the cause and the fix."""
    try:
        yield
    except HubPushError:
        raise
    except LocalTokenNotFoundError as err:
        raise _push_error(
            f"Cannot push to {_braced(repo_id)!r}: no token found. {{login}}; {{resume}}", repo_id, folder
        ) from err
    except HfHubHTTPError as err:
        status = err.response.status_code if err.response is not None else None
        if status == 401:
            cause = (
                "the token was rejected (invalid, expired or revoked). Create a token with write access at "
                "https://huggingface.co/settings/tokens and log in with `hf auth login`"
            )
        elif status == 403:
            cause = (
                f"the token has no write access to {repo_id!r} (a read-only token, or a namespace you cannot "
                "write to). Use a token with write access (https://huggingface.co/settings/tokens) or push to a "
                "repo in your own namespace"
            )
        else:
            cause = f"the Hub answered {status}: {str(err).splitlines()[0]}"
        raise _push_error(
            f"Upload to {_braced(repo_id)!r} failed: {_braced(cause)}. Nothing is lost: {{resume}}", repo_id, folder
        ) from err
    except _network_errors() as err:
        raise _push_error(
            f"Upload to {_braced(repo_id)!r} failed ({type(err).__name__}: {_braced(err)}). Nothing is lost: {{resume}}",
            repo_id,
            folder,
        ) from err
    except RuntimeError as err:
        # huggingface_hub wraps a failed LFS upload (large files go to the Hub's storage, not its API) in a
        # RuntimeError; the storage's answer (e.g. an expired upload URL) is no verdict on the token.
        cause = err.__cause__
        if not isinstance(cause, (HfHubHTTPError, *_network_errors())):
            raise
        if isinstance(cause, HfHubHTTPError):
            answer = f"answered {str(cause).splitlines()[0].rstrip('.')}"
        else:
            answer = f"could not be reached ({type(cause).__name__}: {cause})"
        raise _push_error(
            f"Upload to {_braced(repo_id)!r} failed: {_braced(err)} The storage the Hub sent the large files to "
            f"{_braced(answer)}. Files already stored are not sent again. Nothing is lost: {{resume}}",
            repo_id,
            folder,
        ) from err


def create_repo(api: HfApi, repo_id: str, folder: str, *, token: str | None, private: bool | None = None) -> str:
    """Create (or find) the repo; returns its full id (namespace/name)."""
    token = resolve_token(token, repo_id, folder)
    with hub_errors(repo_id, folder):
        return api.create_repo(repo_id, token=token, private=private, exist_ok=True).repo_id


def upload_folder(
    api: HfApi,
    folder: str,
    repo_id: str,
    *,
    token: str | None,
    commit_message: str,
    revision: str | None = None,
    path_in_repo: str = "",
    run_as_future: bool = False,
    secrets: tuple[str, ...] = (),
):
    """One commit with the uploadable files of `folder`; files already on the Hub are skipped.

    Files are opened now, so a save that replaces them during an asynchronous push does not mix versions.
    """
    token = resolve_token(token, repo_id, folder)
    names = uploadable_files(folder)
    _refuse_secrets(folder, names, (token, *secrets))
    handles = [open(os.path.join(folder, name), "rb") for name in names]
    operations = [
        CommitOperationAdd(path_in_repo=f"{path_in_repo}/{name}" if path_in_repo else name, path_or_fileobj=handle)
        for name, handle in zip(names, handles)
    ]

    def commit():
        try:
            with xet_fallback_notice_silenced():
                return api.create_commit(
                    repo_id, operations, commit_message=commit_message, token=token, revision=revision
                )
        finally:
            for handle in handles:
                handle.close()

    if run_as_future:
        future = api.run_as_future(commit)
        future.add_done_callback(lambda f: _log_failed_push(f, repo_id, folder))
        return future
    with hub_errors(repo_id, folder):
        return commit()


def _log_failed_push(future, repo_id: str, folder: str) -> None:
    if not future.cancelled() and future.exception() is not None:
        logger.error(
            "A background push of %s to %s failed (%s); the next push uploads it again.",
            folder,
            repo_id,
            future.exception(),
        )


def _refuse_secrets(folder: str, names: list[str], secrets: tuple) -> None:
    secrets = [s.encode() for s in secrets if isinstance(s, str) and len(s) >= 8]
    for name in names:
        if name.endswith(".safetensors"):
            continue
        with open(os.path.join(folder, name), "rb") as f:
            data = f.read()
        if any(s in data for s in secrets):
            raise HubPushError(
                f"Refusing to upload {os.path.join(folder, name)}: it contains your Hub token. Remove the token "
                "from that file (and revoke the token if it was shared), then push again."
            )
