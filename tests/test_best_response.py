"""The attacker's best response inside training (#19): worst-case scales and bounded ascent.

The choice of scales and the cap are functions of losses, checked on hand-made numbers; the trainer's
step is checked against the direct Trap² gradient at the scales the choice should make."""

import copy
import math

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch.func import functional_call

from conftest import VOCAB, tiny_llama, token_dataset
from trap_checks import assert_grads_close, direct_lora_gradients, exact_trap_args, lora_effective_weights, trainable_state
from trap2_hf import Trap2Trainer, Trap2TrainingArguments
from trap2_hf.best_response import (
    bounded_loss,
    bounded_row_losses,
    candidate_scales,
    candidate_strata,
    chance_loss,
    select_scales,
    step_candidates,
)
from trap2_hf.settings import Trap2Settings

LORA = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"], init_lora_weights=False)


def test_candidates_cover_the_rim_and_both_far_sides():
    strata = candidate_strata(0.05, 2.0, 0.05)
    assert strata == [(0.05, 0.75), (0.75, 0.95), (1.05, 1.3), (1.3, 2.0)]
    scales = candidate_scales(0.05, 2.0, 0.05, 8, torch.Generator().manual_seed(0))
    for k, scale in enumerate(scales):
        lo, hi = strata[k % 4]
        assert lo <= scale <= hi
    # A support that is all rim is not cut.
    assert candidate_strata(0.8, 1.2, 0.05) == [(0.8, 0.95), (1.05, 1.2)]


@pytest.mark.parametrize(
    "losses, sampling, expected",
    [
        ([5.0, 0.3, 0.9, 4.0], "stratified", [0.85, 1.1]),
        ([0.1, 0.3, 3.0, 4.0], "stratified", [0.2, 1.1]),  # one per side even when both best are below 1
        ([0.1, 0.3, 3.0, 4.0], "uniform", [0.2, 0.85]),
        ([2.0, 0.3, 3.0, 0.5], "uniform", [0.85, 1.8]),
    ],
)
def test_the_lowest_loss_candidates_are_picked(losses, sampling, expected):
    assert select_scales([0.2, 0.85, 1.1, 1.8], losses, 2, sampling) == expected


def test_a_side_without_candidates_left_gives_way_to_the_other():
    assert select_scales([0.5, 0.9, 1.2], [1.0, 2.0, 3.0], 3, "stratified") == [0.5, 1.2, 0.9]
    with pytest.raises(ValueError, match="Cannot pick 3 scales from 2"):
        select_scales([0.5, 1.2], [1.0, 2.0], 3, "stratified")


def test_with_a_temperature_the_picks_follow_exp_minus_loss():
    candidates, losses = [0.2, 0.5, 1.1, 1.8], [0.0, math.log(3), 0.0, 5.0]
    generator = torch.Generator().manual_seed(0)
    below = [select_scales(candidates, losses, 2, "stratified", 1.0, generator) for _ in range(4000)]
    share = sum(picks[0] == 0.2 for picks in below) / len(below)
    assert share == pytest.approx(0.75, abs=0.03)  # exp(0) : exp(-log 3) = 3 : 1
    assert all(picks[1] in (1.1, 1.8) for picks in below)  # the other side, as without a temperature
    assert select_scales(candidates, losses, 2, "stratified", 1e-6, generator) == [0.2, 1.1]


def test_the_cap_stops_the_gradient_above_it_and_keeps_it_below():
    x = torch.tensor([0.5, 1.0, 2.0, 3.0], requires_grad=True)
    bounded_loss(x**2, 2.0).sum().backward()  # x**2 = 0.25, 1, 4, 9: the last two are above the cap
    torch.testing.assert_close(x.grad, torch.tensor([1.0, 2.0, 0.0, 0.0]))
    rows = torch.tensor([1.0, 6.0, 9.0], requires_grad=True)
    counts = torch.tensor([1, 2, 4])  # per-item means 1, 3, 2.25 against a cap of 2.5
    capped = bounded_row_losses(rows, counts, 2.5)
    torch.testing.assert_close(capped, torch.tensor([1.0, 5.0, 9.0]), check_dtype=False)
    capped.sum().backward()
    torch.testing.assert_close(rows.grad, torch.tensor([1.0, 0.0, 1.0]))
    assert bounded_loss(x, None) is x


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"trap_scale_candidates": -1}, "trap_scale_candidates must be >= 0"),
        ({"trap_scale_candidates": 1, "trap_scales_per_step": 2}, "fewer than trap_scales_per_step=2"),
        ({"trap_scale_candidates": 2.5}, "trap_scale_candidates must be an integer"),
        ({"trap_candidate_fraction": 0.0}, r"trap_candidate_fraction must be in \(0, 1\]"),
        ({"trap_candidate_temperature": -0.5}, "trap_candidate_temperature must be >= 0"),
        ({"trap_ascent": "kl"}, "trap_ascent must be one of 'unbounded', 'capped'"),
        ({"trap_ascent_cap": 1.0}, "trap_ascent='unbounded' does not use it"),
        ({"trap_ascent": "capped", "trap_ascent_cap": -1.0}, "trap_ascent_cap must be a positive number"),
    ],
)
def test_settings_are_validated(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Trap2Settings(**kwargs).validate_trap_settings()


def test_the_automatic_cap_is_the_chance_level_loss():
    from transformers import LlamaConfig, LlamaForSequenceClassification

    assert chance_loss(tiny_llama()) == pytest.approx(math.log(VOCAB))
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, num_labels=3, pad_token_id=0)
    assert chance_loss(LlamaForSequenceClassification(config)) == pytest.approx(math.log(3))
    with pytest.raises(ValueError, match="set trap_ascent_cap"):
        chance_loss(torch.nn.Linear(2, 2))


def one_step(model, tmp_out, dataset, **settings):
    args = Trap2TrainingArguments(output_dir=tmp_out, max_steps=1, per_device_train_batch_size=len(dataset),
                                  **exact_trap_args(**settings))
    trainer = Trap2Trainer(model=model, args=args, train_dataset=dataset)
    before = trainable_state(model)
    trainer.train()
    after = trainable_state(model)
    return trainer, {k: before[k] - after[k] for k in before}


def test_worst_case_step_ascends_at_the_lowest_loss_candidates(tmp_out):
    dataset = token_dataset(8)
    model = get_peft_model(tiny_llama(), LoraConfig(**LORA))
    reference = copy.deepcopy(model)
    trainer, grads = one_step(model, tmp_out, dataset, trap_lambda=0.3, trap_scale_candidates=4,
                              trap_candidate_fraction=1.0)
    batch = {k: torch.tensor(dataset[k]) for k in ("input_ids", "attention_mask", "labels")}
    candidates, _ = step_candidates(trainer.args, 0)
    factors = {n: p.detach() for n, p in reference.named_parameters() if p.requires_grad}
    with torch.no_grad():
        losses = [functional_call(tiny_llama(), lora_effective_weights(reference, s, factors), kwargs=batch).loss.item()
                  for s in candidates]
    picked = select_scales(candidates, losses, 2, "stratified")
    log = trainer.state.log_history[0]
    assert [log["trap/scale"], log["trap/scale_2"]] == pytest.approx(picked)
    assert log["trap/candidate_passes"] == 4
    assert_grads_close(grads, direct_lora_gradients(reference, tiny_llama(), batch, picked, 0.3, "inv"))


@pytest.mark.parametrize("mode", ["two_pass", "fused"])
def test_capped_ascent_is_plain_training_above_the_cap_and_the_paper_below(tmp_out, mode):
    dataset = token_dataset(8)
    model = get_peft_model(tiny_llama(), LoraConfig(**LORA))
    trap = dict(trap_lambda=0.3, trap_mode=mode, trap_rescaled_fraction=1.0 if mode == "fused" else None)
    results = {}
    for name, extra in {
        "plain": {"trap_lambda": 0.0},
        "unbounded": {},
        "tiny_cap": {"trap_ascent": "capped", "trap_ascent_cap": 1e-6},
        "huge_cap": {"trap_ascent": "capped", "trap_ascent_cap": 1e6},
    }.items():
        results[name] = one_step(copy.deepcopy(model), f"{tmp_out}_{name}", dataset, **{**trap, **extra})[1]
    assert_grads_close(results["tiny_cap"], results["plain"])
    assert_grads_close(results["huge_cap"], results["unbounded"])
    differs = max((results["unbounded"][k] - results["plain"][k]).abs().max() for k in results["plain"])
    assert differs > 1e-4  # the ascent does move the step, so the two checks above tell the cases apart
