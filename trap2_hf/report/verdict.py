"""Whether an audit can judge the protection at all, and what it did not measure: the line a merge is held under,
no verdict where the update alone does not clear it, the comparisons an audit without a twin lacks, the modes and
methods that did not run. audit.md, audit.png and the model card read these."""

# A merge "held" when the protected task stays within this margin of max(base, chance).
HELD_MARGIN = 0.05
# The audit judges the protection only when the update alone scores above max(base, chance) by this margin on the
# protected task: an update that does not clear the line a merge is held under cannot be told from a held merge.
VERDICT_MARGIN = HELD_MARGIN
# How many names a "not measured" list spells out before counting the rest.
LISTED_NAMES = 10


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
    if left_out.get("best"):
        parts.append("the best shared weight of " + _listed(left_out["best"]))
    refused = [f"{s['method']} (refused: {s['reason'].splitlines()[0][:120]})" for s in results.get("skipped", [])]
    parts += refused[:LISTED_NAMES] + ([f"{len(refused) - LISTED_NAMES} more refused"] if len(refused) > LISTED_NAMES
                                       else [])
    return "; ".join(parts) or None



def _num(value) -> str:
    return "–" if value is None else f"{value:.3f}"


def _listed(names: list[str]) -> str:
    more = f" and {len(names) - LISTED_NAMES} more" if len(names) > LISTED_NAMES else ""
    return ", ".join(names[:LISTED_NAMES]) + more
