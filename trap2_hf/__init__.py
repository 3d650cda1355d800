"""trap2_hf: unmergeable fine-tunes (Trap², ICML 2026) for transformers, PEFT and TRL."""

from ._lazy import lazy_exports
from ._warnings import ignore_peft_deprecation as _ignore_peft_deprecation

__version__ = "0.1.0"

_EXPORTS = {
    "Trap2Settings": ".settings",
    "Trap2SFTConfig": ".config",
    "Trap2SFTTrainer": ".trainer",
    "Trap2Trainer": ".trainer",
    "Trap2TrainingArguments": ".config",
    "ReleaseTracer": ".trace",
    "load_protected_adapter": ".hub",
    "rescaled_adapter": ".rescale",
    "rescaled_loss_coefficient": ".objective",
    "rescaled_parameters": ".rescale",
    "rescaled_update": ".updates",
    "sample_scales": ".objective",
    "scale_weight": ".objective",
    "snapshot_parameters": ".rescale",
    "trace_release": ".trace",
    "trap_objective": ".objective",
}
__all__ = list(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)
_ignore_peft_deprecation()  # PEFT's read of a deprecated transformers name (_warnings.py)
