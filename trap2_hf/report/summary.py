"""What an attacker gets: the audit's results as one row per (method, attack), and the plain-words
verdict (what the protection stops, what it does not) that audit.md and the model card print. Every
backend's methods are rows alike (mergekit's named `mergekit:NAME`).

Every number is the protected task's metric on the report split, merged with the protected update
and with its unprotected twin; repair rows add the reference (the same repair without the released
update). A `public` row is the method's worst public point among those that count (the twin keeps its
gain there), and the twin's score at that point.
"""

from .verdict import HELD_MARGIN, VERDICT_MARGIN, not_measured, verdict

# A public point counts where the unprotected twin, in the protected update's place, keeps at least this
# fraction of its gain on the protected task: a merge that loses the task with the twin too proves nothing.
TWIN_GAIN_KEPT = 0.6
ATTACKS = {
    "average": "naive merge (weights 1/N)",
    "best": "best shared weight",
    "public": "public merge configs",
    "informed:mean": "informed grid, best mean",
    "informed:constrained": "informed grid, others keep ≥{kept:.0%} of their gain",
    "search:mean": "random search, best mean",
    "search:constrained": "random search, others keep ≥{kept:.0%} of their gain",
}
REPAIR_STAGES = {"average": "the naive merge", "informed": "the informed merge"}


def attack_rows(results: dict) -> list[dict]:
    """One row per (method, attack): {"method", "attack", "label", "protected", "unprotected", "traced"} (and
    "reference", "before" for repair rows). Constrained objectives with no qualifying merge give None. `traced`
    holds the traced cell of each merge (traced.py) per variant and, for repair, the reference's; {} untraced."""
    task = results["protected_task"]
    kept = _min_gain_kept(results)
    rows = []
    for entry in results["methods"]:
        traced = entry.get("traced") or {}
        if "objectives" in entry:
            for objective in ("mean", "constrained"):
                key = f"{entry['mode']}:{objective}"
                picks = entry["objectives"][objective]
                cells = {v: (picks.get(v) or {}).get("traced") for v in _VARIANTS}
                rows.append(_row(entry["method"], key, kept, *(_metric(picks.get(v), task) for v in _VARIANTS), cells))
        elif entry["mode"] == "public" and entry["protected"] is None:  # no point counted
            twins = [p["unprotected"] for p in entry["points"] if p["unprotected"] is not None]
            rows.append(_row(entry["method"], "public", kept, None, max(twins, default=None), {}))
        else:
            twin = entry.get("unprotected")
            rows.append(_row(entry["method"], entry["mode"], kept, entry["protected"][task], twin and twin[task], traced))
    for repair in (results.get("repair") or {}).get("rows", []):
        for k, after in repair["after"].items():
            row = {
                "method": repair["method"],
                "attack": f"repair:{repair['stage']}:{k}",
                "label": f"repair with k={k} after {REPAIR_STAGES[repair['stage']]}",
                "protected": after["protected"],
                "unprotected": after.get("unprotected"),
                "reference": after["reference"],
                "before": repair["before"],
                "traced": ((repair.get("traced") or {}).get("after") or {}).get(k) or {},
            }
            rows.append(row)
    return rows


def attack_grid(results: dict):
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


def _repair_order(attack: str):
    _, stage, k = attack.split(":")
    return (stage != "average", int(k))


def floor(results: dict) -> float:
    """max(base, chance) on the protected task: what a merge that gained the attacker nothing scores."""
    task = results["protected_task"]
    return max(results["base"][task], results["chance"][task])


def held(value, results: dict) -> bool:
    return value is not None and value <= floor(results) + HELD_MARGIN + 1e-9


def threat_summary(results: dict) -> list[str]:
    """Markdown bullets: which attacks the protection stops and which it does not, from the numbers; no verdict
    where the update alone does not beat the base; the comparisons missing without a twin; what did not run."""
    task = results["protected_task"]
    judged = verdict(results)
    lines = [] if judged["given"] else [
        f"**No verdict** on what the protection stops (`{task}`, {report_split(results)} split; the update alone "
        f"must score above max(base, chance) + {VERDICT_MARGIN:g} for a merge to say anything about it):",
        f"- {judged['reason']}. The merges below leave `{task}` no lower than the update alone already is; train it "
        "until it learns its task (or check the tasks file), then audit again.",
    ]
    if judged["given"]:
        lines += _stops_and_fails(results)
    traced = trace_summary(results)
    if traced:
        lines.append(f"- Traced (`trap2 trace`, p < {results['trace']['alpha']:g}): {traced}.")
    if judged["missing"]:
        lines.append(
            "- No unprotected twin was given (`--unprotected`, or `unprotected=` in run_audit), so the audit lacks "
            + "; ".join(judged["missing"]) + "."
        )
    left_out = not_measured(results)
    if left_out:
        lines.append(f"- Not measured: {left_out}.")
    return lines


def _stops_and_fails(results: dict) -> list[str]:
    task = results["protected_task"]
    rows = attack_rows(results)
    ceiling = floor(results) + HELD_MARGIN
    stops, fails, impossible = [], [], []
    for attack in ATTACKS:
        everyone = [r for r in rows if r["attack"] == attack]
        group = [r for r in everyone if r["protected"] is not None]
        if len(group) < len(everyone):
            twins = [r["unprotected"] for r in everyone if r["protected"] is None and r["unprotected"] is not None]
            with_twin = f"; with the twin in its place: up to {max(twins):.2f}" if twins else ""
            impossible.append((attack, f"{everyone[0]['label']} ({len(everyone) - len(group)} methods{with_twin})"))
        if not group:
            continue
        worst = max(group, key=lambda r: r["protected"])
        twins = [r["unprotected"] for r in group if r["unprotected"] is not None]
        twin = f"; with the twin up to {max(twins):.2f}" if twins else ""
        label = group[0]["label"]
        if held(worst["protected"], results):
            stops.append(f"{label} ({len(group)} methods: `{task}` at most {worst['protected']:.2f}{twin})")
        else:
            broken = sorted((r for r in group if not held(r["protected"], results)), key=lambda r: -r["protected"])
            names = ", ".join(f"{r['method']} {r['protected']:.2f}" + _in_parentheses(traced_note(
                r["traced"].get("protected"))) for r in broken[:3])
            more = f" and {len(broken) - 3} more" if len(broken) > 3 else ""
            cells = [r["traced"]["protected"] for r in broken if "protected" in r["traced"]]
            traced = [c for c in cells if c["contains"]]
            trace = (f"; not stopped but traced at p ≤ {_p(max(c['p_value'] for c in traced))} in {len(traced)} of "
                     f"{len(broken)}" if traced else f"; none of them traced" if cells else "")
            fails.append(
                f"{label} ({len(broken)} of {len(group)} methods above {ceiling:.2f}: {names}{more}{twin}{trace})"
            )
    lines = [
        f"**What the protection stops and what it does not** (`{task}`, {report_split(results)} split; a merge "
        f"gains the attacker nothing at or below max(base, chance) + {HELD_MARGIN:g} = {ceiling:.2f}):",
        "- Stops: " + ("; ".join(stops) if stops else "none of the audited attacks") + ".",
        "- Does not stop: " + ("; ".join(fails) if fails else "none of the audited attacks") + ".",
    ]
    searched = [line for attack, line in impossible if attack != "public"]
    if searched:
        lines.append(
            f"- No merge with the protected update qualified for: {'; '.join(searched)} (no configuration "
            "searched kept that much of every other task's gain on validation)."
        )
    public = [line for attack, line in impossible if attack == "public"]
    if public:
        lines.append(
            f"- No public merge config counted for: {'; '.join(public)} (the twin kept less than "
            f"{_twin_gain_kept(results):.0%} of its gain on `{task}` at every point: such a merge breaks the task "
            "without any protection)."
        )
    for row in (r for r in rows if r["attack"].startswith("repair:")):
        gap = row["protected"] - row["reference"]
        verdict = (
            "no more than without the released update" if gap <= HELD_MARGIN + 1e-9
            else f"{gap:+.2f} over the same repair without the released update"
        )
        note = traced_note(row["traced"].get("protected"))
        lines.append(
            f"- {row['method']}, {row['label']}: `{task}` {row['protected']:.2f} "
            f"(without the released update: {row['reference']:.2f}), {verdict}" + (f"; {note}" if note else "") + "."
        )
    if any(r["attack"].startswith("repair:") for r in rows):
        lines.append(
            "  The protection is worth something against repair only where the repaired merge stays at or below "
            "the repair without the released update."
        )
    return lines


def public_summary(results: dict) -> str | None:
    """One line on the public grid: points run, counted (the twin keeps its gain) and held, the worst point."""
    entries = [e for e in results["methods"] if e["mode"] == "public"]
    if not entries:
        return None
    task = results["protected_task"]
    points = [p for e in entries for p in e["points"]]
    counted = [p for p in points if p["counted"]]
    holding = sum(held(p["protected"], results) for p in counted)
    worst = max((e for e in entries if e["protected"] is not None), key=lambda e: e["protected"][task], default=None)
    line = (
        f"public merge configs: {len(points)} points over {len(entries)} methods, {len(counted)} counted (the twin "
        f"keeps ≥{_twin_gain_kept(results):.0%} of its gain on `{task}`), {holding} of them hold"
    )
    if worst is not None:
        twin = (worst.get("unprotected") or {}).get(task)
        line += f"; worst {worst['method']} {worst['protected'][task]:.2f}" + (f" (twin {twin:.2f})" if twin else "")
    return line


def eval_rows(results: dict) -> list[tuple[str, float]]:
    """(name, value) of the rows `model-index` does not get from the method entries: the informed
    attacker's headline (constrained) picks and the repair runs."""
    out = []
    for row in attack_rows(results):
        if row["attack"].endswith(":constrained") or row["attack"].startswith("repair:"):
            for variant in ("protected", "unprotected", "reference"):
                value = row.get(variant)
                if value is not None:
                    who = "without the released update" if variant == "reference" else f"{variant} update"
                    out.append((f"{row['method']}, {row['label']}, {who}", value))
    return out


_VARIANTS = ("protected", "unprotected")


def _row(method: str, attack: str, kept: float, protected, unprotected, traced: dict) -> dict:
    return {
        "method": method,
        "attack": attack,
        "label": ATTACKS[attack].format(kept=kept),
        "protected": protected,
        "unprotected": unprotected,
        "traced": {v: cell for v, cell in traced.items() if cell is not None},
    }


def traced_note(cell: dict | None) -> str:
    """How a merge reads when it is not stopped: "traced at p = 1e-32" or "not traced (p = 0.4)"; "" untraced."""
    if not cell:
        return ""
    return f"traced at p = {_p(cell['p_value'])}" if cell["contains"] else f"not traced (p = {_p(cell['p_value'])})"


def trace_summary(results: dict) -> str | None:
    """The traced column in a sentence: how many reported merges with the protected update and with its twin are
    traced (p below the section's alpha), and how many updates without the released update are flagged (the
    false-positive check); None where nothing was traced."""
    section = results.get("trace")
    if not section:
        return None
    counts = {}
    for row in attack_rows(results):
        for variant, cell in row["traced"].items():
            if variant in _VARIANTS:
                hit, total = counts.get(variant, (0, 0))
                counts[variant] = (hit + cell["contains"], total + 1)
    said = [f"{hit} of {total} merges with the {'protected update' if v == 'protected' else 'twin (against the twin)'}"
            for v, (hit, total) in counts.items()]
    line = ", ".join(said) or "no merge"
    checked = section.get("false_positives") or {}
    if "suspects" in checked:
        smallest = checked["smallest_p"]
        line += (f"; without the released update, against the protected update: {checked['flagged']} of "
                 f"{len(checked['suspects'])} flagged" + (f" (smallest p {_p(smallest)})" if smallest is not None else ""))
    errors = [f"{v}: {t['error']}" for v, t in section.get("tracers", {}).items() if "error" in t]
    return line + (f"; not traced: {'; '.join(errors)}" if errors else "")


def trace_lines(results: dict) -> list[str]:
    """What `trap2 demo` prints of the traced column: the summary, and the false-positive check with its suspects."""
    body = trace_summary(results)
    if body is None:
        return []
    section = results["trace"]
    lines = [f"traced (`trap2 trace`, p < {section['alpha']:g}): {body}"]
    checked = section.get("false_positives") or {}
    if "suspects" in checked:
        twin = checked.get("twin_alone")
        lines.append(
            f"false positives: {checked['flagged']} of {len(checked['suspects'])} updates and merges without the "
            f"released update traced at p < {checked['alpha']:g} against it (the other tasks' updates alone, each "
            "method's naive merge of the others alone, the repair references before and after repair)"
            + (f"; the twin alone (its task, no Trap²): p = {_p(twin['p_value'])}" if twin else "")
        )
    return lines


def cost_lines(results: dict) -> list[str]:
    """What the update-alone curves and the traced column cost in this audit (evaluations, seconds)."""
    lines = []
    curve = results.get("rescale_curve") or {}
    if "seconds" in curve:
        points = len(curve["scales"]) * (1 + (curve.get("unprotected") is not None))
        lines.append(f"re-scale curve: {points} evaluations in {curve['seconds']:.0f}s")
    section = results.get("transforms")
    if section and "seconds" in section:
        lines.append(f"transforms of the update alone: {section['evaluations']} evaluations in {section['seconds']:.0f}s")
    trace = results.get("trace")
    if trace and isinstance(trace.get("seconds"), dict):
        seconds = trace["seconds"]
        lines.append(
            f"tracing: {trace['traces']} traces in {seconds['traces']:.0f}s ({trace['seconds_per_trace'] or 0:.2f}s "
            f"each), {seconds['build']:.0f}s to prepare the tracers, {seconds['deltas']:.0f}s making merges again"
        )
    return lines


def _p(value: float) -> str:
    return f"{value:.2g}" if value >= 1e-3 else f"{value:.0e}"


def _metric(pick, task):
    return None if pick is None else pick["test"][task]


def _in_parentheses(text: str) -> str:
    return f" ({text})" if text else ""


def _min_gain_kept(results: dict) -> float:
    return ((results.get("config") or {}).get("informed") or {}).get("min_gain_kept", 0.6)


def _twin_gain_kept(results: dict) -> float:
    return ((results.get("config") or {}).get("public") or {}).get("twin_gain_kept", TWIN_GAIN_KEPT)


def report_split(results: dict) -> str:
    return results.get("config", {}).get("splits", {}).get("report", "test")
