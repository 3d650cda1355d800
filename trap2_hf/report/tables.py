"""The audit's outputs: audit.json (everything run_audit returned), audit.md (the verdict and the
tables), audit.png (the re-scaling curve; per method, the protected task merged with the protected
update vs its twin; and, with informed attacks or repair, every attack per method)."""

import json
import os

from .plot import plot
from .summary import HELD_MARGIN, TWIN_GAIN_KEPT, attack_grid, held, report_split, threat_summary
from .verdict import per_task


def format_table(results: dict) -> str:
    """The markdown summary: one row per (method, mode), protected task and all-task average, each
    merged with the protected update and with its unprotected twin. The model card shows this table
    too, and for a short audit (no re-scaling curve, e.g. written by hand) the short table."""
    if "rescale_curve" not in results:
        return _short_table(results)
    task = results["protected_task"]
    base, chance = results["base"], results["chance"]
    floor = max(base[task], chance[task])
    standalone = results["standalone"]
    curve = results["rescale_curve"]
    traced = "trace" in results  # the traced columns: the release's estimated weight in each merge and its p-value
    extra = (" traced w/ protected | traced w/ twin |", "---:|---:|", " – | – |") if traced else ("", "", "")
    lines = [
        *threat_summary(results),
        "",
        *_attack_table(results),
        f"Protected task `{task}` ({report_split(results)} split). Chance {_f(chance[task])}, base model {_f(base[task])}, "
        f"alone: protected {_f(standalone['protected'])}, unprotected twin {_f(standalone['unprotected'])}. "
        f"A merge holds (✓) when the protected task stays at or below max(base, chance) + {HELD_MARGIN:g} "
        f"= {_f(floor + HELD_MARGIN)}.",
        "",
        "Protected update alone, re-scaled by s: "
        + ", ".join(f"s={s:g}: {_f(v)}" for s, v in zip(curve["scales"], curve["protected"]))
        + (
            "; twin: " + ", ".join(f"s={s:g}: {_f(v)}" for s, v in zip(curve["scales"], curve["unprotected"]))
            if curve.get("unprotected") else ""
        ),
        "",
        f"| method | mode | params | {task}: merged w/ protected | {task}: merged w/ twin | held | "
        "avg all tasks: w/ protected | avg all tasks: w/ twin |" + extra[0],
        "|---|---|---|---:|---:|:---:|---:|---:|" + extra[1],
        f"| base model (no update) | – | – | {_f(base[task])} | {_f(base[task])} | – | "
        f"{_f(_mean(base.values()))} | {_f(_mean(base.values()))} |" + extra[2],
        f"| each task's own update, unmerged | – | – | {_f(standalone['protected'])} | "
        f"{_f(standalone['unprotected'])} | – | {_f(_own_average(results, 'protected'))} | "
        f"{_f(_own_average(results, 'unprotected'))} |" + extra[2],
    ]
    for entry in results["methods"]:
        if entry["mode"] == "public":
            continue  # the public grid has its own table below
        protected, twin = entry["protected"], entry.get("unprotected")
        mark = "✓" if held(protected[task], results) else "✗"
        cells = "".join(f" {_traced(entry, v)} |" for v in ("protected", "unprotected")) if traced else ""
        lines.append(
            f"| {entry['method']} | {entry['mode']} | {_params(entry)} | {_f(protected[task])} | "
            f"{_f(twin[task] if twin else None)} | {mark} | {_f(protected['average'])} | "
            f"{_f(twin['average'] if twin else None)} |" + cells
        )
    if traced:
        lines.append(
            "\nTraced: the release's estimated weight in the merge and the p-value of \"the merge does not contain it\" "
            "(`trap2 trace`; the twin's merges traced against the twin)."
        )
    for skipped in results.get("skipped", []):
        lines.append(f"\nSkipped `{skipped['method']}`: {skipped['reason']}")
    lines += _transforms_table(results)
    lines += _public_table(results)
    lines += _benign_table(results)
    lines += _repair_table(results)
    return "\n".join(lines)


def _traced(entry: dict, variant: str) -> str:
    cell = (entry.get("traced") or {}).get(variant)
    return "–" if cell is None else f"{cell['weight']:.2f} (p {_p(cell['p_value'])})"


def _p(value: float) -> str:
    return f"{value:.2g}" if value >= 1e-3 else f"{value:.0e}"


def _short_table(audit: dict) -> str:
    """A short audit: `base` and `chance` may be plain numbers, numbers keep four significant digits."""
    task = audit["protected_task"]
    standalone = audit["standalone"]
    lines = [
        f"Base model: {format_value(per_task(audit.get('base'), task))}; "
        f"chance: {format_value(per_task(audit.get('chance'), task))}; "
        f"alone: protected {format_value(standalone.get('protected'))}, "
        f"unprotected {format_value(standalone.get('unprotected'))}.",
        "",
        f"| merge | mode | parameters | {task} (protected) | {task} (unprotected) | average (protected) "
        "| average (unprotected) |",
        "|---|---|---|---|---|---|---|",
    ]
    for m in audit.get("methods", []):
        prot, unprot = m.get("protected") or {}, m.get("unprotected") or {}
        lines.append(
            f"| {m['method']} | {m.get('mode', '')} | {_short_params(m.get('params'))} | "
            f"{format_value(prot.get(task))} | {format_value(unprot.get(task))} | {format_value(prot.get('average'))} | "
            f"{format_value(unprot.get('average'))} |"
        )
    return "\n".join(lines)


def _short_params(params) -> str:
    if not params:
        return ""
    return ", ".join(f"{k}={format_value(v)}" for k, v in params.items()) if isinstance(params, dict) else str(params)


def format_value(value) -> str:
    """Four significant digits (the card's prose and the short table); "–" for a missing value."""
    if isinstance(value, float):
        return f"{value:.4g}"
    return "–" if value is None else str(value)


def _attack_table(results: dict) -> list[str]:
    """Per method, the protected task under each attack: `protected / twin`. Empty without informed
    attacks or repair (the per-mode table below says it all)."""
    grid = attack_grid(results)
    if grid is None:
        return []
    methods, columns, labels, by_key = grid
    info = (results.get("config") or {}).get("informed") or {}
    lines = [
        f"`{results['protected_task']}` under each attack: merged with the protected update / with its twin "
        "(repair: / without the released update). Informed grid: released update's weight in "
        f"{info.get('protected_weights')}, the others' shared weight in {info.get('other_weights')}, the released "
        f"update unpruned and TIES summed; random search: {info.get('budget')} merges per method.",
        "",
        "| method | " + " | ".join(labels[c] for c in columns) + " |",
        "|---|" + "---:|" * len(columns),
    ]
    for method in methods:
        cells = []
        for column in columns:
            row = by_key.get((method, column))
            if row is None:
                cells.append("–")
            else:
                third = row["reference"] if "reference" in row else row["unprotected"]
                cells.append(f"{_f(row['protected'])} / {_f(third)}")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return lines + [""]


def _repair_table(results: dict) -> list[str]:
    section = results.get("repair")
    if not section:
        return []
    task = results["protected_task"]
    settings = section["settings"]
    lines = [
        "",
        f"Post-merge repair: a fresh rank-{settings['rank']} LoRA, {settings['steps']} steps at lr "
        f"{settings['learning_rate']:g} (batch {settings['batch_size']}), on k labelled `{task}` examples.",
        "",
        f"| method | merge repaired | k | {task}: w/ protected (before → after) | w/ twin (before → after) | "
        "without the released update (before → after) |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for row in section["rows"]:
        for k, after in row["after"].items():
            cells = [
                f"{_f(row['before'].get(run))} → {_f(after.get(run))}" for run in ("protected", "unprotected", "reference")
            ]
            lines.append(f"| {row['method']} | {row['stage']} | {k} | " + " | ".join(cells) + " |")
    return lines


def _public_table(results: dict) -> list[str]:
    """The public grid, one row per method: its points, the worst counted point with the protected update
    and the twin's score there, how many counted points hold (full detail: audit.json's `points`)."""
    entries = [e for e in results["methods"] if e["mode"] == "public"]
    if not entries:
        return []
    task = results["protected_task"]
    kept = ((results.get("config") or {}).get("public") or {}).get("twin_gain_kept", TWIN_GAIN_KEPT)
    lines = [
        "",
        f"Public merge configs (`{task}`, {report_split(results)} split): each method at the points public merge "
        f"YAMLs use, none chosen on any task's data. A point counts where the twin, in the protected update's "
        f"place, keeps ≥ {kept:.0%} of its gain on `{task}`; the worst point is the counted one with the highest "
        f"`{task}` score.",
        "",
        f"| method | points counted / run | twin fails | {task}: worst w/ protected | w/ twin there | points held | "
        "worst point |" + (" traced there: w/ protected / w/ twin |" if "trace" in results else ""),
        "|---|---:|---:|---:|---:|---:|---|" + ("---|" if "trace" in results else ""),
    ]
    for entry in entries:
        counted = [p for p in entry["points"] if p["counted"]]
        holding = sum(held(p["protected"], results) for p in counted)
        protected, twin = entry["protected"], entry.get("unprotected")
        lines.append(
            f"| {entry['method']} | {len(counted)} / {len(entry['points'])} | {entry['twin_fails']} | "
            f"{_f(protected and protected[task])} | {_f(twin and twin[task])} | {holding} / {len(counted)} | "
            f"{_format_params(entry['params'])} |"
            + (f" {_traced(entry, 'protected')} / {_traced(entry, 'unprotected')} |" if "trace" in results else "")
        )
    refused = sum("refused" in p for e in entries for p in e["points"])
    if refused:
        lines.append(f"\n{refused} public points were refused by their backend (audit.json: `refused`).")
    return lines


def _transforms_table(results: dict) -> list[str]:
    """The `transforms` section (transforms.py): per transform, the update alone at each point, `protected / twin`
    with ✓ where the protected update leaves the task held; per-tensor scales give the worst and the mean draw."""
    section = results.get("transforms")
    if not section:
        return []
    task = results["protected_task"]
    lines = [
        "",
        f"The update alone as merges transform it before any partner enters (`{task}`, {report_split(results)} split, "
        f"protected / twin; ✓: held): sparsified by {section['sparsifier']}'s own functions at s = 1 (DARE and DELLA "
        "rescaled to each tensor's L1 norm, as mergekit does), each tensor at its own scale (SCE's per-tensor weights).",
    ]
    groups: dict[tuple, list] = {}
    for name, curve in section["curves"].items():
        if "points" not in curve:
            lines.append(f"\n{curve['label']}: left out ({curve['skipped']}).")
            continue
        groups.setdefault((curve["parameter"], tuple(curve["points"])), []).append(curve)
    for (parameter, points), curves in groups.items():
        short = {"density": "d", "spread": "±"}[parameter]
        lines += ["", "| transform | " + " | ".join(f"{short}={p:g}" for p in points) + " |",
                  "|---|" + "---:|" * len(points)]
        for curve in curves:
            cells = [
                f"{_f(p)} / {_f(t)} {'✓' if held(p, results) else '✗'}"
                for p, t in zip(curve["protected"], curve["unprotected"] or [None] * len(points))
            ]
            label = curve["label"] + (f", ε = {', '.join(f'{e:g}' for e in curve['epsilon'])}" if "epsilon" in curve
                                      else "")
            if "protected_mean" in curve:
                label += f", worst of {curve['draws']} draws"
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
            if "protected_mean" in curve:
                means = zip(curve["protected_mean"], curve.get("unprotected_mean") or [None] * len(points))
                lines.append(f"| … mean of the {curve['draws']} draws | "
                             + " | ".join(f"{_f(p)} / {_f(t)}" for p, t in means) + " |")
    return lines


def _benign_table(results: dict) -> list[str]:
    """The `benign` section (the update alone under benign perturbations, see benign.py), or nothing."""
    section = results.get("benign")
    if not section:
        return []
    task = results["protected_task"]
    twin = section["unprotected"]
    lines = [
        "",
        f"Benign perturbations of the update folded into the base (`{task}`, {section['reference'] or 'no'} "
        f"reference; holds: at most {section['tolerance'] * 100:g} point below it):",
        "",
        "| weights | protected | twin | gap | holds |",
        "|---|---:|---:|---:|:---:|",
    ]
    for p in section["perturbations"]:
        gap = section["gap"][p] if section["gap"] else None
        held = "–" if section["held"] is None else ("✓" if section["held"][p] else "✗")
        lines.append(
            f"| {p} | {_f(section['protected'][p])} | {_f(twin and twin[p])} | "
            f"{'–' if gap is None else f'{gap:+.3f}'} | {held} |"
        )
    return lines


def write_report(results: dict, output_dir: str) -> dict[str, str]:
    """Write audit.json, audit.md and audit.png into `output_dir`; return their paths."""
    os.makedirs(output_dir, exist_ok=True)
    paths = {kind: os.path.join(output_dir, f"audit.{kind}") for kind in ("json", "md", "png")}
    with open(paths["json"], "w") as f:
        json.dump(results, f, indent=2)
    with open(paths["md"], "w") as f:
        f.write(f"# Merge-attack audit\n\n{format_table(results)}\n")
    plot(results, paths["png"])
    return paths


def _own_average(results: dict, variant: str):
    """Average over tasks when each task uses its own update (the protected task: `variant`)."""
    task = results["protected_task"]
    own = dict(results["finetuned"], **{task: results["standalone"][variant]})
    return None if any(v is None for v in own.values()) else _mean(own.values())


def _params(entry: dict) -> str:
    text = _format_params(entry["params"])
    twin = entry.get("unprotected_params")
    if twin is not None and _format_params(twin) != text:
        text += f" (twin: {_format_params(twin)})"
    return text


def _format_params(params: dict) -> str:
    """`w=0.5 d=0.3` for a shared weight; for an informed configuration the weight (and density) of
    the released update (`rel`) and of each other task's update, and `sum` for a disjoint sum."""
    if params is None:
        return "–"
    short = {"weight": "w", "weights": "w", "density": "d"}
    parts = []
    for key, value in params.items():
        if isinstance(value, dict):
            parts.append(f"{short.get(key, key)}(" + " ".join(f"{_update(k)}={v:.3g}" for k, v in value.items()) + ")")
        elif isinstance(value, bool):
            parts.append(key if value else {"normalize": "sum"}.get(key, f"no-{key}"))
        else:
            parts.append(f"{short.get(key, key)}={value:.3g}")
    return " ".join(parts)


def _update(key: str) -> str:
    """The released update (protected or its twin) is `rel`; another task's update is its task name."""
    return key.split(":", 1)[1] if key.startswith("other:") else "rel"


def _mean(values):
    values = list(values)
    return sum(values) / len(values)


def _f(value) -> str:
    return "–" if value is None else f"{value:.3f}"
