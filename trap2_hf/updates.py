"""What the protected update does in training: one class per kind, and everything that depends on the kind.

`trap_target` names the kind; its facts are declared once in `choices/targets.py` (`UpdateKind.declared`), and the
rest of the package asks `update_kind(settings or name)` for the object and calls it instead of comparing the
string. An update kind owns, for its kind of update:

- `check(model)`: refuse a model this kind cannot protect, naming the fix;
- `reference(model, settings, given)`: theta0, where re-scaling needs it (full fine-tuning), else None;
- `rescaled(model, scale, ...)`: the context in which the model computes with W0 + s*dW;
- `pass_row_targets(model, settings)`: modules that form the re-scaled weights as they run for the re-scaled
  passes (full fine-tuning, `rescale/full_per_row.py`), or None: re-scale in place;
- `copy_row_targets(model, settings)` and `rescaled_copies(...)`: where the fused step's per-row scales act, and
  the context that puts each copied row at its scale;
- `card_kind(model)`: the update as the model card names it ('lora', 'loha', ..., 'full').

Adding a kind: its `Target` in `choices/targets.py`, one subclass here (and one in `audit/kinds.py`), both in their
`per_target(...)` table.
"""

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from .choices import targets as declared_targets
from .rescale import (
    RowGroups,
    full_row_targets,
    per_sample_targets,
    refuse_methods_without_weight_delta,
    rescaled_adapter,
    rescaled_adapter_per_sample,
    rescaled_parameters,
    rescaled_parameters_at_scale,
    rescaled_parameters_per_row,
    snapshot_parameters,
    swapped_parameters,
    trained_adapter_names,
)


class UpdateKind:
    """The base of the update kinds; `declared` holds the kind's facts, `name` is its `trap_target` value."""

    declared: declared_targets.Target

    @property
    def name(self) -> str:
        return self.declared.name

    @property
    def needs_reference(self) -> bool:
        """Whether re-scaling reads theta0."""
        return self.declared.needs_reference

    def check(self, model: nn.Module) -> None:
        raise NotImplementedError

    def reference(self, model: nn.Module, settings, given: dict[str, torch.Tensor] | None = None):
        return None

    def rescaled(
        self, model: nn.Module, scale: float, reference=None, adapter_names=None, row_targets=None, in_place=(),
        weight_copy=False,
    ):
        """Context in which `model` computes with the update re-scaled by `scale`; `row_targets` (from
        `pass_row_targets`), `in_place` (the parameters read outside their module) and `weight_copy` (whether the
        pass may hold a copy of the weights) are a full fine-tune's."""
        raise NotImplementedError

    def pass_row_targets(self, model: nn.Module, settings):
        return None

    def copy_row_targets(self, model: nn.Module, settings):
        raise NotImplementedError

    def rescaled_copies(self, model: nn.Module, plan, scales: list[float], reference, targets, device):
        raise NotImplementedError

    def card_kind(self, model: nn.Module) -> str:
        raise NotImplementedError


class AdapterUpdate(UpdateKind):
    """A trained PEFT adapter, re-scaled as W0 + s*dW (`rescale/adapter.py`)."""

    declared = declared_targets.ADAPTER

    def check(self, model: nn.Module) -> None:
        if not has_adapter(model):
            refuse_methods_without_weight_delta(model)
            raise ValueError(
                "trap_target='adapter' but the model has no PEFT adapter. Wrap the model with "
                "peft.get_peft_model(model, LoraConfig(...)) (or pass peft_config=... to Trap2SFTTrainer), "
                "or set trap_target='full' to protect a full fine-tune."
            )
        if not trained_adapter_names(model):
            raise ValueError(
                "trap_target='adapter' but no adapter of the model has trainable parameters. Load the adapter "
                "with is_trainable=True."
            )

    def rescaled(self, model, scale, reference=None, adapter_names=None, row_targets=None, in_place=(),
                 weight_copy=False):
        return rescaled_adapter(model, scale, adapter_names)

    def copy_row_targets(self, model, settings):
        return per_sample_targets(model)

    def rescaled_copies(self, model, plan, scales, reference, targets, device):
        return rescaled_adapter_per_sample(model, plan.sample_scales(device), targets=targets)

    def card_kind(self, model: nn.Module) -> str:
        active = getattr(model, "active_adapter", "default")
        config = model.peft_config[active if isinstance(active, str) else active[0]]
        peft_type = getattr(config.peft_type, "value", config.peft_type)
        return str(peft_type).lower()


class FullUpdate(UpdateKind):
    """Every trainable parameter, re-scaled as theta0 + s*(theta - theta0) (`rescale/`)."""

    declared = declared_targets.FULL

    def check(self, model: nn.Module) -> None:
        if has_adapter(model):
            raise ValueError(
                "trap_target='full' re-scales parameters (theta0 + s*(theta - theta0)), which for a PEFT model is "
                "not the adapter's W0 + s*dW. Use trap_target='adapter' for PEFT models."
            )
        if is_quantized(model):
            raise ValueError(
                "trap_target='full' on a quantized (bitsandbytes) model: quantized weights cannot hold "
                "theta0 + s*(theta - theta0). Protect a LoRA adapter on the quantized base (trap_target='adapter', "
                "QLoRA) or load the model unquantized."
            )

    def reference(self, model, settings, given=None):
        return given or snapshot_parameters(model, settings.trap_reference_device, settings.trap_reference_dtype)

    def rescaled(self, model, scale, reference=None, adapter_names=None, row_targets=None, in_place=(),
                 weight_copy=False):
        """theta_s in a copy swapped into the weights where the pass may hold one (`weight_copy`), theta0 is on the
        device and activation checkpointing is off (checkpointing is there to save memory); else module by module
        where `row_targets` allow; else written into the weights and restored (`rescale/`)."""
        if reference is None:
            raise ValueError("trap_target='full' needs the reference weights theta0 (`reference=`).")
        if weight_copy and _on_device(model, reference) and not getattr(model, "is_activation_checkpointing", False):
            return swapped_parameters(model, scale, reference)
        if row_targets is not None:
            return rescaled_parameters_at_scale(model, scale, reference, row_targets, in_place)
        return rescaled_parameters(model, scale, reference)

    def pass_row_targets(self, model, settings):
        """The modules that let the re-scaled passes form theta0 + s*(theta - theta0) as they run (no write into
        the weights, no residual, no restore), or None: then they re-scale the weights in place."""
        if settings.trap_reference_device == "cpu":
            return None
        try:
            return full_row_targets(model)
        except (ValueError, NotImplementedError):
            return None

    def copy_row_targets(self, model, settings):
        if settings.trap_reference_device == "cpu":
            raise ValueError(
                "trap_mode='fused' on a full fine-tune reads theta0 at every step, which "
                "trap_reference_device='cpu' offloads. Use trap_mode='sub_batch' or keep theta0 on the device."
            )
        return full_row_targets(model)

    def rescaled_copies(self, model, plan, scales, reference, targets, device):
        groups = RowGroups.of_copies(plan.batch_size, plan.copy_scale_index, scales)
        return rescaled_parameters_per_row(model, groups, reference, targets)

    def card_kind(self, model: nn.Module) -> str:
        return self.name


UPDATE_KINDS: dict[str, UpdateKind] = declared_targets.per_target(AdapterUpdate(), FullUpdate())


def update_kind(settings_or_name) -> UpdateKind:
    """The update kind of a `trap_target` value or of settings that carry one."""
    name = settings_or_name if isinstance(settings_or_name, str) else settings_or_name.trap_target
    return UPDATE_KINDS[declared_targets.target(name).name]


@contextmanager
def rescaled_update(
    model: nn.Module,
    scale: float,
    target: str = declared_targets.ADAPTER.name,
    reference: dict[str, torch.Tensor] | None = None,
    adapter_names: Iterable[str] | None = None,
) -> Iterator[None]:
    """Re-scale the update of `model` by `scale`: an adapter (`target='adapter'`) or, for
    `target='full'`, the parameters' difference from `reference` (theta0)."""
    with update_kind(target).rescaled(model, scale, reference, adapter_names):
        yield


def _on_device(model: nn.Module, reference: dict[str, torch.Tensor]) -> bool:
    """Whether theta0 sits where the parameters are (not offloaded by trap_reference_device='cpu')."""
    theta0, param = next(iter(reference.values()), None), next(model.parameters(), None)
    return theta0 is not None and param is not None and theta0.device == param.device


def has_adapter(model: nn.Module) -> bool:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return any(isinstance(module, BaseTunerLayer) for module in model.modules())


def is_quantized(model: nn.Module) -> bool:
    """Whether the (base) model's weights are bitsandbytes-quantized."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return bool(getattr(base, "is_loaded_in_4bit", False) or getattr(base, "is_loaded_in_8bit", False))
