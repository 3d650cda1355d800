"""The mergekit methods the backend runs, and how each is wired: which base, how many updates, how
per-update weights enter, and what a naive merger passes.

Nothing here re-implements a merge. Facts mergekit owns (parameter names, scopes, defaults, input
contracts) are read from its own registry through `MergekitMethod.spec`; the table below adds only the
wiring. Adding a mergekit method is one entry in `METHODS`.
"""

from dataclasses import dataclass, field

from .methods import DEFAULT_DENSITY

MERGEKIT_VERSION = "0.1.5"
INSTALL_HINT = "pip install 'trap2_hf[mergekit]'"
# How the pretrained base enters mergekit's YAML: as `base_model` (the merge works on task vectors),
# not at all (the merge works on the full weights), or the first update as `base_model` (slerp's
# interpolation between two models).
BASE, NO_BASE, FIRST_UPDATE = "pretrained base", "not used", "first update"


@dataclass(frozen=True)
class MergekitMethod:
    """How one mergekit method is called: `naive` holds what a naive merger passes beyond the
    per-update weights (1/N each); `t_from_weights` maps two weights to slerp's `t = w2 / (w1 + w2)`
    (nuslerp's own convention), so every method takes the same weight list."""

    name: str
    summary: str
    naive: dict = field(default_factory=dict)
    base: str | None = None
    t_from_weights: bool = False

    @property
    def spec(self):
        """mergekit's own declaration of the method (parameters with scope and default, contract)."""
        return _mergekit().merge_methods.registry.get(self.name).spec

    @property
    def base_role(self) -> str:
        if self.base is not None:
            return self.base
        return NO_BASE if self.spec.contract.base.value in ("ignored", "forbidden") else BASE

    @property
    def weighted(self) -> bool:
        """Whether the method takes one weight per update (slerp's `t` comes from two weights)."""
        return self.t_from_weights or "weight" in self.parameter_defaults()

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

    def describe(self) -> dict:
        low, high = self.update_range()
        return {
            "method": self.name,
            "summary": self.summary,
            "base": self.base_role,
            "updates": f"exactly {low}" if low == high else f"at least {low}" if high is None else f"{low}-{high}",
            "weights": "t = w2 / (w1 + w2)" if self.t_from_weights else "per update" if self.weighted else "none",
            "parameters": self.parameter_defaults(),
            "naive": self.naive,
        }


_SPARSE = {"density": DEFAULT_DENSITY}
METHODS: dict[str, MergekitMethod] = {
    m.name: m
    for m in (
        MergekitMethod("linear", "sum_i w_i theta_i / sum_i w_i over the full weights (normalize)"),
        MergekitMethod("task_arithmetic", "theta0 + lambda sum_i w_i tau_i"),
        MergekitMethod("ties", "magnitude trim, sign election, disjoint mean (normalize)", _SPARSE),
        MergekitMethod("dare_ties", "random drop and rescale, then TIES' election", _SPARSE),
        MergekitMethod("dare_linear", "random drop and rescale, then a weighted sum", _SPARSE),
        MergekitMethod("breadcrumbs", "drop the largest gamma and the smallest entries, weighted sum", _SPARSE),
        MergekitMethod("breadcrumbs_ties", "breadcrumbs' sparsification, then TIES' election", _SPARSE),
        MergekitMethod("della", "magnitude-ranked random drop (density +- epsilon), TIES' election", _SPARSE),
        MergekitMethod("della_linear", "DELLA's drop, then a weighted sum", _SPARSE),
        MergekitMethod("sce", "select by variance, weights from squared magnitudes, sign election (no weights)"),
        MergekitMethod("model_stock", "interpolation to the base by the updates' angles (no weights)"),
        MergekitMethod("karcher", "Riemannian (Karcher) mean of the full weights (no weights)"),
        MergekitMethod("multislerp", "spherical interpolation of any number of task vectors"),
        MergekitMethod("slerp", "spherical interpolation between two models", base=FIRST_UPDATE, t_from_weights=True),
        MergekitMethod("nuslerp", "spherical interpolation of two task vectors"),
    )
}


def get(name: str) -> MergekitMethod:
    if name not in METHODS:
        raise KeyError(f"Unknown mergekit method {name!r}; known methods: {', '.join(METHODS)}.")
    return METHODS[name]


def applicable(num_updates: int) -> list[str]:
    """The methods whose input contract accepts `num_updates` updates (slerp and nuslerp: two)."""
    return [n for n, m in METHODS.items() if _fits(m.update_range(), num_updates)]


def naive_weights(method: str, num_updates: int) -> list[float] | None:
    """What a naive merger uses: 1/N for every update; None for methods without weights."""
    return [1.0 / num_updates] * num_updates if get(method).weighted else None


def informed_weights(num_updates: int, others: float, protected: float = 1.0, protected_index: int = 0) -> list[float]:
    """The informed attacker's weights: the protected update at `protected` (its nominal scale is
    1.0), every other update at `others`."""
    if not 0 <= protected_index < num_updates:
        raise ValueError(f"protected_index={protected_index} is outside the {num_updates} updates.")
    return [protected if i == protected_index else others for i in range(num_updates)]


def method_table() -> str:
    """The table of methods as Markdown, from `describe()`."""
    rows = [
        "| method | base | updates | weights | naive | mergekit parameters (default) |",
        "|---|---|---|---|---|---|",
    ]
    for method in METHODS.values():
        d = method.describe()
        params = ", ".join(f"{k} ({v})" for k, v in d["parameters"].items() if k != "weight")
        naive = ", ".join(f"{k} {v}" for k, v in d["naive"].items()) or "mergekit's defaults"
        rows.append(f"| {d['method']} | {d['base']} | {d['updates']} | {d['weights']} | {naive} | {params or '-'} |")
    return "\n".join(rows)


def _fits(bounds: tuple[int, int | None], n: int) -> bool:
    low, high = bounds
    return n >= low and (high is None or n <= high)


def _mergekit():
    try:
        import mergekit
        import mergekit.merge_methods.registry  # noqa: F401
    except ImportError as err:
        raise ImportError(f"The mergekit backend needs mergekit=={MERGEKIT_VERSION}: {INSTALL_HINT}.") from err
    return mergekit
