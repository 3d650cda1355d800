"""The audit's traced column (audit/traced.py): every reported merge traced for the release it holds, the twin's
merges against the twin, the false-positive check, and what the report and the demo print of it."""

import pytest
import torch
from conftest import VOCAB
from trace_updates import lora_config, trace_base

from trap2_hf.audit import AuditTask, format_table, methods, run_audit
from trap2_hf.audit.settings import InformedSettings, PublicSettings, RepairSettings, TransformSettings
from trap2_hf.report.summary import attack_rows, trace_lines
from trap2_hf.trace import ReleaseTracer

IDS = {split: torch.randint(0, VOCAB, (4, 10), generator=torch.Generator().manual_seed(i))
       for i, split in enumerate(("validation", "test", "train"))}
METHODS = ["task_arithmetic", "ties", "dare_ties", "tsv", "peft_cat", "peft_ties"]
MERGEKIT = ["mergekit:ties", "mergekit:della", "mergekit:sce", "mergekit:slerp"]
TRACED = 1e-6


def setup():
    """A 3-layer Llama with rank-8 LoRAs of random factors: prot (task t0), an independent twin, o1 (t1), o2 (t2).
    Each task's labels are what its own update predicts."""
    from peft import get_peft_model

    config = lora_config(init_lora_weights=False)
    torch.manual_seed(0)
    model = get_peft_model(trace_base(), config, adapter_name="prot").eval()
    for seed, name in enumerate(("twin", "o1", "o2"), start=1):
        torch.manual_seed(seed)
        model.add_adapter(name, config)
    labels = {}
    with torch.no_grad():
        for task, adapter in (("t0", "prot"), ("t1", "o1"), ("t2", "o2")):
            model.set_adapter(adapter)
            labels[task] = {split: model(input_ids=ids).logits.argmax(-1) for split, ids in IDS.items()}

    def task(name):
        def evaluate(m, split):
            return (m(input_ids=IDS[split]).logits.argmax(-1) == labels[name][split]).float().mean().item()

        def train_loss(m, indices):
            logits = m(input_ids=IDS["train"][indices]).logits
            return torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels[name]["train"][indices].flatten())

        return AuditTask(name, evaluate, 1 / VOCAB, train_loss, len(IDS["train"]))

    model.set_adapter("prot")
    model.requires_grad_(False)
    return model, [task("t0"), task("t1"), task("t2")]


@pytest.fixture(scope="module")
def audited():
    model, tasks = setup()
    audited = METHODS + [m for m in MERGEKIT if m in methods.names("adapter")]
    results = run_audit(
        model, tasks, "t0", "prot", "twin", {"t1": "o1", "t2": "o2"}, methods=audited,
        modes=("average", "public", "informed"), sweep_scales=(1.0,), progress=False, benign=(),
        transforms=TransformSettings(kinds=()), informed=InformedSettings(methods=("task_arithmetic",),
                                                                          protected_weights=(1.0,), other_weights=(0.5,)),
        public=PublicSettings(methods=tuple(m for m in ("task_arithmetic", "mergekit:slerp") if m in audited)),
        repair=RepairSettings(ks=(2,), steps=2, batch_size=2, rank=2, methods=("task_arithmetic",)),
    )
    return model, results


def release_weights(entry: dict, variant: str) -> list[float]:
    """The released update's nominal weight in each merge of `entry` traced for `variant`."""
    if "objectives" in entry:
        picks = [p[variant] for p in entry["objectives"].values() if p[variant] is not None]
        return [p["config"]["weights"][variant] for p in picks]
    params = entry["params" if variant == "protected" else "unprotected_params"]
    if "weights" in params:
        return [params["weights"][variant]]
    return [params.get("weight", 1 / 3)]


def test_every_reported_merge_is_traced_against_the_update_it_holds(audited):
    _, results = audited
    assert results["trace"]["tracers"] == {"protected": {"blocks": 21}, "unprotected": {"blocks": 21}}
    assert {e["method"] for e in results["methods"]} >= set(METHODS)
    for entry in results["methods"]:
        for variant in ("protected", "unprotected"):
            cell = entry["traced"][variant]
            assert all(w >= 0.1 for w in release_weights(entry, variant)), entry["method"]
            assert cell["p_value"] < TRACED and cell["contains"], (entry["method"], entry["mode"], variant, cell)
        if "objectives" in entry:
            for picks in entry["objectives"].values():
                assert all(p is None or p["traced"]["p_value"] < TRACED for p in picks.values())
    for row in results["repair"]["rows"]:
        for run in ("protected", "unprotected"):
            assert row["traced"]["before"][run]["p_value"] < TRACED
            assert row["traced"]["after"]["2"][run]["p_value"] < TRACED


def test_the_twin_column_is_traced_against_the_twin(audited):
    model, results = audited
    from trap2_hf.audit.task_vectors import adapter_task_vector

    naive = next(e for e in results["methods"] if e["method"] == "task_arithmetic" and e["mode"] == "average")
    assert naive["traced"]["protected"]["weight"] == pytest.approx(1 / 3, abs=0.05)
    assert naive["traced"]["unprotected"]["weight"] == pytest.approx(1 / 3, abs=0.05)
    vectors = {a: adapter_task_vector(model, a) for a in ("prot", "twin", "o1", "o2")}
    twin_merge = {k: sum(vectors[a][k] for a in ("twin", "o1", "o2")) / 3 for k in vectors["twin"]}
    against_protected = ReleaseTracer(vectors["prot"]).trace(twin_merge)
    against_twin = ReleaseTracer(vectors["twin"]).trace(twin_merge)
    assert against_protected.p_value > 1e-3  # the twin's merge holds no protected update: traced against the twin
    assert against_twin.p_value == pytest.approx(naive["traced"]["unprotected"]["p_value"])
    assert against_twin.weight == pytest.approx(naive["traced"]["unprotected"]["weight"], abs=1e-6)


def test_updates_without_the_release_are_not_flagged(audited):
    _, results = audited
    checked = results["trace"]["false_positives"]
    averaged = [e for e in results["methods"] if e["mode"] == "average" and methods.get(e["method"]).accepts(2)]
    names = [row["suspect"] for row in checked["suspects"]]
    assert {"t1 alone", "t2 alone"} <= set(names)
    assert sum("of the others alone" in n for n in names) == len(averaged)
    # each repaired merge (the naive one and the informed pick) without the released update, before and after repair
    assert sum("repair reference" in n for n in names) == 2 * len(results["repair"]["rows"]) == 4
    assert checked["flagged"] == 0 and checked["smallest_p"] > 1e-3
    assert checked["twin_alone"]["p_value"] > 1e-3


def test_the_report_reads_stopped_or_traced_per_attack(audited):
    _, results = audited
    table = format_table(results)
    assert "| traced w/ protected | traced w/ twin |" in table
    naive = next(e for e in results["methods"] if e["method"] == "task_arithmetic" and e["mode"] == "average")
    assert f"| {naive['traced']['protected']['weight']:.2f} (p " in table
    assert "not stopped but traced at p ≤" in table  # random adapters protect nothing: each attack is traced
    assert "- Traced (`trap2 trace`, p < 0.001): " in table
    traced, false_positives = trace_lines(results)
    # one per (method, attack) with a merge: the informed objectives and each repair apart (a constrained objective
    # with no qualifying merge has none)
    rows = [row for row in attack_rows(results) if row["protected"] is not None]
    assert all({"protected", "unprotected"} <= set(row["traced"]) for row in rows)
    assert f"{len(rows)} of {len(rows)} merges with the protected update, {len(rows)} of {len(rows)} merges with " \
           "the twin (against the twin)" in traced
    assert false_positives.startswith(f"false positives: 0 of {len(results['trace']['false_positives']['suspects'])}")


def test_no_traced_column_when_asked_and_none_for_an_update_with_nothing_to_trace():
    from peft import LoraConfig

    model, tasks = setup()
    common = dict(methods=["task_arithmetic"], modes=("average",), sweep_scales=(1.0,), progress=False, benign=(),
                  transforms=TransformSettings(kinds=()))
    results = run_audit(model, tasks, "t0", "prot", None, {"t1": "o1"}, trace=False, **common)
    assert "trace" not in results and "traced" not in results["methods"][0]
    model.add_adapter("blank", LoraConfig(r=8, target_modules="all-linear"))  # B = 0: nothing to trace
    results = run_audit(model, tasks, "t0", "blank", None, {"t1": "o1"}, **common)
    assert "nothing to trace" in results["trace"]["tracers"]["protected"]["error"]
    assert results["methods"][0]["traced"] == {"protected": None}
    assert "not traced: protected: " in format_table(results)


def test_the_card_says_how_many_audited_merges_were_traced(audited):
    from huggingface_hub import ModelCard

    from trap2_hf.release.card import render_card

    _, results = audited
    protection = {"update": "lora", "library_version": "0", "trap_lambda": 0.05, "trap_scale_min": 0.05,
                  "trap_scale_max": 2.0, "trap_margin": 0.05, "sha256": {"adapter_config.json": "0" * 64}}
    text = ModelCard(render_card(None, protection, audit=results)).text
    assert "Traced in the merges it audited (`trap2 trace`, p < 0.001): 14 of 14 merges with the protected update" \
        in text
