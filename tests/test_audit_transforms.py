"""The update alone as merges transform it (audit/transforms.py): the sparsifiers and per-tensor scales as functions,
and the audit's `transforms` curves against a hand computation on a tiny Llama."""

import json
from contextlib import contextmanager

import pytest
import torch
from conftest import VOCAB, tiny_llama

from trap2_hf.audit import AuditTask, format_table, run_audit, write_report
from trap2_hf.audit.settings import TransformSettings
from trap2_hf.audit.transforms import della_epsilon, sparsified, tensor_scaled

VECTOR = {
    "a.weight": torch.randn(6, 5, generator=torch.Generator().manual_seed(0)),
    "b.weight": torch.randn(4, 8, generator=torch.Generator().manual_seed(1)),
}


def test_density_one_keeps_the_update_and_trim_keeps_the_largest_entries_unscaled():
    for how in ("trim", "dare", "della"):
        out = sparsified(VECTOR, how, 1.0, seed=0, epsilon=0.15)
        assert all(torch.equal(out[k], VECTOR[k]) for k in VECTOR), how
    trimmed = sparsified(VECTOR, "trim", 0.5, seed=0)
    for name, tensor in VECTOR.items():
        k = int(0.5 * tensor.numel())
        threshold = tensor.abs().flatten().topk(k).values[-1]
        expected = torch.where(tensor.abs() >= threshold, tensor, torch.zeros_like(tensor))
        assert torch.equal(trimmed[name], expected), name


def test_dare_and_della_keep_a_fraction_rescaled_to_the_tensor_l1_norm_and_are_seeded():
    for how, epsilon in (("dare", 0.0), ("della", 0.15)):
        out = sparsified(VECTOR, how, 0.5, seed=3, epsilon=epsilon)
        again = sparsified(VECTOR, how, 0.5, seed=3, epsilon=epsilon)
        assert all(torch.equal(out[k], again[k]) for k in VECTOR)
        for name, tensor in VECTOR.items():
            kept = out[name] != 0
            assert 0 < kept.sum() < tensor.numel()
            factor = tensor.abs().sum() / (tensor * kept).abs().sum()  # mergekit's rescale: the L1 norm matched
            assert torch.allclose(out[name], tensor * kept * factor, atol=1e-6)
            assert out[name].abs().sum() == pytest.approx(float(tensor.abs().sum()), rel=1e-5)
    # DELLA's d +- epsilon stays inside (0, 1), as mergekit requires: epsilon narrows near 1
    assert della_epsilon(0.3, 0.15) == 0.15 and della_epsilon(0.9, 0.15) == 0.05
    sparsified(VECTOR, "della", 0.9, seed=0, epsilon=della_epsilon(0.9, 0.15))


def test_per_tensor_scales_are_drawn_in_range_per_tensor_and_spread_zero_is_the_update():
    same, scales = tensor_scaled(VECTOR, 0.0, seed=0, draw=0)
    assert set(scales.values()) == {1.0} and all(torch.equal(same[k], VECTOR[k]) for k in VECTOR)
    scaled, scales = tensor_scaled(VECTOR, 0.25, seed=0, draw=1)
    assert all(0.75 <= s <= 1.25 for s in scales.values()) and len(set(scales.values())) == 2
    for name in VECTOR:
        assert torch.allclose(scaled[name], scales[name] * VECTOR[name])
    assert tensor_scaled(VECTOR, 0.25, seed=0, draw=1)[1] == scales
    assert tensor_scaled(VECTOR, 0.25, seed=0, draw=2)[1] != scales


IDS = {split: torch.randint(0, VOCAB, (4, 10), generator=torch.Generator().manual_seed(i))
       for i, split in enumerate(("validation", "test"))}


def setup():
    """A tiny Llama with adapters prot (task t0), twin and other (task t1); each task's labels are what its own
    update predicts, so prot alone scores 1.0."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
    model = get_peft_model(tiny_llama(), config, adapter_name="prot").eval()
    for name in ("twin", "other"):
        model.add_adapter(name, config)
    labels = {}
    with torch.no_grad():
        for task, adapter in (("t0", "prot"), ("t1", "other")):
            model.set_adapter(adapter)
            labels[task] = {split: model(input_ids=ids).logits.argmax(-1) for split, ids in IDS.items()}

    def task(name):
        def evaluate(m, split):
            return (m(input_ids=IDS[split]).logits.argmax(-1) == labels[name][split]).float().mean().item()

        return AuditTask(name, evaluate, chance=1 / VOCAB)

    model.set_adapter("prot")
    return model, [task("t0"), task("t1")]


def lora_delta(model, adapter: str) -> dict:
    """B @ A * scaling per adapted layer, keyed by the base layer's weight name: the update by hand."""
    from peft.tuners.lora import LoraLayer

    names = {id(p): n for n, p in model.named_parameters()}
    delta = {}
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, LoraLayer) and adapter in module.lora_A:
                product = module.lora_B[adapter].weight @ module.lora_A[adapter].weight * module.scaling[adapter]
                delta[names[id(module.base_layer.weight)]] = product
    return delta


@contextmanager
def holding(model, vector):
    params = dict(model.named_parameters())
    saved = {name: params[name].data.clone() for name in vector}
    try:
        with model.disable_adapter(), torch.no_grad():
            for name, delta in vector.items():
                params[name].data += delta
            yield
    finally:
        for name, data in saved.items():
            params[name].data = data


def test_the_audit_curves_match_the_update_transformed_by_hand(tmp_path):
    model, tasks = setup()
    settings = TransformSettings(densities=(0.3, 1.0), tensor_spreads=(0.0, 0.25), tensor_draws=2)
    results = run_audit(model, tasks, "t0", "prot", "twin", {"t1": "other"}, methods=["task_arithmetic"],
                        modes=("average",), sweep_scales=(1.0,), progress=False, benign=(), transforms=settings)
    section = results["transforms"]
    assert section["sparsifier"] == "mergekit" and section["evaluations"] == 2 * (3 * 2 + 2 * 2)
    curves = section["curves"]
    alone = results["standalone"]["protected"]
    assert alone == 1.0
    # density 1 is the update itself, for every sparsifier; spread 0 is s = 1 on every draw
    for name in ("trim", "dare", "della"):
        assert curves[name]["protected"][1] == alone, name
    assert curves["tensor_scales"]["protected_draws"][0] == [alone, alone]
    assert curves["della"]["epsilon"] == [0.15, 0.0]
    # trim at 0.3 by hand: each tensor's top 30 % of entries by magnitude, unscaled
    by_hand = {}
    for name, delta in lora_delta(model, "prot").items():
        k = int(0.3 * delta.numel())
        threshold = delta.abs().flatten().topk(k).values[-1]
        by_hand[name] = torch.where(delta.abs() >= threshold, delta, torch.zeros_like(delta))
    with holding(model, by_hand):
        expected = tasks[0].evaluate(model, "test")
    assert curves["trim"]["protected"][0] == pytest.approx(expected)
    assert expected < 1.0  # the trim changes the predictions: the comparison is not of two untouched updates
    # per-tensor scales by hand: the second spread's draws, each tensor at its own scale
    for draw in range(2):
        _, scales = tensor_scaled(lora_delta(model, "prot"), 0.25, results["config"]["seed"], 2 + draw)
        scaled = {name: scales[name] * delta for name, delta in lora_delta(model, "prot").items()}
        with holding(model, scaled):
            value = tasks[0].evaluate(model, "test")
        assert curves["tensor_scales"]["protected_draws"][1][draw] == pytest.approx(value)
    assert curves["tensor_scales"]["protected"][1] == max(curves["tensor_scales"]["protected_draws"][1])
    # the twin is an independent adapter here: its curve is its own
    assert curves["trim"]["unprotected"][1] == results["standalone"]["unprotected"]
    table = format_table(results)
    assert "| transform | d=0.3 | d=1 |" in table and "| transform | ±=0 | ±=0.25 |" in table
    assert f"| magnitude trim at s = 1 (TIES, normalised) | {curves['trim']['protected'][0]:.3f} / " in table
    paths = write_report(results, str(tmp_path))
    assert json.loads(open(paths["json"]).read())["transforms"]["curves"]["trim"]["points"] == [0.3, 1.0]
    with open(paths["png"], "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    # the rim is part of the default re-scale curve
    from trap2_hf.audit.settings import DEFAULT_SCALES

    assert {0.8, 0.85, 0.9, 0.95, 1.05, 1.1, 1.15, 1.2} <= set(DEFAULT_SCALES)
