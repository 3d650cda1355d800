"""The off-ray context: while inside, every LoRA Linear layer of the trained adapter computes W0 x + dW' x, with
dW' the draw's transform of its own factors (`transforms.layer_parts`)."""

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

import torch
from torch import nn

from ..batch import batch_size_of, select_rows
from ..rescale import adapters_of, patched_forward, replaced_lora_scaling, trained_adapter_names
from ..seeding import OFFRAY_ROWS
from .draws import OffrayDraw
from .foreign import ForeignUpdate, canonical_path
from .transforms import apply_parts, layer_parts


def offray_layers(model: nn.Module, adapter_names=None) -> list[tuple[str, nn.Module, str]]:
    """(name, layer, adapter) of every LoRA Linear layer of the trained adapter; refuses what off-ray
    terms cannot transform exactly, naming the fix."""
    from peft.tuners.lora import LoraLayer
    from peft.tuners.lora.layer import Linear as LoraLinear
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils.other import ModulesToSaveWrapper

    names = sorted(trained_adapter_names(model) if adapter_names is None else adapter_names)
    if len(names) != 1:
        raise ValueError(
            f"Off-ray terms (trap_offray) need exactly one trained PEFT LoRA adapter; the model has {names or 'none'}. "
            "Train one LoRA adapter (trap_target='adapter'), or drop trap_offray / trap_guard_lambda."
        )
    adapter = names[0]
    layers = []
    for name, module in model.named_modules():
        if isinstance(module, ModulesToSaveWrapper) and adapter in module.modules_to_save:
            raise ValueError(
                f"Off-ray terms transform LoRA weights only, but {name} is a modules_to_save copy of adapter "
                f"{adapter!r}. Drop modules_to_save from the LoraConfig, or drop trap_offray / trap_guard_lambda."
            )
        if not isinstance(module, BaseTunerLayer) or adapter not in adapters_of(module):
            continue
        if (
            not isinstance(module, LoraLayer)
            or type(module) is not LoraLinear
            or adapter in getattr(module, "lora_variant", {})
        ):
            raise ValueError(
                f"Off-ray terms support plain LoRA / rsLoRA on Linear layers only; {name} is "
                f"{type(module).__name__} (adapter {adapter!r}{', a LoRA variant such as DoRA' if adapter in getattr(module, 'lora_variant', {}) else ''}). "
                "Restrict target_modules to Linear layers and drop use_dora, or drop trap_offray / trap_guard_lambda."
            )
        layers.append((name, module, adapter))
    if not layers:
        raise ValueError(f"No LoRA Linear layer carries adapter {adapter!r}; off-ray terms have nothing to transform.")
    return layers


@contextmanager
def offray_update(
    model: nn.Module,
    draw: OffrayDraw,
    foreign: list[ForeignUpdate] = (),
    layers: list[tuple[str, nn.Module, str]] | None = None,
) -> Iterator[None]:
    """While inside, every LoRA layer of the trained adapter computes W0 x + dW' x, dW' = T(scaling*B@A)
    as `draw` says (see `layer_parts`); the layers are restored on exit. Each layer's LoRA dropout
    still applies to x."""
    layers = offray_layers(model) if layers is None else layers
    if draw.spec.needs_foreign_adapters and len(draw.coefs) != len(foreign):
        raise ValueError(f"The draw has {len(draw.coefs)} foreign coefficients for {len(foreign)} foreign updates.")
    with ExitStack() as stack:
        for index, (name, layer, adapter) in enumerate(layers):
            lora_a, lora_b = layer.lora_A[adapter], layer.lora_B[adapter]
            scaling = layer.scaling[adapter]
            path, base = canonical_path(name), layer.get_base_layer().weight

            def delta_forward(
                _original, x, lora_a=lora_a, lora_b=lora_b, scaling=scaling, index=index, path=path, base=base
            ):
                pairs = [(c, f.get(path, lora_a.weight)) for c, f in zip(draw.coefs, foreign)]
                parts = layer_parts(lora_a.weight, lora_b.weight, scaling, draw, index, pairs, base=base)
                return apply_parts(parts, x)

            stack.enter_context(patched_forward(lora_a, delta_forward))
            stack.enter_context(patched_forward(lora_b, lambda _original, x: x))
            stack.enter_context(replaced_lora_scaling(layer, adapter, 1.0))
        yield


def offray_inputs(inputs: dict, num_items_in_batch, fraction: float, draw: OffrayDraw) -> tuple[dict, object]:
    """(inputs, num_items_in_batch) of an off-ray pass over `fraction` of the micro-batch's rows (at least one),
    drawn from the pass's seed; num_items_in_batch shrinks with them, so a loss summed over rows and divided by it
    stays unbiased (a loss averaged over the rows it sees is unbiased as it is). `fraction` 1: everything, as is."""
    if fraction >= 1:
        return inputs, num_items_in_batch
    batch_size = batch_size_of(inputs)
    count = max(1, round(fraction * batch_size))
    rows = torch.randperm(batch_size, generator=OFFRAY_ROWS.generator(draw.seed))[:count].sort().values
    items = None if num_items_in_batch is None else num_items_in_batch * (count / batch_size)
    return select_rows(inputs, rows, batch_size), items
