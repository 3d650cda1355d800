"""What the audit knows about one merge method, as data: its backend, its parameters (the naive default and
the `best`-mode grid), the points public merge configurations use, and how many updates it merges.

Three backends run merges:

- `weights`: the audit's own weight-space merges of task vectors (`merges.py`, built from
  `peft.utils.merge_utils`);
- `mergekit`: mergekit's own methods, run in memory on the same task vectors (`mergekit/`), given the
  base weights W0 (some of them, such as slerp and karcher, are not translation-invariant);
- `peft`: `LoraModel.add_weighted_adapter` with one `combination_type`; adapters only.

The first two merge task vectors: `merge(task_tensors, weights, **params)` (with `base=W0` where
`needs_base`) returns the merged task vector of one tensor. This module imports nothing heavy, so that the
command line can read the settings built on it without loading torch.
"""

import itertools
from collections.abc import Callable
from dataclasses import dataclass, field

from ..choices import TARGETS

WEIGHTS, MERGEKIT, PEFT = "weights", "mergekit", "peft"
BACKENDS = (WEIGHTS, MERGEKIT, PEFT)
ONE_OVER_N = "1/N"
# A value of a public grid that stands for the backend's own default (mergekit's `normalize`, for one).
BACKEND_DEFAULT = "backend default"

# Shared coefficient grids of the `best` mode: linear merges sum N updates, so useful coefficients span
# 1/N to >1.
LINEAR_WEIGHTS = (0.3, 0.5, 0.7, 0.85, 1.0, 1.25, 1.5, 2.0)
SPARSE_WEIGHTS = (0.5, 1.0, 1.5)
DENSITIES = (0.3, 0.6, 0.9)
# TIES paper (top-20% kept) and the PEFT model-merging guide use density 0.2.
DEFAULT_DENSITY = 0.2

# The points public merge configurations use (issue 30): a shared weight 0.3-1.0, densities 0.3/0.5/0.7, the
# released update weighted as the others or twice, slerp's t 0.3/0.5/0.7.
PUBLIC_WEIGHTS = (0.3, 0.5, 0.7, 1.0)
PUBLIC_DENSITIES = (0.3, 0.5, 0.7)
RELEASED_TWICE = (1.0, 2.0)
PUBLIC_T = (0.3, 0.5, 0.7)


class MergeUnsupported(Exception):
    """A backend refused these updates (a PEFT combination type, a mergekit method); the audit reports the
    method, or the point, as skipped with the backend's message."""


@dataclass(frozen=True)
class Param:
    """One merge parameter: its `average`-mode default and its `best`-mode grid (empty: not searched, it
    stays at its default)."""

    name: str
    default: float | str
    grid: tuple[float, ...]
    help: str
    # The values below 1 the backend accepts, where it limits them (DELLA: density +- epsilon in (0, 1));
    # a density of 1 or more keeps every entry.
    accepted: tuple[float, float] | None = None

    def clamp(self, value: float) -> float:
        """`value` moved into `accepted` (a value of 1 or more is left as it is)."""
        if self.accepted is None or value >= 1.0:
            return value
        return min(max(value, self.accepted[0]), self.accepted[1])

    def resolve(self, num_updates: int | None, value=None) -> float:
        value = self.default if value is None else value
        if value != ONE_OVER_N:
            return float(value)
        if num_updates is None:
            raise ValueError(f"Parameter {self.name!r} is 1/N: pass the number of updates merged.")
        return 1.0 / num_updates

    def as_dict(self) -> dict:
        limits = {"accepted": list(self.accepted)} if self.accepted else {}
        return {"name": self.name, "default": self.default, "grid": list(self.grid), "help": self.help, **limits}


@dataclass(frozen=True)
class PublicGrid:
    """The points public merge configurations use for one method, none chosen on any task's data.

    Every combination of `params` (name, values), then each factor of `released` (the released update's
    weight as a multiple of the others'), then each shared weight of `weights`: the others at w, the
    released update at factor * w. Where a combination sets `normalizing` (param, value), the merge
    divides by the summed weights and a shared weight cancels: only w = 1 is run. With `pairs`, the
    merge is of two updates, the released one and each partner alone, at t = w_partner / (w_released +
    w_partner) for each t of `pairs` (slerp's convention).
    """

    weights: tuple[float, ...] = (1.0,)
    released: tuple[float, ...] = (1.0,)
    params: tuple[tuple[str, tuple], ...] = ()
    normalizing: tuple[str, object] | None = None
    pairs: tuple[float, ...] = ()

    def points(self, released: str, others: list[str]) -> list[dict]:
        """The configurations (`informed.py`'s form: {"weights": {update: w}, param: value, ...})."""
        names = [name for name, _ in self.params]
        configs = []
        for values in itertools.product(*(values for _, values in self.params)):
            chosen = dict(zip(names, values))
            if self.pairs:
                for partner in others:
                    for t in self.pairs:
                        configs.append({"weights": {released: 1.0 - t, partner: t}, **chosen})
                continue
            cancels = self.normalizing is not None and chosen.get(self.normalizing[0]) == self.normalizing[1]
            for factor in self.released:
                for w in (1.0,) if cancels else self.weights:
                    configs.append({"weights": {released: factor * w, **{k: w for k in others}}, **chosen})
        return configs

    def resolved(self, defaults: dict) -> "PublicGrid":
        """The grid with each `BACKEND_DEFAULT` replaced by the backend's default of that parameter (values
        that coincide are run once)."""
        params = []
        for name, values in self.params:
            values = [defaults[name] if v == BACKEND_DEFAULT else v for v in values]
            params.append((name, tuple(dict.fromkeys(values))))
        return PublicGrid(self.weights, self.released, tuple(params), self.normalizing, self.pairs)

    def as_dict(self) -> dict:
        return {
            "weights": list(self.weights), "released": list(self.released),
            "params": {name: list(values) for name, values in self.params},
            "normalizing": None if self.normalizing is None else list(self.normalizing), "pairs": list(self.pairs),
        }


@dataclass(frozen=True)
class MergeMethod:
    """A registered merge: `merge(task_tensors, weights, **params)` for the task-vector backends (`base=` the
    base tensor too where `needs_base`), or the `add_weighted_adapter` combination type for `peft`."""

    name: str
    backend: str
    params: tuple[Param, ...]
    summary: str
    merge: Callable | None = None
    combination_type: str | None = None
    randomized: bool = False
    targets: tuple[str, ...] = field(default=tuple(TARGETS))
    # merge(taus, w * 1) == w * merge(taus, 1) for a shared weight w (with the same seed): one merge
    # serves every weight of the grid. The audit's own weight-space merges are linear in each update's own
    # weight too, which the informed and public modes use the same way.
    linear_in_weight: bool = False
    # The keyword arguments that let each update enter at its own weight instead of a share of it
    # (TIES's disjoint mean divides by the number of agreeing updates; `normalize=False` sums): what
    # an attacker who wants the protected update at its nominal scale sets (mergekit: normalize: false).
    compensation: tuple[tuple[str, object], ...] = ()
    # The merge is W0 + sum_i w_i * dW_i (up to peft's cross terms or rank truncation, or mergekit's
    # normalisation of the weights): no trimming, sign election or re-basing. What a protection at the
    # update's nominal scale must hold against by design (the demo's criterion covers these merges).
    combines_linearly: bool = False
    # The merge takes each update's own weight (the informed and search modes need it).
    per_update_weights: bool = True
    # The merge is given the base tensor W0 beside the task vectors (mergekit's methods).
    needs_base: bool = False
    # (fewest, most) updates one merge takes; None: no upper bound.
    updates: tuple[int, int | None] = (1, None)
    public: PublicGrid | None = None
    # The backend's parameters the audit leaves at their defaults (mergekit's, read from its own spec).
    backend_defaults: dict = field(default_factory=dict)
    # What the backend needs said about the method in reports (mergekit: which model is the base, ...).
    wiring: dict = field(default_factory=dict)

    def average_params(self, num_updates: int) -> dict[str, float]:
        return {p.name: p.resolve(num_updates) for p in self.params}

    def grid(self, num_updates: int | None = None) -> list[dict[str, float]]:
        """Every point of the `best`-mode search: the product of the parameter grids (a parameter with no
        grid at its default), the shared weight varying fastest."""
        ordered = sorted(self.params, key=lambda p: p.name == "weight")
        grids = [[p.resolve(num_updates, v) for v in p.grid] or [p.resolve(num_updates)] for p in ordered]
        points = [dict(zip((p.name for p in ordered), values)) for values in itertools.product(*grids)]
        return [{p.name: point[p.name] for p in self.params} for point in points]

    @property
    def searched(self) -> bool:
        """Whether the `best` mode has anything to search (a parameter with a grid)."""
        return any(p.grid for p in self.params)

    @property
    def weighted(self) -> bool:
        """Whether the merge is given weights at all (sce, model_stock and karcher are not)."""
        return any(p.name == "weight" for p in self.params)

    @property
    def on_task_vectors(self) -> bool:
        return self.backend != PEFT

    @property
    def density_per_update(self) -> bool:
        """Whether each update may have its own density (task-vector merges; peft's is shared)."""
        return self.on_task_vectors and any(p.name == "density" for p in self.params)

    def accepts(self, num_updates: int) -> bool:
        low, high = self.updates
        return num_updates >= low and (high is None or num_updates <= high)

    def describe_updates(self) -> str:
        low, high = self.updates
        return f"exactly {low}" if low == high else f"at least {low}" if high is None else f"{low} to {high}"

    def describe(self) -> dict:
        return {
            "backend": self.backend,
            "summary": self.summary,
            "randomized": self.randomized,
            "linear_in_weight": self.linear_in_weight,
            "combines_linearly": self.combines_linearly,
            "per_update_weights": self.per_update_weights,
            "needs_base": self.needs_base,
            "updates": self.describe_updates(),
            "compensation": dict(self.compensation),
            "targets": list(self.targets),
            "params": [p.as_dict() for p in self.params],
            "public": None if self.public is None else self.public.as_dict(),
            "backend_defaults": dict(self.backend_defaults),
            **({"wiring": dict(self.wiring)} if self.wiring else {}),
        }
