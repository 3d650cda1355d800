"""The merge attacks of the audit: one registry, each method with its parameters declared as data.

Two kinds of method:

- `weights`: weight-space merges of task vectors (adapter deltas W_adapted - W0, or theta - theta0
  for full fine-tunes), one stateless function per method over the per-tensor stack of task vectors,
  built from `peft.utils.merge_utils`. Related methods are compositions: TIES = magnitude trim + sign
  election + disjoint mean; DARE = random drop + rescale, then a sum (DARE-linear) or TIES's election
  and disjoint mean (DARE-TIES).
- `peft`: `LoraModel.add_weighted_adapter` with one `combination_type`; adapters only.

Each parameter declares its `average`-mode default (what a naive merger uses; `weight` is 1/N for N
updates) and the grid of the attacker-optimistic `best` mode. Every `best` grid reaches full weight
(a shared coefficient of 1.0 and above) and densities 0.3-0.9; grids stay small because every point
costs one evaluation of every task.
"""

import dataclasses
import itertools
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from peft.utils import merge_utils

WEIGHTS, PEFT = "weights", "peft"
ONE_OVER_N = "1/N"

# Shared coefficient grids: linear merges sum N updates, so useful coefficients span 1/N to >1.
LINEAR_WEIGHTS = (0.3, 0.5, 0.7, 0.85, 1.0, 1.25, 1.5, 2.0)
SPARSE_WEIGHTS = (0.5, 1.0, 1.5)
DENSITIES = (0.3, 0.6, 0.9)
# TIES paper (top-20% kept) and the PEFT model-merging guide use density 0.2.
DEFAULT_DENSITY = 0.2


@dataclass(frozen=True)
class Param:
    """One merge parameter: its `average`-mode default and its `best`-mode grid."""

    name: str
    default: float | str
    grid: tuple[float, ...]
    help: str

    def resolve(self, num_updates: int) -> float:
        return 1.0 / num_updates if self.default == ONE_OVER_N else float(self.default)

    def as_dict(self) -> dict:
        return {"name": self.name, "default": self.default, "grid": list(self.grid), "help": self.help}


def weight_param(grid: tuple[float, ...]) -> Param:
    return Param("weight", ONE_OVER_N, grid, "coefficient shared by every update (average mode: 1/N)")


def density_param() -> Param:
    return Param("density", DEFAULT_DENSITY, DENSITIES, "fraction of each update's entries kept")


@dataclass(frozen=True)
class MergeMethod:
    """A registered merge: `merge(task_tensors, weights, **params)` for `weights` methods, or the
    `add_weighted_adapter` combination type for `peft` methods."""

    name: str
    kind: str
    params: tuple[Param, ...]
    summary: str
    merge: Callable[..., torch.Tensor] | None = None
    combination_type: str | None = None
    randomized: bool = False
    targets: tuple[str, ...] = field(default=("adapter", "full"))
    # merge(taus, w * 1) == w * merge(taus, 1) for a shared weight w (with the same seed): one merge
    # serves every weight of the grid. The weight-space merges here are linear in each update's own
    # weight too, which the informed mode uses the same way.
    linear_in_weight: bool = False
    # The keyword arguments that let each update enter at its own weight instead of a share of it
    # (TIES's disjoint mean divides by the number of agreeing updates; `normalize=False` sums): what
    # an attacker who wants the protected update at its nominal scale sets (mergekit: normalize: false).
    compensation: tuple[tuple[str, object], ...] = ()
    # The merge is W0 + sum_i w_i * dW_i (up to peft's cross terms or rank truncation): no trimming, sign
    # election or re-basing. What a protection at the update's nominal scale must hold against by design
    # (the demo's criterion covers these merges).
    combines_linearly: bool = False

    def average_params(self, num_updates: int) -> dict[str, float]:
        return {p.name: p.resolve(num_updates) for p in self.params}

    def grid(self) -> list[dict[str, float]]:
        """Every point of the `best`-mode search: the product of the parameter grids, the shared
        weight varying fastest."""
        ordered = sorted(self.params, key=lambda p: p.name == "weight")
        grids = itertools.product(*(p.grid for p in ordered))
        points = [dict(zip((p.name for p in ordered), values)) for values in grids]
        return [{p.name: point[p.name] for p in self.params} for point in points]

    @property
    def density_per_update(self) -> bool:
        """Whether each update may have its own density (weight-space merges; peft's is shared)."""
        return self.kind == WEIGHTS and any(p.name == "density" for p in self.params)

    def describe(self) -> dict:
        return {
            "kind": self.kind,
            "summary": self.summary,
            "randomized": self.randomized,
            "linear_in_weight": self.linear_in_weight,
            "combines_linearly": self.combines_linearly,
            "compensation": dict(self.compensation),
            "targets": list(self.targets),
            "params": [p.as_dict() for p in self.params],
        }


_REGISTRY: dict[str, MergeMethod] = {}


def with_grids(methods: list[MergeMethod], grids: dict[str, tuple[float, ...]] | None) -> dict[str, MergeMethod]:
    """{name: method} with the `best`-mode grid of each parameter named in `grids` replaced (for one audit run);
    a name no method has, or an empty grid, raises."""
    grids = {name: tuple(float(v) for v in values) for name, values in (grids or {}).items()}
    known = {p.name for m in methods for p in m.params}
    bad = [name for name, values in grids.items() if name not in known or not values]
    if bad:
        raise ValueError(f"grids {bad}: each must name a parameter of the audited methods ({sorted(known)}) "
                         "and give at least one value.")
    return {m.name: dataclasses.replace(m, params=tuple(
        dataclasses.replace(p, grid=grids[p.name]) if p.name in grids else p for p in m.params)) for m in methods}


def register(method: MergeMethod) -> MergeMethod:
    if method.name in _REGISTRY:
        raise ValueError(f"Merge method {method.name!r} is registered twice.")
    if method.kind not in (WEIGHTS, PEFT):
        raise ValueError(f"Merge method {method.name!r} has kind {method.kind!r}; use {WEIGHTS!r} or {PEFT!r}.")
    _REGISTRY[method.name] = method
    return method


def get(name: str) -> MergeMethod:
    """The registered method `name`; an unknown name raises and lists the known ones."""
    if name not in _REGISTRY:
        raise KeyError(f"Unknown merge method {name!r}; known methods: {', '.join(_REGISTRY)}.")
    return _REGISTRY[name]


def names(target: str | None = None) -> list[str]:
    """Registered method names, in registration order; only those that apply to `target` if given."""
    if target not in (None, "adapter", "full"):
        raise ValueError(f"Unknown target {target!r}; use 'adapter' or 'full'.")
    return [n for n, m in _REGISTRY.items() if target is None or target in m.targets]


# ---- weight-space merges: (task_tensors, weights, **params) -> merged tensor --------------------


def _weighted(task_tensors: list[torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
    stacked = torch.stack(task_tensors)
    return stacked * merge_utils.reshape_weight_task_tensors(stacked, weights.to(stacked))


def _sparsified(task_tensors: list[torch.Tensor], density, how: str) -> list[torch.Tensor]:
    """Each update pruned to `density` (one float for all, or one per update); 1.0 keeps it whole."""
    densities = [density] * len(task_tensors) if isinstance(density, (int, float)) else list(density)
    if len(densities) != len(task_tensors):
        raise ValueError(f"Got {len(densities)} densities for {len(task_tensors)} updates; pass one per update.")
    return [
        t if d >= 1.0 else merge_utils.prune(t, d, method=how, rescale=how == "random")
        for t, d in zip(task_tensors, densities)
    ]


def _elect_and_disjoint_mean(
    task_tensors: list[torch.Tensor], weights: torch.Tensor, normalize: bool = True
) -> torch.Tensor:
    """TIES steps 2-3: elect each entry's sign by total mass, average the weighted entries that agree
    (`normalize=False`: sum them, so each update keeps its own weight)."""
    sign_mask = merge_utils.calculate_majority_sign_mask(torch.stack(task_tensors), method="total")
    weighted = _weighted(task_tensors, weights)
    if normalize:
        return merge_utils.disjoint_merge(weighted, sign_mask)
    return (weighted * sign_mask).sum(dim=0)


def task_arithmetic(task_tensors: list[torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
    """sum_i w_i * tau_i (Ilharco et al., 2023)."""
    return merge_utils.task_arithmetic(task_tensors, weights.to(task_tensors[0]))


def ties(task_tensors: list[torch.Tensor], weights: torch.Tensor, density, normalize: bool = True) -> torch.Tensor:
    """TIES (Yadav et al., 2023): keep each update's top-`density` entries by magnitude, elect signs,
    disjoint mean."""
    return _elect_and_disjoint_mean(_sparsified(task_tensors, density, "magnitude"), weights, normalize)


def dare_linear(task_tensors: list[torch.Tensor], weights: torch.Tensor, density) -> torch.Tensor:
    """DARE (Yu et al., 2024): drop entries at random, keep each with prob. `density` rescaled by
    1/density, then task arithmetic."""
    return task_arithmetic(_sparsified(task_tensors, density, "random"), weights)


def dare_ties(
    task_tensors: list[torch.Tensor], weights: torch.Tensor, density, normalize: bool = True
) -> torch.Tensor:
    """DARE's random drop and rescale, then TIES's sign election and disjoint mean."""
    return _elect_and_disjoint_mean(_sparsified(task_tensors, density, "random"), weights, normalize)


def magnitude_prune(task_tensors: list[torch.Tensor], weights: torch.Tensor, density) -> torch.Tensor:
    """Keep each update's top-`density` entries by magnitude, then task arithmetic (no sign election)."""
    return task_arithmetic(_sparsified(task_tensors, density, "magnitude"), weights)


def tsv(task_tensors: list[torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
    """TSV-Merge (Task Singular Vectors, Gargiulo et al., CVPR 2025): per layer matrix, each update's
    top 1/N singular directions, orthogonalised across updates, then summed with weights w_i.

    Each update keeps its top k = max(1, min(m, n) // N) singular triplets; the concatenated left and
    right singular vectors are orthogonalised (the polar factor P Q^T of their SVD, i.e. Procrustes
    whitening) to remove interference, and the matrix is rebuilt with the singular values of update i
    scaled by w_i. Tensors that are not matrices (biases, norms) use task arithmetic; tensors of more
    than two dimensions are flattened to (shape[0], -1).
    """
    first = task_tensors[0]
    if first.dim() < 2:
        return task_arithmetic(task_tensors, weights)
    matrices = [t.reshape(t.shape[0], -1).float() for t in task_tensors]
    k = max(1, min(matrices[0].shape) // len(matrices))
    us, ss, vs = [], [], []
    for matrix, w in zip(matrices, weights.tolist()):
        u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
        us.append(u[:, :k])
        ss.append(s[:k] * w)
        vs.append(vh[:k].T)
    u, s, v = _polar(torch.cat(us, dim=1)), torch.cat(ss), _polar(torch.cat(vs, dim=1))
    return ((u * s) @ v.T).reshape(first.shape).to(first.dtype)


def _summary(function) -> str:
    """The first paragraph of a docstring, on one line."""
    return " ".join(function.__doc__.split("\n\n")[0].split())


def _polar(matrix: torch.Tensor) -> torch.Tensor:
    """The orthonormal factor closest to `matrix`: P Q^T from its reduced SVD P S Q^T."""
    p, _, qh = torch.linalg.svd(matrix, full_matrices=False)
    return p @ qh


def _weight_space(
    name: str, merge, sparse: bool, randomized: bool = False, compensation=(), combines_linearly: bool = False
) -> MergeMethod:
    """Each weight-space merge here is linear in each update's weight: signs are elected on the
    unweighted updates and DARE's masks depend on the seed only."""
    params = (weight_param(SPARSE_WEIGHTS), density_param()) if sparse else (weight_param(LINEAR_WEIGHTS),)
    return MergeMethod(
        name, WEIGHTS, params, _summary(merge), merge, randomized=randomized, linear_in_weight=True,
        compensation=tuple(compensation), combines_linearly=combines_linearly,
    )


DISJOINT_SUM = (("normalize", False),)

register(_weight_space("task_arithmetic", task_arithmetic, sparse=False, combines_linearly=True))
register(_weight_space("ties", ties, sparse=True, compensation=DISJOINT_SUM))
register(_weight_space("dare_linear", dare_linear, sparse=True, randomized=True))
register(_weight_space("dare_ties", dare_ties, sparse=True, randomized=True, compensation=DISJOINT_SUM))
register(_weight_space("magnitude_prune", magnitude_prune, sparse=True))
register(_weight_space("tsv", tsv, sparse=False))

# ---- PEFT's add_weighted_adapter: LoRA adapters only --------------------------------------------

def _peft(
    combination: str, summary: str, sparse: bool, randomized: bool = False, combines_linearly: bool = False
) -> MergeMethod:
    params = (weight_param(SPARSE_WEIGHTS), density_param()) if sparse else (weight_param(LINEAR_WEIGHTS),)
    return MergeMethod(
        f"peft_{combination}",
        PEFT,
        params,
        f"peft add_weighted_adapter(combination_type={combination!r}): {summary}",
        combination_type=combination,
        randomized=randomized,
        targets=("adapter",),
        combines_linearly=combines_linearly,
    )


register(
    _peft("linear", "the weighted sums of A and of B (a rough approximation of the weight-space sum)", False,
          combines_linearly=True)
)
register(_peft("cat", "A and B concatenated along the rank: exactly sum_i w_i * dW_i", False, combines_linearly=True))
register(_peft("svd", "sum_i w_i * dW_i truncated by SVD to the largest adapter rank", False, combines_linearly=True))
register(_peft("ties", "TIES on A and on B separately", True))
register(_peft("dare_linear", "DARE-linear on A and on B separately", True, randomized=True))
register(_peft("dare_ties", "DARE-TIES on A and on B separately", True, randomized=True))
register(_peft("magnitude_prune", "magnitude pruning on A and on B separately", True))


def combine_adapters(
    model, method: MergeMethod, adapters: list[str], params: dict[str, float], name: str, weights=None
) -> None:
    """Create adapter `name` on the PEFT `model` by `add_weighted_adapter` with `method`'s combination
    type and one shared weight (or `weights`, one per adapter); the caller activates and deletes it."""
    if method.kind != PEFT:
        raise ValueError(f"{method.name!r} is a weight-space merge, not a PEFT combination type.")
    if name in model.peft_config:
        raise ValueError(f"An adapter named {name!r} already exists; delete it or choose another name.")
    kwargs = {"density": params["density"]} if "density" in params else {}
    model.add_weighted_adapter(
        adapters=list(adapters),
        weights=[params["weight"]] * len(adapters) if weights is None else [float(w) for w in weights],
        adapter_name=name,
        combination_type=method.combination_type,
        **kwargs,
    )
