"""'split': ONE forward/backward over the micro-batch itself, the rows drawn for each scale computing at that scale
instead of at 1. Everything else is fused's (`fused.py`), the off-ray and guard passes included; the settings refuse
a fraction that would draw a row for two scales (`choices.modes.Mode.fraction_refusal`).

`fused` appends re-scaled copies of the drawn rows, so its pass holds their activations too; `split`
moves the drawn rows to the re-scaled term instead, so the pass has the micro-batch's rows and plain fine-tuning's
activation memory, at the price of a nominal loss over the rows not drawn. Each row is drawn for at most one scale
(the draw of `rows.py` with K*f < 1), so it is left to the nominal loss with probability 1 - K*f, and
weighting the remaining rows by 1 / (1 - K*f) keeps the nominal loss unbiased:

    loss = sum_{i not drawn} l_i / ((1 - K*f) * D)  +  sum_{j drawn} c_j * l_j / D,    c_j = -lambda * w(s_j) / (K*f),

the rows ordered nominal first, then each scale's side by side (the order `RowGroups.of_copies` and the adapters'
per-row scales expect). Its gradient is two_pass's in expectation, micro-batch by micro-batch; its value, logged
as the step's loss, is the nominal term alone (an unbiased estimate of the nominal loss, noisier than fused's).
"""

from dataclasses import dataclass

import torch

from ..batch import select_rows
from ..choices.modes import SPLIT
from .base import FusedUnsupported
from .fused import Fused, FusedPlan
from .fused_batch import check_rows_are_samples


@dataclass
class SplitPlan(FusedPlan):
    """A micro-batch of `batch_size + num_copies` rows: the nominal ones (`batch_size` of them), then the drawn
    ones (`rows`, their indices in the micro-batch) at `copy_scales`; `order` is that arrangement."""

    order: torch.Tensor | None = None
    micro_batch_size: int = 0

    @classmethod
    def build(cls, batch_size, rows, scales, coefficients, fraction) -> "SplitPlan":
        drawn = torch.cat(rows) if rows else torch.zeros(0, dtype=torch.long)
        if len(drawn.unique()) != len(drawn):
            raise ValueError(
                f"trap_mode='split' needs every row drawn for at most one scale, but trap_rescaled_fraction={fraction} "
                f"with {len(scales)} scales per step draws some twice. Use a fraction below 1 / trap_scales_per_step."
            )
        left = torch.ones(batch_size, dtype=torch.bool)
        left[drawn] = False
        nominal = left.nonzero().flatten()
        plan = super().build(len(nominal), rows, scales, coefficients, fraction)
        plan.nominal_weight = 1.0 / (1.0 - len(scales) * fraction)
        plan.order = torch.cat([nominal, drawn])
        plan.micro_batch_size = batch_size
        return plan

    def arrange(self, inputs: dict) -> dict:
        """The micro-batch's own rows, nominal ones first: no copy, so the pass holds plain's activations."""
        if inputs.get("fused_lm_head"):  # its per-token log-probs would need their own weighting (not done)
            raise FusedUnsupported("trap_mode='split' needs per-row losses, not TRL's fused LM head's log-probs.")
        check_rows_are_samples(inputs)
        return select_rows(inputs, self.order, self.micro_batch_size)


class Split(Fused):
    declared = SPLIT
    plan_class = SplitPlan
