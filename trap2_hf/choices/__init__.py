"""The choices a user makes in the protection settings, as facts: the trap modes (`modes.py`), the update kinds
(`targets.py`) and the off-ray terms with the ranges they draw from (`offray.py`). Pure data, no torch: the settings
validate against it, the trainer, the modes, the model card and the audit read it, and no other module compares the
names."""

from .modes import AUTO, AUTO_ORDER, FALLBACK, MODES, TRAP_MODES, AutoChoice, Mode, TrainerLoss, mode
from .targets import TARGETS, Target, card_target, per_target, target

__all__ = [
    "AUTO",
    "AUTO_ORDER",
    "FALLBACK",
    "MODES",
    "TARGETS",
    "TRAP_MODES",
    "AutoChoice",
    "Mode",
    "Target",
    "TrainerLoss",
    "card_target",
    "mode",
    "per_target",
    "target",
]
