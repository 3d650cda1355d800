"""The Trap² objective as plain maths: the scale distribution S, the weighting w(s) and the joint loss.

    J(dW) = L(W0 + dW) - lambda * E_{s~S}[ w(s) * L(W0 + s*dW) ],
    S = Uniform([s_min, 1 - delta] U [1 + delta, s_max]).

The trainer never builds J as one tensor: it runs one backward per scale (memory, activation
checkpointing) with the coefficient `rescaled_loss_coefficient`. `trap_objective` is the same
quantity in one expression, for direct checks.
"""

import math

import torch

from .seeding import SCALES
from .settings import trap_scale_intervals


def scale_weight(scale: float, weighting: str) -> float:
    """w(s): 1/s ('inv'), 1/sqrt(s) ('inv_sqrt') or 1 ('none')."""
    if weighting == "inv":
        return 1.0 / scale
    if weighting == "inv_sqrt":
        return 1.0 / math.sqrt(scale)
    if weighting == "none":
        return 1.0
    raise ValueError(f"Unknown trap_weighting {weighting!r}; use 'inv', 'inv_sqrt' or 'none'.")


def rescaled_loss_coefficient(scale: float, trap_lambda: float, weighting: str, num_scales: int = 1) -> float:
    """The factor that multiplies L(W0 + s*dW) in J when `num_scales` scales are drawn per step."""
    return -trap_lambda * scale_weight(scale, weighting) / num_scales


def sample_scales(
    scale_min: float,
    scale_max: float,
    margin: float,
    num_scales: int,
    sampling: str,
    generator: torch.Generator,
) -> list[float]:
    """Draw `num_scales` scales from S.

    'uniform': each draw is uniform on the union of the intervals (by length).
    'stratified': draw k comes from interval k mod (number of intervals), so a step with two scales
    has one on each side of s = 1.
    """
    intervals = trap_scale_intervals(scale_min, scale_max, margin)
    if not intervals:
        raise ValueError(
            f"No scale in [{scale_min}, {scale_max}] lies outside [1 - {margin}, 1 + {margin}]."
        )
    uniforms = torch.rand(num_scales, generator=generator, dtype=torch.float64).tolist()
    if sampling == "stratified":
        return [_point_in(intervals[k % len(intervals)], u) for k, u in enumerate(uniforms)]
    if sampling == "uniform":
        return [_point_in_union(intervals, u) for u in uniforms]
    raise ValueError(f"Unknown trap_scale_sampling {sampling!r}; use 'uniform' or 'stratified'.")


def _point_in(interval: tuple[float, float], u: float) -> float:
    lo, hi = interval
    return lo + u * (hi - lo)


def _point_in_union(intervals: list[tuple[float, float]], u: float) -> float:
    """The point at fraction u of the intervals laid end to end."""
    position = u * sum(hi - lo for lo, hi in intervals)
    for lo, hi in intervals:
        if position <= hi - lo:
            return lo + position
        position -= hi - lo
    return intervals[-1][1]


def step_generator(seed: int, step: int) -> torch.Generator:
    """A generator that depends only on (seed, optimizer step): every rank, and every resumed run,
    draws the same scales for the same step with no state to checkpoint."""
    return SCALES.generator(seed, step)


def trap_objective(
    nominal_loss: torch.Tensor,
    rescaled_losses: list[torch.Tensor],
    scales: list[float],
    trap_lambda: float,
    weighting: str,
) -> torch.Tensor:
    """J = L(1) - lambda * mean_k w(s_k) L(s_k), as one tensor."""
    joint = nominal_loss
    for scale, loss in zip(scales, rescaled_losses):
        joint = joint + rescaled_loss_coefficient(scale, trap_lambda, weighting, len(scales)) * loss
    return joint
