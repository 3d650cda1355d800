"""The audit's own weight-space merges and the PEFT combination types it runs, declared as `MergeMethod`s.

Each weight-space merge is a stateless torch function over the per-tensor stack of task vectors (adapter
deltas W_adapted - W0, or theta - theta0 for full fine-tunes), built from `peft.utils.merge_utils`.
Related methods are compositions: TIES = magnitude trim + sign election + disjoint mean; DARE = random
drop + rescale, then a sum (DARE-linear) or TIES's election and disjoint mean (DARE-TIES). PEFT's
`add_weighted_adapter` runs its own combination types on LoRA adapters.

Each parameter declares its `average`-mode default (what a naive merger uses; `weight` is 1/N for N
updates) and the grid of the attacker-optimistic `best` mode. Every `best` grid reaches full weight
(a shared coefficient of 1.0 and above) and densities 0.3-0.9; grids stay small because every point
costs one evaluation of every task. The public points: a shared weight 0.3-1.0, and for the merges that
are not a plain weighted sum the released update weighted twice the others and densities 0.3/0.5/0.7.
"""

import torch
from peft.utils import merge_utils

from .merge_method import (
    DEFAULT_DENSITY,
    DENSITIES,
    LINEAR_WEIGHTS,
    ONE_OVER_N,
    PEFT,
    PUBLIC_DENSITIES,
    PUBLIC_WEIGHTS,
    RELEASED_TWICE,
    SPARSE_WEIGHTS,
    WEIGHTS,
    MergeMethod,
    Param,
    PublicGrid,
)


def weight_param(grid: tuple[float, ...]) -> Param:
    return Param("weight", ONE_OVER_N, grid, "coefficient shared by every update (average mode: 1/N)")


def density_param() -> Param:
    return Param("density", DEFAULT_DENSITY, DENSITIES, "fraction of each update's entries kept")


def public_grid(sparse: bool, combines_linearly: bool) -> PublicGrid:
    """A plain weighted sum: one shared weight (a merge's lambda); otherwise also the released update at
    twice the others' weight, and for a sparsifying merge each public density."""
    if combines_linearly:
        return PublicGrid(weights=PUBLIC_WEIGHTS)
    params = (("density", PUBLIC_DENSITIES),) if sparse else ()
    return PublicGrid(weights=PUBLIC_WEIGHTS, released=RELEASED_TWICE, params=params)


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
        public=public_grid(sparse, combines_linearly),
    )


DISJOINT_SUM = (("normalize", False),)

OWN_METHODS = (
    _weight_space("task_arithmetic", task_arithmetic, sparse=False, combines_linearly=True),
    _weight_space("ties", ties, sparse=True, compensation=DISJOINT_SUM),
    _weight_space("dare_linear", dare_linear, sparse=True, randomized=True),
    _weight_space("dare_ties", dare_ties, sparse=True, randomized=True, compensation=DISJOINT_SUM),
    _weight_space("magnitude_prune", magnitude_prune, sparse=True),
    _weight_space("tsv", tsv, sparse=False),
)


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
        public=public_grid(sparse, combines_linearly),
    )


PEFT_METHODS = (
    _peft("linear", "the weighted sums of A and of B (a rough approximation of the weight-space sum)", False,
          combines_linearly=True),
    _peft("cat", "A and B concatenated along the rank: exactly sum_i w_i * dW_i", False, combines_linearly=True),
    _peft("svd", "sum_i w_i * dW_i truncated by SVD to the largest adapter rank", False, combines_linearly=True),
    _peft("ties", "TIES on A and on B separately", True),
    _peft("dare_linear", "DARE-linear on A and on B separately", True, randomized=True),
    _peft("dare_ties", "DARE-TIES on A and on B separately", True, randomized=True),
    _peft("magnitude_prune", "magnitude pruning on A and on B separately", True),
)


def combine_adapters(
    model, method: MergeMethod, adapters: list[str], params: dict[str, float], name: str, weights=None
) -> None:
    """Create adapter `name` on the PEFT `model` by `add_weighted_adapter` with `method`'s combination
    type and one shared weight (or `weights`, one per adapter); the caller activates and deletes it."""
    if method.backend != PEFT:
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
