"""Which rows of a micro-batch each scale re-scales (sub_batch, fused, split), drawn from (seed, step, micro-batch)
alone.

`sub_batch`, `fused` and `split` re-scale, for each scale s_k of the step, a random set R_k of rows of each
micro-batch. Each of the K*b (scale, row) pairs is drawn with probability f (`trap_rescaled_fraction`),
by systematic sampling: the pairs are laid out row by row (each row's K scales in a random order) and
every 1/f-th is taken from a random start. So weighting those rows by 1/f makes each scale's re-scaled
loss an unbiased estimate of the whole micro-batch's, micro-batch by micro-batch, under any gradient
accumulation, and any run of consecutive rows holds floor or ceil of K*f*(its rows) drawn pairs: a
micro-batch never carries more than ceil(K*f*b) re-scaled copies, which bounds fused's memory.
f = 1 takes every row, in order: exactly two_pass.

Under data parallelism the draw is made once for the global micro-batch (the W ranks' b rows, rank by
rank), from (seed, step, micro-batch) alone, and each rank takes its own b rows of it: the union of the
ranks' rows is what one process with the global micro-batch draws, so W processes train the same
update as one (up to float error, where nothing else differs per rank, such as dropout masks), and
each rank's share still holds at most ceil(K*f*b) copies.
"""

import torch

from ..seeding import ROWS


def rows_generator(seed: int, step: int, micro_batch: int) -> torch.Generator:
    """A generator that depends only on (seed, optimizer step, micro-batch), like the scales': every rank
    draws the same rows of the global micro-batch."""
    return ROWS.generator(seed, step, micro_batch)


def drawn_rows(args, batch_size: int, step: int, micro_batch: int) -> list[torch.Tensor]:
    """Per scale, the rows of this rank's micro-batch that it re-scales under the settings `args` (sub_batch,
    fused, split): this rank's share of the global micro-batch's draw, a function of (seed, step, micro-batch) only."""
    return rescaled_rows(
        batch_size, args.trap_rescaled_fraction, args.trap_scales_per_step, rows_generator(args.seed, step, micro_batch),
        rank=args.process_index, world_size=args.world_size,
    )


def drawn_on_any_rank(args, batch_size: int, step: int, micro_batch: int) -> list[bool]:
    """Per scale, whether the global micro-batch's draw re-scales a row on any rank: where it does, every rank runs
    that scale's pass (with weight 0 where its own share is empty), so all run the same collectives (TRL's metric
    gathers, DDP's buffer broadcasts) in the same order."""
    generator = rows_generator(args.seed, step, micro_batch)
    everything = rescaled_rows(
        batch_size * args.world_size, args.trap_rescaled_fraction, args.trap_scales_per_step, generator
    )
    return [len(rows) > 0 for rows in everything]


def rescaled_rows(
    batch_size: int,
    fraction: float,
    num_scales: int,
    generator: torch.Generator,
    rank: int = 0,
    world_size: int = 1,
) -> list[torch.Tensor]:
    """The rows of this rank's `batch_size` rows that each of `num_scales` scales re-scales, drawn for the
    global micro-batch of `world_size * batch_size` rows (see the module docstring)."""
    if fraction >= 1:
        return [torch.arange(batch_size) for _ in range(num_scales)]
    total = batch_size * world_size
    start = torch.rand((), generator=generator, dtype=torch.float64)
    scale_order = torch.rand(total, num_scales, generator=generator).argsort(dim=1)
    position = torch.arange(total * num_scales, dtype=torch.float64)
    taken = torch.floor((position + 1) * fraction + start) > torch.floor(position * fraction + start)
    mine = slice(rank * batch_size, (rank + 1) * batch_size)
    taken, scale_order = taken.view(total, num_scales)[mine], scale_order[mine]
    return [(taken & (scale_order == k)).any(dim=1).nonzero().flatten() for k in range(num_scales)]
