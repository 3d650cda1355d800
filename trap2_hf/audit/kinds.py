"""What the audit does differently for each kind of update: one class per kind, looked up by the names of
`trap2_hf.updates.UPDATE_KINDS` (the `trap_target` values).

The audit's modules ask `audited_kind(target)` for the object and call it instead of comparing the string.
An audited kind owns, for its kind of update:

- `check(model, updates, reserved)`: refuse a model that does not hold these updates, naming the fix;
- `loaded(model, model_class, folders, device)`: the updates read from their folders (`trap2 audit`);
- `without_update(model)`: the context in which the model computes as the base;
- `active(model)`: the active adapter to restore after the audit, or None;
- `alone(model, update, vector)` and `rescaled(model, update, vector, scale)`: the contexts holding one update
  alone and re-scaled along its ray (`vector()` gives its task vector, computed once by the caller);
- `task_vector(model, update)`: what the update adds to the base weights, keyed by the model's parameter names;
- `describe(update)`: how audit.json names it;
- `plain_name(name)`: a parameter of the audited model in the namespace of the plain base model (what a merged
  checkpoint or a suspect of `trap2 trace` names it);
- `repair_targets(model, update)` and `fresh_lora(model, config, name, seed)`: the repair attacker's fresh LoRA.

Adding a kind: one class here and its entry in `AUDITED_KINDS`, under the name of its `UpdateKind`.
"""

import re
import warnings
from collections.abc import Callable
from contextlib import contextmanager, nullcontext

import torch
from torch import nn

from .._warnings import peft_deprecation_silenced
from ..choices import per_target
from ..updates import rescaled_update
from .task_vectors import TaskVector, adapter_task_vector, applied, full_task_vector


class AuditedKind:
    """The base of the audited kinds; `name` is the `trap_target` value, `updates` what the audit is given."""

    name: str = ""
    updates: str = ""

    def check(self, model: nn.Module, updates: list, reserved: str) -> None:
        pass

    def loaded(self, model: nn.Module, model_class, folders: dict[str, str], device: str) -> tuple[nn.Module, dict]:
        raise NotImplementedError

    def without_update(self, model: nn.Module):
        return nullcontext()

    def active(self, model: nn.Module) -> str | None:
        return None

    def alone(self, model: nn.Module, update, vector: Callable[[], TaskVector]):
        raise NotImplementedError

    def rescaled(self, model: nn.Module, update, vector: Callable[[], TaskVector], scale: float):
        raise NotImplementedError

    def task_vector(self, model: nn.Module, update) -> TaskVector:
        raise NotImplementedError

    def describe(self, update):
        raise NotImplementedError

    def plain_name(self, name: str) -> str:
        return name

    def repair_targets(self, model: nn.Module, update):
        raise NotImplementedError

    def fresh_lora(self, model: nn.Module, config, name: str, seed: int):
        raise NotImplementedError


class AuditedAdapter(AuditedKind):
    """PEFT adapters: the audited model is a PeftModel holding every update as a named adapter."""

    name = "adapter"
    updates = "PEFT adapters"

    def check(self, model, updates, reserved):
        if not hasattr(model, "peft_config") or not hasattr(model, "disable_adapter"):
            raise ValueError("target='adapter' needs a peft PeftModel holding every update as a named adapter.")
        missing = [u for u in updates if u not in model.peft_config]
        if missing:
            raise ValueError(f"Adapter(s) {missing} are not loaded; the model has {list(model.peft_config)}.")
        if reserved in model.peft_config:
            raise ValueError(f"The adapter name {reserved!r} is reserved for the audit's temporary merges.")

    def loaded(self, model, model_class, folders, device):
        """Every adapter folder loaded into one PeftModel, named after its key (`other:city` -> `other_city`)."""
        from peft import PeftModel

        names = {key: re.sub(r"\W", "_", key) for key in folders}
        peft_model = None
        for key, folder in folders.items():
            if peft_model is None:
                with peft_deprecation_silenced():
                    peft_model = PeftModel.from_pretrained(model, folder, adapter_name=names[key])
            else:
                peft_model.load_adapter(folder, adapter_name=names[key])
        return peft_model, names

    def without_update(self, model):
        return model.disable_adapter()

    def active(self, model):
        return getattr(model, "active_adapter", None)

    @contextmanager
    def alone(self, model, update, vector):
        model.set_adapter(update, inference_mode=True)
        yield

    @contextmanager
    def rescaled(self, model, update, vector, scale):
        with self.alone(model, update, vector), rescaled_update(model, scale, self.name, adapter_names=[update]):
            yield

    def task_vector(self, model, update):
        return adapter_task_vector(model, update)

    def describe(self, update):
        return update

    def plain_name(self, name):
        """A PEFT model's base weight in the plain model's namespace (adapter weights map to names the plain
        model does not have, and are skipped)."""
        return name.removeprefix("base_model.model.").replace(".base_layer.", ".").replace(".original_module.", ".")

    def repair_targets(self, model, update):
        """The released adapter's own target modules."""
        return model.peft_config[update].target_modules

    @contextmanager
    def fresh_lora(self, model, config, name, seed):
        """A fresh adapter `name` (initialised under `seed`), active while inside, deleted on exit."""
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            model.add_adapter(name, config)
            model.set_adapter(name)
        try:
            yield
        finally:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=f"Adapter {name} was active")
                model.delete_adapter(name)


class AuditedFull(AuditedKind):
    """Full fine-tunes: the audited model is the base (its weights are theta0), each update a fine-tuned
    state {parameter name: tensor}."""

    name = "full"
    updates = "fine-tuned states"

    def loaded(self, model, model_class, folders, device):
        return model, {key: _finetuned_state(model_class, folder, device) for key, folder in folders.items()}

    @contextmanager
    def alone(self, model, update, vector):
        with applied(model, vector()):
            yield

    @contextmanager
    def rescaled(self, model, update, vector, scale):
        params = dict(model.named_parameters())
        theta0 = {name: params[name].data for name in vector()}
        with self.alone(model, update, vector), rescaled_update(model, scale, self.name, reference=theta0):
            yield

    def task_vector(self, model, update):
        return full_task_vector(model, update)

    def describe(self, update):
        return f"<fine-tuned state: {len(update)} tensors>"

    def repair_targets(self, model, update):
        return "all-linear"

    @contextmanager
    def fresh_lora(self, model, config, name, seed):
        """LoRA layers `name` (initialised under `seed`) injected into the plain model, unloaded on exit."""
        from peft.tuners.lora import LoraModel

        had_config = hasattr(model, "peft_config")
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            tuner = LoraModel(model, config, name)
        try:
            yield
        finally:
            tuner.unload()
            if not had_config and hasattr(model, "peft_config"):
                del model.peft_config


AUDITED_KINDS: dict[str, AuditedKind] = per_target(AuditedAdapter(), AuditedFull())


def audited_kind(target: str) -> AuditedKind:
    """The audited kind of a `target` value."""
    if target not in AUDITED_KINDS:
        choices = " or ".join(f"{name!r} ({kind.updates})" for name, kind in AUDITED_KINDS.items())
        raise ValueError(f"Unknown target {target!r}; use {choices}.")
    return AUDITED_KINDS[target]


def _finetuned_state(model_class, folder: str, device: str) -> dict:
    finetuned = model_class.from_pretrained(folder)
    state = {name: p.detach().to(device) for name, p in finetuned.named_parameters()}
    del finetuned
    return state
