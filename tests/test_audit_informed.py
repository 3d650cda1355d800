"""The informed attacker: per-update weights and compensation on hand-computable tensors, the two
objectives on hand-built metric tables, and the `informed`/`search` modes end to end on a tiny Llama."""

import pytest
import torch
from conftest import tiny_llama
from test_audit_run import lora_setup

from trap2_hf.audit import methods, run_audit
from trap2_hf.audit.informed import (
    InformedSettings,
    attack,
    choose,
    gains_kept,
    grid_configs,
    is_merge,
    search_configs,
)
from trap2_hf.audit.auditor import Auditor
from trap2_hf.audit.task_vectors import applied, merge_task_vectors


def t(rows):
    return torch.tensor(rows, dtype=torch.float32)


def test_per_update_weights_give_exactly_w0_plus_the_weighted_sum():
    model = torch.nn.Linear(3, 2, bias=False)
    w0 = model.weight.detach().clone()
    deltas = {"p": t([[1, 0, 2], [0, -1, 0]]), "o1": t([[0, 4, 0], [1, 0, 0]]), "o2": t([[2, 2, 2], [2, 2, 2]])}
    updates = {k: {"weight": w0 + d} for k, d in deltas.items()}
    auditor = Auditor(model, [], "full", updates, seed=0)
    method = methods.get("task_arithmetic")
    config = {"weights": {"p": 1.1, "o1": 0.5, "o2": 0.0}}  # o2 switched off: it leaves the merge
    for reuse in (False, True):
        with auditor.merged_config(method, config, reuse):
            expected = w0 + 1.1 * deltas["p"] + 0.5 * deltas["o1"]
            torch.testing.assert_close(model.weight.detach(), expected, atol=1e-6, rtol=0)
    assert torch.equal(model.weight.detach(), w0)
    vectors = [{"weight": d} for d in deltas.values()]
    summed = merge_task_vectors(method, vectors, {}, weights=[1.0, 0.25, -2.0])
    torch.testing.assert_close(summed["weight"], deltas["p"] + 0.25 * deltas["o1"] - 2.0 * deltas["o2"])
    with pytest.raises(ValueError, match="one per vector"):
        merge_task_vectors(method, vectors, {}, weights=[1.0, 1.0])


def test_compensation_lets_the_released_update_enter_at_its_own_weight():
    tau_p, tau_o = t([[1, -2, 3], [-4, 5, -6]]), t([[2, 1, -1], [3, -1, 2]])
    ties = methods.get("ties")
    assert dict(ties.compensation) == {"normalize": False} and ties.density_per_update
    # Densities per update: p kept whole, o trimmed to its top half ([[2, 0, 0], [3, 0, 2]]). Elected
    # signs (total mass): [[+,-,+],[-,+,-]]. A disjoint SUM keeps each agreeing entry at its own
    # weight (1 + 0.5 * 2 at [0, 0]); the default disjoint mean halves it.
    summed = ties.merge([tau_p, tau_o], torch.tensor([1.0, 0.5]), density=[1.0, 0.5], normalize=False)
    torch.testing.assert_close(summed, t([[2, -2, 3], [-4, 5, -6]]))
    averaged = ties.merge([tau_p, tau_o], torch.tensor([1.0, 0.5]), density=[1.0, 0.5])
    torch.testing.assert_close(averaged, t([[1, -2, 3], [-4, 5, -6]]))
    # DARE keeps a density-1.0 update whole, with no random drop and no rescale.
    dare = methods.get("dare_linear")
    merged = dare.merge([tau_p, torch.zeros_like(tau_o)], torch.tensor([1.0, 1.0]), density=[1.0, 0.3])
    torch.testing.assert_close(merged, tau_p)


def test_the_grid_includes_the_nominal_scale_and_compensates_sparsifying_methods():
    settings = InformedSettings()
    grid = grid_configs(methods.get("ties"), "p", ["o1", "o2"], settings)
    assert len(grid) == 3 * 5 * 5
    assert {c["weights"]["p"] for c in grid} == {0.8, 0.9, 1.0, 1.1, 1.2}
    assert all(c["density"]["p"] == 1.0 and c["normalize"] is False for c in grid)
    assert {c["density"]["o1"] for c in grid} == {0.3, 0.6, 0.9}
    assert all(c["weights"]["o1"] == c["weights"]["o2"] > 0 for c in grid)
    peft = grid_configs(methods.get("peft_ties"), "p", ["o1"], settings)
    assert {c["density"] for c in peft} == {0.3, 0.6, 0.9} and "normalize" not in peft[0]
    assert len(grid_configs(methods.get("task_arithmetic"), "p", ["o1"], settings)) == 25
    with pytest.raises(ValueError, match="exactly 1.0"):
        InformedSettings(protected_weights=(0.9, 1.1))
    with pytest.raises(ValueError, match="not a merge"):
        InformedSettings(other_weights=(0.0, 1.0))


def test_the_search_is_seeded_and_the_twin_faces_the_same_draws():
    settings = InformedSettings(budget=6)
    method = methods.get("dare_ties")
    first = search_configs(method, "protected", ["o1", "o2"], settings, seed=3)
    twin = search_configs(method, "unprotected", ["o1", "o2"], settings, seed=3)
    assert len(first) == 6
    assert [c["weights"]["protected"] for c in first] == [c["weights"]["unprotected"] for c in twin]
    assert [c["density"]["o2"] for c in first] == [c["density"]["o2"] for c in twin]
    assert first != search_configs(method, "protected", ["o1", "o2"], settings, seed=4)
    for config in first:
        assert 0.7 <= config["weights"]["protected"] <= 1.3
        assert all(0.2 <= d <= 1.0 for d in config["density"].values())
        assert config.get("normalize", False) is False


# Validation metric tables built by hand. Base t1 0.2, t2 0.3; own updates t1 1.0, t2 0.9 (gains 0.8, 0.6).
REFERENCE = {"base": {"t0": 0.25, "t1": 0.2, "t2": 0.3}, "finetuned": {"t1": 1.0, "t2": 0.9}}
TABLE = {
    "alone": ((1.0, 0.0, 0.0), {"t0": 1.0, "t1": 1.0, "t2": 0.9}),  # not a merge, however good it looks
    "b": ((1.0, 1.0, 1.0), {"t0": 0.9, "t1": 0.6, "t2": 0.9}),  # t1 keeps 50%
    "c": ((0.8, 1.0, 1.0), {"t0": 0.6, "t1": 0.76, "t2": 0.72}),  # 70% and 70%: the constrained pick
    "d": ((0.9, 0.5, 0.5), {"t0": 0.45, "t1": 1.0, "t2": 0.9}),  # keeps everything, protected lower
    "e": ((1.2, 1.0, 0.5), {"t0": 0.55, "t1": 0.68, "t2": 0.9}),  # t1 keeps exactly 60%: eligible
    "f": ((1.1, 1.0, 1.0), {"t0": 0.95, "t1": 0.672, "t2": 0.9}),  # t1 keeps 59%: the best mean, not eligible
}


def table_rows():
    rows = []
    for name, (weights, scores) in TABLE.items():
        config = {"name": name, "weights": dict(zip(("p", "o1", "o2"), weights))}
        rows.append({"config": config, "validation": dict(scores, average=sum(scores.values()) / 3)})
    return rows


def test_the_constrained_objective_excludes_the_released_update_alone_and_partners_below_60_percent():
    rows = table_rows()
    assert not is_merge(rows[0]["config"], "p") and is_merge(rows[1]["config"], "p")
    kept = gains_kept(TABLE["e"][1], REFERENCE["base"], REFERENCE["finetuned"], ["t1", "t2"])
    assert kept == pytest.approx({"t1": 0.6, "t2": 1.0})
    picks = choose(rows, "p", "t0", ["t1", "t2"], REFERENCE, 0.6)
    assert picks["constrained"]["config"]["name"] == "c"
    assert picks["mean"]["config"]["name"] == "f"
    # A stricter constraint leaves only the configuration that keeps every gain.
    assert choose(rows, "p", "t0", ["t1", "t2"], REFERENCE, 0.95)["constrained"]["config"]["name"] == "d"
    # With only the released update alone qualifying, nothing is picked.
    assert choose(rows[:1], "p", "t0", ["t1", "t2"], REFERENCE, 0.6) == {"mean": None, "constrained": None}


def test_attack_selects_on_validation_and_measures_only_the_picks_on_test():
    calls = []
    by_name = {row["config"]["name"]: row for row in table_rows()}

    def evaluate(config, split):
        calls.append((config["name"], split))
        scores = dict(by_name[config["name"]]["validation"])
        if split == "test":  # a different split: the report must carry these numbers, not validation's
            scores = {k: v - 0.05 for k, v in scores.items()}
        return scores

    test_reference = {"base": REFERENCE["base"], "finetuned": REFERENCE["finetuned"]}
    result = attack(
        evaluate, [row["config"] for row in table_rows()], "p", "t0", ["t1", "t2"],
        {"validation": REFERENCE, "test": test_reference}, 0.6,
    )
    assert [name for name, split in calls if split == "test"] == ["f", "c"]
    assert len([1 for _, split in calls if split == "validation"]) == len(TABLE)
    assert result["constrained"]["test"]["t0"] == pytest.approx(0.55)
    assert result["constrained"]["validation"]["t0"] == 0.6
    assert result["constrained"]["gain_kept"]["validation"] == pytest.approx({"t1": 0.7, "t2": 0.7})
    assert result["constrained"]["gain_kept"]["test"]["t1"] == pytest.approx((0.71 - 0.2) / 0.8)
    assert result["mean"]["config"]["name"] == "f" and len(result["searched"]) == len(TABLE)


def test_informed_and_search_modes_end_to_end_on_adapters():
    model, tasks = lora_setup()
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    settings = InformedSettings(protected_weights=(0.9, 1.0, 1.1), other_weights=(0.5, 1.0), budget=3)
    results = run_audit(
        model, tasks, "t0", "prot", "twin", {"t1": "other1", "t2": "other2"},
        methods=["task_arithmetic", "peft_ties"], modes=("informed", "search"), sweep_scales=(1.0,),
        progress=False, informed=settings,
    )
    assert results["config"]["informed"]["budget"] == 3
    entries = {(e["method"], e["mode"]): e for e in results["methods"]}
    assert set(entries) == {(m, mode) for m in ("task_arithmetic", "peft_ties") for mode in ("informed", "search")}
    assert entries[("task_arithmetic", "informed")]["evaluations"] == 6
    assert entries[("peft_ties", "informed")]["evaluations"] == 18
    assert entries[("peft_ties", "search")]["evaluations"] == 3
    for entry in entries.values():
        for variant in ("protected", "unprotected"):
            searched = entry["search"][variant]
            best = max(row["validation"]["average"] for row in searched)
            assert entry["objectives"]["mean"][variant]["validation"]["average"] == best
            assert entry[variant] == entry["objectives"]["mean"][variant]["test"]
        # The twin is an exact copy of the protected update: the same picks, the same numbers.
        assert entry["protected"] == entry["unprotected"]
    # The reported test numbers are those of the chosen merge, redone by hand.
    entry = entries[("task_arithmetic", "informed")]
    config = entry["params"]
    vectors = {k: results_vector(model, name) for k, name in (("protected", "prot"), ("other:t1", "other1"),
                                                               ("other:t2", "other2"))}
    delta = merge_task_vectors(
        methods.get("task_arithmetic"), list(vectors.values()), {}, weights=[config["weights"][k] for k in vectors]
    )
    with torch.no_grad(), model.disable_adapter(), applied(model, delta):
        by_hand = {task.name: task.evaluate(model, "test") for task in tasks}
    assert all(abs(entry["protected"][k] - v) <= 1 / 40 for k, v in by_hand.items())
    for name, param in model.named_parameters():
        assert torch.equal(param.detach(), weights[name]), name


def results_vector(model, adapter):
    from trap2_hf.audit import adapter_task_vector

    return adapter_task_vector(model, adapter)


def test_full_finetunes_take_the_informed_mode_too():
    model = tiny_llama().eval()
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    generator = torch.Generator().manual_seed(2)
    states = {k: {n: p + 0.05 * torch.randn(p.shape, generator=generator) for n, p in base.items() if "q_proj" in n}
              for k in ("t0", "t1")}
    ids = torch.arange(20).view(2, 10)

    def evaluate(m, split):
        return float(m(input_ids=ids).logits.argmax(-1).float().mean() / 48)

    from trap2_hf.audit import AuditTask

    tasks = [AuditTask("t0", evaluate, 0.1), AuditTask("t1", evaluate, 0.1)]
    results = run_audit(
        model, tasks, "t0", states["t0"], None, {"t1": states["t1"]}, target="full", methods=["dare_ties"],
        modes=("search",), sweep_scales=(1.0,), progress=False, informed=InformedSettings(budget=2),
    )
    (entry,) = results["methods"]
    assert entry["mode"] == "search" and len(entry["search"]["protected"]) == 2
    assert set(entry["params"]["density"]) == {"protected", "other:t1"}
    for name, param in model.named_parameters():
        assert torch.equal(param.detach(), base[name]), name
