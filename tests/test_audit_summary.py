"""The attacker's summary from hand-built audit results: rows per attack, the plain-words verdict the
card and audit.md print, the tables, the plot and the model-index rows."""

import copy

import pytest

from trap2_hf.audit import format_table, write_report
from trap2_hf.report.summary import attack_rows, eval_rows, threat_summary


def pick(topic, average=0.9):
    return {"config": {"weights": {"protected": 1.0, "other:city": 1.0}}, "validation": {}, "test": {"topic": topic,
            "city": 0.9, "average": average}, "gain_kept": {}}


def scores(topic):
    return {"topic": topic, "city": 0.9, "average": (topic + 0.9) / 2}


RESULTS = {
    "protected_task": "topic",
    "tasks": ["topic", "city"],
    "base": {"topic": 0.21, "city": 0.3},
    "chance": {"topic": 0.25, "city": 0.25},
    "finetuned": {"topic": 1.0, "city": 1.0},
    "standalone": {"protected": 1.0, "unprotected": 1.0},
    "rescale_curve": {"scales": [0.5, 1.0], "protected": [0.25, 1.0], "unprotected": [0.9, 1.0]},
    "methods": [
        {"method": "task_arithmetic", "mode": "average", "params": {"weight": 0.5}, "protected": scores(0.25),
         "unprotected": scores(1.0), "unprotected_params": {"weight": 0.5}},
        {"method": "task_arithmetic", "mode": "informed", "params": pick(1.0)["config"],
         "unprotected_params": pick(1.0)["config"], "protected": scores(1.0), "unprotected": scores(0.98),
         "objectives": {"mean": {"protected": pick(1.0), "unprotected": pick(0.98)},
                        "constrained": {"protected": pick(0.93), "unprotected": pick(0.99)}},
         "search": {}, "evaluations": 25},
        {"method": "ties", "mode": "average", "params": {"weight": 0.5, "density": 0.2}, "protected": scores(0.27),
         "unprotected": scores(0.8), "unprotected_params": {"weight": 0.5, "density": 0.2}},
        {"method": "ties", "mode": "informed", "params": pick(0.3)["config"], "unprotected_params": None,
         "protected": scores(0.3), "unprotected": scores(0.9),
         "objectives": {"mean": {"protected": pick(0.3), "unprotected": pick(0.9)},
                        "constrained": {"protected": None, "unprotected": pick(0.85)}},
         "search": {}, "evaluations": 75},
    ],
    "skipped": [],
    "repair": {
        "settings": {"ks": [16, 64], "steps": 40, "learning_rate": 1e-3, "batch_size": 16, "rank": 8},
        "rows": [{"method": "task_arithmetic", "stage": "average", "configs": {},
                  "before": {"protected": 0.25, "unprotected": 1.0, "reference": 0.24},
                  "after": {"16": {"protected": 0.98, "unprotected": 1.0, "reference": 1.0},
                            "64": {"protected": 0.99, "unprotected": 1.0, "reference": 0.6}},
                  "training": {}}],
    },
    "config": {"splits": {"search": "validation", "report": "test"},
               "informed": {"min_gain_kept": 0.6, "protected_weights": [0.8, 1.0, 1.2], "other_weights": [0.5, 1.0],
                            "budget": 8}},
}


def test_attack_rows_carry_every_attack_per_method():
    rows = {(r["method"], r["attack"]): r for r in attack_rows(RESULTS)}
    assert rows[("task_arithmetic", "average")]["protected"] == 0.25
    assert rows[("task_arithmetic", "average")]["unprotected"] == 1.0
    assert rows[("task_arithmetic", "informed:constrained")]["protected"] == 0.93
    assert rows[("task_arithmetic", "informed:constrained")]["label"] == "informed grid, others keep ≥60% of their gain"
    assert rows[("ties", "informed:constrained")]["protected"] is None
    repair = rows[("task_arithmetic", "repair:average:64")]
    assert (repair["protected"], repair["unprotected"], repair["reference"]) == (0.99, 1.0, 0.6)
    assert len(rows) == 2 * 3 + 2


def test_the_verdict_says_what_is_stopped_and_what_is_not():
    lines = threat_summary(RESULTS)
    text = "\n".join(lines)
    stops = next(line for line in lines if line.startswith("- Stops:"))
    fails = next(line for line in lines if line.startswith("- Does not stop:"))
    assert "naive merge (weights 1/N) (2 methods: `topic` at most 0.27; with the twin up to 1.00)" in stops
    assert "informed grid, others keep ≥60% of their gain (1 of 1 methods above 0.30: task_arithmetic 0.93" in fails
    assert "informed grid, best mean (2 of 2 methods above 0.30: task_arithmetic 1.00, ties 0.30" not in fails
    assert "task_arithmetic 1.00" in fails
    assert "No merge with the protected update qualified for: informed grid, others keep ≥60% of their gain " \
           "(1 methods; with the twin in its place: up to 0.85)" in text
    assert "repair with k=16 after the naive merge: `topic` 0.98 (without the released update: 1.00), no more than" in text
    assert "repair with k=64 after the naive merge: `topic` 0.99 (without the released update: 0.60), +0.39 over" in text


def test_tables_plot_and_model_index_carry_the_new_rows(tmp_path):
    table = format_table(RESULTS)
    assert table.startswith("**What the protection stops")
    assert "| task_arithmetic | 0.250 / 1.000 | 1.000 / 0.980 | 0.930 / 0.990 | 0.980 / 1.000 | 0.990 / 0.600 |" in table
    assert "| ties | 0.270 / 0.800 | 0.300 / 0.900 | – / 0.850 | – | – |" in table
    assert "| task_arithmetic | average | 64 | 0.250 → 0.990 | 1.000 → 1.000 | 0.240 → 0.600 |" in table
    paths = write_report(copy.deepcopy(RESULTS), str(tmp_path))
    with open(paths["png"], "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    names = dict(eval_rows(RESULTS))
    assert names["task_arithmetic, informed grid, others keep ≥60% of their gain, protected update"] == 0.93
    assert names["task_arithmetic, repair with k=64 after the naive merge, without the released update"] == 0.6
    assert not any("best mean" in name for name in names)  # those come from the method entries already

    from trap2_hf.release.card import audit_eval_results, audit_table

    values = {r.metric_name: r.metric_value for r in audit_eval_results(RESULTS) if r.dataset_type == "topic"}
    assert values["task_arithmetic, repair with k=16 after the naive merge, protected update"] == pytest.approx(0.98)
    assert values["task_arithmetic merge (informed), protected update"] == 1.0
    assert "**What the protection stops and what it does not**" in audit_table(RESULTS)


def test_mergekit_merges_are_attack_rows_and_reach_the_tables(tmp_path):
    """mergekit's methods are ordinary entries of `methods` (one schema): rows, tables, verdict, model-index."""
    results = copy.deepcopy(RESULTS)
    results["methods"] += [
        {"method": "mergekit:ties", "mode": "average", "params": {"weight": 0.5, "density": 0.2, "lambda": 1.0},
         "protected": scores(0.26), "unprotected": scores(0.97),
         "unprotected_params": {"weight": 0.5, "density": 0.2, "lambda": 1.0}},
        {"method": "mergekit:ties", "mode": "informed", "params": pick(0.7)["config"], "unprotected_params": None,
         "protected": scores(0.7), "unprotected": scores(0.96),
         "objectives": {"mean": {"protected": pick(0.7), "unprotected": pick(0.96)},
                        "constrained": {"protected": pick(0.55), "unprotected": None}},
         "search": {}, "evaluations": 75},
    ]
    assert "mergekit" not in results
    rows = {(r["method"], r["attack"]): r for r in attack_rows(results)}
    assert (rows[("mergekit:ties", "average")]["protected"], rows[("mergekit:ties", "average")]["unprotected"]) == (
        0.26, 0.97)
    assert rows[("mergekit:ties", "informed:constrained")]["protected"] == 0.55
    assert rows[("mergekit:ties", "informed:constrained")]["unprotected"] is None
    assert rows[("mergekit:ties", "informed:mean")]["unprotected"] == 0.96
    table = format_table(results)
    assert "| mergekit:ties | 0.260 / 0.970 | 0.700 / 0.960 | 0.550 / – |" in table
    assert "| mergekit:ties | average | w=0.5 d=0.2 lambda=1 | 0.260 | 0.970 | ✓ |" in table
    fails = next(line for line in threat_summary(results) if line.startswith("- Does not stop:"))
    assert "mergekit:ties 0.55" in fails
    assert dict(eval_rows(results))["mergekit:ties, informed grid, others keep ≥60% of their gain, protected update"] \
        == 0.55
    write_report(results, str(tmp_path))


# ---- the verdict is given only where the audit can give one (issue 32 item 1)
def untrained(results=RESULTS):
    """The audit of an update that learned nothing: alone it scores what the base does."""
    results = copy.deepcopy(results)
    results["standalone"]["protected"] = 0.21
    results["rescale_curve"]["protected"] = [0.21, 0.21]
    return results


def test_no_verdict_for_an_update_that_does_not_beat_the_base():
    lines = threat_summary(untrained())
    text = "\n".join(lines)
    assert not any(line.startswith(("- Stops:", "- Does not stop:")) for line in lines)
    assert "no verdict: the update alone does not beat the base" in text
    # the margin is stated
    assert "alone 0.210, needs more than max(base 0.210, chance 0.250) + 0.05 = 0.300" in text
    assert format_table(untrained()).startswith("**No verdict**")
    # at the line itself, still none; just above it, the verdict is given
    at_line = untrained()
    at_line["standalone"]["protected"] = 0.30
    assert "no verdict" in "\n".join(threat_summary(at_line))
    above = untrained()
    above["standalone"]["protected"] = 0.31
    assert any(line.startswith("- Stops:") for line in threat_summary(above))


def test_without_a_twin_the_report_names_the_comparisons_it_lacks():
    results = copy.deepcopy(RESULTS)
    results["standalone"]["unprotected"] = None
    results["rescale_curve"]["unprotected"] = None
    for entry in results["methods"]:
        entry["unprotected"] = None
        for objective in entry.get("objectives", {}).values():
            objective["unprotected"] = None
    results["benign"] = {"perturbations": ["float32"], "reference": "float32", "protected": {"float32": 1.0},
                         "unprotected": None, "gap": {"float32": 0.0}, "held": {"float32": True}, "tolerance": 0.01}
    text = "\n".join(threat_summary(results))
    line = next(line for line in text.splitlines() if line.startswith("- No unprotected twin"))
    for missing in ("the same merges with the twin in its place", "the twin's re-scale curve",
                    "the guard against the twin", "the repair of the twin's merges"):
        assert missing in line, missing
    assert "No unprotected twin" not in "\n".join(threat_summary(RESULTS))  # given a twin, nothing is missing


def test_what_was_not_measured_is_computed_from_what_ran():
    results = copy.deepcopy(RESULTS)
    results["config"]["not_audited"] = {"methods": ["dare_linear", "tsv", "mergekit:sce"], "modes": ["best", "public"]}
    results["skipped"] = [{"method": "peft_svd", "reason": "ValueError: no"}]
    text = "\n".join(threat_summary(results))
    line = next(line for line in text.splitlines() if line.startswith("- Not measured:"))
    assert "the modes best, public" in line
    assert "dare_linear, tsv, mergekit:sce" in line and "peft_svd (refused: ValueError: no)" in line
    assert "ties" not in line.replace("dare_ties", "")  # ties ran: it is not listed
