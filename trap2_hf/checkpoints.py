"""Checkpoints of a protected run: which are complete, and theta0 (full fine-tuning's reference) saved in each,
so a resumed run protects against the same reference."""

import json
import os
import re

import torch
from safetensors.torch import load_file, save_file
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from .files import ordinary_permissions

REFERENCE_WEIGHTS_NAME = "trap2_reference.safetensors"


def is_complete_checkpoint(folder: str) -> bool:
    """A Trainer checkpoint is complete once its trainer state, which the Trainer writes last, reads back."""
    try:
        with open(os.path.join(folder, TRAINER_STATE_NAME)) as f:
            json.load(f)
    except (OSError, ValueError):
        return False
    return True


def last_complete_checkpoint(output_dir: str) -> str | None:
    if not os.path.isdir(output_dir):
        return None
    steps = {}
    for name in os.listdir(output_dir):
        match = re.fullmatch(rf"{PREFIX_CHECKPOINT_DIR}-(\d+)", name)
        if match and is_complete_checkpoint(os.path.join(output_dir, name)):
            steps[int(match.group(1))] = os.path.join(output_dir, name)
    return steps[max(steps)] if steps else None


def checkpoint_to_resume(resume_from_checkpoint, output_dir: str):
    """What `Trainer.train` resumes from: `True` is the last *complete* checkpoint, so a run that crashed while
    saving resumes from the one before; an incomplete folder is refused, naming the one to use."""
    if resume_from_checkpoint is True:
        resume_from_checkpoint = last_complete_checkpoint(output_dir)
        if resume_from_checkpoint is None:
            raise ValueError(f"No complete checkpoint in {output_dir} to resume from.")
    elif isinstance(resume_from_checkpoint, str) and not is_complete_checkpoint(resume_from_checkpoint):
        previous = last_complete_checkpoint(os.path.dirname(os.path.abspath(resume_from_checkpoint)))
        raise ValueError(
            f"Checkpoint {resume_from_checkpoint} is incomplete (its {TRAINER_STATE_NAME}, written last, is "
            f"missing or unreadable: the save was interrupted). Resume from {previous or 'an earlier checkpoint'} "
            "or pass resume_from_checkpoint=True to take the last complete one."
        )
    return resume_from_checkpoint


def save_reference(reference: dict[str, torch.Tensor], output_dir: str) -> None:
    """theta0 into the checkpoint folder, written whole or not at all."""
    path = os.path.join(output_dir, REFERENCE_WEIGHTS_NAME)
    tmp = path + ".tmp"
    save_file({k: v.contiguous() for k, v in reference.items()}, tmp)
    ordinary_permissions(tmp)
    os.replace(tmp, path)


def load_reference(reference: dict[str, torch.Tensor], checkpoint: str) -> dict[str, torch.Tensor]:
    """The checkpoint's theta0, on the devices and in the dtypes of `reference` (the run's current one)."""
    path = os.path.join(checkpoint, REFERENCE_WEIGHTS_NAME)
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"Resuming a full fine-tune from {checkpoint}, but it has no {REFERENCE_WEIGHTS_NAME} (theta0). "
            "Without it the resumed run would protect against the wrong reference; resume from a checkpoint "
            "written by Trap2Trainer."
        )
    loaded = load_file(path)
    return {name: loaded[name].to(device=current.device, dtype=current.dtype) for name, current in reference.items()}
