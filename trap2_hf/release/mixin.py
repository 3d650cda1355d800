"""`Trap2HubMixin`: the trainers' saves and pushes, each with the protection card.

What changes against the stock `Trainer`:
- every save writes the protection card (README.md) next to the weights, and re-applies it after TRL or
  transformers re-write README.md;
- files land in the output folder by rename (staged first), the card last: a crash leaves the old files
  or a folder whose card no longer matches, never a folder that looks complete but is not;
- pushes follow upload.py's policy (saved locally first, never a pickle or a secret).

The mixin asks one thing of the trainer it is mixed into besides the `Trainer` API and settings-bearing
`args` (`trap_settings_dict()`): `trap_card_kind()`, the `update` the card records. `Trap2TrainerMixin`, listed
before it in the bases, answers from its update kind; the fallback here reads the model's PEFT config.
"""

import logging
import os
import shutil
import tempfile
from pathlib import Path

import safetensors.torch
from huggingface_hub import HfApi
from transformers import PreTrainedModel
from transformers.trainer_utils import HubStrategy, SaveStrategy
from transformers.utils import PushInProgress

from ..files import atomic_copy, atomic_write_text, move_into, read_text, remove, sha256_files, update_files
from .card import CARD_NAME, split_card, write_card
from .protection import ProtectionCardError, base_model_config, read_protection
from .upload import TRAINING_ARGS_JSON, create_repo, training_args_json, upload_folder

logger = logging.getLogger(__name__)

CARD_OPTIONS = ("license", "base_model", "finetuned_from", "audit", "audit_plot")


class Trap2HubMixin:
    """Saves and pushes a protected update with its protection card; put it before the Trainer class in the bases.

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
    def trap_card_kind(self) -> str:
        """The `update` the card records: the adapter's PEFT type in lower case ("lora", "loha", ...), or "full"
        for a model without one. The one fact the mixin asks of its trainer: `Trap2TrainerMixin` answers it from
        its update kind (`updates.py`); this fallback serves any other Trainer it is mixed with."""
        model = self.accelerator.unwrap_model(self.model)
        config = getattr(model, "peft_config", None)
        if not config:
            return "full"
        active = getattr(model, "active_adapter", "default")
        peft_type = config[active if isinstance(active, str) else active[0]].peft_type
        return str(getattr(peft_type, "value", peft_type)).lower()

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
            update=self.trap_card_kind(),
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
            existing = read_text(os.path.join(output_dir, CARD_NAME))
            move_into(staging, output_dir, first_removed=CARD_NAME)
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
        text = read_text(path)
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
        existing = read_text(os.path.join(output_dir, CARD_NAME))
        remove(os.path.join(output_dir, CARD_NAME))
        for name in names:
            atomic_copy(os.path.join(checkpoint_folder, name), os.path.join(output_dir, name))
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


def _pop_card_metadata(path: str) -> dict | None:
    """The metadata of the card PEFT writes on save (its body is a template we replace)."""
    text = read_text(path)
    if text is None:
        return None
    os.remove(path)
    return split_card(text)[0]
