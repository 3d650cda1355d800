"""trap2_hf: unmergeable fine-tunes (Trap², ICML 2026) for transformers, PEFT and TRL."""

from .config import Trap2Settings, Trap2SFTConfig, Trap2TrainingArguments
from .hub import load_protected_adapter
from .objective import rescaled_loss_coefficient, sample_scales, scale_weight, trap_objective
from .rescale import rescaled_adapter, rescaled_parameters, rescaled_update, snapshot_parameters
from .trainer import Trap2SFTTrainer, Trap2Trainer

__version__ = "0.1.0"

__all__ = [
    "Trap2Settings",
    "Trap2SFTConfig",
    "Trap2SFTTrainer",
    "Trap2Trainer",
    "Trap2TrainingArguments",
    "load_protected_adapter",
    "rescaled_adapter",
    "rescaled_loss_coefficient",
    "rescaled_parameters",
    "rescaled_update",
    "sample_scales",
    "scale_weight",
    "snapshot_parameters",
    "trap_objective",
]
