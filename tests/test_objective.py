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


# ----------------------------------------------------------------------------- the rim (trap_rim_share)
def test_without_a_rim_the_draws_are_the_interval_points_of_the_step_uniforms():
    """trap_rim_share 0 draws what every earlier version drew: side k mod 2 at the step generator's k-th uniform."""
    for seed, step in [(0, 0), (5, 17)]:
        u = torch.rand(4, generator=step_generator(seed, step), dtype=torch.float64).tolist()
        expected = [0.05 + u[0] * 0.90, 1.05 + u[1] * 0.95, 0.05 + u[2] * 0.90, 1.05 + u[3] * 0.95]
        got = sample_scales(0.05, 2.0, 0.05, 4, "stratified", step_generator(seed, step))
        assert got == pytest.approx(expected, abs=1e-12)
        assert sample_scales(0.05, 2.0, 0.05, 4, "stratified", step_generator(seed, step), rim=(0.0, 0.75, 1.3)) == got


def test_a_full_rim_share_draws_every_scale_on_the_rim_and_keeps_the_sides_alternating():
    scales = [
        s for step in range(2000)
        for s in sample_scales(0.05, 2.0, 0.05, 2, "stratified", step_generator(1, step), rim=(1.0, 0.75, 1.3))
    ]
    low, high = torch.tensor(scales[0::2]), torch.tensor(scales[1::2])
    assert low.min() >= 0.75 and low.max() <= 0.95 and high.min() >= 1.05 and high.max() <= 1.3
    assert abs(low.mean().item() - 0.85) < 0.01 and abs(high.mean().item() - 1.175) < 0.01  # uniform on each part


def test_a_rim_share_puts_that_share_of_the_draws_on_the_rim_and_the_rest_on_all_of_s():
    scales = torch.tensor([
        s for step in range(4000)
        for s in sample_scales(0.05, 2.0, 0.05, 2, "uniform", step_generator(2, step), rim=(0.5, 0.75, 1.3))
    ])
    on_rim = ((scales >= 0.75) & (scales <= 1.3)).float().mean().item()
    # Half the draws on the rim (0.45 of S's length), half on all of S (of which 0.45 / 1.85 on the rim too).
    assert abs(on_rim - (0.5 + 0.5 * 0.45 / 1.85)) < 0.02
    assert not ((scales > 0.95) & (scales < 1.05)).any()
    again = sample_scales(0.05, 2.0, 0.05, 2, "uniform", step_generator(2, 7), rim=(0.5, 0.75, 1.3))
    assert again == sample_scales(0.05, 2.0, 0.05, 2, "uniform", step_generator(2, 7), rim=(0.5, 0.75, 1.3))


def test_a_side_without_a_rim_part_keeps_its_whole_interval():
    scales = [
        sample_scales(0.05, 2.0, 0.05, 2, "stratified", step_generator(3, step), rim=(1.0, 0.8, 0.9))
        for step in range(500)
    ]
    assert all(0.8 <= low <= 0.9 for low, _ in scales)
    assert max(high for _, high in scales) > 1.5  # the upper side has no rim part: drawn on [1.05, 2.0]


@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(trap_rim_share=1.5), "trap_rim_share must be in"),
        (dict(trap_rim_share=0.5, trap_rim_min=1.2, trap_rim_max=1.1), "trap_rim_min"),
        (dict(trap_rim_share=0.5, trap_rim_min=0.97, trap_rim_max=1.03), "holds no scale that is drawn"),
    ],
)
def test_rim_settings_are_validated_by_name(settings, message):
    from trap2_hf import Trap2Settings

    with pytest.raises(ValueError, match=message):
        Trap2Settings(**settings).validate_trap_settings()
    Trap2Settings(trap_rim_share=0.5).validate_trap_settings()
