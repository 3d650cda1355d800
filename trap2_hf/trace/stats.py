"""The statistics of `trap2 trace`, as plain functions of tensors: is a released update inside a suspect's weights?

Every weight-space merge leaves the release's delta R in the merged model's delta D = M - W0 (task arithmetic,
TIES, DARE, SCE, slerp, PEFT's combinations: D = a*R + other updates, up to sparsification). The test runs block by
block, a block being one weight matrix the release changes. docs/trace.md has the measurements behind each choice.

Score. Per block, R = U S V^T (its singular directions). Its `shared_directions` strongest directions are left out:
updates of one base trained on unrelated tasks lean the same way there, so they say little about this release. On
the next ones (at most `max_directions`), the score is <D, R_scored> = sum_k s_k u_k^T D v_k, and the release's
weight in the suspect is estimated as that score over ||R_scored||^2 (a*R scores a exactly). Before scoring, the
suspect's own strongest directions outside the scored block are projected out (`suspect_directions`): the other
updates of a merge and what all updates of the base share.

Decoys (no references). A decoy is the release with its scored directions re-paired at random: U S Q V^T, Q a
uniformly random rotation. It has the release's singular values and directions, so a suspect that merely shares
the release's directions (the base's) scores the same on both; only one that holds the release's own pairing of
left and right directions, a copy of it, scores above its decoys. A block matches when the release outscores all
but `match_level` of its decoys. Matches are counted over the blocks; the p-value is the binomial tail of that
count at a per-block rate of `null_match_rate`: a margin above `match_level` for the alignment unrelated updates
of one base still share. The null is "the suspect was made without this release".

References. Independent trainings of the release with its recipe and other seeds, which only its author can make.
Release and references are then exchangeable draws of one training process: under the null that the suspect
contains none of them, the release's score ranks uniformly among theirs in each block, whatever the suspect shares
with all of them (task, data, base). Per block, each candidate's score is how far it stands above its own decoys
(its z-score); the p-value is the exact tail of the release's rank sum over the blocks, the blocks taken as
independent.
"""

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from .settings import TraceSettings

TaskVector = dict[str, torch.Tensor]

@dataclass
class Block:
    """One matrix of the release, prepared once: its scored directions (u_k, s_k, v_k)."""

    name: str
    shape: tuple[int, ...]
    left: torch.Tensor  # (m, w): u_k
    values: torch.Tensor  # (w,): s_k
    right: torch.Tensor  # (w, n): v_k^T

    @property
    def width(self) -> int:
        return len(self.values)

    def core(self, delta: torch.Tensor, deflate: int = 0, seed: int = 0) -> torch.Tensor:
        """S U^T D V: the suspect's delta seen through the scored directions (w x w); with `deflate`, after
        projecting out the suspect's own `deflate` strongest directions outside them (see `deflated`)."""
        matrix = delta.reshape(self.shape[0], -1).to(self.left)
        if deflate:
            matrix = self.deflated(matrix, deflate, seed)
        return self.values[:, None] * (self.left.T @ matrix @ self.right.T)

    def deflated(self, matrix: torch.Tensor, count: int, seed: int) -> torch.Tensor:
        """`matrix` with the left and right directions of its `count` strongest singular triplets outside the
        scored block (matrix - U U^T matrix V V^T) projected out. Those are what the suspect holds most of besides
        this release (the other updates of a merge, the base's shared directions); leaving them out removes noise
        and shared alignment from the score. They are a function of the suspect and of the scored subspaces only,
        not of how the release pairs its directions, so decoys stay exchangeable with the release."""
        inside = self.left @ (self.left.T @ matrix @ self.right.T) @ self.right
        left, values, right = _top_directions(matrix - inside, count, seed, exact=False)
        kept = values > values[:1] * 1e-6  # a rank-deficient remainder has no direction past its rank
        left, right = left[:, kept], right[kept]
        matrix = matrix - left @ (left.T @ matrix)
        return matrix - (matrix @ right.T) @ right

    def z_score(self, core: torch.Tensor) -> float:
        """How far the release stands above its decoys: <D, R_scored> over the decoys' spread (sqrt(w) at most
        per direction for a copy)."""
        spread = core.norm() / self.width**0.5
        return float(torch.trace(core) / spread) if spread > 0 else 0.0

    def weight(self, core: torch.Tensor) -> float:
        """The release's estimated weight in the suspect: <D, R_scored> / ||R_scored||^2."""
        return float(torch.trace(core) / (self.values**2).sum())


def scored_blocks(vector: Mapping[str, torch.Tensor], settings: TraceSettings) -> list[Block]:
    """The release's matrices with the directions the test scores; matrices with too few directions to score
    (rank <= shared_directions) are left out."""
    blocks = []
    for name in sorted(vector):
        delta = vector[name]
        if delta.dim() < 2 or not delta.any():
            continue
        matrix = delta.detach().reshape(delta.shape[0], -1).double()
        wanted = settings.shared_directions + settings.max_directions
        left, values, right = _top_directions(matrix, wanted, settings.seed)
        rank = int((values > values[0] * 1e-6).sum()) if len(values) else 0
        start, stop = settings.shared_directions, min(rank, wanted)
        if stop <= start:
            continue
        blocks.append(Block(name, tuple(delta.shape), left[:, start:stop], values[start:stop], right[start:stop]))
    return blocks


def match_p_values(blocks: Sequence[Block], cores: Sequence[torch.Tensor], settings: TraceSettings) -> list[float]:
    """Per block, the share of decoys scoring at least the release: (1 + #{decoy >= release}) / (1 + decoys)."""
    rotations = {}
    p_values = []
    for block, core in zip(blocks, cores):
        if block.width not in rotations:
            rotations[block.width] = random_rotations(settings.decoys, block.width, settings.seed)
        decoys = (rotations[block.width] * core).sum(dim=(1, 2))
        real = torch.trace(core)
        # the identity rotation is the release itself: a tolerance keeps a decoy that equals it counted
        beaten = int((decoys >= real - 1e-9 * core.abs().sum()).sum())
        p_values.append((1 + beaten) / (1 + settings.decoys))
    return p_values


def random_rotations(count: int, width: int, seed: int) -> torch.Tensor:
    """`count` uniformly random (Haar) orthogonal width x width matrices, a function of (seed, width)."""
    generator = torch.Generator().manual_seed(seed * 1009 + width)
    gaussian = torch.randn(count, width, width, generator=generator, dtype=torch.float64)
    q, r = torch.linalg.qr(gaussian)
    return q * torch.sign(torch.diagonal(r, dim1=1, dim2=2)).unsqueeze(1)


def binomial_tail(successes: int, trials: int, rate: float) -> float:
    """P(Binomial(trials, rate) >= successes), exact."""
    if successes <= 0:
        return 1.0
    if successes > trials:
        return 0.0
    log_terms = [
        math.lgamma(trials + 1) - math.lgamma(k + 1) - math.lgamma(trials - k + 1)
        + k * math.log(rate) + (trials - k) * math.log1p(-rate)
        for k in range(successes, trials + 1)
    ]
    top = max(log_terms)
    return min(1.0, math.exp(top) * sum(math.exp(t - top) for t in log_terms))


def rank_sum_tail(ranks: Sequence[int], candidates: int) -> float:
    """P(sum of len(ranks) independent uniform ranks on 1..candidates >= sum(ranks)), exact by convolution."""
    distribution = [1.0]  # of the sum of (rank - 1) so far
    for _ in ranks:
        widened = [0.0] * (len(distribution) + candidates - 1)
        for total, mass in enumerate(distribution):
            for step in range(candidates):
                widened[total + step] += mass / candidates
        distribution = widened
    observed = sum(ranks) - len(ranks)
    return min(1.0, sum(distribution[observed:]))


def layer_of(name: str) -> str:
    """The layer a parameter belongs to: its name up to the first numbered component
    (`model.layers.3.self_attn.q_proj.weight` -> `model.layers.3`), else the module's name."""
    match = re.match(r"^(.*?\.\d+)(\.|$)", name)
    return match.group(1) if match else name.removesuffix(".weight")


def _top_directions(matrix: torch.Tensor, wanted: int, seed: int, exact: bool = True):
    """The `wanted` strongest singular triplets (U, S, V^T) of `matrix`: exact SVD for small matrices, a seeded
    randomised SVD for large ones (fewer power iterations when close is enough: `exact=False`)."""
    smallest = min(matrix.shape)
    if smallest <= 4 * wanted + 32:
        left, values, right = torch.linalg.svd(matrix, full_matrices=False)
        return left[:, :wanted], values[:wanted], right[:wanted]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        left, values, right = torch.svd_lowrank(matrix, q=wanted + 8, niter=6 if exact else 2)
    return left[:, :wanted], values[:wanted], right[:, :wanted].T
