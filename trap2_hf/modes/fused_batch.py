"""The fused and split steps' batch and forward: the model's inputs arranged by the plan (`fused.FusedPlan`,
`split.SplitPlan`) and, around the model's one call, the per-row losses weighed into the step's one loss."""

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from ..batch import is_batched, rows_of
from .base import FusedUnsupported
from .row_losses import RowLosses

# Batch keys that describe several sequences packed into one row: rows are not samples there.
PACKED_KEYS = ("cu_seq_lens_q", "cu_seq_lens_k", "seq_idx")


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


@contextmanager
def fused_batch(
    model: nn.Module, plan, row_losses: RowLosses, check_model_loss: bool = False
) -> Iterator[None]:
    """While inside, `model(**inputs)` runs on the inputs plus the plan's copies and returns outputs for the
    original rows whose loss is the fused loss (TRL's per-token log-probs get the copies folded in instead).

    `check_model_loss`: leave the labels to the model this once and raise FusedUnsupported (before any backward)
    unless its own loss over all the rows equals the per-row losses' (`check_row_losses`); the context then
    yields {"uses_num_items": ...}, which normaliser matched (a classifier's loss takes num_items_in_batch where
    its model passes it on)."""
    state, found = {}, {}

    def before(module, args, kwargs):
        plan.calls += 1
        if plan.calls > 1:
            raise RuntimeError("trap_mode='fused' expects one model call per micro-batch; use trap_mode='two_pass'.")
        if args:
            raise FusedUnsupported("trap_mode='fused' needs the model called with keyword arguments, as Trainer does")
        kwargs = plan.arrange(kwargs)
        state["token_log_probs"] = bool(kwargs.get("fused_lm_head"))
        if not state["token_log_probs"]:
            if kwargs.get("labels") is None:
                raise FusedUnsupported("trap_mode='fused' needs labels in the model's inputs; use trap_mode='two_pass'.")
            decoder_given = any(kwargs.get(k) is not None for k in ("decoder_input_ids", "decoder_inputs_embeds"))
            if row_losses.decoder_inputs is not None and not decoder_given:
                kwargs["decoder_input_ids"] = row_losses.decoder_inputs(kwargs["labels"])
            take = kwargs.get if check_model_loss else kwargs.pop
            state["labels"] = take("labels")
            state["shift_labels"] = take("shift_labels", None)
            state["num_items"] = take("num_items_in_batch", None)
            if check_model_loss and state["num_items"] is not None:
                # A value no item count can equal, so that the check tells the two normalisers apart.
                state["probe"] = kwargs["num_items_in_batch"] = state["num_items"] + 0.5
        return args, kwargs

    def after(module, args, kwargs, outputs):
        if state["token_log_probs"]:
            return fold_token_log_probs(outputs, plan)
        sums, counts = row_losses.compute(outputs, state["labels"], state["shift_labels"])
        uses_num_items = row_losses.uses_num_items and state["num_items"] is not None
        if check_model_loss:
            candidates = {False: counts.sum()} | ({True: state["probe"]} if state["num_items"] is not None else {})
            order = sorted(candidates, key=lambda uses: uses != row_losses.uses_num_items)  # the rule's guess first
            uses_num_items = check_row_losses(module, outputs, {uses: sums.sum() / candidates[uses] for uses in order})
            found["uses_num_items"] = uses_num_items
        normaliser = state["num_items"] if uses_num_items else counts[: plan.batch_size].sum()
        return _original_rows(outputs, plan, loss=plan.combine(sums, normaliser, counts))

    handles = [
        model.register_forward_pre_hook(before, with_kwargs=True),
        model.register_forward_hook(after, with_kwargs=True),
    ]
    try:
        yield found
    finally:
        for handle in handles:
            handle.remove()


def check_row_losses(model: nn.Module, outputs, from_rows: dict, rtol: float = 1e-3):
    """The first key of `from_rows` ({key: the per-row losses' sum over a normaliser}) whose value is the model's
    own loss, else FusedUnsupported: a model whose loss is not what `row_loss_function` assumed (a shift it does
    not make, an extra term, another reduction) is found at its first fused micro-batch, before any backward."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    own = outputs.get("loss") if isinstance(outputs, dict) else None
    if own is None:
        raise FusedUnsupported(
            f"{type(inner).__name__} returned no loss for its labels, so the per-row losses of trap_mode='fused' "
            "cannot be checked against it; use trap_mode='two_pass'."
        )
    own = own.detach().float()
    values = {key: torch.as_tensor(value).detach().float().to(own.device) for key, value in from_rows.items()}
    for key, value in values.items():
        if torch.isclose(own, value, rtol=rtol, atol=1e-6):
            return key
    shown = ", ".join(f"{value.item():.6g}" for value in values.values())
    raise FusedUnsupported(
        f"{type(inner).__name__}'s own loss ({own.item():.6g}) is not the sum of the per-row losses that "
        f"trap_mode='fused' weights ({shown}): the model computes its loss in a way fused does not "
        "know. Use trap_mode='two_pass' or 'sub_batch', or give the model a method trap_sample_losses(outputs, "
        "labels) -> (per-row loss sums, per-row item counts)."
    )


def fold_token_log_probs(outputs, plan):
    """TRL's fused-head outputs for the original rows, each copy's weighted log-probs added (as x - x.detach())
    to the row it copies: TRL's loss -sum(log_probs)/D then is the fused loss, its metrics the nominal ones."""
    b = plan.batch_size
    log_probs = outputs["log_probs"]
    weights = plan.copy_weights.to(device=log_probs.device, dtype=log_probs.dtype)
    # trap_ascent='capped': a copy's token stops pulling once its loss -log p passes the cap
    ascended = log_probs[b:] if plan.rescaled_cap is None else log_probs[b:].clamp(min=-plan.rescaled_cap)
    copies = ascended * weights.view(-1, *([1] * (log_probs.dim() - 1)))
    added = torch.zeros_like(log_probs[:b]).index_add(0, plan.rows.to(log_probs.device), copies)
    plan.record(-log_probs[:b].sum(), -log_probs[b:].flatten(1).sum(-1))
    folded = log_probs[:b] + (added - added.detach())
    label_mask = outputs["label_mask"][:b]
    return _original_rows(outputs, plan, loss=-folded.sum() / label_mask.sum().clamp(min=1), log_probs=folded)


def _original_rows(outputs, plan, **replace):
    """The outputs cut to the original rows, with `replace`d fields (a new object, loss first)."""
    if not isinstance(outputs, dict):
        raise RuntimeError("trap_mode='fused' needs dict-like model outputs (return_dict=True).")
    total = plan.batch_size + plan.num_copies
    values = {
        key: value[: plan.batch_size] if is_batched(value, total) else value
        for key, value in outputs.items()
        if key not in replace
    }
    values = {**replace, **values}
    return type(outputs)(**values) if type(outputs) is not dict else values
