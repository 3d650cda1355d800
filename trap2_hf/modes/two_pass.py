"""'two_pass', the reference algorithm: one more forward/backward over the whole micro-batch per scale. Exact for
any update and model, peak memory a plain step's; with fused, the modes that also run the off-ray and guard passes."""

from .passes import PassesMode


class TwoPass(PassesMode):
    name = "two_pass"
    runs_side_terms = True

    def passes(self, trainer, inputs, num_items_in_batch, num_scales):
        return [(inputs, num_items_in_batch, 1.0)] * num_scales
