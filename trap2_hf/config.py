"""`Trap2TrainingArguments` and `Trap2SFTConfig`: transformers' and TRL's arguments plus the protection settings
(`settings.py`), validated when they are built."""

import os
from dataclasses import dataclass, field

from transformers import TrainingArguments
from trl import SFTConfig

from .settings import Trap2Settings


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
    # TRL turns activation checkpointing on by default through transformers' deprecated `gradient_checkpointing`,
    # which warns on every config built; the default moves to the current name (one given by the user still wins).
    gradient_checkpointing: bool | None = field(
        default=None, metadata=TrainingArguments.__dataclass_fields__["gradient_checkpointing"].metadata
    )

    def __post_init__(self):
        if self.activation_checkpointing is None and self.gradient_checkpointing is None:
            self.activation_checkpointing = True
        super().__post_init__()
        self.derive_trap_defaults()
        self.validate_trap_settings()
        check_run_arguments(self)


def check_run_arguments(args) -> None:
    """Refuse, before any model is loaded, a run that trains nothing (its save would carry a protection card
    for an untrained update) or that could not save what it trained."""
    if args.output_dir and os.path.exists(args.output_dir) and not os.path.isdir(args.output_dir):
        raise ValueError(
            f"output_dir={args.output_dir!r} is a file, not a folder: the update could not be saved there. Pass "
            "a new or existing folder."
        )
    if args.max_steps == 0:
        raise ValueError(
            "max_steps=0 trains nothing (transformers would still run one step), and the saved update would be "
            "labelled protected. Pass max_steps > 0, or leave it at -1 to train for num_train_epochs."
        )
    if args.max_steps < 0 and not args.num_train_epochs > 0:
        raise ValueError(
            f"num_train_epochs={args.num_train_epochs} with max_steps={args.max_steps} trains nothing, and the saved "
            "update would be labelled protected. Pass num_train_epochs > 0 or max_steps > 0."
        )
