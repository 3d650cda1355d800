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


def test_list_and_partner_fields_of_the_demo_parse_in_a_variant():
    label, settings, demo = parse_variant(
        "rim:trap_rim_share=0.5:curve_scales=0.5,0.9,1.1:curve_transforms=prune@0.2,della@0.2:pseudo_partners=3"
    )
    assert settings == {"trap_rim_share": 0.5}
    assert demo == {"curve_scales": [0.5, 0.9, 1.1], "curve_transforms": ["prune@0.2", "della@0.2"], "pseudo_partners": 3}


def test_curve_transforms_are_the_protected_update_under_an_off_ray_part_at_weight_one():
    from trap2_hf.demo.pipeline import curve_transform

    for bad in ("prune", "prune@0", "prune@x", "foreign@0.5", "scale@0.5"):
        with pytest.raises(SystemExit, match="curve_transforms"):
            curve_transform(None, bad)


@pytest.mark.parametrize("spec", ["nonesuch", "x:trap_nope=1", "x:trap_lambda"])
def test_bad_variants_are_refused(spec):
    with pytest.raises(SystemExit):
        parse_variant(spec)


def test_variant_values_parse_as_the_same_command_line_flags_would():
    label, settings, demo = parse_variant("x:trap_lambda=1:trap_foreign_adapters=a/b:learning_rate=1e-3:trapped_margin=0")
    assert settings == {"trap_lambda": 1.0, "trap_foreign_adapters": ["a/b"]} and type(settings["trap_lambda"]) is float
    assert demo == {"learning_rate": 0.001, "trapped_margin": 0.0}
    for spec, named in [("x:trap_lambda=abc", "'abc'"), ("x:trap_weighting=nope", "'nope'"),
                        ("x:stop_when_trapped=maybe", "maybe")]:
        with pytest.raises(SystemExit, match=f"variant '{spec}': argument --{spec[2:].split('=')[0]}.*{named}"):
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


def test_mergekits_methods_count_in_the_row_under_their_registry_name():
    results = audit(0.25, 0.25)
    results["methods"].append({"method": "mergekit:sce", "mode": "average", "protected": {"topic": 0.6, "region": 1.0}})
    row = summarize("a", {}, {"steps": 10, "seconds": 1.0}, results)
    assert row["merged"]["mergekit:sce"] == {"average": 0.6}
    assert not row["holds"] and row["worst"] == 0.6
    assert "| –/0.60 |" in format_variants([row])


@pytest.mark.slow
def test_compare_variants_end_to_end_writes_the_comparison(tmp_path):
    """A tiny real comparison: the twin, the defaults and an off-ray variant with a known foreign update;
    audit.json carries the comparison, with merges against the held-out partner."""
    import json

    from trap2_hf.cli import main

    out = tmp_path / "compare"
    code = main([
        "demo", "--output_dir", str(out), "--steps", "1", "--protected_max_steps", "2", "--curve_every", "1",
        "--train_size", "16", "--validation_size", "8", "--test_size", "8", "--methods", "task_arithmetic",
        "mergekit:linear", "--foreign_tasks", "object", "--curve_transforms", "prune@0.5",
        "--compare_variants", "none", "default", "offray:trap_offray=dare+foreign",
        "pseudo:trap_offray=foreign:pseudo_partners=2:pseudo_partner_steps=1:curve_transforms=della@0.3",
    ])
    assert code == 0
    audit = json.loads((out / "audit.json").read_text())
    assert audit["audit_of_variant"] == "default"
    assert [row["label"] for row in audit["variants"]] == ["none", "default", "offray", "pseudo"]
    assert len(list((out / "pseudo_partners").iterdir())) == 2  # the pseudo variant's partners, not `object`
    assert audit["heldout_partner"]["partner"] == "region"
    assert all("mergekit:linear" in row["merged"] for row in audit["variants"])  # the twin's row included
    offray = audit["variants"][2]
    assert offray["settings"]["trap_offray"] == "dare+foreign" and offray["settings"]["trap_foreign_adapters"]
    assert set(offray["merged"]["task_arithmetic"]) == {"average", "best"}
    assert offray["partner"] == "region"
    assert set(offray["heldout_partner"]["task_arithmetic"]) == {"average", "best"}
    assert json.loads((out / "variants.json").read_text())["variants"] == audit["variants"]
    assert (out / "variants" / "offray" / "audit.json").exists() and "offray" in (out / "audit.md").read_text()
