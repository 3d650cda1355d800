"""Foreign updates: other LoRA adapters of the same base, read from their saved folders (safetensors only) and
held frozen, for the 'foreign' partner of the off-ray terms."""

import json
import math
import os

import torch
from torch import nn


class ForeignUpdate:
    """Another update of the same base, held as frozen per-layer factors (scaling*B, A): never a
    parameter or buffer of the model, so it is neither trained nor saved."""

    def __init__(self, name: str, factors: dict[str, tuple[torch.Tensor, torch.Tensor]]):
        self.name = name
        self.factors = factors
        self._cast = {}

    def get(self, path: str, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        if path not in self.factors:
            return None
        key = (path, like.device, like.dtype)
        if key not in self._cast:
            b, a = self.factors[path]
            self._cast[key] = (b.to(like.device, like.dtype), a.to(like.device, like.dtype))
        return self._cast[key]


def load_foreign_update(folder: str) -> ForeignUpdate:
    """A saved PEFT LoRA adapter folder (adapter_config.json + adapter_model.safetensors) as a
    `ForeignUpdate`; its dW = scaling * B @ A per layer."""
    config_path = os.path.join(folder, "adapter_config.json")
    if not os.path.isfile(config_path):
        raise ValueError(
            f"trap_foreign_adapters entry {folder!r} is not a PEFT adapter folder (no adapter_config.json). Pass the "
            "folder written by model.save_pretrained(...) of a LoRA adapter of the same base model."
        )
    with open(config_path) as handle:
        config = json.load(handle)
    if str(config.get("peft_type", "LORA")).upper() != "LORA" or config.get("use_dora"):
        raise ValueError(
            f"trap_foreign_adapters entry {folder!r} is a {config.get('peft_type')} adapter"
            f"{' with DoRA' if config.get('use_dora') else ''}; only plain LoRA / rsLoRA adapters can be used as "
            "foreign updates. Remove it from trap_foreign_adapters."
        )
    if config.get("alpha_pattern"):
        raise ValueError(
            f"trap_foreign_adapters entry {folder!r} uses alpha_pattern, which is not supported for foreign updates; "
            "remove it from trap_foreign_adapters."
        )
    state = _load_adapter_state(folder)
    alpha = float(config.get("lora_alpha", 8))
    factors_a, factors_b = {}, {}
    for key, tensor in state.items():
        for kind, table in (("lora_A", factors_a), ("lora_B", factors_b)):
            marker = f".{kind}."
            if marker in key and key.endswith(".weight"):
                table[canonical_path(key.split(marker)[0])] = tensor.detach().float()
    factors = {}
    for path, a in factors_a.items():
        if path not in factors_b or a.dim() != 2:
            continue
        rank = a.shape[0]
        scaling = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
        factors[path] = (factors_b[path] * scaling, a)
    if not factors:
        raise ValueError(f"trap_foreign_adapters entry {folder!r} holds no LoRA A/B weight pairs.")
    return ForeignUpdate(os.path.basename(os.path.normpath(folder)), factors)


def _load_adapter_state(folder: str) -> dict[str, torch.Tensor]:
    """The adapter's weights, from safetensors only: the library never unpickles a file."""
    path = os.path.join(folder, "adapter_model.safetensors")
    if not os.path.isfile(path):
        raise ValueError(
            f"trap_foreign_adapters entry {folder!r} has no adapter_model.safetensors; adapters are read as "
            "safetensors only. Re-save it with model.save_pretrained(folder) (safe_serialization is the default)."
        )
    from safetensors.torch import load_file

    return load_file(path)


def canonical_path(module_name: str) -> str:
    """A LoRA layer's path below the PEFT wrapper, the same in a saved adapter and in any model that
    wraps the PeftModel (e.g. 'encoder.layer.0.attention.self.query')."""
    marker = "base_model.model."
    return module_name.rsplit(marker, 1)[-1] if marker in module_name else module_name


def matched_foreign_updates(model: nn.Module, foreign: list[ForeignUpdate], layers) -> list[ForeignUpdate]:
    """Check each foreign update against the model's LoRA layers: it must share at least one layer
    with the protected adapter, and its shapes must match there."""
    paths = {canonical_path(name): layer for name, layer, _ in layers}
    for update in foreign:
        shared = [p for p in update.factors if p in paths]
        if not shared:
            raise ValueError(
                f"Foreign update {update.name!r} shares no LoRA layer with the protected adapter (its layers e.g. "
                f"{sorted(update.factors)[:3]}, the adapter's e.g. {sorted(paths)[:3]}). It must be a LoRA adapter of "
                "the same base model on the same target modules; remove it from trap_foreign_adapters."
            )
        for p in shared:
            b, a = update.factors[p]
            weight = paths[p].get_base_layer().weight
            if (b.shape[0], a.shape[1]) != tuple(weight.shape):
                raise ValueError(
                    f"Foreign update {update.name!r} has dW of shape {(b.shape[0], a.shape[1])} at {p}, but the model's "
                    f"weight there is {tuple(weight.shape)}: not an update of the same base model."
                )
    return list(foreign)
