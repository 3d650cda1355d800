"""The guard: the released update alone under benign perturbations (half-precision casts, 8-bit weights)."""

import copy

import pytest
import torch
from conftest import VOCAB, tiny_llama
from peft import LoraConfig, get_peft_model
from torch import nn

from trap2_hf import Trap2Trainer, Trap2TrainingArguments
from trap2_hf.audit import AuditTask, format_table, run_audit
from trap2_hf.audit.benign import TOLERANCE, cast_round_trip, int8_round_trip, perturbed


def test_int8_round_trip_by_hand():
    weight = torch.tensor([[1.0, -0.5, 0.25], [0.0, 0.0, 0.0], [127.0, 63.6, -1.0]])
    # Row 0: scale 1/127; -0.5 * 127 = -63.5 rounds to -64 (half to even), 0.25 * 127 = 31.75 to 32.
    # Row 1: all zero stays zero. Row 2: scale 1; 63.6 rounds to 64.
    expected = torch.tensor([[1.0, -64 / 127, 32 / 127], [0.0, 0.0, 0.0], [127.0, 64.0, -1.0]])
    result = int8_round_trip(weight)
    assert result.dtype == torch.float32
    torch.testing.assert_close(result, expected, rtol=0, atol=1e-7)


def test_cast_round_trip_keeps_what_the_half_format_holds():
    values = torch.tensor([1.0, 1 + 2**-10, 1 + 2**-12, 3.0])
    # bfloat16 keeps 7 fraction bits, float16 keeps 10.
    assert cast_round_trip(values, torch.bfloat16).tolist() == [1.0, 1.0, 1.0, 3.0]
    assert cast_round_trip(values, torch.float16).tolist() == [1.0, 1 + 2**-10, 1.0, 3.0]
    assert cast_round_trip(values, torch.float16).dtype == torch.float32


def lora_model():
    config = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "down_proj"], init_lora_weights=False)
    torch.manual_seed(0)
    return get_peft_model(tiny_llama(), config, adapter_name="prot")


def test_perturbed_rounds_the_merged_weights_and_restores_them():
    model = lora_model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    linear = {f"{name}.weight" for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    with perturbed(model, "int8"):
        for name, param in model.named_parameters():
            if ".prot." in name:
                assert torch.equal(param, before[name]), name  # adapter weights are not the merged model's
            elif name in linear:
                assert torch.equal(param, int8_round_trip(before[name])), name
                assert not torch.equal(param, before[name]), name
            else:
                assert torch.equal(param, before[name]), name  # embeddings and norms keep their values
    with perturbed(model, "bfloat16"):
        base = {n: p for n, p in model.named_parameters() if ".prot." not in n}
        assert all(torch.equal(p, p.to(torch.bfloat16).float()) for p in base.values())
        assert any(not torch.equal(p, before[n]) for n, p in base.items())
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    with pytest.raises(ValueError, match="int4"):
        with perturbed(model, "int4"):
            pass


SHIFT = 3  # the task: next token = this token + 3 (mod VOCAB)


def shifted(num: int, seed: int, length: int = 10) -> torch.Tensor:
    starts = torch.randint(0, VOCAB, (num,), generator=torch.Generator().manual_seed(seed))
    return (starts[:, None] + SHIFT * torch.arange(length)) % VOCAB


TEST_IDS = {"validation": shifted(32, 98), "test": shifted(64, 99)}


def accuracy(model, split: str) -> float:
    ids = TEST_IDS[split]
    with torch.no_grad():
        predicted = model(input_ids=ids).logits.argmax(-1)
    return (predicted[:, :-1] == ids[:, 1:]).float().mean().item()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A protected LoRA and its twin, trained briefly on the shift task; a random adapter as the other update."""
    from datasets import Dataset

    ids = shifted(1024, 0)
    data = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist(),
                              "labels": ids.tolist()})
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj", "down_proj"])
    adapters = {}
    for name, settings in (("twin", {"trap_lambda": 0.0}), ("prot", {"trap_lambda": 0.1})):
        torch.manual_seed(0)
        model = get_peft_model(tiny_llama(), config)
        args = Trap2TrainingArguments(
            output_dir=str(tmp_path_factory.mktemp(name)), max_steps=200, per_device_train_batch_size=32,
            learning_rate=5e-3, report_to="none", use_cpu=True, save_strategy="no", disable_tqdm=True, seed=0,
            **settings,
        )
        Trap2Trainer(model=model, args=args, train_dataset=data).train()
        adapters[name] = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    model = get_peft_model(tiny_llama(), config, adapter_name="prot")
    model.add_adapter("twin", config)
    model.add_adapter("other", LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"], init_lora_weights=False))
    with torch.no_grad():
        params = dict(model.named_parameters())
        for name in ("prot", "twin"):
            for key, value in adapters[name].items():
                params[key.replace(".default.", f".{name}.")].copy_(value)
    model.eval()
    tasks = [AuditTask("shift", accuracy, chance=1 / VOCAB), AuditTask("other", lambda m, s: 0.5, chance=0.5)]
    results = run_audit(model, tasks, "shift", "prot", "twin", {"other": "other"}, modes=("average",),
                        methods=["task_arithmetic"], sweep_scales=(0.5, 1.0), progress=False)
    return model, results


def by_hand(model, adapter: str, perturb) -> float:
    """Merge `adapter` with peft's merge_and_unload into a copy, perturb every weight by hand, evaluate."""
    merged = copy.deepcopy(model)
    merged.set_adapter(adapter)
    plain = merged.merge_and_unload(adapter_names=[adapter])
    with torch.no_grad():
        perturb(plain)
    return accuracy(plain.eval(), "test")


def half(dtype):
    def perturb(plain):
        for param in plain.parameters():
            param.data = param.data.to(dtype).float()

    return perturb


def int8(plain):
    for module in plain.modules():
        if isinstance(module, nn.Linear):
            module.weight.data = int8_round_trip(module.weight.data)


def test_a_trained_protected_update_under_benign_perturbations(trained):
    model, results = trained
    section = results["benign"]
    assert section["perturbations"] == ["float32", "bfloat16", "float16", "int8"]
    assert section["reference"] == "twin"
    for variant, adapter in (("protected", "prot"), ("unprotected", "twin")):
        scores = section[variant]
        # Folded into the base, the update scores what it scores as an adapter.
        assert scores["float32"] == pytest.approx(results["standalone"][variant], abs=1 / 64)
        assert scores["bfloat16"] == pytest.approx(by_hand(model, adapter, half(torch.bfloat16)), abs=1e-6)
        assert scores["float16"] == pytest.approx(by_hand(model, adapter, half(torch.float16)), abs=1e-6)
        assert scores["int8"] == pytest.approx(by_hand(model, adapter, int8), abs=1e-6)
    assert results["standalone"]["unprotected"] > 0.9  # the twin learned the task
    for p in section["perturbations"]:
        gap = section["protected"][p] - section["unprotected"][p]
        assert section["gap"][p] == pytest.approx(gap)
        assert section["held"][p] == (gap >= -TOLERANCE - 1e-9)  # within one point of the twin, or flagged
    assert section["all_held"] == all(section["held"].values())
    table = format_table(results)
    assert "| int8 | " in table and ("✓" if section["held"]["int8"] else "✗") in table.split("| int8 | ")[1]


def test_without_a_twin_the_reference_is_the_unperturbed_update(trained):
    model, _ = trained
    tasks = [AuditTask("shift", accuracy, chance=1 / VOCAB), AuditTask("other", lambda m, s: 0.5, chance=0.5)]
    results = run_audit(model, tasks, "shift", "prot", None, {"other": "other"}, modes=("average",),
                        methods=["task_arithmetic"], sweep_scales=(1.0,), progress=False, benign=("int8",))
    assert results["benign"]["reference"] is None and results["benign"]["held"] is None
    results = run_audit(model, tasks, "shift", "prot", None, {"other": "other"}, modes=("average",),
                        methods=["task_arithmetic"], sweep_scales=(1.0,), progress=False, benign=("float32", "int8"))
    section = results["benign"]
    assert section["reference"] == "float32" and section["unprotected"] is None
    assert section["gap"]["int8"] == pytest.approx(section["protected"]["int8"] - section["protected"]["float32"])
    results = run_audit(model, tasks, "shift", "prot", None, {"other": "other"}, modes=("average",),
                        methods=["task_arithmetic"], sweep_scales=(1.0,), progress=False, benign=())
    assert "benign" not in results
    with pytest.raises(ValueError, match="fp8"):
        run_audit(model, tasks, "shift", "prot", None, {"other": "other"}, modes=("average",),
                  methods=["task_arithmetic"], progress=False, benign=("fp8",))
