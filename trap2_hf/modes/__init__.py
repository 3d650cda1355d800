"""The trap modes: how a step computes the re-scaled term (`trap_mode`), one strategy per file, and `auto`'s rule.

- `two_pass.py`: one more pass over the whole micro-batch per scale (the reference; exact for everything).
- `sub_batch.py`: the same passes over the rows drawn for each scale.
- `fused.py`: one pass over the micro-batch plus re-scaled copies of the drawn rows.
- `split.py`: one pass over the micro-batch, the drawn rows at their scales instead of at 1.

`trap_mode='auto'` tries the modes `AUTO_ORDER` lists for the update kind and runs the first that is exact for the
model and settings (`TrapMode.unsupported`), with the share of rows the order names where trap_rescaled_fraction
is unset (else the mode's own, `mode_settings.MODE_SHARES`); where a step then finds its mode would not be exact for a
batch, it falls back to `FALLBACK` for good. The choice goes into the trainer's own copy of the arguments (a user
may share one arguments object between trainers of different models), so logs, checkpoints and the model card
record what runs.

Adding a mode: a file here with a `TrapMode` subclass, an entry in `MODES`, its default share in
`mode_settings.MODE_SHARES` (which the settings validate without importing this package), and, for auto to pick it, a
place in `AUTO_ORDER`.
"""

import copy
import logging
from typing import NamedTuple

from ..mode_settings import MODE_SHARES, default_rescaled_fraction
from ..rows import NotExactHere
from .base import TrapMode, capture_rng_state, restore_rng_state
from .fused import Fused
from .split import Split
from .sub_batch import SubBatch
from .two_pass import TwoPass

logger = logging.getLogger(__name__)

MODES: dict[str, type[TrapMode]] = {mode.name: mode for mode in (TwoPass, SubBatch, Fused, Split)}
FALLBACK = "two_pass"


class AutoChoice(NamedTuple):
    mode: str
    share: float | None = None  # the share of rows where trap_rescaled_fraction is unset; None: the mode's own
    why: str = ""  # logged with the choice


AUTO_ORDER: dict[str, tuple[AutoChoice, ...]] = {
    "adapter": (AutoChoice("fused"), AutoChoice("two_pass")),
    # Full fine-tuning: the scales share half of each micro-batch's rows, a re-scaled pass over a quarter of them
    # per scale (with theta_s in a copy of the weights, `updates.FullUpdate.rescaled`). That protects as two_pass
    # does, where a quarter of the rows in all, or passes skipped on whole micro-batches, do not. Not 'fused'
    # (fused_full.py): it holds the copies' activations, several times the weights on small models. Not 'split':
    # its nominal loss over half the rows protects less. The measurements: docs/how_a_step_works.md, "Cost".
    "full": (
        AutoChoice("sub_batch", 0.5, "re-scaled passes over half the rows in all keep theta0 the only extra memory"),
        AutoChoice("two_pass"),
    ),
}

__all__ = ["AUTO_ORDER", "FALLBACK", "MODES", "NotExactHere", "TrapMode", "capture_rng_state", "restore_rng_state"]


def get_mode(name: str) -> TrapMode:
    """A new instance of the mode `name`."""
    if name not in MODES:
        raise ValueError(f"Unknown trap_mode {name!r} for a step; use one of {', '.join(map(repr, MODES))}.")
    return MODES[name]()


def resolve_auto(trainer) -> str:
    """trap_mode='auto': the first mode of `AUTO_ORDER` that is exact for `trainer`'s model and settings. Returns
    the line the trainer logs: the choice, and why."""
    trainer.args = copy.copy(trainer.args)
    args = trainer.args
    reasons = []
    for choice in AUTO_ORDER[args.trap_target]:
        reason = trainer._trap_mode_named(choice.mode).unsupported(trainer)
        if reason is not None:
            reasons.append(reason)
            continue
        if choice.share is not None and args.trap_rescaled_fraction is None:
            args.trap_rescaled_fraction = default_rescaled_fraction(choice.share, args.trap_scales_per_step)
        use_mode(args, choice.mode)
        fraction = f" (trap_rescaled_fraction={args.trap_rescaled_fraction:g})" if choice.share is not None else ""
        why = choice.why or (reasons[0] if reasons else "")
        return f"trap_mode='auto' chose {choice.mode!r}{fraction}{f': {why}' if why else ''}."
    raise ValueError(f"trap_mode='auto' found no exact mode: {'; '.join(reasons)}")


def fall_back(trainer, reason: str) -> None:
    """'auto' found, at a step, that the mode it chose would not be exact here: `FALLBACK` from now on."""
    logger.warning("trap_mode='auto' switches from %r to %r: %s", trainer.args.trap_mode, FALLBACK, reason)
    trainer.args.trap_rescaled_fraction = None  # the chosen mode's derived share; the fall-back takes its own
    use_mode(trainer.args, FALLBACK)


def use_mode(args, name: str) -> None:
    """Record `name` as the mode that runs, with its default share where the fraction is unset."""
    if MODE_SHARES[name] is None and args.trap_rescaled_fraction not in (None, 1, 1.0):
        logger.warning(
            "trap_rescaled_fraction=%s is not used: trap_mode='auto' chose %r, which re-scales whole micro-batches.",
            args.trap_rescaled_fraction,
            name,
        )
        args.trap_rescaled_fraction = 1.0
    args.trap_mode = name
    args.derive_trap_defaults()
