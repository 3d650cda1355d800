"""The merge-attack audit: what each merge method does to a protected update, against its twin.

For one protected update (and optionally its unprotected twin, trained the same way without Trap²)
and the updates of other tasks on the same base, the audit measures every task on held-out data:

- the base model, each update alone, and the protected task along the re-scaling ray W0 + s*dW;
- every registered merge method (the audit's own, PEFT's and mergekit's, `methods.py`) in up to five
  modes, each where it applies to the method: `average` (weights 1/N, the method's naive density: what a
  naive merger does), `best` (attacker-optimistic: the method's grid, one shared weight and a density,
  searched on the validation split for the highest merged average over all tasks, the test split
  reported), `public` (the points public merge configurations use, see `public.py`), and the informed
  attacker's `informed` (per-update weights around the released update's nominal scale) and `search` (a
  budgeted random search), see `informed.py`. Each merge is run once with the protected update and once
  with the twin in its place;
- what merges do to each update alone before a partner enters (`transforms.py`): magnitude trim at s = 1, DARE's
  and DELLA's rescaled drops, per-tensor scales, as curves;
- the guard (`benign.py`): the update alone folded into the base under benign perturbations (half-precision
  casts, 8-bit weights), against its twin under the same perturbation;
- optionally, post-merge repair (`repair.py`): a fresh LoRA fine-tuned on k labelled examples of the
  protected task on the merged weights, against the same fine-tune without the released update.

Merges are applied to the weights in place and undone exactly (or, for PEFT combination types,
created as a temporary adapter and deleted), so the base model is loaded once. A merge a backend refuses
(a PEFT combination type, a mergekit method) is reported under `skipped` with the backend's message.
"""

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ..report.summary import attack_rows, verdict
from . import benign as benign_check
from . import informed as informed_attack
from . import methods as registry
from . import public as public_grid
from .auditor import MERGED_ADAPTER, REPORT_SPLIT, SEARCH_SPLIT, AttackContext, Auditor
from .kinds import audited_kind
from .merge_method import MergeUnsupported
from .repair import run_repair
from .settings import DEFAULT_SCALES, MODES, InformedSettings, PublicSettings, TransformSettings
from .traced import MergeTracer
from .transforms import run_transforms, sparsifier


@dataclass
class AuditTask:
    """One task of the audit and how to measure it.

    `evaluate(model, split)` returns the task metric in [0, 1] (higher is better) on `split`
    ("validation" or "test") with the model's current weights and active adapter; `chance` is the
    metric of a constant or random predictor.

    Post-merge repair (only for the protected task) also needs labelled training examples:
    `train_loss(model, indices)` returns the mean loss (a tensor with gradients) of the model as it is
    now on the training examples `indices` (a 1-D tensor of ints below `num_train`).
    """

    name: str
    evaluate: Callable[[nn.Module, str], float]
    chance: float
    train_loss: Callable[[nn.Module, torch.Tensor], torch.Tensor] | None = None
    num_train: int = 0


def run_audit(
    model: nn.Module,
    tasks: list[AuditTask],
    protected_task: str,
    protected,
    unprotected,
    others: dict,
    target: str = "adapter",
    methods: list[str] | None = None,
    modes: tuple = MODES,
    sweep_scales: tuple = DEFAULT_SCALES,
    seed: int = 0,
    progress: bool = True,
    informed: InformedSettings | None = None,
    repair=None,
    benign: tuple = benign_check.PERTURBATIONS,
    grids: dict[str, tuple[float, ...]] | None = None,
    public: PublicSettings | None = None,
    transforms: TransformSettings | None = None,
    trace: bool = True,
    best_methods: tuple[str, ...] | None = None,
) -> dict:
    """Run the audit and return the content of `audit.json`.

    With `target="adapter"`, `model` is a PEFT model holding every update as a named adapter and
    `protected`, `unprotected` and the values of `others` are adapter names. With `target="full"`,
    `model` is the base model (its current weights are theta0) and they are fine-tuned states
    `{parameter name: tensor}`. `unprotected` may be None. `methods` defaults to every registered
    method (mergekit's included, when installed) that applies to `target` and runs in one of `modes` with
    this many updates. `informed` sets the informed attacker's grids and budget (default
    `InformedSettings()`); `public` which methods the public grid runs and when a point counts (default
    `PublicSettings()`); `repair` (a `RepairSettings`) adds the post-merge repair section; `benign` names
    the perturbations of the update alone in the `benign` section (empty: no section); `grids` replaces, for this run,
    the `best`-mode grid of the named parameters of every method that has them (e.g. `{"weight": (0.1, 0.2, ..., 2.0)}`,
    the paper's shared-weight search; `config.declared` records it); `transforms` (a
    `TransformSettings`, default one) what merges do to each update alone before a partner enters, the `transforms`
    section (`TransformSettings(kinds=())`: no section). `trace` adds the traced column (traced.py): each reported
    merge traced for the released update in it, and the false-positive check, the `trace` section. `best_methods`
    limits the `best` mode to those of the audited methods (default: every one with a grid), for a run that must
    fit a time budget; the others still run in the other modes, and `config.best_methods` records the choice.
    """
    informed, public = informed or InformedSettings(), public or PublicSettings()
    transforms = TransformSettings() if transforms is None else transforms
    chosen = _check_arguments(
        model, tasks, protected_task, protected, unprotected, others, target, methods, modes, informed, public,
        best_methods,
    )
    declared = registry.with_grids([registry.get(name) for name in chosen], grids)
    other_keys = {t: f"other:{t}" for t in others}
    updates = {"protected": protected, "unprotected": unprotected, **{other_keys[t]: u for t, u in others.items()}}
    auditor = Auditor(model, tasks, target, updates, seed)
    variants = ["protected"] + (["unprotected"] if unprotected is not None else [])
    plan = {
        name: _modes_for(declared[name], modes, informed, public, 1 + len(others), best_methods) for name in chosen
    }
    attacked = any(mode in informed_attack.MODES for planned in plan.values() for mode in planned)
    if repair is not None:
        repair.check(tasks, protected_task, target, chosen)
    benign = benign_check.check_perturbations(benign or ())
    total = (
        1 + len(others) + len(variants) * (1 + len(sweep_scales) + len(benign)) + attacked * (1 + len(others))
        + len(variants) * transforms.evaluations(sparsifier() == "mergekit")
        + len(variants) * sum(_evaluations(declared[n], plan[n], informed, len(others)) for n in chosen)
    )
    with auditor.session(total, progress):
        base = auditor.measure(auditor.base, REPORT_SPLIT)
        standalone = {v: auditor.score(lambda v=v: auditor.alone(v), protected_task) for v in variants}
        finetuned = {t: auditor.score(lambda k=k: auditor.alone(k), t) for t, k in other_keys.items()}
        start = time.perf_counter()
        curve = {
            v: [auditor.score(lambda v=v, s=s: auditor.rescaled(v, s), protected_task) for s in sweep_scales]
            for v in variants
        }
        curve_seconds = time.perf_counter() - start
        guard = benign_check.run_benign(auditor, variants, protected_task, benign) if benign else None
        start = time.perf_counter()
        transformed = run_transforms(auditor, variants, protected_task, transforms) if transforms.kinds else None
        if transformed is not None:
            transformed["seconds"] = time.perf_counter() - start
        references = {REPORT_SPLIT: {"base": base, "finetuned": finetuned}}
        if attacked:
            references[SEARCH_SPLIT] = {
                "base": auditor.measure(auditor.base, SEARCH_SPLIT),
                "finetuned": {
                    t: auditor.score(lambda k=k: auditor.alone(k), t, SEARCH_SPLIT) for t, k in other_keys.items()
                },
            }
        tracer = MergeTracer(auditor, variants) if trace else None
        context = AttackContext(
            protected_task, list(other_keys.values()), list(others), references, informed, public,
            standalone.get("unprotected"), tracer,
        )
        entries, skipped = [], []
        for name in chosen:
            method = declared[name]
            if not plan[name]:
                skipped.append({"method": name, "reason": _why_not(method, modes, 1 + len(others))})
                continue
            try:
                for mode in plan[name]:
                    start = time.perf_counter()
                    entries.append(_audit_method(auditor, method, mode, variants, context))
                    if tracer is not None and mode not in ("average", "best"):
                        tracer.trace_entry(auditor, method, entries[-1])
                    entries[-1]["seconds"] = time.perf_counter() - start
            except MergeUnsupported as error:
                entries = [e for e in entries if e["method"] != name]
                skipped.append({"method": name, "reason": str(error)})
                auditor.skip(len(variants) * _evaluations(method, plan[name], informed, len(others)))
        repaired = None
        if repair is not None:
            repaired = run_repair(auditor, repair, entries, variants, context, tracer)
        if tracer is not None:
            false_positives = tracer.false_positives(auditor, entries, context.other_keys, repaired)
            traced = tracer.describe() | {"false_positives": false_positives}
    task_names = [t.name for t in tasks]
    results = {
        "protected_task": protected_task,
        "target": target,
        "tasks": task_names,
        "base": {t: base[t] for t in task_names},
        "chance": {t.name: float(t.chance) for t in tasks},
        "finetuned": {t: finetuned.get(t) for t in task_names} | {protected_task: standalone.get("unprotected")},
        "standalone": {"protected": standalone["protected"], "unprotected": standalone.get("unprotected")},
        "rescale_curve": {
            "scales": [float(s) for s in sweep_scales],
            "protected": curve["protected"],
            "unprotected": curve.get("unprotected"),
            "seconds": curve_seconds,
        },
        "methods": entries,
        "skipped": skipped,
        "config": {
            "seed": seed,
            "modes": list(modes),
            "informed": informed.describe() if attacked else None,
            "public": public.describe() if "public" in modes else None,
            "best_methods": None if best_methods is None else list(best_methods),
            "splits": {"search": SEARCH_SPLIT, "report": REPORT_SPLIT},
            "updates": {
                "protected": auditor.kind.describe(protected),
                "unprotected": None if unprotected is None else auditor.kind.describe(unprotected),
                "others": {t: auditor.kind.describe(u) for t, u in others.items()},
            },
            "declared": {name: declared[name].describe() for name in chosen},
            "not_audited": {
                "methods": [name for name in registry.names(target) if name not in chosen],
                "modes": [mode for mode in MODES if mode not in modes],
                "best": [
                    name for name in chosen
                    if "best" in modes and best_methods is not None and name not in best_methods
                    and declared[name].searched
                ],
            },
        },
    }
    if guard is not None:
        results["benign"] = guard
    if transformed is not None:
        results["transforms"] = transformed
    if tracer is not None:
        results["trace"] = traced
    if repaired is not None:
        results["repair"] = repaired
    results["attacks"] = attack_rows(results)
    results["verdict"] = verdict(results)
    return results


def _audit_method(auditor: Auditor, method, mode: str, variants: list[str], context: AttackContext) -> dict:
    if mode in informed_attack.MODES:
        return _informed_entry(auditor, method, mode, variants, context)
    if mode == "public":
        return public_grid.run_public(auditor, method, variants, context, REPORT_SPLIT)
    entry = {"method": method.name, "mode": mode}
    for variant in variants:
        keys = [variant, *context.other_keys]
        if mode == "average":
            params, search = method.average_params(len(keys)), None
        else:
            search = [
                {"params": p, SEARCH_SPLIT: auditor.measure(lambda p=p: auditor.merged(method, keys, p), SEARCH_SPLIT)}
                for p in method.grid(len(keys))
            ]
            params = max(search, key=lambda row: row[SEARCH_SPLIT]["average"])["params"]
        scores = auditor.measure(lambda: auditor.merged(method, keys, params), REPORT_SPLIT)
        entry["params" if variant == "protected" else "unprotected_params"] = params
        entry[variant] = scores
        if context.tracer is not None:  # the merge just measured is still at hand
            entry.setdefault("traced", {})[variant] = context.tracer.trace(
                variant, lambda: auditor.merged_delta(method, keys, params)
            )
        if search is not None:
            entry.setdefault("search", {})[variant] = search
    entry.setdefault("unprotected", None)
    entry.setdefault("unprotected_params", None)
    return entry


def _informed_entry(auditor: Auditor, method, mode: str, variants: list[str], context: AttackContext) -> dict:
    """One informed-attacker entry: per variant, both objectives' picks (test scores), the searched
    configurations (validation scores). `protected`/`params` carry the `mean` objective's pick, as in
    the other modes; `objectives[...]["constrained"]` is the headline."""
    entry = {"method": method.name, "mode": mode, "objectives": {o: {} for o in informed_attack.OBJECTIVES}}
    settings = context.settings
    for variant in variants:
        if mode == "informed":
            configs = informed_attack.grid_configs(method, variant, context.other_keys, settings)
        else:
            configs = informed_attack.search_configs(method, variant, context.other_keys, settings, auditor.seed)
        reuse = mode == "informed"

        def evaluate(config, split, reuse=reuse):
            return auditor.measure(lambda: auditor.merged_config(method, config, reuse), split)

        result = informed_attack.attack(
            evaluate, configs, variant, context.protected_task, context.other_tasks, context.references,
            settings.min_gain_kept,
        )
        auditor.skip(informed_attack.evaluations(method, mode, settings) - len(configs) - _tested(result))
        for objective in informed_attack.OBJECTIVES:
            entry["objectives"][objective][variant] = result[objective]
        mean = result["mean"]
        entry["params" if variant == "protected" else "unprotected_params"] = mean and mean["config"]
        entry[variant] = mean and mean["test"]
        entry.setdefault("search", {})[variant] = result["searched"]
    entry["evaluations"] = len(configs)
    entry.setdefault("unprotected", None)
    entry.setdefault("unprotected_params", None)
    return entry


def _tested(result: dict) -> int:
    picks = [result[o]["config"] for o in informed_attack.OBJECTIVES if result[o] is not None]
    return len({id(config) for config in picks})


def _modes_for(
    method, modes: tuple, informed: InformedSettings, public: PublicSettings, num_updates: int, best_methods=None
) -> list:
    """The modes of `modes` that apply to `method` with `num_updates` updates: `best` where it has a grid to
    search (and is among `best_methods`, when given), the informed modes where it takes each update's own weight,
    `public` where it declares points."""
    fits = method.accepts(num_updates)
    applies = {
        "average": fits,
        "best": fits and method.searched and (best_methods is None or method.name in best_methods),
        "public": public_grid.runs(method, public, num_updates),
        "informed": fits and method.per_update_weights and informed.attacks(method.name),
        "search": fits and method.per_update_weights and informed.attacks(method.name),
    }
    return [mode for mode in modes if applies[mode]]


def _why_not(method, modes: tuple, num_updates: int) -> str:
    if not method.accepts(num_updates):
        pairs = " (it runs pairwise in the public mode)" if method.public and method.public.pairs else ""
        return f"merges {method.describe_updates()} updates, got {num_updates}{pairs}"
    return f"none of the modes {list(modes)} applies to it"


def _evaluations(method, modes: list, informed: InformedSettings, num_others: int) -> int:
    """Merges one variant costs for `method` over its `modes` (the progress bar's total)."""
    total = 0
    for mode in modes:
        if mode in informed_attack.MODES:
            total += informed_attack.evaluations(method, mode, informed)
        elif mode == "public":
            total += public_grid.evaluations(method, num_others)
        else:
            total += 1 if mode == "average" else len(method.grid(num_others + 1)) + 1
    return total


def _check_arguments(
    model, tasks, protected_task, protected, unprotected, others, target, methods, modes, informed, public,
    best_methods=None,
) -> list[str]:
    kind = audited_kind(target)
    names = [t.name for t in tasks]
    if len(set(names)) != len(names):
        raise ValueError(f"Task names must be unique; got {names}.")
    if protected_task not in names:
        raise ValueError(f"protected_task={protected_task!r} is not one of the tasks {names}.")
    if not others:
        raise ValueError("Pass at least one other update in `others` ({task name: update}); a merge needs two.")
    stray = [t for t in others if t not in names or t == protected_task]
    if stray:
        raise ValueError(f"`others` keys {stray} must name tasks other than {protected_task!r}, from {names}.")
    bad_modes = [m for m in modes if m not in MODES]
    if bad_modes or not modes:
        raise ValueError(f"Unknown mode(s) {bad_modes or list(modes)}; use one or more of {list(MODES)}.")
    kind.check(model, [protected, *([] if unprotected is None else [unprotected]), *others.values()], MERGED_ADAPTER)
    n = 1 + len(others)
    if methods is None:
        chosen = [
            m for m in registry.names(target) if _modes_for(registry.get(m), modes, informed, public, n, best_methods)
        ]
    else:
        chosen = list(methods)
    for name in chosen:
        targets = registry.get(name).targets
        if target not in targets:
            raise ValueError(f"Merge method {name!r} applies to target {' or '.join(targets)} only, not {target!r}.")
    for given, label in ((informed.methods, "InformedSettings.methods"), (public.methods, "PublicSettings.methods"),
                         (best_methods, "best_methods")):
        stray = [m for m in given or () if m not in chosen]
        if stray:
            raise ValueError(f"{label} {stray} are not among the audited methods {chosen}; audit them too.")
    unweighted = [m for m in informed.methods or () if not registry.get(m).per_update_weights]
    if unweighted and any(mode in informed_attack.MODES for mode in modes):
        weighted = [m for m in chosen if registry.get(m).per_update_weights]
        raise ValueError(
            f"{unweighted} take no per-update weights (slerp's t comes from two): the informed modes need them; "
            f"choose among {weighted}."
        )
    return chosen
