"""The audit's outputs: audit.json (everything run_audit returned), audit.md (the verdict and the
tables), audit.png (the re-scaling curve; per method, the protected task merged with the protected
update vs its twin; and, with informed attacks or repair, every attack per method)."""

import json
import math
import os

from .summary import ATTACKS, HELD_MARGIN, TWIN_GAIN_KEPT, attack_rows, held, per_task, report_split, threat_summary
from .summary import verdict


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
        "avg all tasks: w/ protected | avg all tasks: w/ twin |",
        "|---|---|---|---:|---:|:---:|---:|---:|",
        f"| base model (no update) | – | – | {_f(base[task])} | {_f(base[task])} | – | "
        f"{_f(_mean(base.values()))} | {_f(_mean(base.values()))} |",
        f"| each task's own update, unmerged | – | – | {_f(standalone['protected'])} | "
        f"{_f(standalone['unprotected'])} | – | {_f(_own_average(results, 'protected'))} | "
        f"{_f(_own_average(results, 'unprotected'))} |",
    ]
    for entry in results["methods"]:
        if entry["mode"] == "public":
            continue  # the public grid has its own table below
        protected, twin = entry["protected"], entry.get("unprotected")
        mark = "✓" if held(protected[task], results) else "✗"
        lines.append(
            f"| {entry['method']} | {entry['mode']} | {_params(entry)} | {_f(protected[task])} | "
            f"{_f(twin[task] if twin else None)} | {mark} | {_f(protected['average'])} | "
            f"{_f(twin['average'] if twin else None)} |"
        )
    for skipped in results.get("skipped", []):
        lines.append(f"\nSkipped `{skipped['method']}`: {skipped['reason']}")
    lines += _public_table(results)
    lines += _benign_table(results)
    lines += _repair_table(results)
    return "\n".join(lines)


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
    grid = _attack_grid(results)
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


def _attack_grid(results: dict):
    """(methods, attack columns, column labels, {(method, attack): row}), or None when only the
    average and best modes ran (nothing beyond the per-mode table)."""
    rows = attack_rows(results)
    attacks = [a for a in ATTACKS if any(r["attack"] == a for r in rows)]
    repairs = sorted({r["attack"] for r in rows if r["attack"].startswith("repair:")}, key=_repair_order)
    if not any(a not in ("average", "best") for a in attacks) and not repairs:
        return None
    methods = list(dict.fromkeys(r["method"] for r in rows))
    labels = {r["attack"]: r["label"] for r in rows}
    return methods, attacks + repairs, labels, {(r["method"], r["attack"]): r for r in rows}


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
        "worst point |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for entry in entries:
        counted = [p for p in entry["points"] if p["counted"]]
        holding = sum(held(p["protected"], results) for p in counted)
        protected, twin = entry["protected"], entry.get("unprotected")
        lines.append(
            f"| {entry['method']} | {len(counted)} / {len(entry['points'])} | {entry['twin_fails']} | "
            f"{_f(protected and protected[task])} | {_f(twin and twin[task])} | {holding} / {len(counted)} | "
            f"{_format_params(entry['params'])} |"
        )
    refused = sum("refused" in p for e in entries for p in e["points"])
    if refused:
        lines.append(f"\n{refused} public points were refused by their backend (audit.json: `refused`).")
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


def _repair_order(attack: str):
    _, stage, k = attack.split(":")
    return (stage != "average", int(k))


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


def plot(results: dict, path: str) -> None:
    """Left: the protected task along W0 + s*dW for each update alone. Right: the protected task
    after each merge, with the protected update vs with its twin. Below, with informed attacks or
    repair: per method and attack, the protected task with the protected update (colour and first
    number) and with the twin or, for repair, without the released update (second number)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    task = results["protected_task"]
    base, chance = results["base"][task], results["chance"][task]
    entries = [e for e in results["methods"] if e["protected"] is not None]
    grid = _attack_grid(results)
    top = max(4.5, 0.28 * len(entries) + 1.5)
    bottom = 0 if grid is None else 0.45 * len(grid[0]) + 3.0
    fig = plt.figure(figsize=(13, top + bottom))
    layout = fig.add_gridspec(2 if grid else 1, 2, width_ratios=[1, 1.3], height_ratios=[top, bottom] if grid else None)
    left, right = fig.add_subplot(layout[0, 0]), fig.add_subplot(layout[0, 1])
    curve = results["rescale_curve"]
    left.plot(curve["scales"], curve["protected"], "o-", color="tab:red", label="protected")
    if curve.get("unprotected"):
        left.plot(curve["scales"], curve["unprotected"], "s--", color="tab:blue", label="unprotected twin")
    for ax in (left, right):
        line = ax.axhline if ax is left else ax.axvline
        line(base, color="gray", linestyle=":", label="base model")
        line(chance, color="black", linestyle="-.", linewidth=0.8, label="chance")
    left.axvline(1.0, color="gray", linewidth=0.5)
    left.set(xlabel="scale s of the update (W0 + s·ΔW)", ylabel=f"{task} metric", title="Update alone, re-scaled")
    left.set_ylim(-0.02, 1.02)
    left.legend(loc="best", fontsize=8)

    labels = [f"{e['method']} ({e['mode']})" for e in entries]
    ys = range(len(entries))
    right.barh([y - 0.2 for y in ys], [e["protected"][task] for e in entries], height=0.4, color="tab:red",
               label="merged with protected")
    twins = [e["unprotected"][task] if e.get("unprotected") else 0.0 for e in entries]
    right.barh([y + 0.2 for y in ys], twins, height=0.4, color="tab:blue", label="merged with twin")
    right.set_yticks(list(ys), labels, fontsize=7)
    right.invert_yaxis()
    right.set(xlabel=f"{task} metric after merging (test)", title="Merged with the other updates")
    right.set_xlim(0, 1.02)
    right.legend(loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=4, fontsize=8)  # below: never over a bar
    if grid is not None:
        _plot_attacks(fig.add_subplot(layout[1, :]), grid, task)
    judged = verdict(results)
    if not judged["given"]:
        fig.suptitle(judged["reason"], color="tab:red", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def _plot_attacks(ax, grid, task: str) -> None:
    methods, columns, labels, by_key = grid
    values = [[_value(by_key.get((m, c)), "protected") for c in columns] for m in methods]
    image = ax.imshow(values, cmap="Reds", vmin=0.0, vmax=1.0, aspect="auto")
    for i, method in enumerate(methods):
        for j, column in enumerate(columns):
            row = by_key.get((method, column))
            if row is not None:
                other = row["reference"] if "reference" in row else row["unprotected"]
                text = f"{_f(row['protected'])}\n{_f(other)}"
                dark = row["protected"] is not None and row["protected"] > 0.6
                ax.text(j, i, text, ha="center", va="center", fontsize=7, color="white" if dark else "black")
    ax.set_xticks(range(len(columns)), [labels[c] for c in columns], rotation=25, ha="right", fontsize=7)
    ax.set_yticks(range(len(methods)), methods, fontsize=7)
    ax.set_title(f"{task} (test) per attack: with the protected update (top, colour) / twin or, for repair, "
                 "without the released update (bottom)", fontsize=9)
    ax.figure.colorbar(image, ax=ax, fraction=0.02, pad=0.01)


def _value(row, key):
    return math.nan if row is None or row.get(key) is None else row[key]


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
