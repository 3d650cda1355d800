"""The off-ray terms by name: what each part of a term is and which ranges of the settings its draws use.

Pure data (no torch), so the settings validate `trap_offray` without importing training code. The transform each
part stands for is in `offray/transforms.py`, in tables keyed by the same names.

A term is at most one own-update transform and at most one partner, joined by '+' ('dare', 'synthetic',
'dare+foreign'); without an own transform the own update is re-scaled ('scale'). 'guard' is the term of the guard
pass (`trap_guard_lambda`), never listed in `trap_offray`, and its loss is minimised.
"""

from dataclasses import dataclass

from .modes import side_terms_refusal
from .targets import target


@dataclass(frozen=True)
class Range:
    """A range of the settings that draws are uniform on: the names of its two fields."""

    low: str
    high: str
    example: str
    at_most_one: bool = False  # a rate: the range must lie in (0, 1]


# Checked, and drawn, in this order.
RANGES = {
    "weight": Range("trap_offray_weight_min", "trap_offray_weight_max", "a positive weight range such as 0.3-2.0"),
    "keep": Range("trap_offray_keep_min", "trap_offray_keep_max", "keep rates in (0, 1] such as 0.1-0.9", True),
    "coef": Range("trap_foreign_coef_min", "trap_foreign_coef_max", "a positive coefficient range such as 0.3-2.0"),
}


@dataclass(frozen=True)
class Part:
    """An own-update transform or a partner update; `ranges`: the `RANGES` its draw takes values from."""

    name: str
    ranges: tuple[str, ...] = ()
    needs_foreign_adapters: bool = False  # one coefficient per trap_foreign_adapters entry (else one, if a partner)
    per_layer_weight: bool = False  # each layer draws its own weight from the weight range (the pass's weight is 1)


OWN_PARTS = {
    part.name: part
    for part in (
        Part("scale", ("weight",)),
        Part("dare", ("weight", "keep")),
        Part("prune", ("weight", "keep")),
        Part("factor_dare", ("weight", "keep")),
        Part("della", ("weight", "keep")),
        Part("layer_scale", ("weight",), per_layer_weight=True),
    )
}
PARTNER_PARTS = {
    part.name: part
    for part in (
        Part("foreign", ("coef",), needs_foreign_adapters=True),
        Part("synthetic", ("coef",)),
        Part("spectral", ("coef",)),
    )
}
GUARD = "guard"
GUARD_PART = Part(GUARD)
# What one may list in trap_offray ('scale' is the default own part, never written).
OWN_TRANSFORMS = tuple(name for name in OWN_PARTS if name != "scale")
PARTNERS = tuple(PARTNER_PARTS)


@dataclass(frozen=True)
class Term:
    """A parsed term: its own part and its partner (None: no partner)."""

    name: str
    own: Part
    partner: Part | None = None

    @property
    def is_guard(self) -> bool:
        """The guard term's loss is minimised (weight trap_guard_lambda); every other term's is maximised."""
        return self.own is GUARD_PART

    @property
    def needs_foreign_adapters(self) -> bool:
        return self.partner is not None and self.partner.needs_foreign_adapters

    @property
    def draws_keep(self) -> bool:
        return "keep" in self.own.ranges

    def num_coefs(self, num_foreign: int) -> int:
        if self.partner is None:
            return 0
        return num_foreign if self.partner.needs_foreign_adapters else 1


def term(name: str) -> Term:
    """The `Term` of a canonical term name (as `parse_terms` returns them, or 'guard')."""
    if name == GUARD:
        return Term(GUARD, GUARD_PART)
    parts = name.split("+")
    own = next((OWN_PARTS[p] for p in parts if p in OWN_TRANSFORMS), OWN_PARTS["scale"])
    partner = next((PARTNER_PARTS[p] for p in parts if p in PARTNERS), None)
    return Term(name, own, partner)


def parse_terms(spec) -> list[str]:
    """The canonical term list of a `trap_offray` value: a comma-separated string or a list of terms,
    each an own transform and/or a partner joined by '+' (e.g. 'dare+foreign'). Raises ValueError."""
    if spec is None:
        return []
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    terms = []
    for item in items:
        item = str(item).strip()
        if not item:
            continue
        parts = [p.strip() for p in item.split("+")]
        unknown = [p for p in parts if p not in OWN_TRANSFORMS + PARTNERS]
        own = [p for p in parts if p in OWN_TRANSFORMS]
        partner = [p for p in parts if p in PARTNERS]
        if unknown or len(own) > 1 or len(partner) > 1:
            raise ValueError(
                f"trap_offray term {item!r} is not valid: a term is at most one of {', '.join(OWN_TRANSFORMS)} and/or "
                f"at most one of {', '.join(PARTNERS)}, joined by '+' (e.g. 'dare', 'synthetic', 'dare+foreign')."
            )
        terms.append("+".join(own + partner))
    return terms


def check_offray_settings(settings) -> None:
    """Refuse off-ray / guard settings (`Trap2Settings`' trap_offray*, trap_guard*, trap_foreign*) that are out of
    range or that the chosen update kind and mode cannot run, naming the fix."""
    terms = settings.trap_offray_terms  # raises on an unknown term
    for name in ("trap_offray_lambda", "trap_guard_lambda", "trap_guard_noise"):
        value = getattr(settings, name)
        if not (isinstance(value, (int, float)) and value >= 0):
            raise ValueError(f"{name} must be >= 0, got {value!r}.")
    fraction = settings.trap_offray_fraction
    if not (isinstance(fraction, (int, float)) and 0 < fraction <= 1):
        raise ValueError(
            f"trap_offray_fraction must be in (0, 1], got {fraction!r}; e.g. 0.25 runs each off-ray pass on a quarter "
            "of the micro-batch's rows, 1 on all of them."
        )
    if settings.trap_offray_shared_weight and not any(term(t).partner for t in terms):
        raise ValueError(
            f"trap_offray_shared_weight=True sets the partners' coefficients, but trap_offray={settings.trap_offray!r} "
            "has no partner term; add one (e.g. trap_offray='spectral') or drop trap_offray_shared_weight."
        )
    if not (isinstance(settings.trap_offray_per_step, int) and settings.trap_offray_per_step >= 1):
        raise ValueError(f"trap_offray_per_step must be an integer >= 1, got {settings.trap_offray_per_step!r}.")
    candidates = settings.trap_offray_candidates
    if not (isinstance(candidates, int) and (candidates == 0 or candidates >= settings.trap_offray_per_step)):
        raise ValueError(
            f"trap_offray_candidates must be 0 (off) or an integer >= trap_offray_per_step "
            f"({settings.trap_offray_per_step}), got {candidates!r}; e.g. trap_offray_candidates=4."
        )
    if candidates and not terms:
        raise ValueError(
            f"trap_offray_candidates={candidates} picks among off-ray draws, but trap_offray is empty. Set trap_offray "
            "(e.g. trap_offray='synthetic') or drop trap_offray_candidates."
        )
    for declared in RANGES.values():
        a, b = getattr(settings, declared.low), getattr(settings, declared.high)
        if not (a > 0 and a <= b):
            raise ValueError(f"{declared.low} ({a}) must be > 0 and <= {declared.high} ({b}); use {declared.example}.")
    for declared in RANGES.values():
        if declared.at_most_one and getattr(settings, declared.high) > 1:
            raise ValueError(f"{declared.high} must be <= 1, got {getattr(settings, declared.high)}.")
    uses_foreign = any(term(t).needs_foreign_adapters for t in terms)
    if uses_foreign and not settings.trap_foreign_adapters:
        raise ValueError(
            f"trap_offray={settings.trap_offray!r} has a 'foreign' term but trap_foreign_adapters is empty. List "
            "the folders of other LoRA adapters of the same base, or use 'synthetic' instead of 'foreign'."
        )
    if settings.trap_foreign_adapters and not uses_foreign:
        raise ValueError(
            f"trap_foreign_adapters is set ({settings.trap_foreign_adapters}) but no trap_offray term uses it. Add a "
            "'foreign' term (e.g. trap_offray='foreign') or drop trap_foreign_adapters."
        )
    if terms or settings.trap_guard_lambda > 0:
        if not target(settings.trap_target).is_adapter:
            raise ValueError(
                f"trap_offray / trap_guard_lambda transform a LoRA adapter's weights; trap_target="
                f"{settings.trap_target!r} is not supported. Use trap_target='adapter' with a LoRA adapter, or drop them."
            )
        refusal = side_terms_refusal(settings)
        if refusal:
            raise ValueError(refusal)
