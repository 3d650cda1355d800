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
    rim: tuple[float, float, float] = (0.0, 1.0, 1.0),
) -> list[float]:
    """Draw `num_scales` scales from S.

    'uniform': each draw is uniform on the union of the intervals (by length).
    'stratified': draw k comes from interval k mod (number of intervals), so a step with two scales
    has one on each side of s = 1.
    `rim` = (share, low, high): each draw, with probability `share`, comes from the same place cut to
    [low, high] (its side's part there, for 'stratified'; a side without one keeps its whole interval),
    so that share of the ascent lands where merges that normalise put the update, near s = 1.
    """
    intervals = trap_scale_intervals(scale_min, scale_max, margin)
    if not intervals:
        raise ValueError(
            f"No scale in [{scale_min}, {scale_max}] lies outside [1 - {margin}, 1 + {margin}]."
        )
    if sampling not in ("stratified", "uniform"):
        raise ValueError(f"Unknown trap_scale_sampling {sampling!r}; use 'uniform' or 'stratified'.")
    uniforms = torch.rand(num_scales, generator=generator, dtype=torch.float64).tolist()
    on_rim = [False] * num_scales
    share, low, high = rim
    if share > 0:  # drawn after the positions, so the draws without a rim stay what they were
        on_rim = (torch.rand(num_scales, generator=generator, dtype=torch.float64) < share).tolist()
    scales = []
    for k, u in enumerate(uniforms):
        support = [intervals[k % len(intervals)]] if sampling == "stratified" else intervals
        if on_rim[k]:
            support = _cut(support, low, high) or support
        scales.append(_point_in_union(support, u))
    return scales


def _cut(intervals: list[tuple[float, float]], low: float, high: float) -> list[tuple[float, float]]:
    """The parts of `intervals` inside [low, high]."""
    cut = [(max(lo, low), min(hi, high)) for lo, hi in intervals]
    return [(lo, hi) for lo, hi in cut if lo <= hi]


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
