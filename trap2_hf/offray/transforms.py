"""The off-ray transforms, one stateless function per part of a term (`choices/offray.py` names them).

A layer's dW' is a sum of parts, each ('dense', M) or ('lowrank', B', A') with dW' = B' @ A', built by autograd
from the layer's LoRA factors `a` (r x in) and `b` (out x r) and its `scaling`, so gradients flow into them.
Every random choice comes from the layer's generator (`seeding.OFFRAY_LAYER`: the draw's seed and the layer's
index), drawn in a fixed order: own part, then partner.
"""

import torch
import torch.nn.functional as F
from torch.utils.weak import WeakIdKeyDictionary

from ..seeding import OFFRAY_LAYER
from .draws import OffrayDraw


# ----------------------------------------------------------------------------- own-update transforms
def _scale(a, b, scaling, draw, generator):
    """w * dW."""
    return [("lowrank", draw.weight * scaling * b, a)]


def _dare(a, b, scaling, draw, generator):
    """w * M (.) dW / keep, M ~ Bernoulli(keep) per entry."""
    mask = torch.rand(b.shape[0], a.shape[1], generator=generator, device=a.device) < draw.keep
    return [("dense", (draw.weight * scaling / draw.keep) * (mask.to(a.dtype) * (b @ a)))]


def _prune(a, b, scaling, draw, generator):
    """w times the top-`keep` fraction of dW's entries by magnitude."""
    delta = scaling * (b @ a)
    k = max(1, int(draw.keep * delta.numel()))
    magnitudes = delta.detach().abs()
    # The k-th largest magnitude as a threshold: a selection, several times faster than sorting with topk.
    threshold = magnitudes.reshape(-1).kthvalue(delta.numel() - k + 1).values
    return [("dense", draw.weight * (magnitudes >= threshold).to(delta.dtype) * delta)]


def _factor_dare(a, b, scaling, draw, generator):
    """Each LoRA factor dropped and rescaled on its own, combined at weight w (peft's dare_linear)."""
    mask_a = (torch.rand(a.shape, generator=generator, device=a.device) < draw.keep).to(a.dtype)
    mask_b = (torch.rand(b.shape, generator=generator, device=a.device) < draw.keep).to(a.dtype)
    return [("lowrank", (draw.weight * scaling / draw.keep**2) * (mask_b * b), mask_a * a)]


# mergekit's default epsilon for DELLA: keep probabilities spread over keep +- epsilon by magnitude rank.
DELLA_EPSILON = 0.15


def _della(a, b, scaling, draw, generator):
    """w times DELLA's magnitude-ranked random drop (mergekit's della_magprune): within each row of dW, entry of
    magnitude rank r (0 smallest, 1 largest) kept with probability keep - e + 2 e r, e = min(0.15, keep/2,
    (1 - keep)/2); the kept entries rescaled so the layer's L1 norm stays that of dW (the rescale is not trained)."""
    delta = scaling * (b @ a)
    keep = draw.keep
    if keep >= 1:
        return [("dense", draw.weight * delta)]
    epsilon = min(DELLA_EPSILON, keep / 2, (1 - keep) / 2)
    ranks = delta.detach().abs().argsort(dim=1).argsort(dim=1).to(delta.dtype)
    probs = keep - epsilon + 2 * epsilon * ranks / max(delta.shape[1] - 1, 1)
    mask = (torch.rand(delta.shape, generator=generator, device=a.device, dtype=delta.dtype) < probs).to(delta.dtype)
    kept = mask * delta
    rescale = delta.detach().abs().sum() / kept.detach().abs().sum().clamp_min(1e-12)
    return [("dense", (draw.weight * rescale) * kept)]


def _layer_scale(a, b, scaling, draw, generator):
    """dW times the layer's own weight, uniform on draw.weight_range (one per layer, as SCE's per-tensor weights
    give)."""
    lo, hi = draw.weight_range
    weight = lo + (hi - lo) * torch.rand((), generator=generator, device=a.device, dtype=torch.float64).item()
    return [("lowrank", weight * scaling * b, a)]


def _guard(a, b, scaling, draw, generator):
    """dW plus dense noise of norm `draw.noise` * ||dW||."""
    noise = torch.randn(b.shape[0], a.shape[1], generator=generator, device=a.device, dtype=a.dtype)
    norm = _lowrank_norm(scaling * b.detach(), a.detach())
    return [("lowrank", 1.0 * scaling * b, a), ("dense", noise * (draw.noise * norm / noise.norm().clamp_min(1e-12)))]


TRANSFORMS = {
    "scale": _scale, "dare": _dare, "prune": _prune, "factor_dare": _factor_dare, "della": _della,
    "layer_scale": _layer_scale, "guard": _guard,
}


# ----------------------------------------------------------------------------- partners
# Partners take the layer's frozen base weight W0 as `base` (only 'spectral' reads it).
def _foreign(a, b, scaling, draw, generator, foreign, base=None):
    """sum_j c_j dW_j over the foreign updates that have this layer."""
    return [("lowrank", c * pair[0], pair[1]) for c, pair in foreign if pair is not None]


def _synthetic(a, b, scaling, draw, generator, foreign, base=None):
    """A random rank-r update U V^T with ||U V^T|| = c * ||dW||."""
    rank = a.shape[0]
    u = torch.randn(b.shape[0], rank, generator=generator, device=a.device, dtype=a.dtype)
    v = torch.randn(rank, a.shape[1], generator=generator, device=a.device, dtype=a.dtype)
    return [_norm_matched(u, v, draw.coefs[0], a, b, scaling)]


# How many of W0's top singular directions (times the LoRA rank r) a 'spectral' partner lives in.
SPECTRAL_DIRECTIONS_PER_RANK = 4
_TOP_SINGULAR = WeakIdKeyDictionary()  # W0 -> {k: (U_k, V_k)}: W0 is frozen, so its SVD is taken once


def _spectral(a, b, scaling, draw, generator, foreign, base=None):
    """A random rank-r update (U_k G)(H V_k^T), G and H Gaussian, inside the span of the top k = 4r singular
    directions of the layer's base weight W0 (where task vectors concentrate), with norm c * ||dW||."""
    if base is None:
        raise ValueError("The 'spectral' partner needs the layer's base weight W0; offray_update passes it.")
    rank = a.shape[0]
    u_k, v_k = top_singular_directions(base, SPECTRAL_DIRECTIONS_PER_RANK * rank)
    k = u_k.shape[1]
    g = torch.randn(k, rank, generator=generator, device=a.device, dtype=a.dtype)
    h = torch.randn(rank, k, generator=generator, device=a.device, dtype=a.dtype)
    left, right = u_k.to(a.dtype) @ g, h @ v_k.to(a.dtype).T
    return [_norm_matched(left, right, draw.coefs[0], a, b, scaling)]


def top_singular_directions(weight: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(U_k, V_k): the left (out x k) and right (in x k) singular vectors of `weight`'s k largest singular values
    (k capped at the smaller dimension), computed once per weight and k."""
    per_weight = _TOP_SINGULAR.setdefault(weight, {})
    if k not in per_weight:
        u, _, vh = torch.linalg.svd(weight.detach().float(), full_matrices=False)
        k_eff = min(k, u.shape[1])
        per_weight[k] = (u[:, :k_eff].contiguous(), vh[:k_eff].T.contiguous())
    return per_weight[k]


PARTNER_UPDATES = {"foreign": _foreign, "synthetic": _synthetic, "spectral": _spectral}


# ----------------------------------------------------------------------------- one layer
def layer_parts(
    a: torch.Tensor,
    b: torch.Tensor,
    scaling: float,
    draw: OffrayDraw,
    index: int,
    foreign: list[tuple[float, tuple[torch.Tensor, torch.Tensor] | None]] = (),
    base: torch.Tensor | None = None,
) -> list[tuple]:
    """dW' of one layer as a sum of parts, each ('dense', M) or ('lowrank', B', A') with dW' = B' @ A'.

    `a`, `b`: the layer's LoRA factors (r x in, out x r); `foreign`: (c_j, (scaling_j*B_j, A_j) or None); `base`:
    the layer's frozen base weight W0 (out x in), which the 'spectral' partner needs."""
    generator = OFFRAY_LAYER.generator(draw.seed, index, device=a.device)
    spec = draw.spec
    if spec.own.name not in TRANSFORMS:
        raise ValueError(f"Unknown off-ray transform {spec.own.name!r}.")
    parts = TRANSFORMS[spec.own.name](a, b, scaling, draw, generator)
    if spec.partner is not None:
        parts += PARTNER_UPDATES[spec.partner.name](a, b, scaling, draw, generator, foreign, base=base)
    return parts


def parts_dense(parts: list[tuple]) -> torch.Tensor:
    """dW' as one matrix (for checks)."""
    return sum(p[1] if p[0] == "dense" else p[1] @ p[2] for p in parts)


def apply_parts(parts: list[tuple], x: torch.Tensor) -> torch.Tensor:
    out = None
    for part in parts:
        y = F.linear(x, part[1]) if part[0] == "dense" else F.linear(F.linear(x, part[2]), part[1])
        out = y if out is None else out + y
    return out


def _norm_matched(left, right, coef, a, b, scaling) -> tuple:
    """The part ('lowrank', left', right) with left' @ right = left @ right scaled to norm coef * ||dW||."""
    target = coef * _lowrank_norm(scaling * b.detach(), a.detach())
    return ("lowrank", left * (target / _lowrank_norm(left, right).clamp_min(1e-12)), right)


def _lowrank_norm(b: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """||B @ A||_F from the r x r Gram matrices: sqrt(trace((B^T B)(A A^T)))."""
    return ((b.T @ b) * (a @ a.T)).sum().clamp_min(0).sqrt()
