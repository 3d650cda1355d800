"""Off-ray perturbations: the update as merges other than a plain re-scaling see it.

Trap² shapes the loss along W0 + s*dW only. Merges also add other updates (W0 + s*dW + sum_j c_j dW_j)
and transform the update itself (DARE drop-and-rescale, magnitude pruning / TIES trimming, PEFT's
factor-wise combinations). An off-ray term is one such transformed weight, dW' = T(dW); the trainer
maximises the loss there as it does at re-scaled weights.

A term is an own-update transform, a partner, or both joined by '+':
- own transforms: 'dare' (w * M (.) dW / keep, M ~ Bernoulli(keep) per entry), 'prune' (w times the
  top-`keep` fraction of dW's entries by magnitude), 'factor_dare' (each LoRA factor dropped and
  rescaled on its own, then combined at weight w as sqrt(w) on each factor: peft's dare_linear
  combination); without one the own update is re-scaled, w * dW;
- partners: 'foreign' (sum_j c_j dW_j over the listed adapters of the same base) and 'synthetic' (a
  random rank-r update U V^T with ||U V^T|| = c * ||dW||, per layer, redrawn every step).
'guard' (not a term one lists: `trap_guard_lambda`) is dW plus small dense noise, whose loss is
*minimised*, so the update tolerates quantization-sized perturbations.

Inside `offray_update(model, draw)` every LoRA Linear layer of the trained adapter computes
W0 x + dW' x, with dW' built by autograd from the layer's own A and B, so gradients flow into them.
Every random choice comes from `draw.seed` and the layer's index, so a forward recomputed by
activation checkpointing sees the same masks, and a resumed run the same draws.
"""

import json
import math
import os
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .rescale import _adapters_of, _patched_forward, replaced_lora_scaling, trained_adapter_names

OWN_TRANSFORMS = ("dare", "prune", "factor_dare")
PARTNERS = ("foreign", "synthetic")
GUARD = "guard"


def parse_terms(spec) -> list[str]:
    """The canonical term list of a `trap_offray` value: a comma-separated string or a list of terms,
    each an own transform and/or a partner joined by '+' (e.g. 'dare+foreign'). Raises ValueError."""
    if spec is None:
        return []
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    terms = []
    for item in items:
        item = str(item).strip()
        if not item:
            continue
        parts = [p.strip() for p in item.split("+")]
        unknown = [p for p in parts if p not in OWN_TRANSFORMS + PARTNERS]
        own = [p for p in parts if p in OWN_TRANSFORMS]
        partner = [p for p in parts if p in PARTNERS]
        if unknown or len(own) > 1 or len(partner) > 1:
            raise ValueError(
                f"trap_offray term {item!r} is not valid: a term is at most one of {', '.join(OWN_TRANSFORMS)} and/or "
                f"at most one of {', '.join(PARTNERS)}, joined by '+' (e.g. 'dare', 'synthetic', 'dare+foreign')."
            )
        terms.append("+".join(own + partner))
    return terms


@dataclass(frozen=True)
class OffrayDraw:
    """One off-ray pass: what is done to the update, at which weights, with which random seed."""

    term: str
    weight: float = 1.0  # w: the own update's weight
    keep: float = 1.0  # DARE / factor-DARE keep rate, or the density kept by 'prune'
    coefs: tuple[float, ...] = ()  # c_j per foreign update, or (c,) for 'synthetic'
    seed: int = 0
    noise: float = 0.0  # 'guard': the noise norm relative to ||dW||

    @property
    def own(self) -> str:
        if self.term == GUARD:
            return GUARD
        return next((p for p in self.term.split("+") if p in OWN_TRANSFORMS), "scale")

    @property
    def partner(self) -> str | None:
        return next((p for p in self.term.split("+") if p in PARTNERS), None)


def draw_offray(
    terms: list[str],
    count: int,
    step: int,
    seed: int,
    weight_range: tuple[float, float],
    keep_range: tuple[float, float],
    coef_range: tuple[float, float],
    num_foreign: int = 0,
) -> list[OffrayDraw]:
    """The `count` off-ray draws of an optimizer step: a function of (seed, step) only. Terms are taken
    in turn (pass k of step t uses term (t*count + k) mod len(terms)); weights, keep rates and
    coefficients are uniform on their ranges."""
    generator = torch.Generator().manual_seed((seed * 1_000_033 + step * 104_729 + 99_991) % (2**63 - 1))
    draws = []
    for k in range(count):
        term = terms[(step * count + k) % len(terms)]
        u = torch.rand(3 + max(num_foreign, 1), generator=generator, dtype=torch.float64).tolist()
        pass_seed = int(torch.randint(0, 2**62, (1,), generator=generator))
        partner = OffrayDraw(term).partner
        n_coefs = num_foreign if partner == "foreign" else 1 if partner == "synthetic" else 0
        draws.append(
            OffrayDraw(
                term=term,
                weight=_lerp(weight_range, u[0]),
                keep=_lerp(keep_range, u[1]) if OffrayDraw(term).own != "scale" else 1.0,
                coefs=tuple(_lerp(coef_range, v) for v in u[3 : 3 + n_coefs]),
                seed=pass_seed,
            )
        )
    return draws


def guard_draw(step: int, seed: int, noise: float) -> OffrayDraw:
    """The step's guard pass: dW plus dense noise of norm `noise` * ||dW|| per layer."""
    return OffrayDraw(term=GUARD, noise=noise, seed=(seed * 7_777_777 + step * 31_337 + 17) % (2**62))


def _lerp(interval: tuple[float, float], u: float) -> float:
    return interval[0] + u * (interval[1] - interval[0])


# ----------------------------------------------------------------------------- foreign updates
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


# ----------------------------------------------------------------------------- the transforms
def layer_parts(
    a: torch.Tensor,
    b: torch.Tensor,
    scaling: float,
    draw: OffrayDraw,
    index: int,
    foreign: list[tuple[float, tuple[torch.Tensor, torch.Tensor] | None]] = (),
) -> list[tuple]:
    """dW' of one layer as a sum of parts, each ('dense', M) or ('lowrank', B', A') with dW' = B' @ A'.

    `a`, `b`: the layer's LoRA factors (r x in, out x r); `foreign`: (c_j, (scaling_j*B_j, A_j) or None)."""
    generator = _layer_generator(draw.seed, index, a.device)
    own, w = draw.own, draw.weight
    parts = []
    if own in ("scale", GUARD):
        parts.append(("lowrank", (w if own == "scale" else 1.0) * scaling * b, a))
    elif own == "dare":
        mask = torch.rand(b.shape[0], a.shape[1], generator=generator, device=a.device) < draw.keep
        parts.append(("dense", (w * scaling / draw.keep) * (mask.to(a.dtype) * (b @ a))))
    elif own == "prune":
        delta = scaling * (b @ a)
        k = max(1, int(draw.keep * delta.numel()))
        mask = torch.zeros(delta.numel(), dtype=delta.dtype, device=delta.device)
        mask[torch.topk(delta.detach().abs().reshape(-1), k=k).indices] = 1
        parts.append(("dense", w * mask.view_as(delta) * delta))
    elif own == "factor_dare":
        mask_a = (torch.rand(a.shape, generator=generator, device=a.device) < draw.keep).to(a.dtype)
        mask_b = (torch.rand(b.shape, generator=generator, device=a.device) < draw.keep).to(a.dtype)
        parts.append(("lowrank", (w * scaling / draw.keep**2) * (mask_b * b), mask_a * a))
    else:
        raise ValueError(f"Unknown off-ray transform {own!r}.")
    if own == GUARD:
        noise = torch.randn(b.shape[0], a.shape[1], generator=generator, device=a.device, dtype=a.dtype)
        norm = _lowrank_norm(scaling * b.detach(), a.detach())
        parts.append(("dense", noise * (draw.noise * norm / noise.norm().clamp_min(1e-12))))
    if draw.partner == "foreign":
        for c, pair in foreign:
            if pair is not None:
                parts.append(("lowrank", c * pair[0], pair[1]))
    elif draw.partner == "synthetic":
        rank = a.shape[0]
        u = torch.randn(b.shape[0], rank, generator=generator, device=a.device, dtype=a.dtype)
        v = torch.randn(rank, a.shape[1], generator=generator, device=a.device, dtype=a.dtype)
        target = draw.coefs[0] * _lowrank_norm(scaling * b.detach(), a.detach())
        parts.append(("lowrank", u * (target / _lowrank_norm(u, v).clamp_min(1e-12)), v))
    return parts


def parts_dense(parts: list[tuple]) -> torch.Tensor:
    """dW' as one matrix (for checks)."""
    return sum(p[1] if p[0] == "dense" else p[1] @ p[2] for p in parts)


def _apply_parts(parts: list[tuple], x: torch.Tensor) -> torch.Tensor:
    out = None
    for part in parts:
        y = F.linear(x, part[1]) if part[0] == "dense" else F.linear(F.linear(x, part[2]), part[1])
        out = y if out is None else out + y
    return out


def _lowrank_norm(b: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """||B @ A||_F from the r x r Gram matrices: sqrt(trace((B^T B)(A A^T)))."""
    return ((b.T @ b) * (a @ a.T)).sum().clamp_min(0).sqrt()


def _layer_generator(seed: int, index: int, device: torch.device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed((seed + index * 1_000_000_007) % (2**63 - 1))


# ----------------------------------------------------------------------------- the context
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
        if not isinstance(module, BaseTunerLayer) or adapter not in _adapters_of(module):
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
    if draw.partner == "foreign" and len(draw.coefs) != len(foreign):
        raise ValueError(f"The draw has {len(draw.coefs)} foreign coefficients for {len(foreign)} foreign updates.")
    with ExitStack() as stack:
        for index, (name, layer, adapter) in enumerate(layers):
            lora_a, lora_b = layer.lora_A[adapter], layer.lora_B[adapter]
            scaling = layer.scaling[adapter]
            path = canonical_path(name)

            def delta_forward(_original, x, lora_a=lora_a, lora_b=lora_b, scaling=scaling, index=index, path=path):
                pairs = [(c, f.get(path, lora_a.weight)) for c, f in zip(draw.coefs, foreign)]
                parts = layer_parts(lora_a.weight, lora_b.weight, scaling, draw, index, pairs)
                return _apply_parts(parts, x)

            stack.enter_context(_patched_forward(lora_a, delta_forward))
            stack.enter_context(_patched_forward(lora_b, lambda _original, x: x))
            stack.enter_context(replaced_lora_scaling(layer, adapter, 1.0))
        yield


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
