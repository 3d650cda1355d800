"""Saving and pushing protected updates: `Trap2HubMixin` for the trainers, and the upload they share
with `trap2 card --push`.

What changes against the stock `Trainer`:
- every save writes the protection card (README.md) next to the weights, and re-applies it after TRL or
  transformers re-write README.md;
- files land in the output folder by rename (staged first), the card last: a crash leaves the old files
  or a folder whose card no longer matches, never a folder that looks complete but is not;
- training arguments are written as `training_args.json` without secrets; `training_args.bin` (a pickle
  that holds `hub_token`) is never written, and no pickle (optimizer/scheduler/RNG states included) is
  ever uploaded;
- the push saves locally first, then checks the token and the repo, then uploads; a missing token or a
  missing write access is a `HubPushError` that says how to fix it, and re-running the push finishes an
  interrupted upload (files already on the Hub are skipped).
"""

import contextlib
import importlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import safetensors.torch
from huggingface_hub import CommitOperationAdd, HfApi, get_token
from huggingface_hub.errors import HfHubHTTPError, LocalTokenNotFoundError
from transformers import PreTrainedModel
from transformers.trainer_utils import HubStrategy, SaveStrategy
from transformers.utils import PushInProgress

from .._warnings import xet_fallback_notice_silenced
from .card import (
    CARD_NAME,
    TRAINING_ARGS_JSON,
    ProtectionCardError,
    atomic_write_text,
    base_model_config,
    ordinary_permissions,
    read_protection,
    sha256_files,
    split_card,
    update_files,
    write_card,
)

logger = logging.getLogger(__name__)

# Formats that can hold a pickle (arbitrary code on load): never uploaded.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".joblib", ".npy", ".npz")
TRAINER_STATE_PICKLES = ("optimizer.", "scheduler.", "scaler.", "rng_state")
SAFE_SUFFIXES = (".safetensors", ".json", ".md", ".png", ".txt", ".jinja", ".yaml", ".model")
CARD_OPTIONS = ("license", "base_model", "finetuned_from", "audit", "audit_plot")


class HubPushError(RuntimeError):
    """A push to the Hub failed; the message says why and how to finish it. Nothing local is lost."""


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
        raise HubPushError(
            f"Cannot push to the Hugging Face Hub repo {repo_id!r}: no token found. Log in with `hf auth login`, "
            "set the HF_TOKEN environment variable, or pass hub_token=... (a token with write access). Nothing was "
            f"uploaded; {_resume_hint(repo_id, folder)}"
        )
    return token


def _resume_hint(repo_id: str, folder: str) -> str:
    return (
        f"the update and its card are kept in {folder!r}: run trainer.push_to_hub() again, or "
        f"`trap2 card {folder} --push {repo_id}`."
    )


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
        raise HubPushError(
            f"Cannot push to {repo_id!r}: no token found. Log in with `hf auth login` or set HF_TOKEN; "
            f"{_resume_hint(repo_id, folder)}"
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
        raise HubPushError(
            f"Upload to {repo_id!r} failed: {cause}. Nothing is lost: {_resume_hint(repo_id, folder)}"
        ) from err
    except _network_errors() as err:
        raise HubPushError(
            f"Upload to {repo_id!r} failed ({type(err).__name__}: {err}). "
            f"Nothing is lost: {_resume_hint(repo_id, folder)}"
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
        raise HubPushError(
            f"Upload to {repo_id!r} failed: {err} The storage the Hub sent the large files to {answer}. Files "
            f"already stored are not sent again. Nothing is lost: {_resume_hint(repo_id, folder)}"
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


# ----------------------------------------------------------------------------- the trainer mixin
class Trap2HubMixin:
    """Saves and pushes a protected update with its protection card; put it first in the bases.

    `hub_api` (optional) is the `HfApi` used for pushes, e.g. one with another endpoint. Card options
    (`license`, `base_model`, `audit` = dict or audit.json path, `audit_plot` = png path) are passed to
    `push_to_hub(...)` or `create_model_card(...)` and kept for later saves.
    """

    def __init__(self, *args, hub_api: HfApi | None = None, **kwargs):
        self._trap_hub_api = hub_api
        self._trap_card_options = {}
        super().__init__(*args, **kwargs)

    @property
    def trap_hub_api(self) -> HfApi:
        """The `hub_api` given, else one for the current endpoint (HF_ENDPOINT), kept while it stays the same."""
        if self._trap_hub_api is not None:
            return self._trap_hub_api
        from huggingface_hub import constants

        from .. import __version__

        cached = getattr(self, "_trap_default_api", None)
        if cached is None or cached.endpoint != constants.ENDPOINT:
            self._trap_default_api = HfApi(library_name="trap2_hf", library_version=__version__)
        return self._trap_default_api

    # ----------------------------------------------------------------------------- facts for the card
    def _trap_update_kind(self) -> str:
        if self.args.trap_target == "full":
            return "full"
        model = self.accelerator.unwrap_model(self.model)
        active = getattr(model, "active_adapter", "default")
        config = model.peft_config[active if isinstance(active, str) else active[0]]
        peft_type = getattr(config.peft_type, "value", config.peft_type)
        return str(peft_type).lower()

    def _trap_base_model(self):
        model = self.accelerator.unwrap_model(self.model)
        return model.get_base_model() if hasattr(model, "get_base_model") else model

    def _trap_repo_id(self) -> str | None:
        return getattr(self, "hub_model_id", None) or self.args.hub_model_id

    def _trap_write_card(self, folder: str, *, sha256=None, existing=None, metadata=None) -> None:
        options = dict(self._trap_card_options)
        base = self._trap_base_model()
        name = getattr(base.config, "_name_or_path", "") or ""
        base_model = options.pop("base_model", None) or (name if name and not os.path.isdir(name) else None)
        repo_id = self._trap_repo_id()
        write_card(
            folder,
            self.args.trap_settings_dict(),
            update=self._trap_update_kind(),
            sha256=sha256,
            existing=existing,
            base_model_config=base_model_config(base.config),
            base_model=base_model,
            repo_id=repo_id,
            model_name=repo_id.split("/")[-1] if repo_id else Path(self.args.output_dir).name,
            metadata=metadata,
            **options,
        )

    def _trap_take_card_options(self, kwargs: dict, accepted) -> None:
        if kwargs.get("base_model") and "finetuned_from" in accepted:  # the Trainer's own card names it too
            kwargs.setdefault("finetuned_from", kwargs["base_model"])
        for key in CARD_OPTIONS:
            if key in kwargs and kwargs[key] is not None:
                value = kwargs[key] if key in accepted else kwargs.pop(key)
                self._trap_card_options["base_model" if key == "finetuned_from" else key] = value
            elif key in kwargs and key not in accepted:
                kwargs.pop(key)

    # ----------------------------------------------------------------------------- saving
    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        savable = isinstance(model, PreTrainedModel) or hasattr(model, "peft_config")
        if not self.args.should_save:
            if getattr(self, "is_distributed_loading_by_transformers", False) and savable:
                model.save_pretrained(output_dir, state_dict=state_dict, is_main_process=False)
            return
        os.makedirs(output_dir, exist_ok=True)
        logger.info("Saving the protected update to %s", output_dir)
        if state_dict is None and not (isinstance(self.model, PreTrainedModel) or hasattr(self.model, "peft_config")):
            state_dict = self.model.state_dict()
        staging = tempfile.mkdtemp(dir=output_dir, prefix=".trap2-staging-")
        try:
            if savable:
                model.save_pretrained(staging, state_dict=state_dict, is_main_process=True)
            else:
                safetensors.torch.save_file(
                    state_dict, os.path.join(staging, "model.safetensors"), metadata={"format": "pt"}
                )
            tokenizer = self.processing_class or getattr(self.data_collator, "tokenizer", None)
            if tokenizer is not None:
                tokenizer.save_pretrained(staging)
            metadata = _pop_card_metadata(os.path.join(staging, CARD_NAME))
            secrets = (self.args.hub_token,)
            atomic_write_text(os.path.join(staging, TRAINING_ARGS_JSON), training_args_json(self.args, secrets))
            sha256 = sha256_files(staging)
            existing = _read_text(os.path.join(output_dir, CARD_NAME))
            _move_into(staging, output_dir)
            self._trap_write_card(output_dir, sha256=sha256, existing=existing, metadata=metadata)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def create_model_card(self, *args, **kwargs):
        import inspect

        accepted = inspect.signature(super().create_model_card).parameters
        self._trap_take_card_options(kwargs, accepted)
        if not self.is_world_process_zero():
            return
        # The checksums stay those recorded when the files were saved; the text around them may change.
        sha256 = self._trap_recorded_sha256(self.args.output_dir)
        super().create_model_card(*args, **kwargs)
        self._trap_write_card(self.args.output_dir, sha256=sha256)

    # ----------------------------------------------------------------------------- pushing
    def init_hf_repo(self, token: str | None = None, private: bool | None = None) -> None:
        if not self.is_world_process_zero():
            return
        repo_name = self.args.hub_model_id or Path(self.args.output_dir).absolute().name
        token = token if token is not None else self.args.hub_token
        private = private if private is not None else self.args.hub_private_repo
        api, folder = self.trap_hub_api, self.args.output_dir
        self.hub_model_id = create_repo(api, repo_name, folder, token=token, private=private)
        self.push_in_progress = None

    def push_to_hub(
        self,
        commit_message: str | None = "End of training",
        blocking: bool = True,
        token: str | None = None,
        revision: str | None = None,
        private: bool | None = None,
        **kwargs,
    ):
        """Save the update and its card in `output_dir`, then upload them (never a pickle)."""
        self.callback_handler.on_push_begin(self.args, self.state, self.control)
        token = token if token is not None else self.args.hub_token
        model_name = kwargs.pop("model_name", None)
        if model_name is None and self.args.should_save:
            model_name = (self.args.hub_model_id or self.args.output_dir).rstrip("/").split("/")[-1]
        self.save_model(_internal_call=True)
        if not self.is_world_process_zero():
            return None
        model_tags = getattr(self.model, "model_tags", None)
        if model_tags:
            tags = kwargs.get("tags") or []
            tags = [tags] if isinstance(tags, str) else list(tags)
            kwargs["tags"] = tags + [t for t in model_tags if t not in tags]
        self.create_model_card(model_name=model_name, **kwargs)
        card_repo = self._trap_repo_id()
        if getattr(self, "hub_model_id", None) is None:
            self.init_hf_repo(token=token, private=private)
        if self.hub_model_id != card_repo:
            self._trap_write_card(self.args.output_dir, sha256=self._trap_recorded_sha256(self.args.output_dir))
        self._finish_current_push()
        return upload_folder(
            self.trap_hub_api,
            self.args.output_dir,
            self.hub_model_id,
            token=token,
            commit_message=commit_message or "End of training",
            revision=revision if revision is not None else self.args.hub_revision,
            run_as_future=not blocking,
            secrets=(self.args.hub_token,),
        )

    def _trap_recorded_sha256(self, folder: str) -> dict | None:
        path = os.path.join(folder, CARD_NAME)
        text = _read_text(path)
        try:
            return read_protection(text, path)["sha256"] if text else None
        except ProtectionCardError:
            return None

    def _push_from_checkpoint(self, checkpoint_folder: str) -> None:
        if not self.is_world_process_zero() or self.args.hub_strategy == HubStrategy.END:
            return
        if not self.args.hub_always_push and self.push_in_progress is not None and not self.push_in_progress.is_done():
            return
        self.callback_handler.on_push_begin(self.args, self.state, self.control)
        output_dir = self.args.output_dir
        names = update_files(checkpoint_folder)
        existing = _read_text(os.path.join(output_dir, CARD_NAME))
        _remove(os.path.join(output_dir, CARD_NAME))
        for name in names:
            _atomic_copy(os.path.join(checkpoint_folder, name), os.path.join(output_dir, name))
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        atomic_write_text(
            os.path.join(output_dir, TRAINING_ARGS_JSON), training_args_json(self.args, (self.args.hub_token,))
        )
        self._trap_write_card(output_dir, sha256=sha256_files(output_dir, names), existing=existing)
        if self.args.save_strategy == SaveStrategy.STEPS:
            commit_message = f"Training in progress, step {self.state.global_step}"
        else:
            commit_message = f"Training in progress, epoch {int(self.state.epoch)}"
        api, repo_id = self.trap_hub_api, self.hub_model_id
        common = dict(token=self.args.hub_token, revision=self.args.hub_revision, run_as_future=True)
        jobs = [upload_folder(api, output_dir, repo_id, commit_message=commit_message, **common)]
        if self.args.hub_strategy in (HubStrategy.CHECKPOINT, HubStrategy.ALL_CHECKPOINTS):
            path_in_repo = (
                "last-checkpoint" if self.args.hub_strategy == HubStrategy.CHECKPOINT else Path(checkpoint_folder).name
            )
            jobs.append(
                upload_folder(
                    api,
                    checkpoint_folder,
                    repo_id,
                    commit_message=commit_message + ", checkpoint",
                    path_in_repo=path_in_repo,
                    **common,
                )
            )
        if self.push_in_progress is None or self.push_in_progress.is_done():
            self.push_in_progress = PushInProgress(jobs)
        else:
            self.push_in_progress.jobs.extend(jobs)


def _read_text(path: str) -> str | None:
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return f.read()


def _remove(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.remove(path)


def _atomic_copy(source: str, target: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(target)), prefix=".trap2-", suffix=".tmp")
    os.close(fd)
    try:
        shutil.copyfile(source, tmp)
        ordinary_permissions(tmp)
        os.replace(tmp, target)
    finally:
        _remove(tmp)


def _pop_card_metadata(path: str) -> dict | None:
    """The metadata of the card PEFT writes on save (its body is a template we replace)."""
    text = _read_text(path)
    if text is None:
        return None
    os.remove(path)
    return split_card(text)[0]


def _move_into(staging: str, output_dir: str) -> None:
    """Rename the staged files into `output_dir`. The stale card goes first: until the new one is
    written last, the folder does not claim to be complete."""
    _remove(os.path.join(output_dir, CARD_NAME))
    for root, _, files in os.walk(staging):
        for name in files:
            source = os.path.join(root, name)
            target = os.path.join(output_dir, os.path.relpath(source, staging))
            os.makedirs(os.path.dirname(target), exist_ok=True)
            ordinary_permissions(source)
            os.replace(source, target)
