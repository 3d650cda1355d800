"""The audit's updates merged by mergekit and measured by the audit's own tasks.

`audit_mergekit` is what `trap2 audit --mergekit_methods` runs: every chosen mergekit method with the
protected update and the others, then with the twin in its place, each merge measured on the
report split with the same `AuditTask`s as the audit's own merges. mergekit's output is applied to
the audited model as a task vector (and undone exactly), so the tasks see the model they were
built for.

With `informed_methods` (`--mergekit_informed`) the informed attacker's grid (`informed.py`) runs on
those mergekit methods too: the released update's weight from `protected_weights`, the others' from
`other_weights`, the others' density from the audit's density grid with the released update kept
whole (density 1.0), and mergekit's `normalize: false` where the method has it, so the released
update enters at its nominal scale. Each configuration is one mergekit merge, scored on validation
(and test, in the same pass: the merge is the cost); the two objectives pick on validation only.
"""

import json
import math
import shutil
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from . import informed as informed_attack
from . import mergekit_backend as backend
from .informed import InformedSettings
from .kinds import AuditedKind, audited_kind
from .methods import DENSITIES
from .task_vectors import TaskVector, applied

REPORT_SPLIT, SEARCH_SPLIT = "test", "validation"


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
    protected_task: str | None = None,
    informed_methods: Sequence[str] = (),
    informed: InformedSettings | None = None,
) -> dict:
    """mergekit's merges of the audited updates with naive weights, as an `audit.json` section.

    Arguments as in `run_audit`: with `target="adapter"` a PEFT model and adapter names, with
    `target="full"` the base model and fine-tuned states. The protected update (or its twin) is the
    first model of every merge, the others follow in the order of `others`. `informed_methods`
    (mergekit methods that take per-update weights) adds an `informed` list: the informed grid of
    `informed` (default `InformedSettings()`) on each, both objectives, for `protected_task`.
    """
    kind = audited_kind(target)
    informed_methods = [backend.get(m).name for m in informed_methods]
    unweighted = [m for m in informed_methods if not backend.get(m).weighted or backend.get(m).t_from_weights]
    if unweighted:
        raise ValueError(
            f"mergekit methods {unweighted} take no per-update weights (slerp's t comes from two): the informed "
            "grid needs per-update weights; choose among "
            f"{[n for n, m in backend.METHODS.items() if m.weighted and not m.t_from_weights]}."
        )
    if informed_methods and protected_task not in [t.name for t in tasks]:
        raise ValueError(f"The informed grid needs protected_task, one of {[t.name for t in tasks]}; got {protected_task!r}.")
    variants = {"protected": protected, **({"unprotected": unprotected} if unprotected is not None else {})}
    settings = informed or InformedSettings()
    sweeps, attacks = {}, {}
    training = model.training
    model.eval()
    try:
        references = _references(model, tasks, others, kind) if informed_methods else None
        for variant, update in variants.items():
            updates = [kind.mergekit_input(model, u) for u in (update, *others.values())]

            def evaluate(merged):
                return _measure(model, tasks, merged_task_vector(model, merged, target), kind, split)

            with backend.written_inputs(model, updates) as inputs:
                sweeps[variant] = backend.sweep_inputs(
                    inputs, evaluate, methods=methods, seed=seed, load=backend.merged_tensors
                )
                for name in informed_methods:
                    attacks.setdefault(name, {})[variant] = _informed_attack(
                        model, tasks, inputs, name, variant, list(others), protected_task, references, settings,
                        kind, seed,
                    )
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
    section = {
        "backend": "mergekit",
        "version": backend.MERGEKIT_VERSION,
        "split": split,
        "seed": seed,
        "layout": sweeps["protected"][0]["layout"] if sweeps["protected"] else None,
        "order": ["protected (or twin)", *others],
        "methods": rows,
        "skipped": skipped,
    }
    if informed_methods:
        section["informed"] = [
            {"method": name, "settings": settings.describe(), "objectives": {
                objective: {variant: result[objective] for variant, result in by_variant.items()}
                for objective in informed_attack.OBJECTIVES
            }, "searched": {variant: result["searched"] for variant, result in by_variant.items()}}
            for name, by_variant in attacks.items()
        ]
    return section


def mergekit_grid(method: str, released: str, others: list[str], settings: InformedSettings) -> list[dict]:
    """The informed grid for mergekit's `method`, as `informed.grid_configs` builds it for the audit's
    own: released weight x the others' shared weight (x the others' density from the audit's grid,
    the released update at 1.0), with mergekit's `normalize: false` where the method merges task
    vectors and has it. Configurations are plain JSON in `informed`'s form."""
    spec = backend.get(method)
    defaults = spec.parameter_defaults()
    compensation = {"normalize": False} if "normalize" in defaults and spec.base_role == backend.BASE else {}
    # The sparsifying methods (a naive merger passes them a density); mergekit declares `density` on
    # every task-arithmetic-family method, task_arithmetic itself ignores it.
    densities = [float(d) for d in DENSITIES] if "density" in spec.naive else [None]
    return informed_attack.weight_grid(released, others, settings, densities, True, compensation)


def _informed_attack(model, tasks, inputs, method, variant, other_tasks, protected_task, references, settings,
                     kind: AuditedKind, seed) -> dict:
    """The informed grid on one mergekit method for one variant; each merge measured on both splits
    once (validation chooses, test reports the two picks)."""
    keys = [variant, *other_tasks]
    scored: dict[str, dict] = {}

    def evaluate(config: dict, split: str) -> dict:
        key = json.dumps(config, sort_keys=True)
        if key not in scored:
            weights = [float(config["weights"][k]) for k in keys]
            params = {k: v for k, v in config.items() if k != "weights"}
            if isinstance(params.get("density"), dict):
                params["density"] = [float(params["density"][k]) for k in keys]
            folder = backend.run_mergekit(inputs, method, weights, params, seed=seed)
            try:
                delta = merged_task_vector(model, backend.merged_tensors(inputs, folder), kind.name)
            finally:
                shutil.rmtree(folder, ignore_errors=True)
            scored[key] = {s: _measure(model, tasks, delta, kind, s) for s in (SEARCH_SPLIT, REPORT_SPLIT)}
        return scored[key][split]

    configs = mergekit_grid(method, variant, other_tasks, settings)
    return informed_attack.attack(
        evaluate, configs, variant, protected_task, other_tasks, references, settings.min_gain_kept
    )


def _references(model, tasks, others: dict, kind: AuditedKind) -> dict:
    """Per split, the base model's metrics and each other task's own update alone: what a task's gain
    is measured from, for the informed objectives."""
    vectors = {task: kind.task_vector(model, update) for task, update in others.items()}
    by_name = {t.name: t for t in tasks}
    return {
        split: {
            "base": _measure(model, tasks, {}, kind, split),
            "finetuned": {t: _measure(model, [by_name[t]], v, kind, split)[t] for t, v in vectors.items()},
        }
        for split in (SEARCH_SPLIT, REPORT_SPLIT)
    }


def merged_task_vector(model: nn.Module, merged: nn.Module | Mapping[str, torch.Tensor], target: str) -> TaskVector:
    """merged - base for every base weight the merge changed, keyed by `model`'s parameter names
    (for a PEFT model: its `...base_layer.weight` names, applied under `disable_adapter()`). `merged` is the
    merged model or its tensors by checkpoint name (`mergekit_backend.merged_tensors`)."""
    kind = audited_kind(target)
    if isinstance(merged, nn.Module):
        merged = dict(merged.named_parameters(remove_duplicate=False))
    vector = {}
    for name, param in model.named_parameters():
        plain = kind.plain_name(name)
        if plain not in merged:
            continue
        merged_param = merged[plain].detach().to(device=param.device, dtype=param.dtype)  # as loading it would
        delta = merged_param.float() - param.detach().float()
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
    for attack in section.get("informed", []):
        picks = attack["objectives"]
        cells = [
            f"{_f(_pick(picks[o].get('protected'), protected_task))} / {_f(_pick(picks[o].get('unprotected'), protected_task))}"
            for o in informed_attack.OBJECTIVES
        ]
        searched = len(attack["searched"]["protected"])
        lines.append(
            f"\nmergekit {attack['method']}, informed grid ({searched} merges per update): {protected_task} "
            f"with the protected update / with its twin: best mean {cells[0]}; others keep "
            f">= {attack['settings']['min_gain_kept']:.0%} of their gain {cells[1]}"
        )
    return "\n".join(lines)


def _pick(pick, task):
    return None if pick is None else pick["test"][task]


def _measure(model, tasks, delta: TaskVector, kind: AuditedKind, split: str) -> dict:
    base = kind.without_update(model)
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
