"""Skipping a step whose gradients are not finite (an overflow at an off-nominal scale), instead of letting the
optimizer write NaN into the update."""

import logging
import math

import torch
from transformers import TrainerCallback

logger = logging.getLogger(__name__)


class SkipNonFiniteStep(TrainerCallback):
    """Drops the gradients of a step whose gradients are not finite, so the optimizer skips it.

    The test is the step's gradient norm, which the Trainer has just computed (`_get_grad_norm`, kept in the
    trainer's `trap_grad_norm`): a norm is finite exactly when every gradient is (an overflowing sum of squares
    counts as not finite). The count goes into the trainer's `trap_skipped_steps`."""

    def __init__(self, trainer):
        self.trainer = trainer
        self.trainable = None

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        norm, self.trainer.trap_grad_norm = self.trainer.trap_grad_norm, None
        if norm is None:  # a Trainer that computed none: take it here
            if self.trainable is None:
                self.trainable = [p for p in model.parameters() if p.requires_grad]
            grads = [p.grad for p in self.trainable if p.grad is not None]
            if not grads:
                return
            norm = torch.nn.utils.get_total_norm(grads)
        if math.isfinite(norm.item() if torch.is_tensor(norm) else norm):
            return
        for p in model.parameters():
            p.grad = None
        self.trainer.trap_skipped_steps += 1
        logger.warning(
            "Step %d: non-finite gradients (an overflow at an off-nominal scale?); the optimizer step is skipped "
            "(%d skipped so far).",
            state.global_step + 1,
            self.trainer.trap_skipped_steps,
        )
