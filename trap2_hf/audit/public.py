"""The `public` mode: each method at the points public merge configurations use, none chosen on any task's data.

A casual merger copies a YAML: task arithmetic at lambda 0.3-1.0, TIES or DARE at density 0.3/0.5/0.7, the
model they care about weighted as the others or twice, slerp at t = 0.3/0.5/0.7 with one partner. Each
method declares its points as data (`MergeMethod.public`, a `PublicGrid`); this module runs them, with the
protected update and with its twin in its place, on the report split only (nothing is chosen, so nothing
needs validation data), measuring the protected task only.

A point counts only where the twin, in the protected update's place, keeps at least
`PublicSettings.twin_gain_kept` of its gain over the base model on the protected task: a merge that loses
the task with the twin too says nothing about the protection. Without a twin every point counts. The entry's
headline (`protected`, `unprotected`, `params`) is the counted point with the highest protected-task score.
"""

from .merge_method import MergeMethod, MergeUnsupported
from .settings import PublicSettings


def points(method: MergeMethod, released: str, others: list[str]) -> list[dict]:
    """The configurations of `method`'s public grid with `released` and the other updates `others`."""
    if method.public is None:
        raise ValueError(f"Merge method {method.name!r} declares no public points.")
    return method.public.points(released, others)


def runs(method: MergeMethod, settings: PublicSettings, num_updates: int) -> bool:
    """Whether the public mode runs `method` on `num_updates` updates (a two-update merge runs pairwise)."""
    if method.public is None or not settings.runs(method.name):
        return False
    return method.accepts(2 if method.public.pairs else num_updates)


def evaluations(method: MergeMethod, num_others: int) -> int:
    """Merges one variant costs (the progress bar's total)."""
    return len(points(method, "released", [f"other:{i}" for i in range(num_others)]))


def twin_gain_kept(score: float, base: float, twin_alone: float) -> float:
    """(merged - base) / (twin alone - base) on the protected task; 1.0 where the twin gained nothing."""
    gain = twin_alone - base
    return (score - base) / gain if gain > 0 else 1.0


def run_public(auditor, method: MergeMethod, variants: list[str], context, split: str) -> dict:
    """The `public` entry of `method`: every point with the protected update and with the twin, measured on
    `split`; points a backend refuses are kept with the reason."""
    task = context.protected_task
    base = context.references[split]["base"][task]
    scores = {}
    for variant in variants:
        configs = points(method, variant, context.other_keys)
        scores[variant] = []
        for config in configs:
            try:
                value = auditor.score(lambda c=config: auditor.merged_config(method, c, reuse=True), task, split)
            except MergeUnsupported as error:
                auditor.skip(1)
                value = str(error)
            scores[variant].append((config, value))
    rows = []
    for i, (config, value) in enumerate(scores["protected"]):
        twin = scores["unprotected"][i][1] if "unprotected" in scores else None
        row = {"config": config, "protected": value, "unprotected": twin, "twin_gain_kept": None, "counted": True}
        if isinstance(value, str) or isinstance(twin, str):
            row.update(protected=None, unprotected=None, counted=False, refused=value if isinstance(value, str) else twin)
        elif twin is not None and context.twin_alone is not None:
            row["twin_gain_kept"] = twin_gain_kept(twin, base, context.twin_alone)
            row["counted"] = row["twin_gain_kept"] >= context.public.twin_gain_kept - 1e-9
        rows.append(row)
    counted = [i for i, row in enumerate(rows) if row["counted"]]
    worst_index = max(counted, key=lambda i: rows[i]["protected"], default=None)
    worst = None if worst_index is None else rows[worst_index]
    entry = {
        "method": method.name,
        "mode": "public",
        "points": rows,
        "evaluations": len(rows),
        "counted": len(counted),
        "twin_fails": sum(row["twin_gain_kept"] is not None and not row["counted"] for row in rows),
        "params": None if worst is None else worst["config"],
        "protected": None if worst is None else {task: worst["protected"]},
        "unprotected": None if worst is None or worst["unprotected"] is None else {task: worst["unprotected"]},
    }
    twin = scores.get("unprotected")
    entry["unprotected_params"] = None if worst is None or twin is None else twin[worst_index][0]
    return entry
