"""The statistics of `trap2 trace` on synthetic tensors: exact tails, the scored directions, the decoy null."""

import itertools
import math

import pytest
import torch

from trap2_hf.trace.settings import TraceSettings
from trap2_hf.trace.stats import (
    binomial_tail,
    layer_of,
    match_p_values,
    random_rotations,
    rank_sum_tail,
    scored_blocks,
)
from trap2_hf.trace.tracer import ReleaseTracer


def low_rank(rows: int, cols: int, rank: int, seed: int, values=None) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    left, _ = torch.linalg.qr(torch.randn(rows, rank, generator=generator, dtype=torch.float64))
    right, _ = torch.linalg.qr(torch.randn(cols, rank, generator=generator, dtype=torch.float64))
    values = torch.linspace(2.0, 0.5, rank, dtype=torch.float64) if values is None else values
    return (left * values) @ right.T


def test_binomial_tail_is_exact():
    for trials, rate in ((10, 0.1), (36, 0.01), (5, 0.5)):
        for k in range(trials + 2):
            brute = sum(math.comb(trials, j) * rate**j * (1 - rate) ** (trials - j) for j in range(k, trials + 1))
            assert binomial_tail(k, trials, rate) == pytest.approx(brute, rel=1e-9, abs=1e-300)
    assert binomial_tail(0, 10, 0.3) == 1.0 and binomial_tail(36, 36, 0.01) == pytest.approx(1e-72)


def test_rank_sum_tail_is_exact():
    for candidates, blocks in ((2, 5), (3, 4), (4, 3)):
        outcomes = list(itertools.product(range(1, candidates + 1), repeat=blocks))
        for observed in outcomes[:: max(1, len(outcomes) // 20)]:
            brute = sum(sum(o) >= sum(observed) for o in outcomes) / len(outcomes)
            assert rank_sum_tail(list(observed), candidates) == pytest.approx(brute)
    assert rank_sum_tail([3] * 36, 3) == pytest.approx(3.0**-36)


def test_random_rotations_are_orthogonal_and_a_function_of_the_seed():
    q = random_rotations(50, 6, seed=3)
    torch.testing.assert_close(q @ q.transpose(1, 2), torch.eye(6, dtype=torch.float64).expand(50, 6, 6))
    assert torch.equal(q, random_rotations(50, 6, seed=3)) and not torch.equal(q, random_rotations(50, 6, seed=4))
    # Haar: the mean of each entry is 0 and its variance 1/width
    many = random_rotations(4000, 6, seed=0)
    assert many.mean(0).abs().max() < 0.03 and (many.var(0) - 1 / 6).abs().max() < 0.02


def test_scored_blocks_skip_the_shared_directions_vectors_and_empty_matrices():
    values = torch.linspace(3.0, 1.0, 10, dtype=torch.float64)
    release = {
        "a.weight": low_rank(40, 30, 10, 0, values).float(),
        "a.bias": torch.ones(40),
        "b.weight": torch.zeros(20, 20),
        "c.weight": low_rank(20, 20, 2, 1).float(),  # rank 2 <= shared_directions: nothing left to score
    }
    blocks = scored_blocks(release, TraceSettings(shared_directions=3, max_directions=5))
    assert [b.name for b in blocks] == ["a.weight"]
    torch.testing.assert_close(blocks[0].values, values[3:8], rtol=1e-5, atol=1e-6)
    everything = scored_blocks(release, TraceSettings(shared_directions=0, max_directions=64))
    assert [b.name for b in everything] == ["a.weight", "c.weight"] and everything[0].width == 10


def test_a_scaled_copy_scores_its_weight_and_what_lies_outside_the_scored_directions_does_not_count():
    release = {"w": low_rank(48, 32, 12, 0).float()}
    tracer = ReleaseTracer(release, settings=TraceSettings(suspect_directions=0))
    assert tracer.trace({"w": 0.37 * release["w"]}).weight == pytest.approx(0.37, abs=1e-5)
    block = tracer.blocks[0]
    outside = torch.randn(48, 32, dtype=torch.float64)
    outside -= block.left @ (block.left.T @ outside)  # nothing left in the scored left directions
    assert tracer.trace({"w": (0.37 * release["w"] + outside).float()}).weight == pytest.approx(0.37, abs=1e-4)
    assert tracer.trace({}).weight == 0.0 and tracer.trace({}).p_value == 1.0


def test_deflation_removes_a_strong_shared_direction_and_keeps_a_copy():
    release = low_rank(64, 48, 10, 0)
    (block,) = scored_blocks({"w": release}, TraceSettings())
    generator = torch.Generator().manual_seed(1)
    # a strong rank-one component, mostly outside the scored directions but leaking into them (as the base's shared
    # directions do)
    g = torch.randn(64, generator=generator, dtype=torch.float64) + 2.0 * block.left[:, 0]
    h = torch.randn(48, generator=generator, dtype=torch.float64) + 2.0 * block.right[0]
    shared = 60.0 * torch.outer(g / g.norm(), h / h.norm())
    plain = block.core(0.5 * release)
    leaked = (block.core(0.5 * release + shared) - plain).norm()
    deflated = (block.core(0.5 * release + shared, deflate=2) - plain).norm()
    assert leaked > plain.norm() and deflated < 0.2 * leaked, (leaked, deflated)
    torch.testing.assert_close(block.core(release, deflate=8), block.core(release), rtol=1e-6, atol=1e-8)


def test_decoy_p_values_are_uniform_when_the_release_is_unrelated():
    """The null the decoys model: the suspect holds the release's directions but not its pairing of them."""
    settings = TraceSettings(decoys=499, suspect_directions=0)
    p_values = []
    generator = torch.Generator().manual_seed(0)
    for seed in range(60):
        release = low_rank(30, 30, 12, seed)
        (block,) = scored_blocks({"w": release}, settings)
        # the suspect: a random matrix inside the release's scored subspaces, plus noise outside them
        inner = torch.randn(block.width, block.width, generator=generator, dtype=torch.float64)
        suspect = block.left @ inner @ block.right + 0.1 * torch.randn(30, 30, generator=generator, dtype=torch.float64)
        p_values += match_p_values([block], [block.core(suspect)], settings)
    share = sum(p <= 0.2 for p in p_values) / len(p_values)
    assert 0.08 <= share <= 0.35, share
    copy = low_rank(30, 30, 12, 99)
    (block,) = scored_blocks({"w": copy}, settings)
    assert match_p_values([block], [block.core(0.2 * copy)], settings) == [1 / 500]


def test_layer_names():
    assert layer_of("model.layers.3.self_attn.q_proj.weight") == "model.layers.3"
    assert layer_of("encoder.layer.11.output.dense.weight") == "encoder.layer.11"
    assert layer_of("lm_head.weight") == "lm_head"


def test_settings_refuse_values_that_cannot_work():
    with pytest.raises(ValueError, match="match_level"):
        TraceSettings(match_level=0.02, null_match_rate=0.01)
    with pytest.raises(ValueError, match="shared_directions"):
        TraceSettings(shared_directions=-1)
    with pytest.raises(ValueError, match="alpha"):
        ReleaseTracer({"w": low_rank(20, 20, 8, 0).float()}).trace({}, alpha=2.0)
    with pytest.raises(ValueError, match="nothing to trace"):
        ReleaseTracer({"w": torch.zeros(8, 8)})
