"""The trap modes' settings (`trap_mode`, `trap_rescaled_fraction`): their names, each mode's default share of the
rows, and the checks that need no model. The modes themselves are `modes/`, which imports training code; these
facts stay here so that the settings validate without it."""

DEFAULT_RESCALED_SHARE = 0.25
# Per mode (`modes/`), the share of each micro-batch's rows that the scales of a step re-scale together where
# trap_rescaled_fraction is unset (each scale gets share / trap_scales_per_step); None: whole micro-batches.
# 'auto' resolves to one of these, with the share its order names (`modes.AUTO_ORDER`).
MODE_SHARES = {"two_pass": None, "sub_batch": DEFAULT_RESCALED_SHARE, "fused": DEFAULT_RESCALED_SHARE, "split": 0.5}
TRAP_MODES = ("auto", *MODE_SHARES)


def default_rescaled_fraction(share: float | None, scales_per_step) -> float:
    """trap_rescaled_fraction where it is unset: `share` of the rows for the scales of a step together (each scale
    share / trap_scales_per_step), or 1 (whole micro-batches) for share None."""
    if share is None:
        return 1.0
    scales = scales_per_step if isinstance(scales_per_step, int) else 1
    return share / max(1, scales)


def check_mode_settings(settings) -> None:
    """ValueError naming the fix where trap_mode and trap_rescaled_fraction (and what they need) disagree."""
    mode, fraction, scales = settings.trap_mode, settings.trap_rescaled_fraction, settings.trap_scales_per_step
    if mode not in TRAP_MODES:
        raise ValueError(f"trap_mode must be one of {', '.join(map(repr, TRAP_MODES))}; got {mode!r}.")
    if fraction is not None and not (isinstance(fraction, (int, float)) and 0 < fraction <= 1):
        raise ValueError(
            f"trap_rescaled_fraction must be in (0, 1], got {fraction!r}. Use e.g. 0.25 (a quarter of each "
            "micro-batch is re-scaled) or 1 (all of it)."
        )
    if mode == "two_pass" and fraction not in (None, 1, 1.0):
        raise ValueError(
            f"trap_rescaled_fraction={fraction} needs trap_mode='sub_batch', 'fused' or 'split'; trap_mode='two_pass' "
            "always re-scales the whole micro-batch."
        )
    if mode == "split" and fraction is not None and fraction * scales >= 1:
        raise ValueError(
            f"trap_mode='split' needs trap_rescaled_fraction * trap_scales_per_step < 1 (each row is either nominal "
            f"or at one scale); got {fraction} * {scales}. Use e.g. trap_rescaled_fraction={0.5 / scales:g}."
        )
    if mode in ("fused", "split") and settings.trap_target == "full" and settings.trap_reference_device == "cpu":
        raise ValueError(
            f"trap_mode={mode!r} on a full fine-tune reads theta0 at every step, which trap_reference_device='cpu' "
            "offloads; use trap_mode='sub_batch' or 'two_pass', or trap_reference_device='same'."
        )
