"""The `public` mode: the points public merge configurations use, declared per method, and when a point counts."""

from contextlib import nullcontext

import pytest

from trap2_hf.audit import methods
from trap2_hf.audit.auditor import AttackContext
from trap2_hf.audit.merge_method import MergeUnsupported
from trap2_hf.audit.public import run_public
from trap2_hf.audit.settings import InformedSettings, PublicSettings
from trap2_hf.report.summary import attack_rows, public_summary, threat_summary

OTHERS = ["other:a", "other:b"]


def points(name: str, released: str = "protected", others=OTHERS) -> list[dict]:
    return methods.get(name).public.points(released, others)


def test_task_arithmetic_runs_at_each_public_lambda_for_every_update():
    expected = [{"weights": {"protected": w, "other:a": w, "other:b": w}} for w in (0.3, 0.5, 0.7, 1.0)]
    assert points("task_arithmetic") == expected
    assert points("mergekit:task_arithmetic") == expected
    assert points("peft_cat") == expected


def test_a_normalising_merge_runs_each_density_with_equal_weights_and_the_released_update_twice():
    """mergekit's TIES divides by the summed weights (normalize defaults to true): a shared weight cancels, so
    only w = 1 runs, equal or with the released update at 2."""
    assert points("mergekit:ties") == [
        {"weights": {"protected": r, "other:a": 1.0, "other:b": 1.0}, "density": d, "normalize": True}
        for d in (0.3, 0.5, 0.7) for r in (1.0, 2.0)
    ]
    assert points("mergekit:della") == [dict(p) for p in points("mergekit:ties")]


def test_a_merge_that_sums_also_runs_each_shared_weight_and_with_normalize_switched_on():
    """mergekit's DARE-TIES sums by default (normalize: false): every shared weight 0.3-1.0 at mergekit's
    default, and w = 1 with normalize switched on."""
    grid = points("mergekit:dare_ties")
    assert len(grid) == 3 * (2 * 4 + 2) == 30
    summed = [p for p in grid if p["normalize"] is False]
    assert summed[:8] == [
        {"weights": {"protected": r * w, "other:a": w, "other:b": w}, "density": 0.3, "normalize": False}
        for r in (1.0, 2.0) for w in (0.3, 0.5, 0.7, 1.0)
    ]
    normalised = [p for p in grid if p["normalize"] is True]
    assert normalised == [
        {"weights": {"protected": r, "other:a": 1.0, "other:b": 1.0}, "density": d, "normalize": True}
        for d in (0.3, 0.5, 0.7) for r in (1.0, 2.0)
    ]
    for name in ("dare_linear", "breadcrumbs", "breadcrumbs_ties", "della_linear"):
        assert len(points(f"mergekit:{name}")) == 30, name


def test_the_audits_own_and_peft_sparsifying_merges_map_the_same_grid_without_a_normalize_switch():
    """Their TIES divides by the number of agreeing updates, not by their weights: each shared weight counts."""
    for name in ("ties", "dare_ties", "dare_linear", "magnitude_prune", "peft_ties", "peft_dare_linear"):
        grid = points(name)
        assert len(grid) == 3 * 2 * 4, name
        assert grid[4] == {"weights": {"protected": 0.6, "other:a": 0.3, "other:b": 0.3}, "density": 0.3}, name
    assert points("tsv") == [
        {"weights": {"protected": r * w, "other:a": w, "other:b": w}} for r in (1.0, 2.0) for w in (0.3, 0.5, 0.7, 1.0)
    ]


def test_sce_slerp_and_the_unweighted_merges_run_their_own_public_points():
    assert points("mergekit:sce") == [
        {"weights": {"protected": 1.0, "other:a": 1.0, "other:b": 1.0}, "select_topk": k} for k in (0.5, 1.0)
    ]
    for name in ("linear", "model_stock", "karcher"):
        assert points(f"mergekit:{name}") == [{"weights": {"protected": 1.0, "other:a": 1.0, "other:b": 1.0}}]
    # two-update merges: the released update with each partner alone, t = w_partner / (w_released + w_partner)
    for name in ("slerp", "nuslerp"):
        assert points(f"mergekit:{name}") == [
            {"weights": {"protected": 1 - t, partner: t}} for partner in OTHERS for t in (0.3, 0.5, 0.7)
        ]


class FakeAuditor:
    """Scores a configuration from a table: {(variant, density): protected-task score}; a density of None is
    refused by the backend."""

    def __init__(self, table):
        self.table, self.skipped = table, 0

    def merged_config(self, method, config, reuse=False):
        self.current = (next(iter(config["weights"])), config["density"])
        return nullcontext()

    def score(self, context, task, split):
        with context():
            if self.current[1] == 0.7 and self.table.get("refuse"):
                raise MergeUnsupported("mergekit raised ValueError: no")
            return self.table[self.current]

    def skip(self, steps):
        self.skipped += steps


def context(twin_alone=1.0, kept=0.6):
    references = {"test": {"base": {"topic": 0.25, "city": 0.3}, "finetuned": {"city": 1.0}}}
    return AttackContext("topic", ["other:city"], ["city"], references, InformedSettings(),
                         PublicSettings(twin_gain_kept=kept), twin_alone)


def test_a_point_counts_only_where_the_twin_keeps_its_gain_and_the_worst_counted_point_is_the_headline():
    # base 0.25, twin alone 1.0: the twin keeps (0.7 - 0.25) / 0.75 = 60% at density 0.5, 20% at 0.7
    table = {("protected", d): v for d, v in ((0.3, 0.3), (0.5, 0.6), (0.7, 0.9))}
    table.update({("unprotected", d): v for d, v in ((0.3, 1.0), (0.5, 0.7), (0.7, 0.4))})
    method = methods.get("mergekit:ties")
    entry = run_public(FakeAuditor(table), method, ["protected", "unprotected"], context(), "test")
    assert entry["mode"] == "public" and entry["evaluations"] == 6  # 3 densities x (equal, released twice)
    kept = [row["twin_gain_kept"] for row in entry["points"]]
    assert kept == pytest.approx([1.0, 1.0, 0.6, 0.6, 0.2, 0.2])
    assert [row["counted"] for row in entry["points"]] == [True, True, True, True, False, False]
    assert entry["counted"] == 4 and entry["twin_fails"] == 2
    # 0.9 at density 0.7 does not count (the twin lost the task there too): the headline is 0.6, twin 0.7
    assert entry["protected"] == {"topic": 0.6} and entry["unprotected"] == {"topic": 0.7}
    assert entry["params"]["density"] == 0.5 and entry["unprotected_params"]["weights"]["unprotected"] == 1.0
    results = {
        "protected_task": "topic", "base": {"topic": 0.25}, "chance": {"topic": 0.25}, "methods": [entry],
        "standalone": {"protected": 1.0, "unprotected": 1.0},
        "config": {"public": {"twin_gain_kept": 0.6}},
    }
    (row,) = attack_rows(results)
    assert (row["attack"], row["label"], row["protected"], row["unprotected"]) == (
        "public", "public merge configs", 0.6, 0.7)
    assert "public merge configs (1 of 1 methods above 0.30: mergekit:ties 0.60" in "\n".join(threat_summary(results))
    assert public_summary(results) == (
        "public merge configs: 6 points over 1 methods, 4 counted (the twin keeps ≥60% of its gain on `topic`), "
        "2 of them hold; worst mergekit:ties 0.60 (twin 0.70)"
    )


def test_without_a_twin_every_point_counts_and_a_refused_point_is_kept_with_the_reason():
    table = {("protected", d): v for d, v in ((0.3, 0.3), (0.5, 0.26), (0.7, 0.9))}
    table["refuse"] = True
    auditor = FakeAuditor(table)
    entry = run_public(auditor, methods.get("mergekit:ties"), ["protected"], context(twin_alone=None), "test")
    assert [row["counted"] for row in entry["points"]] == [True, True, True, True, False, False]
    assert entry["points"][4]["refused"] == "mergekit raised ValueError: no" and auditor.skipped == 2
    assert entry["protected"] == {"topic": 0.3} and entry["unprotected"] is None and entry["twin_fails"] == 0


def test_when_the_twin_fails_at_every_point_the_verdict_says_so_instead_of_counting_the_method():
    table = {("protected", d): 0.9 for d in (0.3, 0.5, 0.7)} | {("unprotected", d): 0.3 for d in (0.3, 0.5, 0.7)}
    entry = run_public(FakeAuditor(table), methods.get("mergekit:ties"), ["protected", "unprotected"], context(),
                       "test")
    assert entry["counted"] == 0 and entry["protected"] is None and entry["twin_fails"] == 6
    results = {"protected_task": "topic", "base": {"topic": 0.25}, "chance": {"topic": 0.25}, "methods": [entry],
        "standalone": {"protected": 1.0, "unprotected": 1.0}}
    (row,) = attack_rows(results)
    assert row["protected"] is None and row["unprotected"] == 0.3
    assert "- No public merge config counted for: public merge configs (1 methods; with the twin in its place: " \
           "up to 0.30) (the twin kept less than 60% of its gain on `topic` at every point" in \
           "\n".join(threat_summary(results))
