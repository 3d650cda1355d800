"""Context managers that re-scale an adapter, W0 + dW -> W0 + s*dW, and always restore the model (full fine-tunes:
`full_at_scale.py`, `full_per_row.py`).

- LoRA and rsLoRA: the adapter's `scaling` times s, which is exactly W0 + s*scaling*B@A.
- Any other adapter layer (DoRA, LoHa, LoKr, IA3, ...) and `modules_to_save` copies, whose output
  is affine in the layer's weights: y_s = y_base + s*(y_adapted - y_base), which is exactly the
  layer with weights W0 + s*(W_adapted - W0). For DoRA this is the true weight-space delta
  (re-scaling B is not).
- Per sample (`rescaled_adapter_per_sample`): row i of the batch computes with W0 + s_i*dW, for the
  fused step; only LoRA and rsLoRA, whose branch output is linear in s.

Run each backward inside the context that made its forward: activation checkpointing recomputes the
forward during backward.
"""

import types
from collections.abc import Iterable, Iterator
from contextlib import ExitStack, contextmanager
from functools import partial

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D


# Layers whose output is affine in their own parameters, so output-space re-scaling is weight-space
# (transformers' Conv1D is GPT-2's x @ W + b).
AFFINE_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Embedding, nn.LayerNorm, Conv1D)


def refuse_methods_without_weight_delta(model: nn.Module) -> None:
    """Prompt/prefix tuning and the like add no W0 + dW: there is nothing a merge re-scales."""
    configs = list((getattr(model, "peft_config", None) or {}).values())
    if configs and all(getattr(c, "is_prompt_learning", False) for c in configs):
        kinds = sorted({str(getattr(c.peft_type, "value", c.peft_type)) for c in configs})
        raise NotImplementedError(
            f"Re-scaling (protecting) PEFT method {', '.join(kinds)} is not supported yet: it adds no weight update "
            "W0 + dW that merging re-scales. Use LoRA, rsLoRA, DoRA or another layer adapter (LoHa, LoKr, IA3, ...), "
            "or trap_target='full' without PEFT."
        )


def trained_adapter_names(model: nn.Module) -> list[str]:
    """The adapters of a PEFT model that have trainable parameters: the update being protected."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    names = set()
    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            for layer_name in module.adapter_layer_names:
                for adapter, sub in getattr(module, layer_name).items():
                    params = [sub] if isinstance(sub, nn.Parameter) else list(sub.parameters())
                    if any(p.requires_grad for p in params):
                        names.add(adapter)
    return sorted(names)


def active_adapter_names(model: nn.Module) -> list[str]:
    """The active adapters of a PEFT model's layers (and `modules_to_save` copies), trained or frozen."""
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils.other import ModulesToSaveWrapper

    names = set()
    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            names |= set(module.active_adapters) & adapters_of(module)
        elif isinstance(module, ModulesToSaveWrapper):
            names |= set(module.active_adapters) & set(module.modules_to_save.keys())
    return sorted(names)


def rescaled_adapter_names(model: nn.Module, adapter_names: Iterable[str] | None = None) -> set[str]:
    """The adapters a re-scaling acts on: the named ones; by default the trained ones (the update being protected),
    else, for an adapter loaded for use (`PeftModel.from_pretrained`, `load_protected_adapter`: frozen), the active
    ones."""
    if adapter_names is not None:
        return set(adapter_names)
    names = set(trained_adapter_names(model)) or set(active_adapter_names(model))
    if not names:
        refuse_methods_without_weight_delta(model)
        raise ValueError(
            "The model has no trainable or active PEFT adapter to re-scale. Wrap it with peft.get_peft_model(...) "
            "(or pass peft_config to the SFT trainer), or set trap_target='full' for full fine-tuning."
        )
    return names


@contextmanager
def rescaled_adapter(model: nn.Module, scale: float, adapter_names: Iterable[str] | None = None) -> Iterator[None]:
    """Re-scale the named adapters of a PEFT model to W0 + s*dW; by default the trained ones, or, on a loaded
    (frozen) adapter, the active ones (`rescaled_adapter_names`)."""
    from peft.tuners.lora import LoraLayer
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils.other import ModulesToSaveWrapper

    names = rescaled_adapter_names(model, adapter_names)
    with ExitStack() as stack:
        touched = 0
        for module_name, module in model.named_modules():
            if isinstance(module, ModulesToSaveWrapper):
                for adapter in names & set(module.modules_to_save.keys()):
                    stack.enter_context(_rescaled_modules_to_save(module, module_name, adapter, scale))
                    touched += 1
            elif isinstance(module, BaseTunerLayer):
                present = names & adapters_of(module)
                for adapter in present:
                    if isinstance(module, LoraLayer) and adapter not in getattr(module, "lora_variant", {}):
                        stack.enter_context(_rescaled_lora_scaling(module, adapter, scale))
                    else:
                        stack.enter_context(_rescaled_layer_output(module, module_name, adapter, scale))
                    touched += 1
        if touched == 0:
            raise ValueError(
                f"No layer of the model carries the adapter(s) {sorted(names)}; nothing would be re-scaled. "
                "Check the adapter name, or use trap_target='full'."
            )
        yield


@contextmanager
def rescaled_adapter_per_sample(
    model: nn.Module,
    scales: torch.Tensor,
    adapter_names: Iterable[str] | None = None,
    targets: list[tuple[str, nn.Module, str]] | None = None,
) -> Iterator[None]:
    """While inside, row i of every batch computes with W0 + scales[i]*dW of the named (default: as
    `rescaled_adapter`) adapters: each LoRA branch's output is multiplied row by row (exact: the branch is B@A@x*scaling), and
    affine `modules_to_save` copies are blended row by row. Raises NotImplementedError for anything else.
    `targets`: `per_sample_targets(model, adapter_names)`, computed once by a caller that re-enters often."""
    targets = per_sample_targets(model, adapter_names) if targets is None else targets
    row_scales = _RowScales(scales)
    handles = []
    with ExitStack() as stack:
        try:
            for layer_name, module, kind in targets:
                if kind == "lora_B":
                    handles.append(module.register_forward_hook(partial(_scale_rows, row_scales, layer_name)))
                else:
                    blend = partial(_blend_rows, module.original_module, row_scales, layer_name)
                    stack.enter_context(patched_forward(module, blend))
            yield
        finally:
            for handle in handles:
                handle.remove()


def per_sample_targets(
    model: nn.Module, adapter_names: Iterable[str] | None = None
) -> list[tuple[str, nn.Module, str]]:
    """(name, module, kind) for every place a per-sample scale acts: LoRA B matrices ('lora_B') and
    modules_to_save wrappers ('modules_to_save').

    Raises NotImplementedError, naming the layer and trap_mode='two_pass', where a per-sample scale
    cannot be exact at the cost of a multiply (DoRA and other LoRA variants, LoRA on embeddings or
    parameters, LoHa/LoKr/IA3, non-affine modules_to_save)."""
    from peft.tuners.lora import LoraLayer
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils.other import ModulesToSaveWrapper

    names = rescaled_adapter_names(model, adapter_names)
    targets = []
    for module_name, module in model.named_modules():
        if isinstance(module, ModulesToSaveWrapper):
            if names & set(module.modules_to_save.keys()) & set(module.active_adapters):
                if not isinstance(module.original_module, AFFINE_LAYERS):
                    raise NotImplementedError(
                        f"modules_to_save entry {module_name} ({type(module.original_module).__name__}) is not affine "
                        "in its weights, so it cannot be re-scaled per sample; use trap_mode='two_pass'."
                    )
                targets.append((module_name, module, "modules_to_save"))
            continue
        if not isinstance(module, BaseTunerLayer):
            continue
        for adapter in sorted(names & adapters_of(module)):
            lora_b = getattr(module, "lora_B", {})
            if (
                not isinstance(module, LoraLayer)
                or adapter in getattr(module, "lora_variant", {})
                or adapter not in lora_b
                or type(module).__name__ in ("ParamWrapper", "MultiheadAttention")
            ):
                raise NotImplementedError(
                    f"trap_mode='fused' re-scales each row by multiplying the LoRA branch's output, which is exact "
                    f"for plain LoRA and rsLoRA on Linear and Conv layers only; {module_name} "
                    f"({type(module).__name__}, adapter {adapter!r}) is not one. Use trap_mode='two_pass' (or "
                    "'sub_batch'), which re-scale every adapter kind exactly."
                )
            targets.append((f"{module_name}.lora_B.{adapter}", lora_b[adapter], "lora_B"))
    if not targets:
        raise ValueError(f"No layer of the model carries the adapter(s) {sorted(names)}; nothing would be re-scaled.")
    return targets


class _RowScales:
    """The per-row scales, cast once per (device, dtype) and shaped to broadcast over a layer's output."""

    def __init__(self, scales: torch.Tensor):
        self.scales = scales
        self.cast = {}

    def like(self, output: torch.Tensor, layer_name: str) -> torch.Tensor:
        rows = self.scales.shape[0]
        if output.dim() == 0 or output.shape[0] != rows:
            raise RuntimeError(
                f"Per-sample re-scaling needs every re-scaled layer to see the batch on dimension 0, but {layer_name} "
                f"returned shape {tuple(output.shape)} for a batch of {rows} rows (flattened tokens?). Use "
                "trap_mode='two_pass' or 'sub_batch' for this model."
            )
        key = (output.device, output.dtype)
        if key not in self.cast:
            self.cast[key] = self.scales.to(device=output.device, dtype=output.dtype)
        return self.cast[key].view(-1, *([1] * (output.dim() - 1)))


def _scale_rows(scales: _RowScales, layer_name: str, module, inputs, output: torch.Tensor) -> torch.Tensor:
    return output * scales.like(output, layer_name)


def _blend_rows(base: nn.Module, scales: _RowScales, layer_name: str, adapted_forward, *args, **kwargs) -> torch.Tensor:
    adapted = adapted_forward(*args, **kwargs)
    base_out = base(*args, **kwargs)
    return base_out + scales.like(adapted, layer_name) * (adapted - base_out)


def adapters_of(layer) -> set[str]:
    """The names of the adapters a PEFT tuner layer holds (active or not, trained or not)."""
    found = set()
    for layer_name in layer.adapter_layer_names:
        found |= set(getattr(layer, layer_name).keys())
    return found


def _rescaled_lora_scaling(layer, adapter: str, scale: float):
    return replaced_lora_scaling(layer, adapter, layer.scaling[adapter] * scale)


@contextmanager
def replaced_lora_scaling(layer, adapter: str, value: float) -> Iterator[None]:
    """While inside, the LoRA layer's scaling for `adapter` is `value`; restored on exit."""
    original = layer.scaling[adapter]
    layer.scaling[adapter] = value
    try:
        yield
    finally:
        layer.scaling[adapter] = original


@contextmanager
def _rescaled_layer_output(layer, layer_name: str, adapter: str, scale: float) -> Iterator[None]:
    base = layer.get_base_layer()
    if not isinstance(base, AFFINE_LAYERS):
        raise NotImplementedError(
            f"Re-scaling adapter {adapter!r} on {layer_name} ({type(layer).__name__} over "
            f"{type(base).__name__}) is not supported yet: only layers affine in their weights "
            f"({', '.join(t.__name__ for t in AFFINE_LAYERS)}) can be re-scaled exactly."
        )
    others = [a for a in layer.active_adapters if a != adapter and a in adapters_of(layer)]
    if others:
        raise NotImplementedError(
            f"{layer_name} has other active adapters {others} besides {adapter!r}; re-scaling one of several "
            "active non-LoRA adapters is not supported yet. Deactivate the others while training."
        )
    with patched_forward(layer, lambda adapted, *args, **kwargs: _blend(base, adapted, scale, args, kwargs)):
        yield


@contextmanager
def _rescaled_modules_to_save(wrapper, wrapper_name: str, adapter: str, scale: float) -> Iterator[None]:
    original = wrapper.original_module
    if not isinstance(original, AFFINE_LAYERS):
        raise NotImplementedError(
            f"modules_to_save entry {wrapper_name} ({type(original).__name__}) is not affine in its weights, so "
            f"it cannot be re-scaled exactly; supported: {', '.join(t.__name__ for t in AFFINE_LAYERS)}."
        )
    if adapter not in wrapper.active_adapters:
        yield
        return
    with patched_forward(wrapper, lambda adapted, *args, **kwargs: _blend(original, adapted, scale, args, kwargs)):
        yield


def _blend(base: nn.Module, adapted_forward, scale: float, args, kwargs) -> torch.Tensor:
    adapted = adapted_forward(*args, **kwargs)
    base_out = base(*args, **kwargs)
    return base_out + scale * (adapted - base_out)


@contextmanager
def patched_forward(module: nn.Module, forward) -> Iterator[None]:
    """Make `module(...)` call `forward(original_forward, ...)`; restore whatever was there."""
    had_instance_forward = "forward" in module.__dict__
    previous = module.forward

    def patched(self, *args, **kwargs):
        return forward(previous, *args, **kwargs)

    module.forward = types.MethodType(patched, module)
    try:
        yield
    finally:
        if had_instance_forward:
            module.forward = previous
        else:
            del module.forward
