"""The base of the trap modes' strategies: how one micro-batch's step computes the re-scaled term.

A strategy runs the mode its `declared` facts describe (`choices/modes.py`). It is given the trainer's step object
(`step.TrapStep`) and the micro-batch (`step.MicroBatch`), never the trainer. An instance belongs to one trainer
and may keep what it prepared (the fused step's per-row loss).
"""

import torch

from ..choices import Mode, target


class NotExactHere(NotImplementedError):
    """Raised by a mode's step, before any backward, where it finds it would not be exact for this batch: a mode
    'auto' chose then falls back to two_pass."""


class FusedUnsupported(NotExactHere):
    """This batch cannot be run fused (found at its first forward, before any computation); two_pass can."""


class TrapMode:
    declared: Mode

    @property
    def name(self) -> str:
        return self.declared.name

    def unsupported(self, step) -> str | None:
        """Why this mode would not be exact for the step's model and settings (None: it is). 'auto' asks."""
        if step.args.trap_offray_active:
            return self.declared.side_terms_refusal(target(step.args.trap_target))
        return None

    def prepare(self, step) -> None:
        """Set up for the step's model and settings, or raise the ValueError / NotImplementedError that names the
        fix."""

    def run(self, step, batch) -> torch.Tensor:
        """One micro-batch: the nominal loss and the re-scaled term at `batch.scales` (and the `batch.offray` draws),
        their backwards done; returns the nominal loss, as `Trainer.training_step` returns the loss."""
        raise NotImplementedError
