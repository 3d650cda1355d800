"""Task vectors in weight space: what each update adds to the base weights, merged and applied in place.

A task vector is `{parameter name: delta}` keyed by the names of the base weights it changes, in the
namespace of the model the audit evaluates (for a PEFT model: `....base_layer.weight`, evaluated under
`model.disable_adapter()`). Applying one and undoing it restores the base weights bit for bit, so the
audit never reloads the model between merge configurations.
"""

from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import torch
from torch import nn

from ..rescale import adapters_of
from .merge_method import MergeMethod

TaskVector = dict[str, torch.Tensor]


def adapter_task_vector(model: nn.Module, adapter: str) -> TaskVector:
    """W_adapted - W0 for every base weight the PEFT `adapter` changes.

    Plain LoRA layers give it by `get_delta_weight(adapter)`; other tuner layers (DoRA, LoHa, LoKr,
    IA3, LoRA with a bias) by merging the adapter into a copy of the base weights and subtracting,
    which is exact for layers that are not linear in their update. `modules_to_save` copies give
    copy - original.
    """
    from peft.tuners.lora import LoraLayer
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils.other import ModulesToSaveWrapper

    if adapter not in getattr(model, "peft_config", {}):
        known = ", ".join(getattr(model, "peft_config", {})) or "none"
        raise ValueError(f"The model has no adapter {adapter!r} (adapters: {known}).")
    param_names = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}
    vector: TaskVector = {}
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, ModulesToSaveWrapper):
                if adapter in module.modules_to_save:
                    copy = dict(module.modules_to_save[adapter].named_parameters())
                    for name, param in module.original_module.named_parameters():
                        vector[param_names[id(param)]] = copy[name].detach().float() - param.detach().float()
            elif isinstance(module, BaseTunerLayer) and adapter in adapters_of(module):
                base = module.get_base_layer()
                plain_lora = (
                    isinstance(module, LoraLayer)
                    and adapter not in getattr(module, "lora_variant", {})
                    and not getattr(module, "lora_bias", {}).get(adapter, False)
                )
                if plain_lora:
                    deltas = {"weight": module.get_delta_weight(adapter)}
                else:
                    deltas = _merged_minus_base(module, base, adapter)
                for name, delta in deltas.items():
                    vector[param_names[id(getattr(base, name))]] = delta.detach().float()
    if not vector:
        raise ValueError(f"No layer of the model carries adapter {adapter!r}; its task vector would be empty.")
    return vector


def full_task_vector(model: nn.Module, finetuned: Mapping[str, torch.Tensor]) -> TaskVector:
    """theta - theta0 for every parameter of `finetuned` (theta) that differs from `model`'s (theta0)."""
    params = dict(model.named_parameters())
    unknown = sorted(set(finetuned) - set(params))
    if unknown:
        raise ValueError(
            f"The fine-tuned state names parameters the base model does not have: {unknown[:5]}. Pass "
            "{name: tensor} keyed by the base model's named_parameters() (buffers are not merged)."
        )
    vector = {}
    for name, theta in finetuned.items():
        delta = theta.detach().to(params[name].device).float() - params[name].detach().float()
        if delta.any():
            vector[name] = delta
    return vector


def merge_task_vectors(
    method: MergeMethod, vectors: list[TaskVector], params: Mapping, seed: int = 0, weights=None,
    base: Mapping[str, torch.Tensor] | None = None,
) -> TaskVector:
    """Merge task vectors tensor by tensor with a task-vector method; `params["weight"]` is shared by all,
    unless `weights` gives one per vector (then `params` needs no "weight"; a density may also be a
    list, one per vector). A method without weights (mergekit's sce, model_stock, karcher) takes none.

    A method that `needs_base` (mergekit's) is given `base[name]`, the base weight W0 of each tensor merged
    (what `base_weights` reads from the model). A tensor missing from a vector counts as zero (an adapter
    that does not touch that layer). Tensors are merged in sorted order of their names, as mergekit's own
    file-based merge does; randomised methods draw from a fork of the global RNG seeded once with `seed`:
    reproducible, and the caller's RNG state is untouched.
    """
    if not method.on_task_vectors:
        raise ValueError(f"{method.name!r} is a PEFT combination type; it merges adapters, not task vectors.")
    extra = {k: v for k, v in params.items() if k != "weight"}
    if not method.weighted:
        weights = None
    elif weights is None:
        weights = torch.full((len(vectors),), float(params["weight"]))
    else:
        if len(weights) != len(vectors):
            raise ValueError(f"Got {len(weights)} weights for {len(vectors)} task vectors; pass one per vector.")
        weights = torch.tensor([float(w) for w in weights])
    keys = sorted(set().union(*vectors))
    if method.needs_base:
        missing = [key for key in keys if base is None or key not in base]
        if missing:
            raise ValueError(f"{method.name!r} merges from the base weights W0: pass base={{name: W0}} for {missing[:5]}.")
        extra["base"] = None
    merged = {}
    with torch.random.fork_rng(devices=_cuda_devices(vectors)):
        torch.manual_seed(seed)
        for key in keys:
            like = next(v[key] for v in vectors if key in v)
            tensors = [v[key] if key in v else torch.zeros_like(like) for v in vectors]
            if method.needs_base:
                extra["base"] = base[key].to(like.device)
            merged[key] = method.merge(tensors, weights, **extra)
    return merged


def base_weights(model: nn.Module, names) -> dict[str, torch.Tensor]:
    """W0 of the named parameters, as float32 copies (read while no merge is applied to the model)."""
    params = dict(model.named_parameters(remove_duplicate=False))
    return {name: params[name].detach().float().clone() for name in names}


@contextmanager
def applied(model: nn.Module, vector: Mapping[str, torch.Tensor], scale: float = 1.0) -> Iterator[None]:
    """Hold W0 + scale * delta in the named parameters while inside; restore W0 exactly on exit."""
    params = dict(model.named_parameters(remove_duplicate=False))
    missing = sorted(set(vector) - set(params))
    if missing:
        raise ValueError(f"The task vector names parameters the model does not have: {missing[:5]}.")
    originals, seen = {}, set()
    try:
        with torch.no_grad():
            for name, delta in vector.items():
                param = params[name]
                if id(param) in seen:
                    raise ValueError(f"The task vector names the tied parameter {name!r} twice; keep one name.")
                seen.add(id(param))
                originals[name] = param.data
                param.data = (param.data.float() + scale * delta.to(param.device)).to(param.dtype)
        yield
    finally:
        for name, data in originals.items():
            params[name].data = data


def _merged_minus_base(layer, base: nn.Module, adapter: str) -> dict[str, torch.Tensor]:
    originals = {name: p.data for name, p in base.named_parameters(recurse=False)}
    caches = set(getattr(layer, "_caches", {}))
    try:
        for name, data in originals.items():
            getattr(base, name).data = data.clone()
        layer.merge(adapter_names=[adapter])
        return {
            name: getattr(base, name).data.float() - data.float()
            for name, data in originals.items()
            if not torch.equal(getattr(base, name).data, data)
        }
    finally:
        for name, data in originals.items():
            getattr(base, name).data = data
        if adapter in layer.merged_adapters:
            layer.merged_adapters.remove(adapter)
        for key in set(getattr(layer, "_caches", {})) - caches:
            layer._caches.pop(key)


def _cuda_devices(vectors: list[TaskVector]) -> list[int]:
    return sorted({t.device.index or 0 for v in vectors for t in v.values() if t.device.type == "cuda"})
