"""The merge attacks of the audit: one registry, each method with its parameters declared as data.

Every method is a `MergeMethod` (`merge_method.py`) run by one of three backends: the audit's own
weight-space merges and PEFT's combination types (`merges.py`), and mergekit's own methods
(`mergekit/methods.py`, named `mergekit:NAME`, registered when mergekit is installed), their parameters
read from mergekit's spec. `get(name)` raises on an unknown name and lists the known ones; `names(target)`
lists those that apply to a kind of update.
"""

import dataclasses

from .. import choices
from .merge_method import (  # noqa: F401 (the registry's public names)
    BACKENDS,
    DEFAULT_DENSITY,
    DENSITIES,
    LINEAR_WEIGHTS,
    MERGEKIT,
    ONE_OVER_N,
    PEFT,
    SPARSE_WEIGHTS,
    WEIGHTS,
    MergeMethod,
    MergeUnsupported,
    Param,
    PublicGrid,
)
from .merges import OWN_METHODS, PEFT_METHODS, combine_adapters, density_param, weight_param  # noqa: F401
from .mergekit.methods import registered as mergekit_methods

_REGISTRY: dict[str, MergeMethod] = {}
# Why mergekit's methods are not registered (it is not installed), or None.
MERGEKIT_MISSING: str | None = None


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
    if method.backend not in BACKENDS:
        raise ValueError(f"Merge method {method.name!r} has backend {method.backend!r}; use one of {BACKENDS}.")
    _REGISTRY[method.name] = method
    return method


def get(name: str) -> MergeMethod:
    """The registered method `name`; an unknown name raises and lists the known ones."""
    if name not in _REGISTRY:
        hint = f" ({MERGEKIT_MISSING})" if name.startswith("mergekit:") and MERGEKIT_MISSING else ""
        raise KeyError(f"Unknown merge method {name!r}{hint}; known methods: {', '.join(_REGISTRY)}.")
    return _REGISTRY[name]


def names(target: str | None = None, backend: str | None = None) -> list[str]:
    """Registered method names, in registration order; only those that apply to `target` (and come from
    `backend`) if given."""
    if target is not None:
        target = choices.target(target).name  # an unknown name raises, listing the declared ones
    if backend not in (None, *BACKENDS):
        raise ValueError(f"Unknown backend {backend!r}; use one of {BACKENDS}.")
    return [
        n for n, m in _REGISTRY.items()
        if (target is None or target in m.targets) and (backend is None or m.backend == backend)
    ]


def _register_all() -> None:
    global MERGEKIT_MISSING
    for method in (*OWN_METHODS, *PEFT_METHODS):
        register(method)
    try:
        from_mergekit = mergekit_methods()
    except ImportError as error:  # the mergekit extra is optional
        MERGEKIT_MISSING = str(error)
        return
    for method in from_mergekit:
        register(method)


_register_all()
