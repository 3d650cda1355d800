"""The update alone under what merges do to it before any partner enters: partner-independent curves.

The merges people run put each update near its nominal scale, transformed (issue 30): with `normalize`, TIES and
DELLA divide each entry by the summed weights of the updates that agree on its sign, so wherever only this update
survives it enters at exactly s = 1; DARE and DELLA rescale the entries they keep; SCE weighs each update per
tensor. Sparsification runs on each update alone, before any consensus. So the protected task is measured here
(report split) with the protected update alone, and with its twin, under:

- `trim`: each tensor's top-d entries by magnitude, at s = 1 (normalised TIES where only this update survives);
- `dare`: each entry kept with probability d, the rest rescaled to the tensor's L1 norm (mergekit's DARE rescale,
  1/d in expectation);
- `della`: DELLA's magnitude-ranked drop (keep probability d +- epsilon by rank), rescaled the same way; epsilon is
  narrowed where d +- epsilon would leave (0, 1), which mergekit refuses;
- `tensor_scales`: each tensor at its own scale drawn uniformly from [1 - spread, 1 + spread] (SCE's per-tensor
  weights), several draws per spread: the worst (highest) score and the mean.

The sparsifiers are mergekit's own (`mergekit.sparsify.sparsify`), applied to the task vector as mergekit applies
them inside its merges; without mergekit, PEFT's `prune` (magnitude; random with 1/d) runs `trim` and `dare` and
`della` is left out. Every draw is a function of the audit's seed (and the draw's index), the same for the
protected update and its twin. The rim of the plain re-scale curve (s = 0.8 ... 1.2) is in `DEFAULT_SCALES`.
"""

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from ..seeding import AUDIT_TRANSFORMS
from .settings import TransformSettings
from .task_vectors import TaskVector, applied

LABELS = {
    "trim": "magnitude trim at s = 1 (TIES, normalised)",
    "dare": "random drop, rescaled (DARE)",
    "della": "magnitude-ranked drop, rescaled (DELLA)",
    "tensor_scales": "per-tensor scales (SCE's per-tensor weights)",
}
# DELLA's keep probabilities d +- epsilon stay this far inside (0, 1) (the audit's mergekit DELLA does the same).
DELLA_INSIDE = 0.05


def sparsifier() -> str:
    """Which implementation sparsifies: mergekit's (when installed) or PEFT's."""
    try:
        import mergekit.sparsify  # noqa: F401
    except ImportError:
        return "peft"
    return "mergekit"


def della_epsilon(density: float, epsilon: float) -> float:
    """`epsilon` narrowed so that density +- epsilon stays `DELLA_INSIDE` inside (0, 1)."""
    return round(max(0.0, min(epsilon, density - DELLA_INSIDE, 1.0 - density - DELLA_INSIDE)), 4)


def sparsified(vector: TaskVector, how: str, density: float, seed: int, epsilon: float = 0.0) -> TaskVector:
    """Each tensor of `vector` sparsified to `density` as a merge does it: `how` is "trim", "dare" or "della" (see
    the module docstring). Random drops draw from a fork of the global RNG seeded with `seed`; density 1 keeps the
    vector as it is."""
    if how not in ("trim", "dare", "della"):
        raise ValueError(f"Unknown sparsification {how!r}; use trim, dare or della.")
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density={density} must be in (0, 1].")
    backend = sparsifier()
    if how == "della" and backend != "mergekit":
        raise ValueError("DELLA's magnitude-ranked drop is mergekit's (`mergekit.sparsify`); install the mergekit extra.")
    out = {}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for name in sorted(vector):
            out[name] = _sparsify(vector[name], how, density, epsilon, backend)
    return out


def tensor_scaled(vector: TaskVector, spread: float, seed: int, draw: int) -> tuple[TaskVector, dict[str, float]]:
    """Each tensor of `vector` times its own scale, uniform in [1 - spread, 1 + spread] (in sorted order of the
    names), a function of (seed, draw). Returns the scaled vector and the scales."""
    if not 0.0 <= spread < 1.0:
        raise ValueError(f"spread={spread} must be in [0, 1): each tensor's scale is drawn from [1 - spread, 1 + spread].")
    generator = AUDIT_TRANSFORMS.generator(seed, draw)
    names = sorted(vector)
    draws = torch.rand(len(names), generator=generator, dtype=torch.float64)
    scales = {name: 1.0 + spread * (2.0 * float(u) - 1.0) for name, u in zip(names, draws)}
    return {name: scales[name] * vector[name] for name in names}, scales


def run_transforms(auditor, variants: list[str], protected_task: str, settings: TransformSettings) -> dict:
    """The `transforms` section of audit.json: per transform, the protected task (report split) with each variant
    alone, transformed, at each of its points."""
    backend = sparsifier()
    curves = {}
    for kind in settings.kinds:
        if kind == "della" and backend != "mergekit":
            curves[kind] = {"label": LABELS[kind], "skipped": "needs mergekit's sparsify (the mergekit extra)"}
            continue
        if kind == "tensor_scales":
            curves[kind] = _tensor_scale_curve(auditor, variants, protected_task, settings)
            continue
        curve = {"label": LABELS[kind], "parameter": "density", "points": list(settings.densities)}
        if kind == "della":
            curve["epsilon"] = [della_epsilon(d, settings.della_epsilon) for d in settings.densities]
        for variant in variants:
            scores = []
            for i, density in enumerate(settings.densities):
                epsilon = curve["epsilon"][i] if kind == "della" else 0.0
                seed = AUDIT_TRANSFORMS.seed(auditor.seed, i)
                vector = sparsified(auditor.vector(variant), kind, density, seed, epsilon)
                scores.append(auditor.score(lambda v=vector: _holding(auditor, v), protected_task))
            curve[variant] = scores
        curves[kind] = curve
    for curve in curves.values():
        curve.setdefault("unprotected", None)
    return {"settings": settings.describe(), "sparsifier": backend, "curves": curves,
            "evaluations": len(variants) * settings.evaluations(backend == "mergekit")}


def _tensor_scale_curve(auditor, variants, protected_task, settings) -> dict:
    curve = {"label": LABELS["tensor_scales"], "parameter": "spread", "points": list(settings.tensor_spreads),
             "draws": settings.tensor_draws}
    for variant in variants:
        per_spread = []
        for i, spread in enumerate(settings.tensor_spreads):
            scores = []
            for draw in range(settings.tensor_draws):
                vector, _ = tensor_scaled(auditor.vector(variant), spread, auditor.seed, i * settings.tensor_draws + draw)
                scores.append(auditor.score(lambda v=vector: _holding(auditor, v), protected_task))
            per_spread.append(scores)
        curve[variant] = [max(scores) for scores in per_spread]  # the worst draw for the protection
        curve[f"{variant}_mean"] = [sum(scores) / len(scores) for scores in per_spread]
        curve[f"{variant}_draws"] = per_spread
    return curve


def _sparsify(tensor: torch.Tensor, how: str, density: float, epsilon: float, backend: str) -> torch.Tensor:
    if density >= 1.0:
        return tensor
    if backend == "mergekit":
        from mergekit.sparsify import RescaleNorm, SparsificationMethod, sparsify

        method = {"trim": SparsificationMethod.magnitude, "dare": SparsificationMethod.random,
                  "della": SparsificationMethod.della_magprune}[how]
        rescale = None if how == "trim" else RescaleNorm.l1
        return sparsify(tensor, density=density, method=method, epsilon=epsilon, rescale_norm=rescale)
    from peft.utils.merge_utils import prune

    return prune(tensor, density, method="magnitude" if how == "trim" else "random", rescale=how == "dare")


@contextmanager
def _holding(auditor, vector: TaskVector) -> Iterator[None]:
    """The model with base + `vector` (the update alone, transformed)."""
    with auditor.base(), applied(auditor.model, vector):
        yield

