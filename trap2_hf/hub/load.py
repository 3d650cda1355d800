"""Pulling a protected adapter: plain `PeftModel.from_pretrained`, after the card has been read and the
files checked against the sha256 it recorded at save."""

import os

from .._warnings import peft_deprecation_silenced
from ..choices import card_target
from ..files import (
    ADAPTER_WEIGHTS,
    ChecksumMismatchError,
    checkpoint_folders,
    is_model_folder,
    missing_folder_hint,
    verify_checksums,
)
from ..release.card import CARD_NAME
from ..release.protection import ProtectionCardError, base_model_config, read_protection

# Keyword arguments that choose which files to fetch; the others go to `PeftModel.from_pretrained`.
DOWNLOAD_KWARGS = ("revision", "token", "cache_dir", "force_download", "local_files_only", "endpoint")


class BaseModelMismatchError(ValueError):
    """The base model is not the one the protected update was trained on."""


def load_protected_adapter(base_model, repo_id_or_path: str, *, check_base_model: bool = True, **kwargs):
    """Load a protected adapter onto `base_model` and return `(peft_model, protection_facts)`.

    `repo_id_or_path` is a local adapter folder or a Hub repo id. Before anything is loaded, the card's
    `trap2` block is read and validated and the adapter files are checked against the sha256 it records;
    then the checked files are loaded with `PeftModel.from_pretrained`. The facts are the `trap2` block plus
    `base_model`, `license`, `source` and (from the Hub) `revision`, the commit the files came from.

    Args:
        base_model: the base model (a `PreTrainedModel`), or its Hub id / path for a causal LM.
        repo_id_or_path: the adapter folder or Hub repo id.
        check_base_model: refuse a base whose name or shape differs from the card's (default True).
        **kwargs: `revision`, `token`, `cache_dir`, `force_download`, `local_files_only`, `endpoint` choose
            what is downloaded; the rest (`adapter_name`, `is_trainable`, ...) go to `PeftModel.from_pretrained`.

    Raises:
        ProtectionCardError: no card, no `trap2` block, or a malformed one.
        ChecksumMismatchError: a recorded file is missing or differs from its sha256.
        BaseModelMismatchError: `base_model` is not the card's base model.
        FileNotFoundError: no such folder or Hub repo, or (offline) a file not in the local cache.
        ConnectionError: a file not in the local cache, and the Hub could not be reached.
    """
    from peft import PeftModel

    download = {key: kwargs.pop(key) for key in DOWNLOAD_KWARGS if key in kwargs}
    folder, revision = _fetch_card(repo_id_or_path, download)
    source = repo_id_or_path if revision is None else f"{repo_id_or_path}@{revision[:12]}"
    path = os.path.join(folder, CARD_NAME)
    if not os.path.isfile(path):
        raise ProtectionCardError(f"{source} has no {CARD_NAME} model card, so its protection cannot be checked. "
                                  + _no_card_advice(folder, source))
    with open(path, encoding="utf-8") as f:
        facts = read_protection(f.read(), source)
    if not card_target(facts["update"]).is_adapter or "adapter_config.json" not in facts["sha256"]:
        raise ProtectionCardError(
            f"{source} records a {facts['update']} update without adapter_config.json, not a PEFT adapter. Load a "
            "protected full fine-tune with AutoModel*.from_pretrained."
        )
    weights = [name for name in facts["sha256"] if ADAPTER_WEIGHTS.fullmatch(os.path.basename(name))]
    if not weights:
        raise ProtectionCardError(
            f"The model card of {source} records no adapter weights as safetensors ({sorted(facts['sha256'])}). "
            "Protected adapters are saved and loaded as safetensors only; re-save the adapter with "
            "save_pretrained(..., safe_serialization=True) and refresh its card with `trap2 card <folder>`."
        )
    if revision is not None:
        _fetch_files(repo_id_or_path, sorted(facts["sha256"]), revision, download)
    verify_checksums(folder, facts["sha256"], source)
    base = _base_model(base_model, folder)
    if check_base_model:
        _check_base(base, facts, source)
    facts["source"] = repo_id_or_path
    facts["revision"] = revision
    with peft_deprecation_silenced():
        model = PeftModel.from_pretrained(base, folder, **kwargs)
    return model, facts


def _fetch_card(repo_id_or_path: str, download: dict) -> tuple[str, str | None]:
    """The local folder that holds the card, and the commit it came from (None for a local folder)."""
    if os.path.isdir(repo_id_or_path):
        return repo_id_or_path, None
    if os.path.exists(repo_id_or_path):
        raise FileNotFoundError(f"{repo_id_or_path!r} is a file; pass the adapter folder that holds it.")
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (
        HFValidationError,
        LocalEntryNotFoundError,
        RemoteEntryNotFoundError,
        RepositoryNotFoundError,
    )

    missing = missing_folder_hint(repo_id_or_path)
    try:
        card = hf_hub_download(repo_id_or_path, CARD_NAME, **download)
    except HFValidationError as err:
        raise FileNotFoundError(
            f"{missing or f'There is no folder {repo_id_or_path!r}. '}{repo_id_or_path!r} is not a valid Hub repo id "
            "either. Pass the adapter folder or the repo id (namespace/name)."
        ) from err
    except RepositoryNotFoundError as err:
        raise FileNotFoundError(
            f"{missing}No Hub repo {repo_id_or_path!r} (or it is private and no token with access was given). "
            "Check the id, or log in with `hf auth login`."
        ) from err
    # Before the "no card" case: huggingface_hub's offline / not-cached error is an EntryNotFoundError too.
    except LocalEntryNotFoundError as err:
        raise _unreachable(repo_id_or_path, CARD_NAME, download, err, missing) from err
    except RemoteEntryNotFoundError as err:
        raise ProtectionCardError(
            f"The Hub repo {repo_id_or_path!r} has no {CARD_NAME} model card, so its protection cannot be checked. "
            "If you trust it, load it with plain PeftModel.from_pretrained."
        ) from err
    snapshot = os.path.dirname(card)
    return snapshot, os.path.basename(snapshot)


def _fetch_files(repo_id: str, names: list[str], revision: str, download: dict) -> None:
    """Download the recorded files at the card's commit, into the card's snapshot folder."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import LocalEntryNotFoundError, RemoteEntryNotFoundError

    for name in names:
        try:
            hf_hub_download(repo_id, name, **{**download, "revision": revision})
        except LocalEntryNotFoundError as err:
            raise _unreachable(f"{repo_id}@{revision[:12]}", name, download, err) from err
        except RemoteEntryNotFoundError as err:
            raise ChecksumMismatchError(
                f"{name} is recorded in the model card of {repo_id}@{revision[:12]} but missing from the repo: the "
                "upload was interrupted. Re-run the push (trainer.push_to_hub() or `trap2 card <folder> --push`)."
            ) from err


def _unreachable(source: str, name: str, download: dict, err: Exception, missing: str = "") -> OSError:
    """The error for a file that is neither cached nor downloadable: offline, or no connection."""
    from huggingface_hub import constants

    if download.get("local_files_only") or constants.is_offline_mode():
        switch = "local_files_only=True" if download.get("local_files_only") else "HF_HUB_OFFLINE=1"
        return FileNotFoundError(
            f"{missing}{name} of the Hub repo {source!r} is not in the local cache, and {switch} forbids downloading "
            "it. Download it once while online, or pass the local adapter folder."
        )
    cause = err.__cause__ or err
    return ConnectionError(
        f"{missing}Could not download {name} of the Hub repo {source!r} and it is not in the local cache: the Hub "
        f"could not be reached ({type(cause).__name__}: {cause}). Check the connection (and HF_ENDPOINT), then retry."
    )


def _no_card_advice(folder: str, source: str) -> str:
    """What to do with a folder without a card: it may not be an adapter at all."""
    if is_model_folder(folder):
        return (
            f"It is a full model folder (config.json and weights), not a PEFT adapter: load it with "
            f"AutoModelForCausalLM.from_pretrained({source!r}) (or the Auto class of its task)."
        )
    checkpoints = checkpoint_folders(folder)
    if checkpoints and not os.path.isfile(os.path.join(folder, "adapter_config.json")):
        names = ", ".join(os.path.basename(c) for c in checkpoints)
        return (
            f"It holds no adapter, only Trainer checkpoints ({names}): pass the last one, "
            f"load_protected_adapter(base_model, {checkpoints[-1]!r}), or save the final adapter into {source!r} "
            "with trainer.save_model() after training."
        )
    return (
        "If you trust the files, load them with plain PeftModel.from_pretrained; if they were trained with Trap2, "
        "record the protection with `trap2 card <folder> --trap_lambda ...`."
    )


def _base_model(base_model, folder: str):
    if not isinstance(base_model, str):
        return base_model
    from peft import PeftConfig
    from transformers import AutoModelForCausalLM

    task_type = getattr(PeftConfig.from_pretrained(folder), "task_type", None)
    task_type = getattr(task_type, "value", task_type)
    if task_type not in (None, "CAUSAL_LM"):
        raise TypeError(
            f"base_model={base_model!r} is a name, and names are loaded as causal LMs, but the adapter's task_type is "
            f"{task_type}. Load the base model yourself and pass the model."
        )
    return AutoModelForCausalLM.from_pretrained(base_model)


def _check_base(base, facts: dict, source: str) -> None:
    name = getattr(getattr(base, "config", None), "_name_or_path", "") or ""
    recorded = facts.get("base_model")
    if recorded and name and not os.path.isdir(name) and name != recorded:
        raise BaseModelMismatchError(
            f"{source} was trained on base model {recorded!r}, but the model given is {name!r}. Load "
            f"{recorded!r} as the base (protection and task skill are only defined on it), or pass "
            "check_base_model=False if you know the two are the same weights."
        )
    expected = facts.get("base_model_config") or {}
    found = base_model_config(base.config) if hasattr(base, "config") else {}
    differs = {k: (v, found.get(k)) for k, v in expected.items() if k in found and found[k] != v}
    if differs:
        listed = ", ".join(f"{k}: card {a!r}, model {b!r}" for k, (a, b) in differs.items())
        raise BaseModelMismatchError(
            f"{source} was trained on a different base model{f' ({recorded!r})' if recorded else ''}: its config "
            f"differs ({listed}). Load the base model the adapter was trained on."
        )
