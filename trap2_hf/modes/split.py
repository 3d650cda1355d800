"""'split': ONE forward/backward over the micro-batch itself, the rows drawn for each scale computing at that scale
instead of at 1 (the maths: `trap2_hf/split.py`): no copies, so plain fine-tuning's activation memory, at the price
of a nominal loss over the rows left (1 - K*f of them, weighted up). Everything else is fused's; the settings refuse
a fraction that would draw a row for two scales (`mode_settings.check_mode_settings`)."""

from ..split import SplitPlan
from .fused import Fused


class Split(Fused):
    name = "split"
    plan_class = SplitPlan
