"""'sub_batch': two_pass's re-scaled passes over the rows drawn for each scale (`rows.py`), weighted 1/f through
num_items_in_batch; unbiased where the loss is a sum over rows divided by num_items_in_batch."""

import logging

import torch

from ..batch import batch_size_of, select_rows
from ..choices.modes import SUB_BATCH
from .base import NotExactHere
from .passes import PassesMode
from .row_losses import rows_interact

logger = logging.getLogger(__name__)


class SubBatch(PassesMode):
    declared = SUB_BATCH

    def __init__(self):
        self.warned_token_mean = False

    def unsupported(self, step):
        reason = super().unsupported(step)
        if reason is None:
            rows_reason = rows_interact(step.model)
            if rows_reason is not None:
                reason = f"a re-scaled pass over part of the rows needs a loss that is a sum over rows, but {rows_reason}"
        return reason

    def passes(self, step, batch):
        """The drawn rows of each scale, with num_items_in_batch times the fraction (their weight 1/f); under data
        parallelism, a pass of weight 0 where only other ranks drew rows (`rows.drawn_on_any_rank`)."""
        inputs, num_items_in_batch = batch.inputs, batch.num_items_in_batch
        batch_size = batch_size_of(inputs)
        fraction = step.args.trap_rescaled_fraction
        if num_items_in_batch is None and torch.is_tensor(inputs.get("labels")) and inputs["labels"].dim() > 1:
            if step.chosen_by_auto:  # auto only picks what is unbiased: re-scale whole micro-batches
                raise NotExactHere(
                    "the model averages its loss over each pass's own tokens (no num_items_in_batch), so a loss over "
                    "some rows would be a ratio estimate"
                )
            self._warn_token_mean()
        items = num_items_in_batch if num_items_in_batch is None or fraction == 1 else num_items_in_batch * fraction
        drawn = step.rows(batch_size)
        anywhere = [len(rows) > 0 for rows in drawn]
        if step.args.world_size > 1:
            anywhere = step.drawn_on_any_rank(batch_size)
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
