"""What an attacker gets: the audit's results as one row per (method, attack), and the plain-words
verdict (what the protection stops, what it does not) that audit.md and the model card print. Every
backend's methods are rows alike (mergekit's named `mergekit:NAME`).

Every number is the protected task's metric on the report split, merged with the protected update
and with its unprotected twin; repair rows add the reference (the same repair without the released
update). A `public` row is the method's worst public point among those that count (the twin keeps its
gain there), and the twin's score at that point.
"""

# A merge "held" when the protected task stays within this margin of max(base, chance).
HELD_MARGIN = 0.05
# The audit judges the protection only when the update alone scores above max(base, chance) by this margin on the
# protected task: an update that does not clear the line a merge is held under cannot be told from a held merge.
VERDICT_MARGIN = HELD_MARGIN
# How many names a "not measured" list spells out before counting the rest.
LISTED_NAMES = 10
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
    """One row per (method, attack): {"method", "attack", "label", "protected", "unprotected"} (and
    "reference", "before" for repair rows). Constrained objectives with no qualifying merge give None."""
    task = results["protected_task"]
    kept = _min_gain_kept(results)
    rows = []
    for entry in results["methods"]:
        if "objectives" in entry:
            for objective in ("mean", "constrained"):
                key = f"{entry['mode']}:{objective}"
                picks = entry["objectives"][objective]
                rows.append(_row(entry["method"], key, kept, *(_metric(picks.get(v), task) for v in _VARIANTS)))
        elif entry["mode"] == "public" and entry["protected"] is None:  # no point counted
            twins = [p["unprotected"] for p in entry["points"] if p["unprotected"] is not None]
            rows.append(_row(entry["method"], "public", kept, None, max(twins, default=None)))
        else:
            twin = entry.get("unprotected")
            rows.append(_row(entry["method"], entry["mode"], kept, entry["protected"][task], twin and twin[task]))
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


def per_task(value, task):
    """`base` and `chance` are per-task mappings in `trap2 audit` reports, plain numbers in short ones."""
    return value.get(task) if isinstance(value, dict) else value


def verdict(results: dict) -> dict:
    """Whether the audit can judge the protection at all: the update alone must score above max(base, chance) +
    `VERDICT_MARGIN` on the protected task. {"given", "alone", "floor", "margin", "needed", "reason", "missing"}:
    `reason` says why no verdict is given (None when one is), `missing` the comparisons an audit without an
    unprotected twin lacks (empty with a twin)."""
    task = results["protected_task"]
    alone = (results.get("standalone") or {}).get("protected")
    base, chance = per_task(results.get("base"), task), per_task(results.get("chance"), task)
    known = [v for v in (base, chance) if v is not None]
    line = max(known) if known else None
    needed = None if line is None else line + VERDICT_MARGIN
    reason = None
    if alone is None or needed is None:
        reason = "no verdict: the audit records no score of the update alone, or none of the base model and chance"
    elif alone <= needed + 1e-9:
        reason = (
            f"no verdict: the update alone does not beat the base (alone {alone:.3f}, needs more than max(base "
            f"{_num(base)}, chance {_num(chance)}) + {VERDICT_MARGIN:g} = {needed:.3f} on `{task}`)"
        )
    return {"given": reason is None, "alone": alone, "floor": line, "margin": VERDICT_MARGIN, "needed": needed,
            "reason": reason, "missing": missing_comparisons(results)}


def missing_comparisons(results: dict) -> list[str]:
    """What an audit run without the unprotected twin could not compare, from the sections that ran (empty with a
    twin)."""
    if (results.get("standalone") or {}).get("unprotected") is not None:
        return []
    missing = []
    if results.get("methods"):
        missing.append("the same merges with the twin in its place (a merge that breaks the task for any update "
                       "cannot be told from the protection)")
    if results.get("rescale_curve"):
        missing.append("the twin's re-scale curve")
    if any(e.get("mode") == "public" for e in results.get("methods", [])):
        missing.append("which public points count (without the twin every point does)")
    if results.get("transforms"):
        missing.append("the twin under the same transforms")
    if any("traced" in e for e in results.get("methods", [])):
        missing.append("the twin's traced column")
    if results.get("benign"):
        missing.append("the guard against the twin (the update is compared with its own float32 score)")
    if results.get("repair"):
        missing.append("the repair of the twin's merges")
    return missing


def not_measured(results: dict) -> str | None:
    """The modes and methods the audit did not run (those its registry has for this kind of update), and those a
    backend refused: "the modes ...; the methods ...; NAME (refused: ...)". None when the audit does not record what
    it left out (an audit written by hand or by an older version) or left nothing out."""
    left_out = (results.get("config") or {}).get("not_audited")
    if left_out is None:
        return None
    parts = []
    if left_out.get("modes"):
        parts.append("the modes " + ", ".join(left_out["modes"]))
    if left_out.get("methods"):
        parts.append("the methods " + _listed(left_out["methods"]))
    refused = [f"{s['method']} (refused: {s['reason'].splitlines()[0][:120]})" for s in results.get("skipped", [])]
    parts += refused[:LISTED_NAMES] + ([f"{len(refused) - LISTED_NAMES} more refused"] if len(refused) > LISTED_NAMES
                                       else [])
    return "; ".join(parts) or None


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
            names = ", ".join(f"{r['method']} {r['protected']:.2f}" for r in broken[:3])
            more = f" and {len(broken) - 3} more" if len(broken) > 3 else ""
            fails.append(f"{label} ({len(broken)} of {len(group)} methods above {ceiling:.2f}: {names}{more}{twin})")
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
        lines.append(
            f"- {row['method']}, {row['label']}: `{task}` {row['protected']:.2f} "
            f"(without the released update: {row['reference']:.2f}), {verdict}."
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


def _row(method: str, attack: str, kept: float, protected, unprotected) -> dict:
    return {
        "method": method,
        "attack": attack,
        "label": ATTACKS[attack].format(kept=kept),
        "protected": protected,
        "unprotected": unprotected,
    }


def _metric(pick, task):
    return None if pick is None else pick["test"][task]


def _num(value) -> str:
    return "–" if value is None else f"{value:.3f}"


def _listed(names: list[str]) -> str:
    more = f" and {len(names) - LISTED_NAMES} more" if len(names) > LISTED_NAMES else ""
    return ", ".join(names[:LISTED_NAMES]) + more


def _min_gain_kept(results: dict) -> float:
    return ((results.get("config") or {}).get("informed") or {}).get("min_gain_kept", 0.6)


def _twin_gain_kept(results: dict) -> float:
    return ((results.get("config") or {}).get("public") or {}).get("twin_gain_kept", TWIN_GAIN_KEPT)


def report_split(results: dict) -> str:
    return results.get("config", {}).get("splits", {}).get("report", "test")
