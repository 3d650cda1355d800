"""mergekit's methods as the audit's merge methods: how each is wired, and its in-memory merge of task vectors.

Nothing here re-implements a merge: `merge_tensor` calls `mergekit.merge_methods.api.merge_tensors` on the
base tensor W0 and W0 + tau_i, and returns the result minus W0. Facts mergekit owns (parameter names,
scopes, defaults, input contracts) are read from its own registry through `MergekitMethod.spec`; the table
below adds only the wiring (which model is mergekit's base, whether the method sparsifies, whether only
the ratio of the weights matters) and the public points. Adding a mergekit method is one entry in `METHODS`.
"""

import functools
from dataclasses import dataclass

from ..merge_method import (
    BACKEND_DEFAULT,
    DEFAULT_DENSITY,
    DENSITIES,
    LINEAR_WEIGHTS,
    MERGEKIT,
    ONE_OVER_N,
    PUBLIC_DENSITIES,
    PUBLIC_T,
    PUBLIC_WEIGHTS,
    RELEASED_TWICE,
    SPARSE_WEIGHTS,
    MergeMethod,
    MergeUnsupported,
    Param,
    PublicGrid,
)

MERGEKIT_VERSION = "0.1.5"
INSTALL_HINT = "pip install 'trap2_hf[mergekit]'"
PREFIX = "mergekit:"
# Which model is mergekit's base: the pretrained base W0 (the merge works on task vectors), none (the merge
# works on the full weights), or the first update (slerp's interpolation between two models).
BASE, NO_BASE, FIRST_UPDATE = "pretrained base", "not used", "first update"
# A memory option (the sign masks in int8), not a merge choice: left out of what the audit reports.
_STORAGE_OPTIONS = ("int8_mask",)

_SPARSE_PUBLIC = PublicGrid(
    weights=PUBLIC_WEIGHTS, released=RELEASED_TWICE,
    params=(("density", PUBLIC_DENSITIES), ("normalize", (BACKEND_DEFAULT, True))), normalizing=("normalize", True),
)


@dataclass(frozen=True)
class MergekitMethod:
    """How one mergekit method is called. `t_from_weights`: slerp takes `t`, computed from two weights as
    `t = w2 / (w1 + w2)` (nuslerp's own convention), so every method takes the same weight list; `ratio`:
    only the ratio of the weights matters (slerp, nuslerp), so a shared weight cancels."""

    name: str
    summary: str
    public: PublicGrid
    sparsifies: bool = False
    base: str | None = None
    t_from_weights: bool = False
    ratio: bool = False
    randomized: bool = False
    combines_linearly: bool = False

    @property
    def spec(self):
        """mergekit's own declaration of the method (parameters with scope and default, contract)."""
        return mergekit_module().merge_methods.registry.get(self.name).spec

    @property
    def base_role(self) -> str:
        if self.base is not None:
            return self.base
        return NO_BASE if self.spec.contract.base.value in ("ignored", "forbidden") else BASE

    @property
    def weighted(self) -> bool:
        """Whether the method takes one weight per update (slerp's `t` comes from two)."""
        return self.t_from_weights or "weight" in self.parameter_defaults()

    @property
    def normalizes(self) -> bool:
        """Whether, at mergekit's defaults, the merge divides by the summed weights (a shared weight cancels)."""
        defaults = self.parameter_defaults()
        return self.ratio or defaults.get("normalize") is True or defaults.get("normalize_weights") is True

    def parameter_defaults(self) -> dict:
        return {p.name: (None if p.required else p.default) for p in self.spec.parameters}

    def update_range(self) -> tuple[int, int | None]:
        """(fewest, most) updates mergekit's input contract accepts with this wiring."""
        contract = self.spec.contract
        with_base = self.base_role == BASE
        low, high = max(1, contract.min_inputs - with_base), contract.max_inputs
        high = None if high is None else high - with_base
        if with_base:
            low = max(low, contract.min_non_base or 0)
            if contract.max_non_base is not None:
                high = contract.max_non_base if high is None else min(high, contract.max_non_base)
        return low, high

    def naive(self) -> dict:
        """What a naive merger passes beyond the per-update weights (1/N each)."""
        return {"density": DEFAULT_DENSITY} if self.sparsifies else {}

    def describe(self) -> dict:
        low, high = self.update_range()
        return {
            "method": self.name,
            "summary": self.summary,
            "base": self.base_role,
            "updates": f"exactly {low}" if low == high else f"at least {low}" if high is None else f"{low}-{high}",
            "weights": "t = w2 / (w1 + w2)" if self.t_from_weights else "per update" if self.weighted else "none",
            "parameters": self.parameter_defaults(),
            "naive": self.naive(),
        }


# mergekit's sparsifying task-arithmetic methods: (summary, whether the drop is random).
_SPARSIFYING = {
    "ties": ("magnitude trim, sign election, disjoint mean (normalize)", False),
    "dare_ties": ("random drop and rescale, then TIES' election", True),
    "dare_linear": ("random drop and rescale, then a weighted sum", True),
    "breadcrumbs": ("drop the largest gamma and the smallest entries, weighted sum", False),
    "breadcrumbs_ties": ("breadcrumbs' sparsification, then TIES' election", False),
    "della": ("magnitude-ranked random drop (density +- epsilon), TIES' election", True),
    "della_linear": ("DELLA's drop, then a weighted sum", True),
}
METHODS: dict[str, MergekitMethod] = {
    m.name: m
    for m in (
        MergekitMethod(
            "linear", "sum_i w_i theta_i / sum_i w_i over the full weights (normalize)", PublicGrid(),
            combines_linearly=True,
        ),
        MergekitMethod(
            "task_arithmetic", "theta0 + lambda sum_i w_i tau_i", PublicGrid(weights=PUBLIC_WEIGHTS),
            combines_linearly=True,
        ),
        *(
            MergekitMethod(name, summary, _SPARSE_PUBLIC, sparsifies=True, randomized=randomized)
            for name, (summary, randomized) in _SPARSIFYING.items()
        ),
        MergekitMethod(
            "sce", "select by variance, weights from squared magnitudes, sign election (no weights)",
            PublicGrid(params=(("select_topk", (0.5, 1.0)),)),
        ),
        MergekitMethod("model_stock", "interpolation to the base by the updates' angles (no weights)", PublicGrid()),
        MergekitMethod("karcher", "Riemannian (Karcher) mean of the full weights (no weights)", PublicGrid()),
        MergekitMethod("multislerp", "spherical interpolation of any number of task vectors", PublicGrid()),
        MergekitMethod(
            "slerp", "spherical interpolation between two models", PublicGrid(pairs=PUBLIC_T), base=FIRST_UPDATE,
            t_from_weights=True, ratio=True,
        ),
        MergekitMethod("nuslerp", "spherical interpolation of two task vectors", PublicGrid(pairs=PUBLIC_T), ratio=True),
    )
}


def get(name: str) -> MergekitMethod:
    """The wiring of mergekit's `name` (with or without the `mergekit:` prefix)."""
    name = name.removeprefix(PREFIX)
    if name not in METHODS:
        raise KeyError(f"Unknown mergekit method {name!r}; known methods: {', '.join(METHODS)}.")
    return METHODS[name]


def applicable(num_updates: int) -> list[str]:
    """The methods whose input contract accepts `num_updates` updates (slerp and nuslerp: two)."""
    return [n for n, m in METHODS.items() if fits(m.update_range(), num_updates)]


def fits(bounds: tuple[int, int | None], n: int) -> bool:
    low, high = bounds
    return n >= low and (high is None or n <= high)


def naive_weights(method: str, num_updates: int) -> list[float] | None:
    """What a naive merger uses: 1/N for every update; None for methods without weights."""
    return [1.0 / num_updates] * num_updates if get(method).weighted else None


def informed_weights(num_updates: int, others: float, protected: float = 1.0, protected_index: int = 0) -> list[float]:
    """The informed attacker's weights: the protected update at `protected` (its nominal scale is
    1.0), every other update at `others`."""
    if not 0 <= protected_index < num_updates:
        raise ValueError(f"protected_index={protected_index} is outside the {num_updates} updates.")
    return [protected if i == protected_index else others for i in range(num_updates)]


def merge_tensor(method: MergekitMethod, task_tensors: list, weights, base, **params):
    """mergekit's merge of one tensor, as a task vector: `method` on W0 + tau_i (and W0 where mergekit
    takes the base), minus W0. `weights` holds one weight per update (None for a method without weights);
    a per-update parameter may be one value or a list with one per update."""
    from mergekit.merge_methods.api import merge_tensors

    spec = method.spec
    declared = {p.name: p for p in spec.parameters}
    unknown = sorted(set(params) - set(declared) - ({"t"} if method.t_from_weights else set()))
    if unknown:
        raise ValueError(f"Parameters {unknown} are not parameters of mergekit's {method.name!r}; it takes "
                         f"{sorted(set(declared) - {'weight'})}.")
    w0 = base.float()
    inputs = [w0 + t.float() for t in task_tensors]
    ids = [f"update_{i}" for i in range(len(inputs))]
    parameters = {}
    for name, value in params.items():
        scoped = name in declared and declared[name].scope.value != "shared"
        parameters[name] = dict(zip(ids, value)) if scoped and isinstance(value, (list, tuple)) else value
    if method.t_from_weights:
        total = float(weights[0] + weights[1])
        parameters.setdefault("t", 0.5 if abs(total) < 1e-12 else float(weights[1]) / total)
    elif weights is not None and "weight" in declared:
        parameters["weight"] = {i: float(w) for i, w in zip(ids, weights)}
    role = method.base_role
    tensors, base_index = ([w0, *inputs], 0) if role == BASE else (inputs, 0 if role == FIRST_UPDATE else None)
    names = (["base"] if role == BASE else []) + ids
    try:
        merged = merge_tensors(tensors, method.name, parameters=parameters, ids=names, base_index=base_index)
    except (ValueError, RuntimeError, TypeError) as error:
        raise MergeUnsupported(f"mergekit raised {type(error).__name__}: {error}") from error
    return merged.float() - w0


def registered() -> list[MergeMethod]:
    """Every mergekit method as the audit's `MergeMethod` (named `mergekit:NAME`), its parameters read from
    mergekit's spec; raises ImportError naming the install command when mergekit is missing."""
    mergekit_module()
    return [_as_merge_method(method) for method in METHODS.values()]


def _as_merge_method(method: MergekitMethod) -> MergeMethod:
    defaults = method.parameter_defaults()
    shared = SPARSE_WEIGHTS if method.sparsifies else LINEAR_WEIGHTS
    params = []
    if method.weighted:
        grid = () if method.normalizes else shared  # a shared weight cancels where the weights are normalised
        params.append(Param("weight", ONE_OVER_N, grid, "each update's weight (average mode: 1/N)"))
    if method.sparsifies:
        # DELLA keeps each entry with a probability in density +- epsilon, which mergekit requires in (0, 1):
        # its densities stay 0.05 inside that range (the grid's 0.9 becomes 0.8).
        epsilon = defaults.get("epsilon", 0.0)
        accepted = (round(epsilon + 0.05, 2), round(1.0 - epsilon - 0.05, 2)) if epsilon else None
        density = Param("density", DEFAULT_DENSITY, DENSITIES, "fraction of each update's entries kept", accepted)
        grid = tuple(dict.fromkeys(density.clamp(d) for d in DENSITIES))
        params.append(Param(density.name, density.default, grid, density.help, accepted))
    if method.normalizes and "lambda" in defaults:
        params.append(Param("lambda", defaults["lambda"], shared, "mergekit's lambda: the scale of the normalised merge"))
    taken = {p.name for p in params} | {"weight", *_STORAGE_OPTIONS} | ({"t"} if method.t_from_weights else set())
    low, high = method.update_range()
    return MergeMethod(
        f"{PREFIX}{method.name}",
        MERGEKIT,
        tuple(params),
        f"mergekit {MERGEKIT_VERSION} {method.name}: {method.summary}",
        functools.partial(merge_tensor, method),
        randomized=method.randomized,
        compensation=(("normalize", False),) if "normalize" in defaults and method.base_role == BASE else (),
        combines_linearly=method.combines_linearly,
        per_update_weights=method.weighted and not method.t_from_weights,
        needs_base=True,
        updates=(low, high),
        public=method.public.resolved(defaults),
        backend_defaults={k: v for k, v in defaults.items() if k not in taken},
        wiring={"base": method.base_role,
                "weights": "t = w2 / (w1 + w2)" if method.t_from_weights else
                "per update" if method.weighted else "none"},
    )


def mergekit_module():
    """mergekit, with its registry loaded; a missing install raises ImportError naming the command."""
    try:
        import mergekit
        import mergekit.merge_methods.registry  # noqa: F401
    except ImportError as err:
        raise ImportError(f"The mergekit backend needs mergekit=={MERGEKIT_VERSION}: {INSTALL_HINT}.") from err
    return mergekit
