"""'split': ONE forward/backward over the micro-batch itself, the rows drawn for each scale computing at that scale
instead of at 1 (the maths: `trap2_hf/split.py`): no copies, so plain fine-tuning's activation memory, at the price
of a nominal loss over the rows left (1 - K*f of them, weighted up). Everything else is fused's."""

from ..split import SplitPlan
from .fused import Fused


class Split(Fused):
    name = "split"
    plan_class = SplitPlan

    def unsupported(self, trainer):
        args = trainer.args
        if args.trap_rescaled_fraction is not None and args.trap_rescaled_fraction * args.trap_scales_per_step >= 1:
            return (
                f"trap_mode='split' leaves each row to the nominal loss or to one scale, so it needs "
                f"trap_rescaled_fraction * trap_scales_per_step < 1 (got {args.trap_rescaled_fraction} * "
                f"{args.trap_scales_per_step})"
            )
        return super().unsupported(trainer)
