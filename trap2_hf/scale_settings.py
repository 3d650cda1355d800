"""The scale distribution's rim (`trap_rim_share`, `trap_rim_min`, `trap_rim_max`): the check that needs no model,
kept apart from the sampling (`objective.sample_scales`) so the settings validate without torch."""


def check_rim_settings(settings) -> None:
    """ValueError naming the fix where the rim settings are out of range or miss the support of S."""
    share, low, high = settings.trap_rim_share, settings.trap_rim_min, settings.trap_rim_max
    if not 0 <= share <= 1:
        raise ValueError(f"trap_rim_share must be in [0, 1], got {share}; e.g. 0.5 draws half of the scales on the rim.")
    if not 0 < low <= high:
        raise ValueError(
            f"trap_rim_min ({low}) must be > 0 and <= trap_rim_max ({high}); e.g. trap_rim_min=0.75, trap_rim_max=1.3."
        )
    margin = settings.trap_margin
    below = max(low, settings.trap_scale_min) <= min(high, 1 - margin, settings.trap_scale_max)
    above = max(low, 1 + margin, settings.trap_scale_min) <= min(high, settings.trap_scale_max)
    if share > 0 and not (below or above):
        raise ValueError(
            f"The rim [trap_rim_min, trap_rim_max] = [{low}, {high}] holds no scale that is drawn: S is "
            f"[{settings.trap_scale_min}, {settings.trap_scale_max}] outside [{1 - margin}, {1 + margin}]. Widen the rim "
            "(e.g. 0.75-1.3) or set trap_rim_share=0."
        )
