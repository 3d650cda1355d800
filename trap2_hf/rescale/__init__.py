"""Full fine-tuning's re-scaling: theta0 (`snapshot_parameters`) and the model at theta0 + s*(theta - theta0).

A whole pass at one scale, three ways (`at_scale.py`):

- `swapped_parameters`: each parameter computes with a new tensor holding theta_s, theta untouched: the cheapest
  (one fused lerp, any module), at the cost of a weight-sized copy while the pass runs;
- module by module (`per_row.py` with every row at one scale), writing nothing and holding no copy, for modules
  known to read their parameters in their own forward; `rescaled_parameters_at_scale` writes only the parameters
  read outside their module (`split_in_place`);
- `rescaled_parameters`: written into each parameter's own storage and restored bit for bit, where theta0 is
  offloaded (`trap_reference_device='cpu'`).

And rows at different scales in one pass (`per_row.py`, its Linear layer `grouped_linear.py`): the fused and split
steps' re-scaled rows. `FullUpdate` (updates.py) picks among them.
"""

from .at_scale import (
    rescaled_parameters,
    rescaled_parameters_at_scale,
    snapshot_parameters,
    split_in_place,
    swapped_parameters,
)
from .grouped_linear import GroupedLinear, lerp_to
from .per_row import RowGroups, full_row_targets, rescaled_parameters_per_row

__all__ = [
    "GroupedLinear",
    "RowGroups",
    "full_row_targets",
    "lerp_to",
    "rescaled_parameters",
    "rescaled_parameters_at_scale",
    "rescaled_parameters_per_row",
    "snapshot_parameters",
    "split_in_place",
    "swapped_parameters",
]
