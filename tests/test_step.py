"""A mode driven through its step object (`modes.TrapStep`) with no Trainer: the passes it runs and the gradient it
leaves, on a LoRA tiny Llama, against the exact objective (trap_checks.direct_lora_gradients)."""

import pytest
import torch

from conftest import tiny_llama, token_dataset
from test_modes import batch_of, lora_model
from trap_checks import assert_grads_close, direct_lora_gradients
from trap2_hf import Trap2Settings
from trap2_hf.modes import MicroBatch, TrapStep, get_mode
from trap2_hf.updates import update_kind

SCALES = [0.5, 1.5]


def settings(**overrides):
    args = Trap2Settings(trap_lambda=0.3, trap_weighting="inv", trap_scales_per_step=len(SCALES), **overrides)
    args.validate_trap_settings()
    args.seed, args.process_index, args.world_size, args.device = 0, 0, 1, "cpu"  # what a Trainer's arguments add
    return args


def step_around(model, args):
    """A step object whose 'training step' is forward, the loss as the step weighs it, backward; it records the
    factor and the rows of every pass it is asked to run."""
    passes = []

    def run_pass(pass_model, inputs, num_items_in_batch):
        passes.append((step.factor, len(inputs["input_ids"])))
        loss = step.weigh(pass_model(**inputs).loss)
        loss.backward()
        return loss.detach()

    step = TrapStep(lambda: args, lambda: model, update_kind(args), run_pass)
    return step, passes


@pytest.mark.parametrize("mode", ["two_pass", "sub_batch", "fused"])
def test_a_mode_runs_through_its_step_object_without_a_trainer(mode):
    """With every row re-scaled (fraction 1) each mode's gradient is the exact objective's; two_pass and sub_batch
    run a nominal pass and one pass per scale at -lambda*w(s)/K, fused one pass over the batch and its copies."""
    model = lora_model()
    batch = batch_of(token_dataset(8))
    args = settings(trap_mode=mode, **({} if mode == "two_pass" else {"trap_rescaled_fraction": 1.0}))
    step, passes = step_around(model, args)
    strategy = get_mode(mode)
    strategy.prepare(step)
    nominal = strategy.run(step, MicroBatch(model, dict(batch), None, SCALES))
    assert torch.isfinite(nominal)
    coefficients = [step.coefficient(s, len(SCALES)) for s in SCALES]
    assert coefficients[0] == pytest.approx(-0.3 / 0.5 / 2) and coefficients[1] == pytest.approx(-0.3 / 1.5 / 2)
    assert passes == ([(None, 8)] if mode == "fused" else [(None, 8), (coefficients[0], 8), (coefficients[1], 8)])
    grads = {name: p.grad for name, p in model.named_parameters() if p.requires_grad}
    expected = direct_lora_gradients(lora_model(), tiny_llama(), batch, SCALES, 0.3, "inv")
    assert_grads_close(grads, expected)


def test_the_step_object_runs_the_offray_passes_after_the_rescaled_ones():
    """Off-ray and guard draws: one pass each after the re-scaled ones, the guard's loss minimised (factor
    +trap_guard_lambda), an off-ray term's maximised (-lambda_off * w / count)."""
    model = lora_model()
    args = settings(trap_mode="two_pass", trap_offray="dare", trap_guard_lambda=0.1)
    step, passes = step_around(model, args)
    step.load_offray()
    draws = step.offray_draws(0)
    assert [draw.is_guard for draw in draws] == [False, True]
    get_mode("two_pass").run(step, MicroBatch(model, batch_of(token_dataset(4)), None, SCALES, draws))
    factors = [factor for factor, _ in passes]
    assert len(passes) == 1 + len(SCALES) + len(draws) and factors[0] is None
    assert factors[3] == pytest.approx(step.offray_coefficient(draws[0], 1)) and factors[3] < 0
    assert factors[4] == pytest.approx(0.1)
