"""Re-scaling an update, W0 + dW -> W0 + s*dW, for adapters and for full fine-tunes; every context restores the model.

Adapters (`adapter.py`): `rescaled_adapter` puts every trained adapter layer at scale s (LoRA and rsLoRA through
their `scaling`; DoRA, LoHa, LoKr, IA3 and `modules_to_save` copies in output space, exact for layers affine in
their weights); `rescaled_adapter_per_sample` gives row i of the batch its own scale s_i (LoRA and rsLoRA).

Full fine-tunes: theta0 (`snapshot_parameters`) and the model at theta0 + s*(theta - theta0). A whole pass at one
scale, three ways (`full_at_scale.py`):

- `swapped_parameters`: each parameter computes with a new tensor holding theta_s, theta untouched: the cheapest
  (one fused lerp, any module), at the cost of a weight-sized copy while the pass runs;
- module by module (`full_per_row.py` with every row at one scale), writing nothing and holding no copy, for modules
  known to read their parameters in their own forward; `rescaled_parameters_at_scale` writes only the parameters
  read outside their module (`split_in_place`);
- `rescaled_parameters`: written into each parameter's own storage and restored bit for bit, where theta0 is
  offloaded (`trap_reference_device='cpu'`).

And rows at different scales in one pass (`full_per_row.py`, its Linear layer `grouped_linear.py`): the fused and
split steps' re-scaled rows. The update kinds (`updates.py`) pick among them.
"""

from .adapter import (
    AFFINE_LAYERS,
    active_adapter_names,
    adapters_of,
    patched_forward,
    per_sample_targets,
    refuse_methods_without_weight_delta,
    replaced_lora_scaling,
    rescaled_adapter,
    rescaled_adapter_names,
    rescaled_adapter_per_sample,
    trained_adapter_names,
)
from .full_at_scale import (
    rescaled_parameters,
    rescaled_parameters_at_scale,
    snapshot_parameters,
    split_in_place,
    swapped_parameters,
)
from .full_per_row import RowGroups, full_row_targets, rescaled_parameters_per_row
from .grouped_linear import GroupedLinear, lerp_to

__all__ = [
    "AFFINE_LAYERS",
    "GroupedLinear",
    "RowGroups",
    "active_adapter_names",
    "adapters_of",
    "full_row_targets",
    "lerp_to",
    "patched_forward",
    "per_sample_targets",
    "refuse_methods_without_weight_delta",
    "replaced_lora_scaling",
    "rescaled_adapter",
    "rescaled_adapter_names",
    "rescaled_adapter_per_sample",
    "rescaled_parameters",
    "rescaled_parameters_at_scale",
    "rescaled_parameters_per_row",
    "snapshot_parameters",
    "split_in_place",
    "swapped_parameters",
    "trained_adapter_names",
]
