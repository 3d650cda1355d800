"""`trap2 demo --compare_variants`: parsing variant specs and summarising their audits (no training)."""

import pytest

from trap2_hf.demo.variants import format_variants, parse_variant, summarize


def test_presets_and_custom_variants_parse():
    assert parse_variant("none") == ("none", None, {})
    assert parse_variant("paper")[1] == {"trap_lambda": 0.01, "trap_scales_per_step": 1, "trap_scale_sampling": "uniform"}
    label, settings, demo = parse_variant("mix:trap_offray=dare+synthetic,foreign:trap_offray_per_step=2:stop_when_trapped=false")
    assert label == "mix"
    assert settings == {"trap_offray": "dare+synthetic,foreign", "trap_offray_per_step": 2}
    assert demo == {"stop_when_trapped": False}


@pytest.mark.parametrize("spec", ["nonesuch", "x:trap_nope=1", "x:trap_lambda"])
def test_bad_variants_are_refused(spec):
    with pytest.raises(SystemExit):
        parse_variant(spec)


def audit(protected_topic, heldout_topic):
    def entries(value):
        return [
            {"method": m, "mode": mode, "protected": {"topic": value, "region": 1.0}}
            for m in ("task_arithmetic", "ties")
            for mode in ("average", "best")
        ]

    return {
        "protected_task": "topic",
        "base": {"topic": 0.275, "region": 0.25},
        "chance": {"topic": 0.25, "region": 0.25},
        "standalone": {"protected": 1.0, "unprotected": None},
        "rescale_curve": {"scales": [0.5, 1.0], "protected": [0.25, 1.0]},
        "methods": entries(protected_topic),
        "heldout_partner": {"partner": "region", "methods": entries(heldout_topic), "skipped": []},
    }


def test_protection_holds_only_when_every_merge_including_the_heldout_partner_stays_low():
    held = summarize("a", {}, {"steps": 10, "seconds": 1.0}, audit(0.25, 0.30))
    assert held["holds"] and held["ceiling"] == pytest.approx(0.325)
    assert held["merged"]["ties"] == {"average": 0.25, "best": 0.25}
    broken = summarize("b", {}, {"steps": 10, "seconds": 1.0}, audit(0.25, 0.9))
    assert not broken["holds"] and broken["worst"] == 0.9
    table = format_variants([held, broken])
    assert "ties (held-out)" in table and "0.90/0.90" in table
