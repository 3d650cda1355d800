"""trap_mode='split': one pass over the micro-batch, each drawn row at its scale instead of at 1 (split.py), with the
gradient it claims, on an adapter and on a full fine-tune, under accumulation; and what it refuses."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from conftest import VOCAB, tiny_llama, token_dataset
from test_modes import TWO_SCALES, lora_model, train
from trap_checks import assert_grads_close, lora_effective_weights
from trap2_hf import Trap2Trainer, Trap2TrainingArguments
from trap2_hf.objective import rescaled_loss_coefficient
from trap2_hf.split import SplitPlan

SPLIT = dict(trap_lambda=0.3, trap_mode="split", trap_rescaled_fraction=0.25, **TWO_SCALES)


def row_losses(model, weights, batch):
    logits = functional_call(model, weights, kwargs={k: batch[k] for k in ("input_ids", "attention_mask")}).logits
    labels = batch["labels"][:, 1:]
    tokens = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), labels.reshape(-1), reduction="none")
    return tokens.view(labels.shape).sum(-1)


def split_objective(micro_batches, rows, scales, weights_at, fraction=0.25, trap_lambda=0.3):
    """sum_m [ sum_{i not drawn} l_i(1) / (1 - K*f) + sum_k c_k/f * sum_{i in R_mk} l_i(s_k) ] / N, N the tokens of all
    micro-batches: what split claims to compute (`weights_at(s)`: the parameters at scale s)."""
    total_tokens = sum((b["labels"][:, 1:] != -100).sum() for b in micro_batches)
    joint = 0.0
    for batch, batch_rows in zip(micro_batches, rows):
        left = torch.ones(len(batch["input_ids"]), dtype=torch.bool)
        for r in batch_rows:
            left[r] = False
        joint = joint + row_losses(*weights_at(1.0), batch)[left].sum() / (1 - len(scales) * fraction)
        for k, scale in enumerate(scales):
            coefficient = rescaled_loss_coefficient(scale, trap_lambda, "inv", len(scales))
            joint = joint + coefficient / fraction * row_losses(*weights_at(scale), batch)[batch_rows[k]].sum()
    return joint / total_tokens


@pytest.mark.parametrize("accumulation", [1, 2])
def test_split_adapter_gradient_is_the_split_objective(tmp_out, accumulation):
    dataset = token_dataset(8, ragged=True)
    model = lora_model()
    reference = copy.deepcopy(model)
    batch_size = 8 // accumulation
    trainer, grads, seen = train(model, tmp_out, dataset, batch_size, accumulation=accumulation, **SPLIT)
    assert trainer.args.trap_mode == "split"
    rows = [trainer.trap_rows(batch_size, step=0, micro_batch=m) for m in range(accumulation)]
    drawn = [torch.cat(r) for r in rows]
    assert all(len(d.unique()) == len(d) for d in drawn) and sum(len(d) for d in drawn) == 4  # half, each row once
    base = tiny_llama()
    factors = {n: p.detach().clone().requires_grad_() for n, p in reference.named_parameters() if p.requires_grad}
    objective = split_objective(
        seen, rows, trainer.trap_scales(0), lambda s: (base, lora_effective_weights(reference, s, factors))
    )
    expected = dict(zip(factors, torch.autograd.grad(objective, list(factors.values()))))
    assert_grads_close(grads, expected)


@pytest.mark.parametrize("accumulation", [1, 2])
def test_split_full_fine_tune_gradient_is_the_split_objective(tmp_out, accumulation):
    from test_fused_full import away_from

    dataset = token_dataset(8, ragged=True)
    model = tiny_llama()
    reference = copy.deepcopy(model)
    theta0 = away_from(model)
    batch_size = 8 // accumulation
    original = Trap2Trainer.__init__

    def with_theta0(self, *args, **kwargs):
        original(self, *args, trap_reference=theta0, **kwargs)

    Trap2Trainer.__init__ = with_theta0
    try:
        trainer, grads, seen = train(
            model, tmp_out, dataset, batch_size, accumulation=accumulation, trap_target="full", **SPLIT
        )
    finally:
        Trap2Trainer.__init__ = original
    assert trainer.args.trap_mode == "split"
    rows = [trainer.trap_rows(batch_size, step=0, micro_batch=m) for m in range(accumulation)]
    theta = {n: p.detach().clone().requires_grad_() for n, p in reference.named_parameters() if p.requires_grad}
    objective = split_objective(
        seen, rows, trainer.trap_scales(0),
        lambda s: (reference, {n: theta0[n] + s * (theta[n] - theta0[n]) for n in theta}),
    )
    expected = dict(zip(theta, torch.autograd.grad(objective, list(theta.values()))))
    assert_grads_close(grads, expected)
