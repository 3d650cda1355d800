"""The audit's updates merged by mergekit and measured by the audit's own tasks.

`audit_mergekit` is what `trap2 audit --mergekit_methods` runs: every chosen mergekit method with the
protected update and the others, then with the twin in its place, each merge measured on the
report split with the same `AuditTask`s as the audit's own merges. mergekit's output is applied to
the audited model as a task vector (and undone exactly), so the tasks see the model they were
built for.
"""

import math
from contextlib import nullcontext
from collections.abc import Sequence

import torch
from torch import nn

from . import mergekit_backend as backend
from .task_vectors import TaskVector, applied

REPORT_SPLIT = "test"


def audit_mergekit(
    model: nn.Module,
    tasks: Sequence,
    protected,
    unprotected,
    others: dict,
    target: str = "adapter",
    methods: Sequence[str] | None = None,
    seed: int = 0,
    split: str = REPORT_SPLIT,
) -> dict:
    """mergekit's merges of the audited updates with naive weights, as an `audit.json` section.

    Arguments as in `run_audit`: with `target="adapter"` a PEFT model and adapter names, with
    `target="full"` the base model and fine-tuned states. The protected update (or its twin) is the
    first model of every merge, the others follow in the order of `others`.
    """
    if target not in ("adapter", "full"):
        raise ValueError(f"Unknown target {target!r}; use 'adapter' or 'full'.")
    variants = {"protected": protected, **({"unprotected": unprotected} if unprotected is not None else {})}
    sweeps = {}
    training = model.training
    model.eval()
    try:
        for variant, update in variants.items():
            updates = [(model, u) if target == "adapter" else u for u in (update, *others.values())]

            def evaluate(merged):
                return _measure(model, tasks, merged_task_vector(model, merged, target), target, split)

            sweeps[variant] = backend.mergekit_sweep(model, updates, evaluate, methods=methods, seed=seed)
    finally:
        model.train(training)
    twin = {row["method"]: row for row in sweeps.get("unprotected", [])}
    rows, skipped = [], []
    for row in sweeps["protected"]:
        other = twin.get(row["method"], {})
        if "skipped" in row:
            skipped.append({"method": row["method"], "reason": row["skipped"]})
            continue
        if "skipped" in other:
            skipped.append({"method": row["method"], "reason": f"with the twin: {other['skipped']}"})
        entry = {k: row[k] for k in ("method", "weights", "params")}
        rows.append({**entry, "protected": row["result"], "unprotected": other.get("result")})
    return {
        "backend": "mergekit",
        "version": backend.MERGEKIT_VERSION,
        "split": split,
        "seed": seed,
        "layout": sweeps["protected"][0]["layout"] if sweeps["protected"] else None,
        "order": ["protected (or twin)", *others],
        "methods": rows,
        "skipped": skipped,
    }


def merged_task_vector(model: nn.Module, merged: nn.Module, target: str) -> TaskVector:
    """merged - base for every base weight the merge changed, keyed by `model`'s parameter names
    (for a PEFT model: its `...base_layer.weight` names, applied under `disable_adapter()`)."""
    merged_params = dict(merged.named_parameters(remove_duplicate=False))
    vector = {}
    for name, param in model.named_parameters():
        plain = _plain_name(name) if target == "adapter" else name
        if plain not in merged_params:
            continue
        delta = merged_params[plain].detach().float() - param.detach().float()
        if delta.any():
            vector[name] = delta
    return vector


def format_mergekit_table(section: dict, protected_task: str) -> str:
    """One row per mergekit method: the protected task and the all-task average, merged with the
    protected update and with its twin."""
    lines = [
        f"mergekit {section['version']} merges, naive weights ({section['split']} split; layout {section['layout']}):",
        "",
        f"| mergekit method | weights | params | {protected_task}: w/ protected | {protected_task}: w/ twin | "
        "avg: w/ protected | avg: w/ twin |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    for row in section["methods"]:
        twin = row.get("unprotected") or {}
        weights = "-" if row["weights"] is None else ", ".join(f"{w:.3g}" for w in row["weights"])
        params = ", ".join(f"{k}={v}" for k, v in row["params"].items()) or "-"
        lines.append(
            f"| {row['method']} | {weights} | {params} | {_f(row['protected'].get(protected_task))} | "
            f"{_f(twin.get(protected_task))} | {_f(row['protected']['average'])} | {_f(twin.get('average'))} |"
        )
    lines += [f"\nSkipped `{s['method']}`: {s['reason']}" for s in section["skipped"]]
    return "\n".join(lines)


def _plain_name(name: str) -> str:
    """A PEFT model's base weight in the plain model's namespace (adapter weights map to names the
    plain model does not have, and are skipped)."""
    return name.removeprefix("base_model.model.").replace(".base_layer.", ".").replace(".original_module.", ".")


def _measure(model, tasks, delta: TaskVector, target: str, split: str) -> dict:
    base = model.disable_adapter() if target == "adapter" else nullcontext()
    scores = {}
    with torch.no_grad(), base, applied(model, delta):
        for task in tasks:
            value = float(task.evaluate(model, split))
            if not math.isfinite(value):
                raise ValueError(f"Task {task.name!r} returned a non-finite metric {value} on {split!r}.")
            scores[task.name] = value
    scores["average"] = sum(scores.values()) / len(scores)
    return scores


def _f(value) -> str:
    return "–" if value is None else f"{value:.3f}"
