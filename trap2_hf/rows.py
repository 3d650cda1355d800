"""The rows of a micro-batch that the re-scaled term takes: which ones (drawn from (seed, step, micro-batch)
alone), and the batch restricted to them or extended by copies of them. The sampling and why it is unbiased:
`fused.py`'s docstring."""

import torch

from .seeding import ROWS

# Batch keys that describe several sequences packed into one row: rows are not samples there.
PACKED_KEYS = ("cu_seq_lens_q", "cu_seq_lens_k", "seq_idx")


class NotExactHere(NotImplementedError):
    """Raised by a mode's step, before any backward, where it finds it would not be exact for this batch: a mode
    'auto' chose then falls back to two_pass."""


class FusedUnsupported(NotExactHere):
    """This batch cannot be run fused (found at its first forward, before any computation); two_pass can."""


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


def batch_size_of(inputs: dict) -> int:
    for key in ("input_ids", "labels", "attention_mask", "inputs_embeds", "pixel_values"):
        if torch.is_tensor(inputs.get(key)) and inputs[key].dim() > 0:
            return inputs[key].shape[0]
    for value in inputs.values():
        if torch.is_tensor(value) and value.dim() > 0:
            return value.shape[0]
    raise ValueError(f"Cannot tell the batch size of inputs with keys {sorted(inputs)}: no tensor among them.")


def select_rows(inputs: dict, rows: torch.Tensor, batch_size: int) -> dict:
    """The inputs restricted to `rows`: every tensor whose first dimension is the batch."""
    return {key: rows_of(value, rows, batch_size) for key, value in inputs.items()}


def check_rows_are_samples(inputs: dict) -> None:
    """FusedUnsupported where the batch packs several sequences into one row (packing, padding_free)."""
    packed = sorted(key for key in PACKED_KEYS if key in inputs)
    if packed:
        raise FusedUnsupported(
            f"The batch packs several sequences into one row ({', '.join(packed)}), so a row is not a sample and "
            "cannot be copied on its own; use trap_mode='two_pass' or 'sub_batch', or turn packing/padding_free off."
        )


def append_rows(inputs: dict, rows: torch.Tensor, batch_size: int) -> dict:
    """The inputs followed by copies of `rows`, tensor by tensor."""
    check_rows_are_samples(inputs)
    return {
        key: torch.cat([value, rows_of(value, rows, batch_size)]) if is_batched(value, batch_size) else value
        for key, value in inputs.items()
    }


def is_batched(value, batch_size: int) -> bool:
    return torch.is_tensor(value) and value.dim() > 0 and value.shape[0] == batch_size


def rows_of(value, rows: torch.Tensor, batch_size: int):
    return value.index_select(0, rows.to(value.device)) if is_batched(value, batch_size) else value
