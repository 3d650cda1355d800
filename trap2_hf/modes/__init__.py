"""The trap modes' strategies: how a step computes the re-scaled term (`trap_mode`), one strategy per file, and
`auto`'s rule. What each mode is (its share of rows, what it runs, what it refuses, auto's order) is declared in
`choices/modes.py`; a strategy here runs it.

- `two_pass.py`: one more pass over the whole micro-batch per scale (the reference; exact for everything).
- `sub_batch.py`: the same passes over the rows drawn for each scale (`rows.py`).
- `fused.py`: one pass over the micro-batch plus re-scaled copies of the drawn rows (its batch and forward:
  `fused_batch.py`; the per-row losses it weighs: `row_losses.py`).
- `split.py`: one pass over the micro-batch, the drawn rows at their scales instead of at 1.

A strategy is given the trainer's step object (`step.TrapStep`) and the micro-batch, never the trainer.

`trap_mode='auto'` tries the modes `choices.AUTO_ORDER` lists for the update kind and runs the first that is exact
for the model and settings (`TrapMode.unsupported`), with the share of rows the order names where
trap_rescaled_fraction is unset (else the mode's own); where a step then finds its mode would not be exact for a
batch, it falls back to `choices.FALLBACK` for good. Both return a decision (`AutoDecision`), which the trainer
records in its own copy of the arguments (a user may share one arguments object between trainers of different
models), so logs, checkpoints and the model card record what runs.
"""

import logging
from typing import NamedTuple

from ..choices import AUTO_ORDER, FALLBACK, MODES, target
from ..choices.modes import default_rescaled_fraction
from .base import FusedUnsupported, NotExactHere, TrapMode
from .fused import Fused
from .split import Split
from .step import MicroBatch, TrapStep, capture_rng_state, restore_rng_state
from .sub_batch import SubBatch
from .two_pass import TwoPass

logger = logging.getLogger(__name__)

STRATEGIES: dict[str, type[TrapMode]] = {mode.declared.name: mode for mode in (TwoPass, SubBatch, Fused, Split)}
if set(STRATEGIES) != set(MODES):
    raise ImportError(f"Strategies {sorted(STRATEGIES)} and declared modes {sorted(MODES)} differ.")

__all__ = [
    "STRATEGIES",
    "AutoDecision",
    "FusedUnsupported",
    "MicroBatch",
    "NotExactHere",
    "TrapMode",
    "TrapStep",
    "capture_rng_state",
    "fall_back",
    "get_mode",
    "resolve_auto",
    "restore_rng_state",
]


class AutoDecision(NamedTuple):
    """What 'auto' decided: the mode that runs, the trap_rescaled_fraction to record (None: the mode's own), and
    the line the trainer logs."""

    mode: str
    fraction: float | None
    message: str = ""


def get_mode(name: str) -> TrapMode:
    """A new instance of the strategy of the mode `name`."""
    if name not in STRATEGIES:
        raise ValueError(f"Unknown trap_mode {name!r} for a step; use one of {', '.join(map(repr, STRATEGIES))}.")
    return STRATEGIES[name]()


def resolve_auto(step: TrapStep, mode_named) -> AutoDecision:
    """trap_mode='auto': the first mode of `AUTO_ORDER` that is exact for the step's model and settings, asked of
    the instances `mode_named(name)` gives."""
    args = step.args
    reasons = []
    for choice in AUTO_ORDER[target(args.trap_target)]:
        reason = mode_named(choice.mode.name).unsupported(step)
        if reason is not None:
            reasons.append(reason)
            continue
        fraction = args.trap_rescaled_fraction
        if choice.share is not None and fraction is None:
            fraction = default_rescaled_fraction(choice.share, args.trap_scales_per_step)
        if choice.mode.share is None and fraction not in (None, 1, 1.0):
            logger.warning(
                "trap_rescaled_fraction=%s is not used: trap_mode='auto' chose %r, which re-scales whole micro-batches.",
                fraction,
                choice.mode.name,
            )
            fraction = 1.0
        shown = f" (trap_rescaled_fraction={fraction:g})" if choice.share is not None else ""
        why = choice.why or (reasons[0] if reasons else "")
        message = f"trap_mode='auto' chose {choice.mode.name!r}{shown}{f': {why}' if why else ''}."
        return AutoDecision(choice.mode.name, fraction, message)
    raise ValueError(f"trap_mode='auto' found no exact mode: {'; '.join(reasons)}")


def fall_back(args, reason: str) -> AutoDecision:
    """'auto' found, at a step, that the mode it chose would not be exact here: `FALLBACK` from now on, with its own
    share (the chosen mode's derived one is dropped)."""
    logger.warning("trap_mode='auto' switches from %r to %r: %s", args.trap_mode, FALLBACK.name, reason)
    return AutoDecision(FALLBACK.name, None)
