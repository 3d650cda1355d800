"""'fused': ONE forward/backward over the micro-batch plus re-scaled copies of the rows drawn for each scale (the
draw: `rows.py`), each copy at its own scale (the per-row re-scaling: the update kind's `rescaled_copies`). Exact
only where the model's loss is a sum of per-row losses it can be asked for (`row_losses.py`). The off-ray and
guard passes (`trap_offray`, `trap_guard_lambda`) follow as separate passes over the micro-batch, as in two_pass.

The fused step runs ONE forward/backward over the b rows plus copies of the rows of every R_k, copy
j computing with its own scale s_j (`rescale.rescaled_adapter_per_sample`), with the loss

    loss = sum_{i<b} l_i / D  +  sum_j c_j * l_{b+j} / D,      c_j = -lambda * w(s_j) / (K * f),

l_i the summed loss of row i (its tokens, or its one label), K the scales per step and D the
normaliser of the model's own loss: num_items_in_batch where that loss divides by it (transformers'
causal LMs, TRL's SFT: the items of the whole optimizer step, all micro-batches and ranks), else
the micro-batch's own item count (sequence classifiers: its rows). The first sum is exactly the
nominal loss, so the gradient is, in expectation over the drawn rows, two_pass's gradient of J,
micro-batch by micro-batch, for any accumulation. The loss's value is the nominal loss alone (the
copies enter as x - x.detach()), so logs read as two_pass's.
"""

import contextlib
import dataclasses
from dataclasses import dataclass, field

import torch

from ..batch import batch_size_of
from ..best_response import bounded_row_losses
from ..choices import target
from ..choices.modes import FUSED
from .base import TrapMode
from .fused_batch import append_rows, check_rows_are_samples, fused_batch
from .row_losses import row_loss_function
from .step import capture_rng_state


@dataclass
class FusedPlan:
    """One micro-batch of the fused step: b original rows, then copies of `rows` at `copy_scales`.

    `nominal_sum` and `rescaled_sums` (per scale, already weighted 1/f) are filled by the forward, for the logs."""

    batch_size: int
    rows: torch.Tensor
    copy_scales: torch.Tensor
    copy_weights: torch.Tensor
    copy_scale_index: torch.Tensor
    num_scales: int
    fraction: float
    nominal_sum: torch.Tensor | None = None
    rescaled_sums: torch.Tensor | None = None
    calls: int = field(default=0)
    rescaled_cap: float | None = None  # trap_ascent='capped' (best_response.py)
    nominal_weight: float = 1.0  # the original rows' weight in the nominal loss (`split.SplitPlan`: 1 / (1 - K*f))

    @classmethod
    def build(
        cls, batch_size: int, rows: list[torch.Tensor], scales: list[float], coefficients: list[float], fraction: float
    ) -> "FusedPlan":
        """`coefficients[k]` multiplies L(s_k) in J (-lambda * w(s_k) / K); copies weigh it 1/fraction."""
        counts = [len(r) for r in rows]

        def per_copy(values, dtype):
            return torch.tensor([v for v, n in zip(values, counts) for _ in range(n)], dtype=dtype)

        return cls(
            batch_size=batch_size,
            rows=torch.cat(rows) if rows else torch.zeros(0, dtype=torch.long),
            copy_scales=per_copy(scales, torch.float32),
            copy_weights=per_copy([c / fraction for c in coefficients], torch.float64),
            copy_scale_index=per_copy(range(len(rows)), torch.long),
            num_scales=len(scales),
            fraction=fraction,
        )

    @property
    def num_copies(self) -> int:
        return len(self.rows)

    @property
    def weighs_rows(self) -> bool:
        """Whether the loss is not the model's own: copies to weigh, or original rows weighted other than 1."""
        return self.num_copies > 0 or self.nominal_weight != 1

    def arrange(self, inputs: dict) -> dict:
        """The model's inputs for the fused batch: the micro-batch followed by the copies."""
        return append_rows(inputs, self.rows, self.batch_size)

    def sample_scales(self, device) -> torch.Tensor:
        """The scale of every row of the fused batch: 1 for the originals, then the copies'."""
        return torch.cat([torch.ones(self.batch_size), self.copy_scales]).to(device)

    def combine(self, row_sums: torch.Tensor, normaliser, counts: torch.Tensor | None = None) -> torch.Tensor:
        """sum_{i<b} l_i / D + (x - x.detach()) with x = sum_j c_j l_{b+j} / D: J's gradient, the nominal value."""
        b = self.batch_size
        normaliser = torch.as_tensor(normaliser, device=row_sums.device)
        nominal = row_sums[:b].sum() * self.nominal_weight / normaliser
        weights = self.copy_weights.to(device=row_sums.device, dtype=row_sums.dtype)
        ascended = row_sums[b:]
        if self.rescaled_cap is not None:
            ascended = bounded_row_losses(ascended, counts[b:], self.rescaled_cap)
        copies = (ascended * weights).sum() / normaliser
        self.record(row_sums[:b].sum(), row_sums[b:])
        return nominal + (copies - copies.detach())

    def record(self, nominal_sum: torch.Tensor, copy_sums: torch.Tensor) -> None:
        """Keep the originals' summed loss and, per scale, the copies' (weighted 1/f), for the logs."""
        index = self.copy_scale_index.to(copy_sums.device)
        per_scale = torch.zeros(self.num_scales, device=copy_sums.device, dtype=torch.float32)
        per_scale.index_add_(0, index, copy_sums.detach().float())
        self.nominal_sum = nominal_sum.detach().float() * self.nominal_weight
        self.rescaled_sums = per_scale / self.fraction

    def rescaled_loss(self, nominal_loss: torch.Tensor) -> torch.Tensor:
        """The re-scaled loss averaged over the scales, scaled like the nominal loss: two_pass's trap/rescaled_loss."""
        if not self.num_copies:
            return torch.zeros(())
        ratio = self.rescaled_sums.mean() / self.nominal_sum
        return torch.where(self.nominal_sum != 0, nominal_loss * ratio, torch.zeros_like(ratio))


class Fused(TrapMode):
    declared = FUSED
    plan_class = FusedPlan  # how the drawn rows enter the one pass: appended as copies

    def __init__(self):
        self.row_losses = None  # the model's per-row loss (`row_losses.row_loss_function`)
        self.targets = None  # where the per-row scales act (the update kind's `copy_row_targets`)
        self.checked = False  # whether row_losses was checked against the model's own loss

    def unsupported(self, step):
        reason = super().unsupported(step)
        if reason is None:
            try:
                self.prepare(step)
            except (ValueError, NotImplementedError) as error:
                reason = str(error)
                self.row_losses = self.targets = None
        return reason

    def prepare(self, step):
        refusal = self.declared.loss_refusal(step.trainer_loss, target(step.args.trap_target))
        if refusal:
            raise ValueError(refusal)
        model = step.model
        self.targets = step.update.copy_row_targets(model, step.args)
        self.row_losses = row_loss_function(model)
        self.checked = False  # against the model's own loss, at the first fused micro-batch

    def run(self, step, batch):
        model, inputs, num_items_in_batch, scales, offray = batch
        args = step.args
        if self.row_losses is None:  # trap_mode or trap_lambda set after construction
            self.prepare(step)
        check_rows_are_samples(inputs)
        batch_size = batch_size_of(inputs)
        coefficients = [step.coefficient(scale, len(scales)) for scale in scales]
        rows = step.rows(batch_size) if scales else []  # none with trap_lambda=0 and off-ray terms
        plan = self.plan_class.build(batch_size, rows, scales, coefficients, args.trap_rescaled_fraction)
        plan.rescaled_cap = step.ascent_cap
        unwrapped = step.model
        check = plan.weighs_rows and not self.checked
        rng_state = capture_rng_state()
        with contextlib.ExitStack() as stack:
            if offray:  # the step's last backward is its last off-ray pass
                stack.enter_context(step.not_last_backward(model))
            if plan.num_copies:
                stack.enter_context(
                    step.update.rescaled_copies(unwrapped, plan, scales, step.reference, self.targets, args.device)
                )
            if plan.weighs_rows:
                found = stack.enter_context(fused_batch(unwrapped, plan, self.row_losses, check_model_loss=check))
            nominal = step.plain(model, dict(inputs), num_items_in_batch)
            if check:  # the normaliser the model's own loss was found to use, from now on
                self.row_losses = dataclasses.replace(self.row_losses, **found)
                self.checked = True
        step.record("nominal_loss", nominal)
        if scales:
            step.record("rescaled_loss", plan.rescaled_loss(nominal))
        for k, scale in enumerate(scales):
            step.record_scale(k, scale)
        if offray:
            step.offray_passes(batch, rng_state)
        return nominal
