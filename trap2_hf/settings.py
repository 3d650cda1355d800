"""The protection settings, defined once; `config.py` mixes them into `TrainingArguments` and TRL's `SFTConfig`.

Kept free of transformers and TRL so that what only reads or writes settings (`trap2 card`, the model card)
starts without importing them. Every field is a dataclass field with `help` metadata, so it is a command-line flag and a YAML key
with no extra code, and the model card records exactly these values.
"""

import math
from dataclasses import dataclass, field, fields

from .choices import MODES, TARGETS, TRAP_MODES
from .choices import modes as mode_choices
from .choices import targets as target_choices
from .choices.offray import check_offray_settings, parse_terms
from .scale_settings import check_rim_settings

WEIGHTINGS = ("inv", "inv_sqrt", "none")
SCALE_SAMPLINGS = ("uniform", "stratified")
REFERENCE_DEVICES = ("same", "cpu")
REFERENCE_DTYPES = ("same", "float32", "bfloat16", "float16")
ASCENTS = ("unbounded", "capped")
# What each annotated type of a setting accepts (a bool is an int to Python, never a setting's value).
NUMBER_KINDS = {int: int, float: (int, float), float | None: (int, float, type(None))}


@dataclass
class Trap2Settings:
    """Trap² protection settings (docs/method.md): J = L(1) - lambda * E_s[w(s) * L(s)]."""

    trap_lambda: float = field(
        default=0.05,
        metadata={
            "help": "Weight lambda of the off-nominal (re-scaled) loss, which is maximised. 0 is ordinary "
            "fine-tuning. The paper uses 0.001-0.01; what the default protects against: docs/threat_model.md."
        },
    )
    trap_scale_min: float = field(
        default=0.05, metadata={"help": "Smallest scale s at which the update is re-scaled (> 0)."}
    )
    trap_scale_max: float = field(
        default=2.0,
        metadata={
            "help": "Largest re-scaling s. Equal to trap_scale_min (outside the margin) fixes the scale."
        },
    )
    trap_margin: float = field(
        default=0.05,
        metadata={"help": "Margin delta around s = 1 that is never sampled: s is drawn outside [1-delta, 1+delta]."},
    )
    trap_weighting: str = field(
        default="inv",
        metadata={
            "help": "Re-weighting w(s) of the re-scaled loss, which compensates gradients that shrink for s < 1: "
            "'inv' (1/s, the paper's vision default), 'inv_sqrt' (1/sqrt(s), its LLM default) or 'none'.",
            "choices": list(WEIGHTINGS),
        },
    )
    trap_target: str = field(
        default="adapter",
        metadata={
            "help": target_choices.help_text(),
            "choices": list(TARGETS),
        },
    )
    trap_scales_per_step: int = field(
        default=2,
        metadata={
            "help": "How many scales are drawn per optimizer step; each costs one more forward/backward pass "
            "(on a fraction of the rows in sub_batch and fused modes). The re-scaled term is averaged over them."
        },
    )
    trap_scale_sampling: str = field(
        default="stratified",
        metadata={
            "help": "'uniform': every scale uniform on [min, 1-delta] U [1+delta, max]. 'stratified': the "
            "scales of one step alternate between the two sides of 1 (uniform within each side).",
            "choices": list(SCALE_SAMPLINGS),
        },
    )
    trap_reference_device: str = field(
        default="same",
        metadata={
            "help": "Full fine-tuning only: where theta0 (the weights at the start) is kept: 'same' as the "
            "parameter or 'cpu' (offloaded).",
            "choices": list(REFERENCE_DEVICES),
        },
    )
    trap_reference_dtype: str = field(
        default="same",
        metadata={
            "help": "Full fine-tuning only: dtype of the theta0 copy ('same' as the parameter, 'float32', "
            "'bfloat16', 'float16').",
            "choices": list(REFERENCE_DTYPES),
        },
    )

    trap_mode: str = field(
        default="auto", metadata={"help": mode_choices.help_text(), "choices": list(TRAP_MODES)}
    )
    trap_rescaled_fraction: float | None = field(default=None, metadata={"help": mode_choices.fraction_help()})

    trap_offray: str = field(
        default="",
        metadata={
            "help": "Off-ray terms (beyond the paper; off by default): the loss is also maximised where merges other "
            "than a re-scaling put the update. Comma-separated; each term is at most one own-update transform "
            "('dare': random drop-and-rescale, 'prune': magnitude top-k, 'factor_dare': drop-and-rescale of each "
            "LoRA factor at weight sqrt(w) each, 'della': DELLA's magnitude-ranked drop, 'layer_scale': one weight per "
            "layer from the weight range) and at most one partner ('foreign': the trap_foreign_adapters "
            "added at coefficients c_j, 'synthetic': a random low-rank update of the layer's own dW norm times c, "
            "'spectral': the same inside the span of the top singular directions of the layer's base weight), "
            "joined by '+', e.g. 'dare,synthetic' or 'dare+foreign'. LoRA adapters only; trap_mode "
            f"{mode_choices.side_terms_modes()}."
        },
    )
    trap_offray_lambda: float | None = field(
        default=None,
        metadata={"help": "Weight of the off-ray terms (maximised, like trap_lambda). Unset: trap_lambda."},
    )
    trap_offray_per_step: int = field(
        default=1,
        metadata={
            "help": "Off-ray passes per optimizer step (each one more forward/backward); the terms of trap_offray "
            "are taken in turn and averaged."
        },
    )
    trap_offray_weight_min: float = field(
        default=0.3, metadata={"help": "Smallest weight w of the own update in an off-ray term (uniform draw)."}
    )
    trap_offray_weight_max: float = field(
        default=2.0,
        metadata={"help": "Largest weight w of the own update in an off-ray term; the range should include 1."},
    )
    trap_offray_keep_min: float = field(
        default=0.1,
        metadata={"help": "Smallest keep rate of 'dare'/'factor_dare' (density kept by 'prune'), in (0, 1]."},
    )
    trap_offray_keep_max: float = field(
        default=0.9, metadata={"help": "Largest keep rate / density of the sparsifying off-ray terms, in (0, 1]."}
    )
    trap_foreign_adapters: list[str] = field(
        default_factory=list,
        metadata={
            "help": "Folders of other LoRA adapters of the same base (PEFT save_pretrained output) used by the "
            "'foreign' term. Loaded once, frozen, never saved into the protected update."
        },
    )
    trap_foreign_coef_min: float = field(
        default=0.3,
        metadata={"help": "Smallest coefficient c of a foreign or synthetic partner update (uniform draw, > 0)."},
    )
    trap_foreign_coef_max: float = field(
        default=2.0, metadata={"help": "Largest coefficient c of a foreign or synthetic partner update."}
    )
    trap_guard_lambda: float = field(
        default=0.0,
        metadata={
            "help": "Weight of a guard term that is MINIMISED: the loss at dW plus small dense noise (trap_guard_noise "
            "* ||dW|| per layer), so the update stays robust to quantization-sized perturbations. 0: off."
        },
    )
    trap_guard_noise: float = field(
        default=0.05, metadata={"help": "Norm of the guard term's noise relative to each layer's ||dW||."}
    )

    # --- The attacker's best response (best_response.py): off by default; docs/experimental.md has its measurements.
    trap_scale_candidates: int = field(
        default=0,
        metadata={
            "help": "Worst-case scales (beyond the paper; 0: off, the scales are drawn at random). With C > 0, each "
            "micro-batch evaluates its loss without gradient at C candidate scales, drawn stratified over the support "
            "cut at the rim (0.75-1.3, where informed merges put the update), and the step's trap_scales_per_step "
            "ascent scales go to the lowest-loss (most-recovering) candidates. Costs C forwards, without backward, "
            "over trap_candidate_fraction of the micro-batch's rows. Must be >= trap_scales_per_step."
        },
    )
    trap_offray_candidates: int = field(
        default=0,
        metadata={
            "help": "Worst-case off-ray draws (0: off). With C > 0, each micro-batch draws C off-ray terms, evaluates "
            "their loss without gradient on trap_candidate_fraction of its rows, and ascends at the "
            "trap_offray_per_step lowest-loss (most-recovering) ones. Must be >= trap_offray_per_step."
        },
    )
    trap_candidate_fraction: float = field(
        default=0.25,
        metadata={"help": "Fraction of each micro-batch's rows the candidate scales / off-ray draws are evaluated on."},
    )
    trap_candidate_temperature: float = field(
        default=0.0,
        metadata={
            "help": "0: the ascent scales are the lowest-loss candidates. T > 0: they are drawn among the candidates "
            "with probability proportional to exp(-loss / T) (loss in nats), so scales already broken still get "
            "some of the ascent."
        },
    )
    trap_ascent: str = field(
        default="unbounded",
        metadata={
            "help": "'unbounded': the paper's gradient ascent on the re-scaled loss. 'capped' (beyond the paper): "
            "each re-scaled row's loss is maximised only up to trap_ascent_cap (min(loss, cap)), so no gradient "
            "goes to rows already broken past chance. Applies to every maximised term, off-ray ones too; the "
            "logged trap/rescaled_loss of two_pass and sub_batch is then the capped value.",
            "choices": list(ASCENTS),
        },
    )
    trap_ascent_cap: float | None = field(
        default=None,
        metadata={
            "help": "trap_ascent='capped' only: the per-item loss above which the ascent stops. Unset: the loss of a "
            "chance-level prediction, log(num_labels) for a sequence classifier and log(vocab_size) for a causal "
            "LM; other models must set it (e.g. 1.386 = log 4 for 4 classes)."
        },
    )

    # --- Against merges that put the update near its nominal scale (issue #30): off by default.
    trap_rim_share: float = field(
        default=0.0,
        metadata={
            "help": "Share of the drawn scales taken from the rim of S, its part inside [trap_rim_min, trap_rim_max] "
            "(each draw with this probability; 0: off): where normalising merges or a tuned shared weight put the update."
        },
    )
    trap_rim_min: float = field(default=0.75, metadata={"help": "Lower end of the rim (trap_rim_share)."})
    trap_rim_max: float = field(default=1.3, metadata={"help": "Upper end of the rim (trap_rim_share)."})
    trap_offray_fraction: float = field(
        default=1.0,
        metadata={
            "help": "Fraction of each micro-batch's rows each off-ray pass takes (drawn per pass; the loss stays "
            "unbiased), in (0, 1]: a pass over a quarter of the rows costs about a quarter of one over all of them."
        },
    )
    trap_offray_shared_weight: bool = field(
        default=False,
        metadata={"help": "Partner terms: every partner's coefficient is the own update's weight w, as one shared "
                  "merge weight gives, instead of a draw from [trap_foreign_coef_min, trap_foreign_coef_max]."},
    )

    def __post_init__(self):
        self.derive_trap_defaults()

    def derive_trap_defaults(self) -> None:
        """Fill in the settings whose default depends on others, so what is recorded is what runs."""
        if self.trap_rescaled_fraction is None and self.trap_mode in MODES:
            self.trap_rescaled_fraction = MODES[self.trap_mode].default_fraction(self.trap_scales_per_step)
        # 'auto' is resolved by the trainer, which knows the model (`modes.resolve_auto`).
        if self.trap_offray_lambda is None:
            self.trap_offray_lambda = self.trap_lambda
        if isinstance(self.trap_offray, (list, tuple)):
            self.trap_offray = ",".join(str(t) for t in self.trap_offray)
        if isinstance(self.trap_foreign_adapters, str):
            self.trap_foreign_adapters = [p for p in self.trap_foreign_adapters.split(",") if p.strip()]
        self.trap_foreign_adapters = list(self.trap_foreign_adapters or [])

    @property
    def trap_offray_terms(self) -> list[str]:
        """The parsed off-ray terms (empty: off)."""
        return parse_terms(self.trap_offray)

    @property
    def trap_offray_active(self) -> bool:
        """Whether a step runs off-ray or guard passes."""
        return bool(self.trap_offray_terms and self.trap_offray_lambda) or self.trap_guard_lambda > 0

    def validate_trap_settings(self) -> None:
        """Raise a ValueError that names the field, the value and what is allowed."""
        self._validate_number_types()
        _check_choice("trap_weighting", self.trap_weighting, WEIGHTINGS)
        _check_choice("trap_target", self.trap_target, TARGETS)
        _check_choice("trap_scale_sampling", self.trap_scale_sampling, SCALE_SAMPLINGS)
        _check_choice("trap_reference_device", self.trap_reference_device, REFERENCE_DEVICES)
        _check_choice("trap_reference_dtype", self.trap_reference_dtype, REFERENCE_DTYPES)
        if not self.trap_lambda >= 0:
            raise ValueError(
                f"trap_lambda must be >= 0, got {self.trap_lambda}. Use 0 for ordinary fine-tuning or a small "
                "positive value such as 0.01."
            )
        if not self.trap_margin > 0:
            raise ValueError(
                f"trap_margin must be > 0, got {self.trap_margin}: the scale s = 1 itself must never be "
                "sampled. Use a small positive margin such as 0.05."
            )
        if not self.trap_scale_min > 0:
            raise ValueError(
                f"trap_scale_min must be > 0, got {self.trap_scale_min}. Use e.g. 0.05 (the reference default)."
            )
        if self.trap_scale_min > self.trap_scale_max:
            raise ValueError(
                f"trap_scale_min ({self.trap_scale_min}) must be <= trap_scale_max ({self.trap_scale_max})."
            )
        if not trap_scale_intervals(self.trap_scale_min, self.trap_scale_max, self.trap_margin):
            raise ValueError(
                f"No scale in [trap_scale_min, trap_scale_max] = [{self.trap_scale_min}, {self.trap_scale_max}] "
                f"lies outside the margin [1 - trap_margin, 1 + trap_margin] = "
                f"[{1 - self.trap_margin}, {1 + self.trap_margin}]. Widen the range or shrink trap_margin."
            )
        if not (isinstance(self.trap_scales_per_step, int) and self.trap_scales_per_step >= 1):
            raise ValueError(f"trap_scales_per_step must be an integer >= 1, got {self.trap_scales_per_step!r}.")
        mode_choices.check_mode_settings(self)
        check_offray_settings(self)
        check_rim_settings(self)
        self._validate_best_response()

    def _validate_best_response(self) -> None:
        candidates = self.trap_scale_candidates
        if candidates < 0:
            raise ValueError(f"trap_scale_candidates must be >= 0 (0: off), got {candidates}.")
        if 0 < candidates < self.trap_scales_per_step:
            raise ValueError(
                f"trap_scale_candidates={candidates} is fewer than trap_scales_per_step={self.trap_scales_per_step}: "
                "the step's scales are chosen among the candidates. Use at least as many candidates, e.g. "
                f"trap_scale_candidates={max(4, 2 * self.trap_scales_per_step)}, or 0 to turn it off."
            )
        if not 0 < self.trap_candidate_fraction <= 1:
            raise ValueError(
                f"trap_candidate_fraction must be in (0, 1], got {self.trap_candidate_fraction}; e.g. 0.25 evaluates "
                "the candidates on a quarter of each micro-batch."
            )
        if not self.trap_candidate_temperature >= 0:
            raise ValueError(
                f"trap_candidate_temperature must be >= 0, got {self.trap_candidate_temperature}; 0 takes the "
                "lowest-loss candidates, e.g. 1.0 draws them with probability ~ exp(-loss)."
            )
        _check_choice("trap_ascent", self.trap_ascent, ASCENTS)
        cap = self.trap_ascent_cap
        if cap is not None and self.trap_ascent != "capped":
            raise ValueError(
                f"trap_ascent_cap={cap} is set but trap_ascent={self.trap_ascent!r} does not use it; set "
                "trap_ascent='capped' or drop trap_ascent_cap."
            )
        if cap is not None and not (math.isfinite(cap) and cap > 0):
            raise ValueError(
                f"trap_ascent_cap must be a positive number, got {cap}; use the loss of a chance-level prediction, "
                "e.g. 1.386 (log 4) for 4 classes, or leave it unset to take it from the model."
            )

    def _validate_number_types(self) -> None:
        # In Python nothing parses the values: "0.1" would otherwise fail later in a comparison, naming no field.
        # The annotations, not fields' .type: HfArgumentParser rewrites `float | None` there to `float`.
        annotations = Trap2Settings.__annotations__
        for f in fields(Trap2Settings):
            kinds = NUMBER_KINDS.get(annotations[f.name])
            value = getattr(self, f.name)
            if kinds is not None and (not isinstance(value, kinds) or isinstance(value, bool)):
                kind = "an integer" if kinds is int else "a number"
                example = f.default if f.default is not None else 0.25
                raise ValueError(
                    f"{f.name} must be {kind}, got {value!r} (a {type(value).__name__}); pass e.g. {f.name}={example}."
                )

    def trap_settings_dict(self) -> dict:
        """The protection settings as plain values: what the model card and the audit record."""
        return {f.name: getattr(self, f.name) for f in fields(Trap2Settings)}


def trap_scale_intervals(scale_min: float, scale_max: float, margin: float) -> list[tuple[float, float]]:
    """The parts of [scale_min, scale_max] outside (1 - margin, 1 + margin): the support of S."""
    intervals = []
    low_hi = min(scale_max, 1.0 - margin)
    if scale_min <= low_hi:
        intervals.append((scale_min, low_hi))
    high_lo = max(scale_min, 1.0 + margin)
    if high_lo <= scale_max:
        intervals.append((high_lo, scale_max))
    return intervals


def _check_choice(name: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, allowed))}; got {value!r}.")
