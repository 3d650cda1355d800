"""The step of the modes whose re-scaled term is separate passes: after the nominal forward/backward, per scale,
one forward/backward inside the re-scaling context over the rows `passes` gives, with the nominal pass's dropout
masks; then the off-ray passes. Only the micro-batch's last backward reduces gradients."""

import contextlib
import logging

from ..rescale_full import split_in_place
from ..rows import batch_size_of
from .base import TrapMode, capture_rng_state

logger = logging.getLogger(__name__)


class PassesMode(TrapMode):
    def passes(self, trainer, inputs, num_items_in_batch, num_scales: int) -> list:
        """Per scale, the (inputs, num_items_in_batch, weight) of its re-scaled pass, its loss times `weight`; None
        where no rank re-scales a row."""
        raise NotImplementedError

    def step(self, trainer, model, inputs, num_items_in_batch, scales, offray):
        passes = self.passes(trainer, inputs, num_items_in_batch, len(scales))
        last = max((k for k, p in enumerate(passes) if p is not None), default=-1)
        if offray:  # the step's last backward is its last off-ray pass
            last = len(scales)
        rng_state = capture_rng_state()
        not_last = trainer._trap_not_last_backward(model) if last >= 0 else contextlib.nullcontext()
        with not_last, _watch_pass_row_targets(trainer):
            nominal = trainer._trap_plain_step(model, dict(inputs), num_items_in_batch)
        trainer._trap_record("nominal_loss", nominal)
        for k, scale in enumerate(scales):
            if passes[k] is None:  # no row of this micro-batch drawn for this scale: an unbiased zero
                trainer._trap_record("rescaled_loss", 0.0)
                trainer._trap_record_scale(k, scale)
                continue
            pass_inputs, pass_items, weight = passes[k]
            coefficient = trainer.trap_coefficient(scale, len(scales))
            # A pass over at most a quarter of the rows frees room for a copy of the weights under plain fine-tuning's
            # peak; over half of them it does not (benchmarks/results/2026-12-02-full-fine-tuning-default.md).
            # Activation checkpointing keeps activations small, so there FullUpdate.rescaled takes no copy.
            quarter = 4 * batch_size_of(pass_inputs) <= batch_size_of(inputs)
            context = trainer.trap_rescaled(scale, weight_copy=quarter)
            rescaled = trainer._trap_side_backward(
                model, pass_inputs, pass_items, rng_state, context, coefficient * weight, last=k == last
            )
            trainer._trap_record("rescaled_loss", rescaled / coefficient / len(scales))
            trainer._trap_record_scale(k, scale)
        if offray:
            trainer._trap_offray_passes(model, inputs, num_items_in_batch, rng_state, offray)
        return nominal


@contextlib.contextmanager
def _watch_pass_row_targets(trainer):
    """Around the first nominal pass: if a module of the update's pass row targets (`trainer._trap_full_rows`) does
    not run, the model reads its parameters some other way, which forming theta_s module by module would miss;
    write theta_s into those parameters instead (`rescale_full.split_in_place`)."""
    targets = trainer._trap_full_rows
    if targets is None or trainer._trap_full_rows_checked:
        yield
        return
    called = set()
    handles = [m.register_forward_pre_hook(lambda *_, n=name: called.add(n)) for name, m, _ in targets]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
    trainer._trap_full_rows_checked = True
    skipped = [name for name, _, _ in targets if name not in called]
    if skipped:
        logger.info(
            "%s holds trainable parameters but did not run as a module: its parameters are read some other way, so "
            "the re-scaled passes write theta0 + s*(theta - theta0) into them instead.",
            skipped[0],
        )
        model = trainer.accelerator.unwrap_model(trainer.model)
        trainer._trap_full_rows, trainer._trap_in_place = split_in_place(model, targets, skipped)
