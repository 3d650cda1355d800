"""What `trap2 trace` reads: each update's delta from the base, keyed by the base model's parameter names.

A folder (or Hub repo id) holds either a PEFT adapter (`adapter_config.json`: LoRA, rsLoRA, DoRA, LoHa, LoKr, ...,
read as its weight-space delta W_adapted - W0 through PEFT itself) or a full model (`config.json`: a fine-tune, a
mergekit output, a `merge_and_unload`ed model; its delta is theta - theta0). Everything is computed in float32.
"""

import json
import os
from collections.abc import Iterable
from contextlib import contextmanager

import torch
from torch import nn

from .._warnings import peft_deprecation_silenced
from ..audit.kinds import audited_kind
from ..audit.task_vectors import adapter_task_vector

TaskVector = dict[str, torch.Tensor]
ADAPTER, MODEL = "adapter", "model"
# What is fetched from a Hub repo: configurations and safetensors weights, never pickles.
HUB_FILES = ["*.json", "*.safetensors"]
_LOADED = "trap2_trace"  # the name an adapter is loaded under while its delta is read


def local_folder(path_or_repo: str, role: str) -> str:
    """The local folder of `path_or_repo` (a folder, or a Hub repo id fetched into the cache)."""
    if os.path.isdir(path_or_repo):
        return path_or_repo
    if os.path.exists(path_or_repo):
        raise FileNotFoundError(f"The {role} {path_or_repo!r} is a file; pass the folder that holds it.")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        return snapshot_download(path_or_repo, allow_patterns=HUB_FILES)
    except HFValidationError as err:
        raise FileNotFoundError(
            f"The {role} {path_or_repo!r} is neither a local folder nor a valid Hub repo id. Pass the folder that "
            "holds it, or its repo id (namespace/name)."
        ) from err
    except RepositoryNotFoundError as err:
        raise FileNotFoundError(
            f"The {role} {path_or_repo!r} is not a local folder, and the Hub has no repo of that name (or it is "
            "private: log in with `hf auth login`). Check the path or the id."
        ) from err
    except LocalEntryNotFoundError as err:
        raise FileNotFoundError(
            f"The {role} {path_or_repo!r} is not a local folder, and the Hub repo of that name is not in the local "
            "cache while the Hub cannot be reached (offline?). Download it while online, or pass its folder."
        ) from err


def folder_kind(folder: str, role: str) -> str:
    """ADAPTER for a PEFT adapter folder, MODEL for a full model folder."""
    if os.path.isfile(os.path.join(folder, "adapter_config.json")):
        return ADAPTER
    if os.path.isfile(os.path.join(folder, "config.json")):
        return MODEL
    raise ValueError(
        f"The {role} {folder!r} holds neither adapter_config.json (a PEFT adapter) nor config.json (a full model). "
        "Pass the folder written by save_pretrained."
    )


def load_base(path_or_repo: str) -> nn.Module:
    """The base model, as the class its config names (so its parameter names are the checkpoint's), in float32."""
    import transformers

    folder = local_folder(path_or_repo, "base model")
    if folder_kind(folder, "base model") == ADAPTER:
        raise ValueError(
            f"The base model {path_or_repo!r} is a PEFT adapter; pass the model it was trained on "
            "(its adapter_config.json names it as base_model_name_or_path)."
        )
    config = transformers.AutoConfig.from_pretrained(folder)
    architecture = (getattr(config, "architectures", None) or [None])[0]
    model_class = getattr(transformers, architecture, None) if architecture else None
    model_class = model_class or transformers.AutoModel
    with _quiet_transformers():
        model = model_class.from_pretrained(folder, dtype=torch.float32)
    model.requires_grad_(False)
    return model.eval()


def update_vector(base: nn.Module, path_or_repo: str, role: str, names: Iterable[str] | None = None) -> TaskVector:
    """The delta of the update at `path_or_repo` from `base`: an adapter's W_adapted - W0, a full model's
    theta - theta0; only `names` if given (a name the update leaves unchanged gets no entry)."""
    folder = local_folder(path_or_repo, role)
    if folder_kind(folder, role) == ADAPTER:
        vector = adapter_vector(base, folder, role)
        return vector if names is None else {n: t for n, t in vector.items() if n in set(names)}
    return model_vector(base, folder, role, names)


def adapter_vector(base: nn.Module, folder: str, role: str) -> TaskVector:
    """W_adapted - W0 of the PEFT adapter in `folder`, loaded onto `base` and removed again (the base is left as
    it was), keyed by the base's parameter names."""
    from peft import PeftConfig, PeftModel

    config = PeftConfig.from_pretrained(folder)
    with peft_deprecation_silenced():
        model = PeftModel(base, config, adapter_name=_LOADED)
    try:
        try:
            result = model.load_adapter(folder, _LOADED)
        except RuntimeError as err:  # torch's "size mismatch for ..."
            raise ValueError(
                f"The {role} {folder!r} does not fit the base model: its weights have other shapes than the base's "
                f"({str(err).strip().splitlines()[-1].strip()}). It was trained on another base; pass the base model "
                "its adapter_config.json names."
            ) from err
        # Weights the model cannot place mean another base or model class. Modules the adapter has no weights for
        # (a base with a module the training model lacked, as a pooler matched by "dense") keep their initial,
        # untrained state and are left out.
        missing = {key.split(f".{_LOADED}")[0].rsplit(".", 1)[0] for key in result.missing_keys}
        vector = adapter_task_vector(model, _LOADED)
        vector = {name: delta for name, delta in vector.items() if _module_of(name) not in missing}
        if result.unexpected_keys or not vector:
            unloaded = sorted(result.unexpected_keys) or sorted(result.missing_keys)
            raise ValueError(
                f"The {role} {folder!r} does not fit the base model: its weights name modules the base does not "
                f"have ({unloaded[:3]}). It was trained on another base or model class; pass the base model its "
                "adapter_config.json names."
            )
    finally:
        model.base_model.unload()
    plain = audited_kind("adapter").plain_name
    return {plain(name): delta for name, delta in vector.items()}


def _module_of(name: str) -> str:
    """The PEFT module a task-vector entry belongs to (`....dense.base_layer.weight` -> `....dense`)."""
    for wrapped in (".base_layer.", ".original_module."):
        if wrapped in name:
            return name.split(wrapped)[0]
    return name.rsplit(".", 1)[0]


def model_vector(base: nn.Module, folder: str, role: str, names: Iterable[str] | None = None) -> TaskVector:
    """theta - theta0 of the full model in `folder` (loaded as `base`'s class), for `names` or every parameter."""
    _check_same_architecture(base, folder, role)
    params = dict(base.named_parameters())
    wanted = sorted(params if names is None else names)
    with _quiet_transformers():
        try:
            model, info = type(base).from_pretrained(folder, dtype=torch.float32, output_loading_info=True)
        except RuntimeError as err:  # transformers' "size mismatch for ..."
            raise ValueError(
                f"The {role} {folder!r} has tensors of other shapes than the base model's: it is not a model of "
                f"this base ({str(err).strip().splitlines()[-1]}). Pass a model made from the base model."
            ) from err
    missing = sorted(set(info.get("missing_keys", ())) & set(wanted))
    if missing:
        raise ValueError(
            f"The {role} {folder!r} lacks weights the release changes ({', '.join(missing[:3])}"
            f"{', ...' if len(missing) > 3 else ''}): it is not a full model of this base, or it was saved with "
            "layers dropped. Pass the complete model folder."
        )
    theirs = dict(model.named_parameters())
    vector = {}
    with torch.no_grad():
        for name in wanted:
            if name not in theirs:
                raise ValueError(f"The {role} {folder!r} has no parameter {name!r}, which the base model has.")
            delta = theirs[name].float() - params[name].float()
            if delta.any():
                vector[name] = delta
    del model
    return vector


def _check_same_architecture(base: nn.Module, folder: str, role: str) -> None:
    """Refuse a model of another architecture or size before loading it, naming what differs."""
    with open(os.path.join(folder, "config.json"), encoding="utf-8") as handle:
        theirs = json.load(handle)
    ours = base.config.to_dict()
    keys = ("model_type", "hidden_size", "num_hidden_layers", "intermediate_size", "num_attention_heads", "vocab_size")
    differs = {k: (ours[k], theirs[k]) for k in keys if k in ours and k in theirs and ours[k] != theirs[k]}
    if differs:
        listed = ", ".join(f"{k}: base {a!r}, {role} {b!r}" for k, (a, b) in differs.items())
        raise ValueError(
            f"The {role} {folder!r} is not a model of this base ({listed}). Pass the base model it was made from "
            "with --base_model."
        )


@contextmanager
def _quiet_transformers():
    """transformers' loading report and progress bars off while inside (missing weights are checked here)."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
