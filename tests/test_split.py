"""trap_mode='split': one pass over the micro-batch, each drawn row at its scale instead of at 1 (modes/split.py),
with the gradient it claims, on an adapter and on a full fine-tune, under accumulation; the off-ray passes after it;
and what it refuses."""

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
from trap2_hf.modes.split import SplitPlan

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


@pytest.mark.parametrize("accumulation", [1, 2, 8])  # 8: one-row micro-batches, some all nominal, some all drawn
def test_split_adapter_gradient_is_the_split_objective(tmp_out, accumulation):
    dataset = token_dataset(8, ragged=True)
    model = lora_model()
    reference = copy.deepcopy(model)
    batch_size = 8 // accumulation
    trainer, grads, seen = train(model, tmp_out, dataset, batch_size, accumulation=accumulation, **SPLIT)
    assert trainer.args.trap_mode == "split"
    rows = [trainer.trap_rows(batch_size, step=0, micro_batch=m) for m in range(accumulation)]
    drawn = [torch.cat(r) for r in rows]
    assert all(len(d.unique()) == len(d) for d in drawn)  # each row at most once
    # half the rows of every micro-batch of 4 or 8; one-row micro-batches draw theirs independently, half the time
    assert sum(len(d) for d in drawn) == 4 if batch_size > 1 else 0 < sum(len(d) for d in drawn) < 8
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


def test_split_refuses_a_fraction_that_would_draw_a_row_twice_and_trl_sft(tmp_out):
    from conftest import text_dataset, tiny_tokenizer
    from peft import LoraConfig

    from trap2_hf import Trap2SFTConfig, Trap2SFTTrainer

    with pytest.raises(ValueError, match=r"trap_rescaled_fraction \* trap_scales_per_step < 1.*0.5 \* 2.*=0.25"):
        Trap2TrainingArguments(output_dir=tmp_out, trap_mode="split", trap_rescaled_fraction=0.5, **TWO_SCALES)
    with pytest.raises(ValueError, match="trap_mode='split'.*trap_reference_device='cpu'"):
        Trap2TrainingArguments(output_dir=tmp_out, trap_mode="split", trap_target="full", trap_reference_device="cpu")
    args = Trap2SFTConfig(output_dir=tmp_out, report_to="none", use_cpu=True, bf16=False, trap_mode="split")
    with pytest.raises(ValueError, match="trap_mode='split'.*fused LM head.*'fused' for an adapter"):
        Trap2SFTTrainer(
            model=tiny_llama(), args=args, train_dataset=text_dataset(4), processing_class=tiny_tokenizer(),
            peft_config=LoraConfig(r=4, target_modules=["q_proj"]),
        )


def test_split_default_fraction_leaves_half_the_rows_to_the_nominal_loss(tmp_out):
    args = Trap2TrainingArguments(output_dir=tmp_out, trap_mode="split", **TWO_SCALES)
    assert args.trap_rescaled_fraction == 0.25
    plan = SplitPlan.build(8, [torch.tensor([1, 6]), torch.tensor([3, 4])], [0.5, 1.5], [-0.1, -0.1], 0.25)
    assert plan.order.tolist() == [0, 2, 5, 7, 1, 6, 3, 4] and plan.batch_size == 4 and plan.nominal_weight == 2.0
    assert plan.sample_scales("cpu").tolist() == [1, 1, 1, 1, 0.5, 0.5, 1.5, 1.5]
    with pytest.raises(ValueError, match="at most one scale"):
        SplitPlan.build(8, [torch.tensor([1, 6]), torch.tensor([6])], [0.5, 1.5], [-0.1, -0.1], 0.25)


@pytest.fixture
def float64():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def test_split_runs_the_offray_and_guard_passes_as_two_pass_does(tmp_out, float64):
    """Off-ray and guard terms run after split's one pass, as separate passes over the micro-batch: what they add
    to the step's gradient is what they add to two_pass's (in float64, to rounding)."""
    dataset = token_dataset(8, ragged=True)
    offray = dict(trap_offray="dare,synthetic", trap_guard_lambda=0.1, trap_offray_per_step=2)

    def grads(mode, **extra):
        torch.manual_seed(0)
        settings = {**SPLIT, "trap_mode": mode} if mode == "split" else dict(trap_lambda=0.3, **TWO_SCALES)
        trainer, step_grads, _ = train(lora_model(), f"{tmp_out}/{mode}{len(extra)}", dataset, 4, accumulation=2,
                                       **settings, **extra)
        logged = [log for log in trainer.state.log_history if "trap/offray_loss" in log]
        assert bool(logged) == bool(extra)
        return step_grads

    split_part = {k: v - w for (k, v), w in zip(grads("split", **offray).items(), grads("split").values())}
    two_pass_part = {k: v - w for (k, v), w in zip(grads("two_pass", **offray).items(), grads("two_pass").values())}
    assert max(v.abs().max() for v in two_pass_part.values()) > 1e-4  # the terms move the update
    assert_grads_close(split_part, two_pass_part, rtol=1e-9, atol=1e-12)
