"""'fused': ONE forward/backward over the micro-batch plus re-scaled copies of the rows drawn for each scale, each
copy at its own scale (the maths: `trap2_hf/fused.py`; the per-row re-scaling: the update kind's
`rescaled_copies`). Exact only where the model's loss is a sum of per-row losses it can be asked for. The off-ray and
guard passes (`trap_offray`, `trap_guard_lambda`) follow as separate passes over the micro-batch, as in two_pass."""

import contextlib
import dataclasses

from ..fused import FusedPlan, fused_batch, row_loss_function
from ..rows import batch_size_of, check_rows_are_samples
from .base import TrapMode, capture_rng_state


class Fused(TrapMode):
    name = "fused"
    runs_side_terms = True
    plan_class = FusedPlan  # how the drawn rows enter the one pass: appended as copies

    def __init__(self):
        self.row_losses = None  # the model's per-row loss (`fused.row_loss_function`)
        self.targets = None  # where the per-row scales act (the update kind's `copy_row_targets`)
        self.checked = False  # whether row_losses was checked against the model's own loss

    def unsupported(self, trainer):
        reason = super().unsupported(trainer)
        if reason is None:
            try:
                self.prepare(trainer)
            except (ValueError, NotImplementedError) as error:
                reason = str(error)
                self.row_losses = self.targets = None
        return reason

    def prepare(self, trainer):
        trainer._trap_check_fused(self.name)
        model = trainer.accelerator.unwrap_model(trainer.model)
        self.targets = trainer._trap_update.copy_row_targets(model, trainer.args)
        self.row_losses = row_loss_function(model)
        self.checked = False  # against the model's own loss, at the first fused micro-batch

    def step(self, trainer, model, inputs, num_items_in_batch, scales, offray):
        args = trainer.args
        if self.row_losses is None:  # trap_mode or trap_lambda set after construction
            self.prepare(trainer)
        check_rows_are_samples(inputs)
        batch_size = batch_size_of(inputs)
        coefficients = [trainer.trap_coefficient(scale, len(scales)) for scale in scales]
        rows = trainer._trap_next_rows(batch_size) if scales else []  # none with trap_lambda=0 and off-ray terms
        plan = self.plan_class.build(batch_size, rows, scales, coefficients, args.trap_rescaled_fraction)
        plan.rescaled_cap = trainer._trap_ascent_cap
        unwrapped = trainer.accelerator.unwrap_model(trainer.model)
        check = plan.weighs_rows and not self.checked
        rng_state = capture_rng_state()
        with contextlib.ExitStack() as stack:
            if offray:  # the step's last backward is its last off-ray pass
                stack.enter_context(trainer._trap_not_last_backward(model))
            if plan.num_copies:
                stack.enter_context(
                    trainer._trap_update.rescaled_copies(
                        unwrapped, plan, scales, trainer.trap_reference, self.targets, args.device
                    )
                )
            if plan.weighs_rows:
                found = stack.enter_context(fused_batch(unwrapped, plan, self.row_losses, check_model_loss=check))
            nominal = trainer._trap_plain_step(model, dict(inputs), num_items_in_batch)
            if check:  # the normaliser the model's own loss was found to use, from now on
                self.row_losses = dataclasses.replace(self.row_losses, **found)
                self.checked = True
        trainer._trap_record("nominal_loss", nominal)
        if scales:
            trainer._trap_record("rescaled_loss", plan.rescaled_loss(nominal))
        for k, scale in enumerate(scales):
            trainer._trap_record_scale(k, scale)
        if offray:
            trainer._trap_offray_passes(model, inputs, num_items_in_batch, rng_state, offray)
        return nominal
