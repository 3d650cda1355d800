import math

import pytest
import torch

from trap2_hf.objective import (
    rescaled_loss_coefficient,
    sample_scales,
    scale_weight,
    step_generator,
    trap_objective,
)


def test_uniform_draws_cover_both_sides_in_proportion_and_skip_the_margin():
    scales = torch.tensor(sample_scales(0.05, 2.0, 0.05, 50_000, "uniform", step_generator(0, 0)))
    assert scales.min() >= 0.05 and scales.max() <= 2.0
    assert not ((scales > 0.95) & (scales < 1.05)).any()
    # Lower side [0.05, 0.95] has length 0.90, upper [1.05, 2.0] 0.95.
    assert abs((scales < 1).float().mean().item() - 0.90 / 1.85) < 0.01
    # Uniform within a side: the mean of the lower side is its midpoint.
    assert abs(scales[scales < 1].mean().item() - 0.5) < 0.01


def test_stratified_alternates_sides():
    scales = sample_scales(0.05, 2.0, 0.05, 6, "stratified", step_generator(3, 7))
    assert [s < 1 for s in scales] == [True, False] * 3


def test_fixed_scale():
    assert sample_scales(0.5, 0.5, 0.05, 3, "uniform", step_generator(0, 0)) == [0.5, 0.5, 0.5]
    assert sample_scales(1.5, 1.5, 0.05, 2, "stratified", step_generator(0, 0)) == [1.5, 1.5]


def test_draws_depend_only_on_seed_and_step():
    a = sample_scales(0.05, 2.0, 0.05, 2, "uniform", step_generator(42, 10))
    b = sample_scales(0.05, 2.0, 0.05, 2, "uniform", step_generator(42, 10))
    c = sample_scales(0.05, 2.0, 0.05, 2, "uniform", step_generator(42, 11))
    assert a == b and a != c


@pytest.mark.parametrize("weighting, expected", [("inv", 4.0), ("inv_sqrt", 2.0), ("none", 1.0)])
def test_weights(weighting, expected):
    assert scale_weight(0.25, weighting) == pytest.approx(expected)
    assert rescaled_loss_coefficient(0.25, 0.1, weighting, num_scales=2) == pytest.approx(-0.1 * expected / 2)


def test_unknown_weighting():
    with pytest.raises(ValueError, match="trap_weighting"):
        scale_weight(0.5, "log")


def test_trap_objective_formula():
    nominal, l_a, l_b = torch.tensor(1.0), torch.tensor(3.0), torch.tensor(5.0)
    joint = trap_objective(nominal, [l_a, l_b], [0.25, 1.44], 0.1, "inv_sqrt")
    assert joint.item() == pytest.approx(1.0 - 0.1 * (2.0 * 3.0 + (1 / 1.2) * 5.0) / 2)
    assert math.isclose(trap_objective(nominal, [l_a], [0.5], 0.0, "inv").item(), 1.0)


def test_draw_seeds_stay_what_earlier_versions_drew():
    """A run resumed with a newer version draws the scales and rows the interrupted one would have drawn."""
    from trap2_hf import seeding

    for seed, step, micro_batch in [(0, 0, 0), (42, 7, 3), (2**40 + 3, 123_456, 9)]:
        assert seeding.SCALES.seed(seed, step) == (seed * 1_000_003 + step * 7_919 + 12_345) % (2**63 - 1)
        rows = seeding.ROWS.seed(seed, step, micro_batch)
        assert rows == (seed * 1_000_003 + step * 7_919 + micro_batch * 104_729 + 99_991) % (2**63 - 1)
        expected = torch.Generator().manual_seed(seeding.SCALES.seed(seed, step))
        assert torch.equal(torch.rand(4, generator=step_generator(seed, step)), torch.rand(4, generator=expected))
    with pytest.raises(ValueError, match="mixes 2 values, got 1"):
        seeding.SCALES.seed(1)
