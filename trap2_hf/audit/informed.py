"""The informed attacker: per-update merge weights, scale compensation and a budgeted search.

The model card announces the protection, so an attacker who reads it does not merge naively. He keeps
the released update near its nominal scale and tunes the others. Two modes model him:

- `informed`: a grid. The released update's weight from `protected_weights` (exactly 1.0 and values
  near it), the other updates' weight from `other_weights` (one weight shared by the others), each
  sparsifying method's density grid for the others, and the compensation that lets the released
  update enter at its nominal scale: it keeps density 1.0 (no drop, no trim) in the weight-space
  merges, and TIES's disjoint mean becomes a sum (`MergeMethod.compensation`, mergekit's
  `normalize: false`).
- `search`: a seeded random search over per-update weights and densities (and the compensation on or
  off), `budget` merges per method, like mergekit-evolve with a fixed budget.

Each configuration is scored on the validation split only; two objectives pick one configuration
each, and only those are measured on the test split:

- `mean`: the highest merged mean over all tasks (what `best` mode does with one shared weight);
- `constrained` (the headline): the highest protected-task metric among configurations in which every
  other task keeps at least `min_gain_kept` of its gain over the base model (its own update alone vs
  the base). A configuration whose other updates all have weight 0 is the released update alone, not
  a merge: it never counts for either objective.

The search is independent of how a merge is made: `attack(evaluate, configs, ...)` takes
`evaluate(config, split) -> {task: metric, "average": mean}`, so another merge backend plugs in by
giving its own `evaluate`. A configuration is plain JSON: {"weights": {update: w}, "density": d or
{update: d}, and the method's compensation keys}.
"""

import random
from collections.abc import Callable

from .merge_method import MergeMethod
from .settings import INFORMED_MODES as MODES
from .settings import InformedSettings

OBJECTIVES = ("mean", "constrained")

Evaluate = Callable[[dict, str], dict[str, float]]


def grid_configs(method: MergeMethod, released: str, others: list[str], settings: InformedSettings) -> list[dict]:
    """The `informed` grid: released weight x shared other weight (x the others' density), compensated.
    Ordered so that the configurations of one density are consecutive (one merge structure)."""
    return weight_grid(released, others, settings, _density_grid(method), method.density_per_update,
                       method.compensation)


def weight_grid(
    released: str, others: list[str], settings: InformedSettings, densities: list, per_update_density: bool,
    compensation,
) -> list[dict]:
    """density x released weight x the others' shared weight, each configuration with `compensation`
    (a mapping or (key, value) pairs);
    a per-update density keeps the released update whole (1.0). Any merge backend's informed grid."""
    configs = []
    for density in densities:
        for w_released in settings.protected_weights:
            for w_other in settings.other_weights:
                config = {"weights": {released: float(w_released), **{k: float(w_other) for k in others}}}
                if density is not None:
                    config["density"] = {released: 1.0, **{k: density for k in others}} if per_update_density else density
                configs.append({**config, **dict(compensation)})
    return configs


def search_configs(
    method: MergeMethod, released: str, others: list[str], settings: InformedSettings, seed: int
) -> list[dict]:
    """`settings.budget` random configurations: per-update weights and densities, compensation on or
    off. The draws depend on `seed` only, so the released update and its twin face the same ones."""
    rng = random.Random(seed)
    density = next((p for p in method.params if p.name == "density"), None)
    configs = []
    for _ in range(settings.budget):
        config = {
            "weights": {
                released: _draw(rng, settings.protected_range),
                **{k: _draw(rng, settings.other_range) for k in others},
            }
        }
        if density is not None:  # each draw moved into the values the backend accepts
            if method.density_per_update:
                config["density"] = {k: density.clamp(_draw(rng, settings.density_range)) for k in (released, *others)}
            else:
                config["density"] = density.clamp(_draw(rng, settings.density_range))
        if method.compensation and rng.random() < 0.5:
            config.update(method.compensation)
        configs.append(config)
    return configs


def is_merge(config: dict, released: str) -> bool:
    """At least one update other than the released one takes part."""
    return any(w != 0 for key, w in config["weights"].items() if key != released)


def gains_kept(scores: dict, base: dict, finetuned: dict, tasks: list[str]) -> dict[str, float]:
    """Per task: (merged - base) / (own update alone - base); 1.0 where the update gained nothing."""
    kept = {}
    for task in tasks:
        gain = finetuned[task] - base[task]
        kept[task] = (scores[task] - base[task]) / gain if gain > 0 else 1.0
    return kept


def choose(
    rows: list[dict], released: str, protected_task: str, other_tasks: list[str], reference: dict, min_gain_kept: float
) -> dict:
    """The configuration each objective picks from scored `rows` ({"config", "validation"}): `mean`, the
    highest validation average; `constrained`, the highest validation protected-task metric among
    those keeping >= `min_gain_kept` of every other task's gain (ties: higher average). None when
    no row qualifies. `reference` holds the validation "base" and "finetuned" metrics."""
    merges = [row for row in rows if is_merge(row["config"], released)]

    def keeps(row):
        kept = gains_kept(row["validation"], reference["base"], reference["finetuned"], other_tasks)
        return all(value >= min_gain_kept - 1e-9 for value in kept.values())

    eligible = [row for row in merges if keeps(row)]
    return {
        "mean": max(merges, key=lambda row: row["validation"]["average"], default=None),
        "constrained": max(
            eligible, key=lambda row: (row["validation"][protected_task], row["validation"]["average"]), default=None
        ),
    }


def attack(
    evaluate: Evaluate,
    configs: list[dict],
    released: str,
    protected_task: str,
    other_tasks: list[str],
    references: dict,
    min_gain_kept: float,
) -> dict:
    """Score every configuration on validation, pick one per objective, measure the picks on test.

    `references[split]` holds that split's "base" and "finetuned" (each other task's update alone)
    metrics. Returns {"searched": rows, objective: {"config", "validation", "test", "gain_kept"} or None}.
    """
    rows = [{"config": config, "validation": evaluate(config, "validation")} for config in configs]
    picks = choose(rows, released, protected_task, other_tasks, references["validation"], min_gain_kept)
    tested: list[tuple[dict, dict]] = []
    result = {"searched": rows}
    for objective in OBJECTIVES:
        row = picks[objective]
        if row is None:
            result[objective] = None
            continue
        test = next((scores for config, scores in tested if config is row["config"]), None)
        if test is None:
            test = evaluate(row["config"], "test")
            tested.append((row["config"], test))
        result[objective] = {
            "config": row["config"],
            "validation": row["validation"],
            "test": test,
            "gain_kept": {
                split: gains_kept(scores, references[split]["base"], references[split]["finetuned"], other_tasks)
                for split, scores in (("validation", row["validation"]), ("test", test))
            },
        }
    return result


def evaluations(method: MergeMethod, mode: str, settings: InformedSettings) -> int:
    """Merges one variant costs in `mode` (validation configurations plus at most two on test)."""
    if mode == "informed":
        return len(_density_grid(method)) * len(settings.protected_weights) * len(settings.other_weights) + 2
    return settings.budget + 2


def _density_grid(method: MergeMethod) -> list:
    grid = next((p.grid for p in method.params if p.name == "density"), None)
    return [None] if grid is None else [float(d) for d in grid]


def _draw(rng: random.Random, bounds: tuple[float, float]) -> float:
    return round(rng.uniform(*bounds), 3)
