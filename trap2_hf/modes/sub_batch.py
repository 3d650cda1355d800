"""'sub_batch': two_pass's re-scaled passes over the rows drawn for each scale (`rows.py`), weighted 1/f through
num_items_in_batch; unbiased where the loss is a sum over rows divided by num_items_in_batch."""

import logging

import torch

from ..fused import rows_interact
from ..rows import NotExactHere, batch_size_of, drawn_on_any_rank, select_rows
from .passes import PassesMode

logger = logging.getLogger(__name__)


class SubBatch(PassesMode):
    name = "sub_batch"

    def __init__(self):
        self.warned_token_mean = False

    def unsupported(self, trainer):
        reason = super().unsupported(trainer)
        if reason is None:
            rows_reason = rows_interact(trainer.accelerator.unwrap_model(trainer.model))
            if rows_reason is not None:
                reason = f"a re-scaled pass over part of the rows needs a loss that is a sum over rows, but {rows_reason}"
        return reason

    def passes(self, trainer, inputs, num_items_in_batch, num_scales):
        """The drawn rows of each scale, with num_items_in_batch times the fraction (their weight 1/f); under data
        parallelism, a pass of weight 0 where only other ranks drew rows (`rows.drawn_on_any_rank`)."""
        batch_size = batch_size_of(inputs)
        fraction = trainer.args.trap_rescaled_fraction
        if num_items_in_batch is None and torch.is_tensor(inputs.get("labels")) and inputs["labels"].dim() > 1:
            if trainer._trap_mode_requested == "auto":  # auto only picks what is unbiased: re-scale whole micro-batches
                raise NotExactHere(
                    "the model averages its loss over each pass's own tokens (no num_items_in_batch), so a loss over "
                    "some rows would be a ratio estimate"
                )
            self._warn_token_mean()
        items = num_items_in_batch if num_items_in_batch is None or fraction == 1 else num_items_in_batch * fraction
        drawn = trainer._trap_next_rows(batch_size)
        anywhere = [len(rows) > 0 for rows in drawn]
        if trainer.args.world_size > 1:
            anywhere = drawn_on_any_rank(trainer.args, batch_size, *trainer._trap_micro_batch)
        passes = []
        for rows, any_rank in zip(drawn, anywhere):
            if len(rows):
                passes.append((inputs if len(rows) == batch_size else select_rows(inputs, rows, batch_size), items, 1.0))
            elif any_rank:  # another rank re-scales rows at this scale: run its collectives too, adding nothing
                passes.append((select_rows(inputs, torch.arange(1), batch_size), items, 0.0))
            else:
                passes.append(None)
        return passes

    def _warn_token_mean(self) -> None:
        if not self.warned_token_mean:
            self.warned_token_mean = True
            logger.warning(
                "trap_mode='sub_batch' without num_items_in_batch: the model averages its loss over each pass's own "
                "tokens, so the re-scaled loss of the drawn rows is a ratio estimate (unbiased only when rows have "
                "equal token counts). Models that accept num_items_in_batch (transformers' causal LMs) are exact."
            )
