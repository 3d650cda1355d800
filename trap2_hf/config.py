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
        cpu_defaults(self)
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
        cpu_defaults(self)
        super().__post_init__()
        self.derive_trap_defaults()
        self.validate_trap_settings()
        check_run_arguments(self)


def cpu_defaults(args) -> None:
    """Defaults that only ask for what the machine has: on a machine without a bf16 device TRL's default
    `bf16=True` (a value left unset) becomes False, so `Trap2SFTConfig(...)` trains on a CPU as `SFTConfig` would on a
    GPU, not fail with "Your setup doesn't support bf16/gpu" (a bf16 the user sets still does); without an
    accelerator the DataLoader cannot pin memory, so `dataloader_pin_memory` is off (True there changes nothing
    but a torch warning on every run)."""
    import torch
    from transformers.utils import is_torch_bf16_gpu_available, is_torch_xla_available

    if getattr(args, "bf16", False) is None and not args.fp16:
        args.bf16 = False if args.use_cpu or not (is_torch_bf16_gpu_available() or is_torch_xla_available()) else None
    if args.dataloader_pin_memory and not torch.accelerator.is_available():
        args.dataloader_pin_memory = False


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
