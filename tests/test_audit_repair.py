"""Post-merge repair on a tiny Llama: only the fresh LoRA trains, the model is left as found, and the
reference is the same fine-tune of the same merge without the released update."""

import pytest
import torch
from conftest import VOCAB, tiny_llama
from test_audit_run import IDS, lora_setup

from trap2_hf.audit import methods, run_audit
from trap2_hf.audit.informed import InformedSettings
from trap2_hf.audit.repair import RepairSettings, fine_tune_and_score
from trap2_hf.audit.auditor import Auditor
from trap2_hf.audit.run import AuditTask
from trap2_hf.audit.task_vectors import adapter_task_vector, applied, merge_task_vectors

TRAIN_IDS = torch.randint(0, VOCAB, (32, 10), generator=torch.Generator().manual_seed(7))
SETTINGS = RepairSettings(ks=(4, 16), steps=6, learning_rate=1e-2, batch_size=4, rank=2, seed=0)


def with_training_data(model, tasks):
    """Task t0 learns to predict what the protected adapter predicts on TRAIN_IDS."""
    model.set_adapter("prot")
    with torch.no_grad():
        labels = model(input_ids=TRAIN_IDS).logits.argmax(-1)

    def train_loss(m, indices):
        logits = m(input_ids=TRAIN_IDS[indices]).logits
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels[indices].flatten())

    t0 = tasks[0]
    return [AuditTask(t0.name, t0.evaluate, t0.chance, train_loss, len(TRAIN_IDS)), *tasks[1:]]


@pytest.fixture(scope="module")
def repaired():
    model, tasks = lora_setup()
    tasks = with_training_data(model, tasks)
    model.set_adapter("prot")
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    results = run_audit(
        model, tasks, "t0", "prot", "twin", {"t1": "other1", "t2": "other2"},
        methods=["task_arithmetic"], modes=("average", "informed"), sweep_scales=(1.0,), progress=False,
        informed=InformedSettings(protected_weights=(0.9, 1.0), other_weights=(0.5, 1.0)), repair=SETTINGS,
    )
    return model, tasks, results, weights, flags


def test_repair_section_pairs_each_variant_with_the_reference(repaired):
    _, _, results, _, _ = repaired
    section = results["repair"]
    assert section["settings"]["ks"] == (4, 16) and section["settings"]["steps"] == 6
    row, informed_row = section["rows"]
    assert row["method"] == "task_arithmetic" and row["stage"] == "average"
    # After the informed merge: the informed mode's constrained pick (else its best-mean pick).
    entry = results["methods"][1]
    objectives = entry["objectives"]
    pick = objectives["constrained"]["protected"] or objectives["mean"]["protected"]
    assert informed_row["stage"] == "informed" and informed_row["configs"]["protected"] == pick["config"]
    assert informed_row["before"]["protected"] == pick["test"]["t0"]
    released = {k: w for k, w in pick["config"]["weights"].items() if k != "protected"}
    assert informed_row["configs"]["reference"]["weights"] == released
    third = pytest.approx(1 / 3)
    assert row["configs"]["protected"]["weights"] == {"protected": third, "other:t1": third, "other:t2": third}
    assert row["configs"]["reference"]["weights"] == {"other:t1": third, "other:t2": third}
    entry = results["methods"][0]
    assert row["before"]["protected"] == entry["protected"]["t0"]
    for k in ("4", "16"):
        assert set(row["after"][k]) == {"protected", "unprotected", "reference"}
        # The twin is an exact copy: identical repair, step for step.
        assert row["after"][k]["protected"] == row["after"][k]["unprotected"]
        for run in ("protected", "reference"):
            log = row["training"][k][run]
            # Only the fresh rank-2 LoRA trains: q_proj (32->32), v_proj (32->16), down_proj (64->32), 2 layers.
            assert log["trainable_parameters"] == 2 * 2 * ((32 + 32) + (32 + 16) + (64 + 32))
            assert log["loss_last"] < log["loss_first"], (k, run)


def test_repair_leaves_the_model_as_it_found_it(repaired):
    model, _, _, weights, flags = repaired
    assert set(model.peft_config) == {"prot", "twin", "other1", "other2"}
    assert model.active_adapter == "prot"
    for name, param in model.named_parameters():
        assert torch.equal(param.detach(), weights[name]), name
        assert param.requires_grad == flags[name], name


def test_the_reference_is_the_same_fine_tune_of_the_others_merge_by_hand(repaired):
    model, tasks, results, _, _ = repaired
    row = results["repair"]["rows"][0]
    others = [adapter_task_vector(model, a) for a in ("other1", "other2")]
    delta = merge_task_vectors(methods.get("task_arithmetic"), others, {"weight": 1 / 3})
    auditor = Auditor(model, tasks, "adapter", {"protected": "prot"}, seed=0)
    with torch.no_grad(), model.disable_adapter(), applied(model, delta):
        assert tasks[0].evaluate(model, "test") == row["before"]["reference"]
    with torch.no_grad():
        score, log, _ = fine_tune_and_score(auditor, tasks[0], delta, 16, SETTINGS)
    assert score == row["after"]["16"]["reference"]
    assert log == row["training"]["16"]["reference"]
    model.set_adapter("prot")


def test_repair_on_full_finetunes_wraps_and_unwraps_a_fresh_lora():
    model = tiny_llama().eval()
    for param in model.parameters():
        param.requires_grad_(False)
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    generator = torch.Generator().manual_seed(3)
    states = {k: {n: p + 0.05 * torch.randn(p.shape, generator=generator) for n, p in base.items() if "proj" in n}
              for k in ("t0", "t1")}

    def evaluate(m, split):
        return float((m(input_ids=IDS[split]).logits.argmax(-1) == IDS[split]).float().mean())

    def train_loss(m, indices):
        logits = m(input_ids=TRAIN_IDS[indices]).logits
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), TRAIN_IDS[indices].flatten())

    tasks = [AuditTask("t0", evaluate, 1 / VOCAB, train_loss, 32), AuditTask("t1", evaluate, 1 / VOCAB)]
    settings = RepairSettings(ks=(8,), steps=4, learning_rate=1e-2, batch_size=4, rank=2, target_modules=("q_proj",))
    results = run_audit(
        model, tasks, "t0", states["t0"], None, {"t1": states["t1"]}, target="full", methods=["task_arithmetic"],
        modes=("average",), sweep_scales=(1.0,), progress=False, repair=settings,
    )
    (row,) = results["repair"]["rows"]
    assert set(row["after"]["8"]) == {"protected", "reference"}
    assert row["training"]["8"]["protected"]["trainable_parameters"] == 2 * 2 * (32 + 32)
    assert not hasattr(model, "peft_config") and type(model.model.layers[0].self_attn.q_proj) is torch.nn.Linear
    for name, param in model.named_parameters():
        assert torch.equal(param.detach(), base[name]) and not param.requires_grad, name


def test_bad_repair_settings_name_the_fix():
    model, tasks = lora_setup()
    others = {"t1": "other1"}
    with pytest.raises(ValueError, match="train_loss"):
        run_audit(model, tasks, "t0", "prot", None, others, modes=("average",), repair=RepairSettings())
    tasks = with_training_data(model, tasks)
    with pytest.raises(ValueError, match="between 1 and the task's 32"):
        run_audit(model, tasks, "t0", "prot", None, others, modes=("average",), repair=RepairSettings(ks=(64,)))
    with pytest.raises(ValueError, match="not among the audited"):
        run_audit(model, tasks, "t0", "prot", None, others, methods=["ties"], modes=("average",),
                  repair=RepairSettings(ks=(4,)))


def test_a_peft_combination_is_repaired_on_its_folded_adapter():
    """peft_cat's combined adapter is sum_i w_i dW_i: folded in, it is task arithmetic's merge, so its
    repair rows are task arithmetic's."""
    model, tasks = lora_setup()
    tasks = with_training_data(model, tasks)
    others = {"t1": "other1", "t2": "other2"}
    settings = RepairSettings(ks=(4,), steps=4, learning_rate=1e-2, batch_size=4, rank=2,
                              methods=("task_arithmetic", "peft_cat"))
    results = run_audit(model, tasks, "t0", "prot", "twin", others, methods=["task_arithmetic", "peft_cat"],
                        modes=("average",), sweep_scales=(1.0,), progress=False, repair=settings)
    rows = {row["method"]: row for row in results["repair"]["rows"]}
    assert set(rows) == {"task_arithmetic", "peft_cat"} and rows["peft_cat"]["stage"] == "average"
    auditor = Auditor(model, tasks, "adapter", {"protected": "prot", "other:t1": "other1"}, 0)
    config = {"weights": {"protected": 1.0, "other:t1": 0.5}}
    with torch.no_grad():
        cat = auditor.config_delta(methods.get("peft_cat"), config)
        plain = auditor.config_delta(methods.get("task_arithmetic"), config)
    assert set(cat) == set(plain)
    for name in plain:
        torch.testing.assert_close(cat[name], plain[name], atol=1e-5, rtol=1e-4)
    assert "trap2_audit_merge" not in model.peft_config
    for run in ("protected", "unprotected", "reference"):
        assert rows["peft_cat"]["before"][run] == pytest.approx(rows["task_arithmetic"]["before"][run], abs=1e-6)
        assert rows["peft_cat"]["after"]["4"][run] == pytest.approx(rows["task_arithmetic"]["after"]["4"][run], abs=0.05)
