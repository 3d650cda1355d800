"""A batch as a dict of tensors whose first dimension is the rows: its size, and the batch restricted to some
rows. What a pass over part of a micro-batch is made from (sub_batch, the best responses' candidate losses)."""

import torch


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


def is_batched(value, batch_size: int) -> bool:
    return torch.is_tensor(value) and value.dim() > 0 and value.shape[0] == batch_size


def rows_of(value, rows: torch.Tensor, batch_size: int):
    return value.index_select(0, rows.to(value.device)) if is_batched(value, batch_size) else value
