"""The trap modes as facts (`trap_mode`): one declaration per mode and the order `trap_mode='auto'` tries them in,
read by the settings (choices, help, validation), by the strategies that run them (`trap2_hf/modes/`), by `auto`
and by the docs (`modes_doc`, docs/modes.md). Each mode's refusals are written here once, from these facts.

Adding a mode: a `Mode` here, in `MODES`, and (for auto to pick it) in `AUTO_ORDER`; its strategy in
`trap2_hf/modes/`.
"""

from dataclasses import dataclass

from .targets import ADAPTER, FULL, TARGETS, Target, target

DEFAULT_SHARE = 0.25


@dataclass(frozen=True)
class Mode:
    """One value of `trap_mode`.

    name: the value.
    does: what a step does under it (the settings' help and docs/modes.md).
    share: the share of each micro-batch's rows that the scales of a step re-scale together where
        trap_rescaled_fraction is unset (each scale share / trap_scales_per_step); None: whole micro-batches only.
    one_scale_per_row: each row is drawn for at most one scale, so trap_rescaled_fraction * trap_scales_per_step < 1.
    runs_side_terms: the off-ray and guard passes (trap_offray, trap_guard_lambda) run after its step.
    reads_theta0_every_step: on a full fine-tune theta0 is read at every step, so it cannot be offloaded.
    weighs_row_losses: its loss weighs the model's own per-row losses, so the trainer's loss must be the model's.
    folds_token_log_probs: under TRL's fused LM head (`Trap2SFTTrainer`) it folds its terms into the per-token
        log-probs; a mode that weighs row losses without it cannot run there.
    """

    name: str
    does: str
    share: float | None
    one_scale_per_row: bool = False
    runs_side_terms: bool = False
    reads_theta0_every_step: bool = False
    weighs_row_losses: bool = False
    folds_token_log_probs: bool = False

    def default_fraction(self, scales_per_step) -> float:
        """trap_rescaled_fraction where it is unset."""
        return default_rescaled_fraction(self.share, scales_per_step)

    def fraction_refusal(self, fraction, scales_per_step) -> str | None:
        """Why this mode cannot take `fraction` (set by the user) with that many scales per step; None: it can."""
        if self.share is None and fraction not in (None, 1, 1.0):
            takers = _one_of(m.name for m in MODES.values() if m.share is not None)
            return (
                f"trap_rescaled_fraction={fraction} needs trap_mode={takers}; trap_mode={self.name!r} always re-scales "
                "the whole micro-batch."
            )
        if self.one_scale_per_row and fraction is not None and fraction * scales_per_step >= 1:
            return (
                f"trap_mode={self.name!r} needs trap_rescaled_fraction * trap_scales_per_step < 1 (each row is either "
                f"nominal or at one scale); got {fraction} * {scales_per_step}. Use e.g. trap_rescaled_fraction="
                f"{self.share / scales_per_step:g}."
            )
        return None

    def reference_refusal(self, kind: Target, reference_device: str) -> str | None:
        """Why this mode cannot run `kind` with theta0 on `reference_device`; None: it can."""
        if self.reads_theta0_every_step and kind.needs_reference and reference_device == "cpu":
            others = _one_of(alternatives(kind, lambda m: not m.reads_theta0_every_step))
            return (
                f"trap_mode={self.name!r} on {kind.noun} reads theta0 at every step, which trap_reference_device='cpu' "
                f"offloads; use trap_mode={others}, or trap_reference_device='same'."
            )
        return None

    def side_terms_refusal(self, kind: Target) -> str | None:
        """Why this mode cannot run the off-ray / guard passes; None: it can ('auto' picks a mode that can)."""
        if self.runs_side_terms:
            return None
        others = " or ".join(map(repr, alternatives(kind, lambda m: m.runs_side_terms)))
        return (
            f"trap_offray / trap_guard_lambda run extra full passes, which trap_mode={self.name!r} does not; use "
            f"trap_mode={others}."
        )

    def loss_refusal(self, loss: "TrainerLoss", kind: Target) -> str | None:
        """Why this mode is not exact for a trainer whose loss is `loss`, training `kind`; None: it is."""
        if not self.weighs_row_losses:
            return None
        others = _one_of(alternatives(kind, lambda m: not m.weighs_row_losses))
        if loss.token_log_probs and not self.folds_token_log_probs:
            firsts = " and ".join(f"{AUTO_ORDER[k][0].mode.name!r} for {k.noun}" for k in TARGETS.values())
            return (
                f"trap_mode={self.name!r} weights per-row losses, which TRL's fused LM head (SFTTrainer's loss) folds "
                f"into per-token log-probs. Use trap_mode='auto', which picks {firsts}, or Trap2Trainer."
            )
        if loss.token_log_probs and kind.copies_form_weights_per_module:
            return (
                f"trap_mode={self.name!r} on {kind.noun} forms theta0 + s*(theta - theta0) module by module, but TRL's "
                "fused LM head reads lm_head.weight directly, so the copies would see theta there. Use "
                f"trap_mode={others}."
            )
        if loss.token_log_probs and loss.log_probs_inexact:
            return (
                f"trap_mode={self.name!r} folds re-scaled copies into TRL's per-token log-probs, which is exact for "
                f"loss_type='nll' on rows that are samples; got {loss.log_probs_inexact}. Use trap_mode={others}."
            )
        if not loss.own_row_losses:
            return (
                f"trap_mode={self.name!r} weights the model's own per-row losses, which a compute_loss_func or label "
                f"smoothing replaces. Use trap_mode={others}."
            )
        return None


@dataclass(frozen=True)
class TrainerLoss:
    """What a trainer's loss is, as the modes that weigh per-row losses need to know (the trainer says it).

    own_row_losses: the loss is the model's own (no compute_loss_func, no label smoothing).
    token_log_probs: the loss comes from TRL's fused LM head, as per-token log-probs (`Trap2SFTTrainer`).
    log_probs_inexact: why folding terms into those log-probs would not be exact (e.g. another loss_type); "": it is.
    """

    own_row_losses: bool = True
    token_log_probs: bool = False
    log_probs_inexact: str = ""


TWO_PASS = Mode(
    name="two_pass",
    does="the reference algorithm, exact for any update and model: one more forward/backward over the whole "
    "micro-batch per scale; its graphs are never alive at once, so peak memory stays at plain fine-tuning's",
    share=None,
    runs_side_terms=True,
)
SUB_BATCH = Mode(
    name="sub_batch",
    does="two_pass's re-scaled passes over a random fraction trap_rescaled_fraction of the rows, weighted "
    "1/fraction (any update and model; unbiased; plain fine-tuning's memory)",
    share=DEFAULT_SHARE,
)
FUSED = Mode(
    name="fused",
    does="ONE forward/backward over the micro-batch plus re-scaled copies of a random fraction of its rows, each "
    "copy at its own scale (unbiased; the copies' activations on top of plain's). Exact for LoRA/rsLoRA adapters "
    "on causal LMs, encoder-decoders, TRL SFT, sequence classifiers and models declaring trap_sample_losses, and "
    "for full fine-tunes whose trainable parameters all sit in Linear, Conv1D, Embedding or norm layers, with "
    "theta0 on the device",
    share=DEFAULT_SHARE,
    runs_side_terms=True,
    reads_theta0_every_step=True,
    weighs_row_losses=True,
    folds_token_log_probs=True,
)
SPLIT = Mode(
    name="split",
    does="ONE forward/backward over the micro-batch itself, the drawn rows at their scales instead of at 1 and "
    "the others weighted up (plain fine-tuning's memory, a noisier nominal loss); exact where fused is, "
    "except under TRL SFT",
    share=0.5,
    one_scale_per_row=True,
    runs_side_terms=True,
    reads_theta0_every_step=True,
    weighs_row_losses=True,
)
MODES: dict[str, Mode] = {mode.name: mode for mode in (TWO_PASS, SUB_BATCH, FUSED, SPLIT)}
AUTO = "auto"
TRAP_MODES = (AUTO, *MODES)


@dataclass(frozen=True)
class AutoChoice:
    mode: Mode
    share: float | None = None  # the share of rows where trap_rescaled_fraction is unset; None: the mode's own
    why: str = ""  # logged with the choice


# trap_mode='auto': per update kind, the modes tried in turn; the first that is exact for the model and settings
# runs. The last is the fall-back for good where a step finds its mode would not be exact for a batch.
AUTO_ORDER: dict[Target, tuple[AutoChoice, ...]] = {
    ADAPTER: (AutoChoice(FUSED), AutoChoice(TWO_PASS)),
    # Full fine-tuning: the scales share half of each micro-batch's rows, a re-scaled pass over a quarter of them
    # per scale (with theta_s in a copy of the weights, `updates.FullUpdate.rescaled`): this protects as two_pass
    # does, where a quarter of the rows in all does not. Not fused: it holds the copies' activations, several
    # times the weights on small models. Not split: its nominal loss over half the rows protects less
    # (benchmarks/README.md).
    FULL: (
        AutoChoice(SUB_BATCH, 0.5, "re-scaled passes over half the rows in all keep theta0 the only extra memory"),
        AutoChoice(TWO_PASS),
    ),
}
FALLBACK = TWO_PASS


def mode(name: str) -> Mode:
    """The declared mode `name` ('auto' is resolved by the trainer), or a ValueError listing the known ones."""
    if name not in MODES:
        raise ValueError(f"Unknown trap_mode {name!r} for a step; use one of {', '.join(map(repr, MODES))}.")
    return MODES[name]


def alternatives(kind: Target, keep) -> list[str]:
    """The names of the modes for which `keep(mode)` holds: auto's order for `kind` first, then the others."""
    ordered = [choice.mode for choice in AUTO_ORDER[kind]] + list(MODES.values())
    return list(dict.fromkeys(m.name for m in ordered if keep(m)))


def default_rescaled_fraction(share: float | None, scales_per_step) -> float:
    """trap_rescaled_fraction where it is unset: `share` of the rows for the scales of a step together (each scale
    share / trap_scales_per_step), or 1 (whole micro-batches) for share None."""
    if share is None:
        return 1.0
    scales = scales_per_step if isinstance(scales_per_step, int) else 1
    return share / max(1, scales)


def check_mode_settings(settings) -> None:
    """ValueError naming the fix where trap_mode and trap_rescaled_fraction (and what they need) disagree."""
    name, fraction, scales = settings.trap_mode, settings.trap_rescaled_fraction, settings.trap_scales_per_step
    if name not in TRAP_MODES:
        raise ValueError(f"trap_mode must be one of {', '.join(map(repr, TRAP_MODES))}; got {name!r}.")
    if fraction is not None and not (isinstance(fraction, (int, float)) and 0 < fraction <= 1):
        raise ValueError(
            f"trap_rescaled_fraction must be in (0, 1], got {fraction!r}. Use e.g. 0.25 (a quarter of each "
            "micro-batch is re-scaled) or 1 (all of it)."
        )
    if name == AUTO:
        return
    declared, kind = mode(name), target(settings.trap_target)
    refusal = declared.fraction_refusal(fraction, scales) or declared.reference_refusal(
        kind, settings.trap_reference_device
    )
    if refusal:
        raise ValueError(refusal)


def side_terms_refusal(settings) -> str | None:
    """Why the settings' trap_mode cannot run their off-ray / guard passes; None: it can."""
    if settings.trap_mode == AUTO:
        return None
    return mode(settings.trap_mode).side_terms_refusal(target(settings.trap_target))


# ----------------------------------------------------------------------------- what the settings and docs show
def help_text() -> str:
    """`trap_mode`'s help."""
    orders = "; ".join(
        f"for {kind.noun} {', then '.join(_auto_choice(choice) for choice in order)}"
        for kind, order in AUTO_ORDER.items()
    )
    modes = " ".join(f"{m.name!r}: {m.does}." for m in MODES.values())
    return (
        f"How a step computes the re-scaled term. 'auto' (default): the first mode that is exact for the model and "
        f"settings, {orders}; the trainer logs its choice and the model card records it. {modes} Off-ray and guard "
        f"passes run in {side_terms_modes()}. Cost and protection "
        "measured: docs/performance.md."
    )


def side_terms_modes() -> str:
    """The modes that run the off-ray and guard passes, for a sentence."""
    return _one_of(m.name for m in MODES.values() if m.runs_side_terms)


def fraction_help() -> str:
    """`trap_rescaled_fraction`'s help."""
    by_share = {}
    for m in MODES.values():
        by_share.setdefault(m.share, []).append(m.name)
    defaults = "; ".join(
        "1 for " + " and ".join(names) + " (which takes only 1)" if share is None
        else f"{share:g} / trap_scales_per_step for {' and '.join(names)}"
        for share, names in by_share.items()
    )
    auto = "; ".join(
        f"for {kind.noun} {choice.share:g} / trap_scales_per_step where it picks {choice.mode.name}"
        for kind, order in AUTO_ORDER.items() for choice in order if choice.share is not None
    )
    return (
        "Fraction of each micro-batch's rows that each drawn scale re-scales, in (0, 1]; rows are drawn at random "
        f"and weighted by 1/fraction, so the re-scaled loss is unbiased. Unset: {defaults}, so the scales of a step "
        "together re-scale that share of the rows whatever their number; 'auto' takes the share of the mode it "
        f"picks, and {auto}."
    )


def modes_doc() -> str:
    """What each mode does and its facts as a markdown table: the generated part of docs/modes.md (a test keeps the
    two equal)."""
    def yes(flag: bool) -> str:
        return "yes" if flag else "no"

    places = {m.name: [] for m in MODES.values()}
    for kind, order in AUTO_ORDER.items():
        for rank, choice in enumerate(order, 1):
            share = f" (share {choice.share:g})" if choice.share is not None else ""
            ordinal = {1: "1st", 2: "2nd", 3: "3rd"}.get(rank, f"{rank}th")
            places[choice.mode.name].append(f"{kind.name}: {ordinal}{share}")
    adapters = " and ".join(k.name for k in TARGETS.values() if not k.copies_form_weights_per_module)
    lines = ["What a step does in each mode:", ""]
    lines += [f"- `{m.name}`: {m.does}." for m in MODES.values()]
    lines += [
        "",
        "| mode | default share of rows | off-ray / guard passes | θ0 may be offloaded | under TRL SFT "
        "| `auto`'s order |",
        "|---|---|---|---|---|---|",
    ]
    for m in MODES.values():
        share = "all (whole micro-batches)" if m.share is None else f"{m.share:g}"
        sft = "yes" if not m.weighs_row_losses else "no"
        if m.weighs_row_losses and m.folds_token_log_probs:
            sft = f"{adapters} only, `loss_type='nll'` without packing"
        lines.append(
            f"| `{m.name}` | {share} | {yes(m.runs_side_terms)} | {yes(not m.reads_theta0_every_step)} | {sft} | "
            f"{'; '.join(places[m.name]) or '—'} |"
        )
    return "\n".join(lines) + "\n"


def _auto_choice(choice: AutoChoice) -> str:
    if choice.share is None:
        return repr(choice.mode.name)
    return f"{choice.mode.name!r} with the scales sharing {choice.share:g} of each micro-batch's rows"


def _one_of(names) -> str:
    names = [repr(n) for n in names]
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"
