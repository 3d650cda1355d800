"""The inputs of a mergekit merge: the base and every update written as a full model folder.

A PEFT adapter is folded into the base with `merge_and_unload`, a fine-tuned model or state is saved as
it is; mergekit's readers of the folders are dropped when they are removed. When mergekit has no
architecture definition covering the checkpoint, one update's folder is marked so that mergekit infers
the layout from the tensor names (`WrittenInputs.layout`).
"""

import contextlib
import copy
import glob
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .methods import mergekit_module

# A `config.json` architecture mergekit has no definition for: it then infers the layout from the
# checkpoints' tensor names (see `WrittenInputs.layout`).
INFERRED_ARCHITECTURE = "Trap2InferredLayout"


@dataclass
class WrittenInputs:
    """The base and the updates as model folders mergekit reads, and the model the result loads into.

    `layout` is "mergekit" when mergekit's architecture definition covers the checkpoint, or
    "inferred" when it does not (a head it does not declare, a missing pooler, or mergekit 0.1.5's
    `BertModel` definition, whose optional aliased `position_ids` fails in its planner): one update's
    folder then names an architecture mergekit does not know, so mergekit infers the layout from the
    checkpoints' tensor names and merges every tensor, exact for updates that share the base's names.
    """

    base_dir: str
    update_dirs: list[str]
    base_model: nn.Module
    layout: str
    workdir: str


@contextlib.contextmanager
def written_inputs(base, updates: Sequence, workdir: str | None = None) -> Iterator[WrittenInputs]:
    """Write the base and each update as a full model folder in a temporary folder (under `workdir`
    if given), removed on exit with mergekit's cached readers of it.

    `base` is a transformers model, a PEFT model (its adapters are left out) or a model folder. Each
    update is a model folder, a PEFT adapter folder (folded into the base), a transformers model (a
    full fine-tune), a `(PeftModel, adapter_name)` pair (that adapter folded in), or a fine-tuned
    state `{parameter name: tensor}` keyed like the base's `named_parameters()`.
    """
    mergekit_module()
    if not updates:
        raise ValueError("Pass at least one update to merge.")
    root = tempfile.mkdtemp(prefix="trap2-mergekit-", dir=workdir)
    try:
        base_model = _base_model(base)
        base_dir = os.path.join(root, "base")
        _save(base_model, base_dir)
        dirs = [_write_update(base_model, u, os.path.join(root, f"update_{i}")) for i, u in enumerate(updates)]
        layout = _layout(base_dir)
        if layout == "inferred":
            # mergekit infers a layout when any input lacks a definition; the last update is never
            # the model it reads transformers' tensor names from (the base, or the first update).
            dirs[-1] = _marked_for_inference(dirs[-1], root)
        yield WrittenInputs(base_dir, dirs, base_model, layout, root)
    finally:
        _forget_readers(root)
        shutil.rmtree(root, ignore_errors=True)


def _base_model(base) -> nn.Module:
    if isinstance(base, (str, os.PathLike)):
        return _load_model_folder(os.fspath(base))
    if hasattr(base, "peft_config"):
        return copy.deepcopy(base).unload()
    if not hasattr(base, "save_pretrained"):
        raise TypeError(
            f"base must be a transformers model, a PEFT model or a model folder; got {type(base).__name__}."
        )
    return base


def _write_update(base_model: nn.Module, update, folder: str) -> str:
    if isinstance(update, (str, os.PathLike)):
        path = os.fspath(update)
        if os.path.isfile(os.path.join(path, "adapter_config.json")):
            from peft import PeftModel

            folded = PeftModel.from_pretrained(copy.deepcopy(base_model), path).merge_and_unload()
            _save(folded, folder)
            return folder
        if os.path.isfile(os.path.join(path, "config.json")):
            return path
        raise ValueError(f"Update {path!r} holds neither adapter_config.json (an adapter) nor config.json (a model).")
    if isinstance(update, tuple) and len(update) == 2 and hasattr(update[0], "peft_config"):
        peft_model, name = update
        if name not in peft_model.peft_config:
            raise ValueError(f"The PEFT model has no adapter {name!r} (adapters: {', '.join(peft_model.peft_config)}).")
        folded = copy.deepcopy(peft_model)
        folded.set_adapter(name)
        _save(folded.merge_and_unload(adapter_names=[name]), folder)
        return folder
    if isinstance(update, Mapping):
        model = copy.deepcopy(base_model)
        params = dict(model.named_parameters())
        unknown = sorted(set(update) - set(params))
        if unknown:
            raise ValueError(f"The fine-tuned state names parameters the base model does not have: {unknown[:5]}.")
        with torch.no_grad():
            for name, tensor in update.items():
                params[name].copy_(tensor)
        _save(model, folder)
        return folder
    if hasattr(update, "save_pretrained") and not hasattr(update, "peft_config"):
        _save(update, folder)
        return folder
    raise TypeError(
        f"Cannot write an update of type {type(update).__name__}: pass a model folder, an adapter folder, a "
        "transformers model, a (PeftModel, adapter_name) pair or a {parameter name: tensor} state."
    )


def _save(model: nn.Module, folder: str) -> None:
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model.save_pretrained(folder)
    finally:
        if bars:
            hf_logging.enable_progress_bar()


def _layout(base_dir: str) -> str:
    """'mergekit' if mergekit's architecture definition names every tensor of the base checkpoint and
    finds every tensor it requires, else 'inferred'."""
    from mergekit.architecture import arch_info_for_config
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(base_dir)
    names = set(tensor_names(base_dir))
    try:
        arch = arch_info_for_config(config)
        weights = arch.all_weights(config) if arch is not None else None
    except Exception:  # a definition that cannot even be configured for this checkpoint
        weights = None
    if weights is None:
        return "inferred"
    declared, fits = set(), True
    for weight in weights:
        known = {weight.name, *(weight.aliases or ()), *(weight.tied_names or ())}
        declared |= known
        # mergekit 0.1.5's planner concatenates a list and the tuple of an optional weight's aliases.
        broken = weight.optional and weight.aliases
        fits &= not broken and (weight.optional or bool(known & names))
    return "mergekit" if fits and names <= declared else "inferred"


def _marked_for_inference(folder: str, root: str) -> str:
    """`folder` with an architecture mergekit does not know, so that it infers the layout from the
    tensors; the base keeps its own, from which mergekit reads tied weights. A folder outside `root`
    (the user's) is shadowed by links to its files, never edited."""
    if not os.path.abspath(folder).startswith(os.path.abspath(root) + os.sep):
        shadow = os.path.join(root, "inferred_" + os.path.basename(os.path.normpath(folder)))
        os.makedirs(shadow)
        for name in os.listdir(folder):
            if name != "config.json":
                os.symlink(os.path.abspath(os.path.join(folder, name)), os.path.join(shadow, name))
        shutil.copy(os.path.join(folder, "config.json"), os.path.join(shadow, "config.json"))
        folder = shadow
    path = os.path.join(folder, "config.json")
    with open(path) as f:
        raw = json.load(f)
    raw["architectures"] = [INFERRED_ARCHITECTURE]
    with open(path, "w") as f:
        json.dump(raw, f, indent=2)
    return folder


def tensor_names(folder: str) -> list[str]:
    from safetensors import safe_open

    names = []
    for path in sorted(glob.glob(os.path.join(folder, "*.safetensors"))):
        with safe_open(path, "pt") as f:
            names.extend(f.keys())
    if not names:
        raise FileNotFoundError(f"No *.safetensors weights in {folder!r}; save the model with save_pretrained.")
    return names


def _load_model_folder(folder: str) -> nn.Module:
    import transformers

    config = transformers.AutoConfig.from_pretrained(folder)
    architecture = (config.architectures or [None])[0]
    cls = getattr(transformers, architecture or "", None)
    if cls is None:
        raise ValueError(f"Model folder {folder!r} names architecture {architecture!r}, which transformers lacks.")
    return cls.from_pretrained(folder)


def _forget_readers(root: str) -> None:
    """Drop mergekit's cached readers of folders under `root` (its LoaderCache is process-wide)."""
    try:
        from mergekit.io.tasks import LoaderCache
    except ImportError:
        return
    loaders = LoaderCache().loaders
    for ref in [r for r in loaders if os.path.abspath(str(r.model.path)).startswith(os.path.abspath(root))]:
        loaders.pop(ref).flush()
