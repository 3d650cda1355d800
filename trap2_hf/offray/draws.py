"""The off-ray draws of an optimizer step: which term each pass runs, at which weight, keep rate and
coefficients, with which seed; a function of (seed, step) only (`seeding.OFFRAY`, `seeding.GUARD`)."""

from dataclasses import dataclass

import torch

from ..seeding import GUARD as GUARD_STREAM
from ..seeding import OFFRAY
from ..choices.offray import GUARD, RANGES, Term, term


@dataclass(frozen=True)
class OffrayDraw:
    """One off-ray pass: what is done to the update, at which weights, with which random seed."""

    term: str
    weight: float = 1.0  # w: the own update's weight
    keep: float = 1.0  # DARE / factor-DARE keep rate, or the density kept by 'prune'
    coefs: tuple[float, ...] = ()  # c_j per foreign update, or (c,) for 'synthetic'
    seed: int = 0
    noise: float = 0.0  # 'guard': the noise norm relative to ||dW||
    weight_range: tuple[float, float] = (1.0, 1.0)  # 'layer_scale': each layer's weight is uniform on it

    @property
    def spec(self) -> Term:
        return term(self.term)

    @property
    def own(self) -> str:
        return self.spec.own.name

    @property
    def partner(self) -> str | None:
        partner = self.spec.partner
        return None if partner is None else partner.name

    @property
    def is_guard(self) -> bool:
        return self.spec.is_guard


def draw_offray(
    terms: list[str],
    count: int,
    step: int,
    seed: int,
    weight_range: tuple[float, float],
    keep_range: tuple[float, float],
    coef_range: tuple[float, float],
    num_foreign: int = 0,
    shared_weight: bool = False,
) -> list[OffrayDraw]:
    """The `count` off-ray draws of an optimizer step: a function of (seed, step) only. Terms are taken
    in turn (pass k of step t uses term (t*count + k) mod len(terms)); weights, keep rates and
    coefficients are uniform on their ranges. `shared_weight`: every partner coefficient is the own
    weight instead (a merge with one shared weight). A part with per-layer weights ('layer_scale') has
    weight 1 and carries the range its layers draw from."""
    generator = OFFRAY.generator(seed, step)
    draws = []
    for k in range(count):
        name = terms[(step * count + k) % len(terms)]
        spec = term(name)
        u = torch.rand(3 + max(num_foreign, 1), generator=generator, dtype=torch.float64).tolist()
        pass_seed = int(torch.randint(0, 2**62, (1,), generator=generator))
        weight = 1.0 if spec.own.per_layer_weight else _lerp(weight_range, u[0])
        coefs = tuple(_lerp(coef_range, v) for v in u[3 : 3 + spec.num_coefs(num_foreign)])
        draws.append(
            OffrayDraw(
                term=name,
                weight=weight,
                keep=_lerp(keep_range, u[1]) if spec.draws_keep else 1.0,
                coefs=(weight,) * len(coefs) if shared_weight else coefs,
                seed=pass_seed,
                weight_range=tuple(weight_range) if spec.own.per_layer_weight else (1.0, 1.0),
            )
        )
    return draws


def draw_ranges(settings) -> dict[str, tuple[float, float]]:
    """{'weight_range': ..., 'keep_range': ..., 'coef_range': ...} of `settings`, as `draw_offray` takes them."""
    return {f"{name}_range": (getattr(settings, r.low), getattr(settings, r.high)) for name, r in RANGES.items()}


def guard_draw(step: int, seed: int, noise: float) -> OffrayDraw:
    """The step's guard pass: dW plus dense noise of norm `noise` * ||dW|| per layer."""
    return OffrayDraw(term=GUARD, noise=noise, seed=GUARD_STREAM.seed(seed, step))


def _lerp(interval: tuple[float, float], u: float) -> float:
    return interval[0] + u * (interval[1] - interval[0])
