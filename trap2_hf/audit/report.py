"""The audit's outputs: audit.json (everything run_audit returned), audit.md (the table), audit.png
(the re-scaling curve and, per method, the protected task merged with the protected update vs its twin)."""

import json
import os

# A merge "held" when the protected task stays within this margin of max(base, chance).
HELD_MARGIN = 0.05


def format_table(results: dict) -> str:
    """The markdown summary: one row per (method, mode), protected task and all-task average, each
    merged with the protected update and with its unprotected twin."""
    task = results["protected_task"]
    base, chance = results["base"], results["chance"]
    floor = max(base[task], chance[task])
    standalone = results["standalone"]
    curve = results["rescale_curve"]
    lines = [
        f"Protected task `{task}` ({_split(results)} split). Chance {_f(chance[task])}, base model {_f(base[task])}, "
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
        protected, twin = entry["protected"], entry.get("unprotected")
        held = "✓" if protected[task] <= floor + HELD_MARGIN + 1e-9 else "✗"
        lines.append(
            f"| {entry['method']} | {entry['mode']} | {_params(entry)} | {_f(protected[task])} | "
            f"{_f(twin[task] if twin else None)} | {held} | {_f(protected['average'])} | "
            f"{_f(twin['average'] if twin else None)} |"
        )
    for skipped in results.get("skipped", []):
        lines.append(f"\nSkipped `{skipped['method']}`: {skipped['reason']}")
    return "\n".join(lines)


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
    after each merge, with the protected update vs with its twin."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    task = results["protected_task"]
    base, chance = results["base"][task], results["chance"][task]
    entries = results["methods"]
    fig, (left, right) = plt.subplots(
        1, 2, figsize=(13, max(4.5, 0.28 * len(entries) + 1.5)), gridspec_kw={"width_ratios": [1, 1.3]}
    )
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
    right.legend(loc="upper center", bbox_to_anchor=(0.5, -0.07), ncol=4, fontsize=8)  # below: never over a bar
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def _own_average(results: dict, variant: str):
    """Average over tasks when each task uses its own update (the protected task: `variant`)."""
    task = results["protected_task"]
    own = dict(results["finetuned"], **{task: results["standalone"][variant]})
    return None if any(v is None for v in own.values()) else _mean(own.values())


def _params(entry: dict) -> str:
    text = _format_params(entry["params"])
    twin = entry.get("unprotected_params")
    if twin is not None and twin != entry["params"]:
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


def _split(results: dict) -> str:
    return results.get("config", {}).get("splits", {}).get("report", "test")


def _mean(values):
    values = list(values)
    return sum(values) / len(values)


def _f(value) -> str:
    return "–" if value is None else f"{value:.3f}"
