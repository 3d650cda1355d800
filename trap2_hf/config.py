"""`Trap2TrainingArguments` and `Trap2SFTConfig`: transformers' and TRL's arguments plus the protection settings
(`settings.py`), validated when they are built."""

from dataclasses import dataclass, field

from transformers import TrainingArguments
from trl import SFTConfig

from .settings import Trap2Settings, check_run_arguments


@dataclass
class Trap2TrainingArguments(TrainingArguments, Trap2Settings):
    """`TrainingArguments` plus the Trap² protection settings (fields prefixed `trap_`)."""

    def __post_init__(self):
        super().__post_init__()
        self.derive_trap_defaults()
        self.validate_trap_settings()
        check_run_arguments(self)


@dataclass
class Trap2SFTConfig(SFTConfig, Trap2Settings):
    """TRL's `SFTConfig` plus the Trap² protection settings (fields prefixed `trap_`).

    The re-weighting defaults to 1/sqrt(s), the paper's choice for language models.
    """

    trap_weighting: str = field(default="inv_sqrt", metadata=Trap2Settings.__dataclass_fields__["trap_weighting"].metadata)

    def __post_init__(self):
        super().__post_init__()
        self.derive_trap_defaults()
        self.validate_trap_settings()
        check_run_arguments(self)
