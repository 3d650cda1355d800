"""Screening tables from `trap2 demo --compare_variants` runs: per variant, the protected task under every method's
best shared weight and mergekit's methods (mergekit:NAME) at naive weights too, the update alone against its twin,
steps and training seconds; and, over several runs (seeds) of the same variants, each variant's change against
`default`, paired by run.

    python benchmarks/variants_table.py runs/screen_s0 runs/screen_s1      # folders holding variants.json

A cell is the protected task's test accuracy with the protected update (the twin's row is 'none'). 'best max' and
'best mean' summarise the best-mode columns over the methods; 'naive max' every method's average mode ('mergekit:NAME
naive' columns show mergekit's).
"""

import json
import os
import statistics
import sys


def load(folder: str) -> dict:
    with open(os.path.join(folder, "variants.json")) as handle:
        summary = json.load(handle)
    return {"folder": folder, "seed": summary["demo"]["seed"], "rows": {r["label"]: r for r in summary["variants"]}}


def cells(row: dict) -> dict:
    """{column: value}: best per method, mergekit's methods at naive weights, and the summaries."""
    best = {m: v["best"] for m, v in row["merged"].items() if "best" in v}
    naive = {m: v["average"] for m, v in row["merged"].items() if "average" in v}
    out = dict(best) | {f"{m} naive": v for m, v in naive.items() if m.startswith("mergekit:")}
    out["best max"] = max(best.values(), default=None)
    out["best mean"] = statistics.mean(best.values()) if best else None
    out["naive max"] = max(naive.values(), default=None)
    return out


def table(run: dict) -> str:
    rows = run["rows"]
    twin = rows.get("none")
    columns = list(dict.fromkeys(c for r in rows.values() for c in cells(r)))
    head = ["variant", "alone", "twin", "steps", "train s", *columns]
    lines = [f"seed {run['seed']} ({run['folder']}): protected-task test accuracy, best shared weight per method; "
             "mergekit:* naive: at naive weights", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, row in rows.items():
        values = cells(row)
        lines.append("| " + " | ".join([
            label, f"{row['standalone']:.3f}", "-" if twin is None else f"{twin['standalone']:.3f}",
            str(row["training"]["steps"]), f"{row['training']['seconds']:.0f}",
            *(_f(values.get(c)) for c in columns),
        ]) + " |")
    return "\n".join(lines)


def paired(runs: list[dict]) -> str:
    """Per variant and summary column: the change against `default` in each run (negative: more protection)."""
    keys = ("best max", "best mean", "naive max")
    labels = list(dict.fromkeys(label for run in runs for label in run["rows"] if label not in ("none",)))
    lines = ["Against `default`, paired by seed (" + ", ".join(str(r["seed"]) for r in runs) + "): change of "
             + ", ".join(keys) + "; alone's change", "",
             "| variant | " + " | ".join(keys) + " | alone |", "|---|" + "---|" * (len(keys) + 1)]
    for label in labels:
        deltas = {k: [] for k in (*keys, "alone")}
        for run in runs:
            if label not in run["rows"] or "default" not in run["rows"]:
                continue
            mine, base = cells(run["rows"][label]), cells(run["rows"]["default"])
            for k in keys:
                deltas[k].append(mine[k] - base[k])
            deltas["alone"].append(run["rows"][label]["standalone"] - run["rows"]["default"]["standalone"])
        if deltas["alone"]:
            lines.append(f"| {label} | " + " | ".join(" ".join(f"{d:+.2f}" for d in deltas[k]) for k in (*keys, "alone")) + " |")
    return "\n".join(lines)


def _f(value) -> str:
    return "–" if value is None else f"{value:.2f}"


def main(folders: list[str]) -> int:
    runs = [load(folder) for folder in folders]
    for run in runs:
        print(table(run) + "\n")
    print(paired(runs))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
