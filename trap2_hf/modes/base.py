"""The base of the trap modes: how one micro-batch's step computes the re-scaled term.

A mode is a strategy the trainer calls (`Trap2TrainerMixin.training_step`); the modes, their registry and the
order `trap_mode='auto'` tries them are in this package's `__init__`. A mode instance belongs to one trainer and
may keep what it prepared (the fused step's per-row loss).
"""

import torch


class TrapMode:
    name: str = ""
    runs_side_terms = False  # whether the step also runs the off-ray / guard passes (trap_offray, trap_guard_lambda)

    def unsupported(self, trainer) -> str | None:
        """Why this mode would not be exact for `trainer`'s model and settings (None: it is). 'auto' asks."""
        if trainer.args.trap_offray_active and not self.runs_side_terms:
            return "trap_offray / trap_guard_lambda run extra full passes, which only two_pass and fused do"
        return None

    def prepare(self, trainer) -> None:
        """Set up for `trainer`, or raise the ValueError / NotImplementedError that names the fix."""

    def step(self, trainer, model, inputs, num_items_in_batch, scales: list[float], offray: list) -> torch.Tensor:
        """One micro-batch: the nominal loss and the re-scaled term at `scales` (and the `offray` draws), their
        backwards done; returns the nominal loss, as `Trainer.training_step` returns the loss."""
        raise NotImplementedError


def capture_rng_state() -> dict:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])
