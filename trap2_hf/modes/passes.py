"""The step of the modes whose re-scaled term is separate passes: after the nominal forward/backward, per scale,
one forward/backward inside the re-scaling context over the rows `passes` gives, with the nominal pass's dropout
masks; then the off-ray passes. Only the micro-batch's last backward reduces gradients."""

import contextlib

from ..batch import batch_size_of
from .base import TrapMode
from .step import capture_rng_state


class PassesMode(TrapMode):
    def passes(self, step, batch) -> list:
        """Per scale, the (inputs, num_items_in_batch, weight) of its re-scaled pass, its loss times `weight`; None
        where no rank re-scales a row."""
        raise NotImplementedError

    def run(self, step, batch):
        model, inputs, num_items_in_batch, scales, offray = batch
        passes = self.passes(step, batch)
        last = max((k for k, p in enumerate(passes) if p is not None), default=-1)
        if offray:  # the step's last backward is its last off-ray pass
            last = len(scales)
        rng_state = capture_rng_state()
        not_last = step.not_last_backward(model) if last >= 0 else contextlib.nullcontext()
        with not_last, step.watching_pass_row_targets():
            nominal = step.plain(model, dict(inputs), num_items_in_batch)
        step.record("nominal_loss", nominal)
        for k, scale in enumerate(scales):
            if passes[k] is None:  # no row of this micro-batch drawn for this scale: an unbiased zero
                step.record("rescaled_loss", 0.0)
                step.record_scale(k, scale)
                continue
            pass_inputs, pass_items, weight = passes[k]
            coefficient = step.coefficient(scale, len(scales))
            # A pass over at most a quarter of the rows frees room for a copy of the weights under plain fine-tuning's
            # peak (benchmarks/README.md). Activation checkpointing keeps activations small, so there
            # FullUpdate.rescaled takes no copy.
            quarter = 4 * batch_size_of(pass_inputs) <= batch_size_of(inputs)
            context = step.rescaled(scale, weight_copy=quarter)
            factor = coefficient * weight
            rescaled = step.side(model, pass_inputs, pass_items, rng_state, context, factor, last=k == last)
            step.record("rescaled_loss", rescaled / coefficient / len(scales))
            step.record_scale(k, scale)
        if offray:
            step.offray_passes(batch, rng_state)
        return nominal
