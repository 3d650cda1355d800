"""The update kinds as facts (`trap_target`): one declaration per kind, read by the settings (choices, help,
validation), the modes, the model card, the loader and the audit. What a kind *does* (check a model, snapshot
theta0, re-scale) is its implementation, `updates.py` for training and `audit/kinds.py` for the audit, each
keyed by these declarations through `per_target`."""

from dataclasses import dataclass


@dataclass(frozen=True)
class Target:
    """One value of `trap_target`.

    name: the value, and the name the implementations are registered under.
    what: what the update is and how it is re-scaled (the settings' help).
    noun: the update in a sentence ("an adapter").
    is_adapter: a PEFT adapter: the card names its PEFT type and the library 'peft', `load_protected_adapter` loads
        it, off-ray terms transform it. Otherwise the card names the update by `name`.
    needs_reference: re-scaling reads theta0, a snapshot of the weights at the start, kept with checkpoints.
    copies_form_weights_per_module: the fused step's re-scaled copies form the re-scaled weights module by module,
        so a weight read outside its module's forward (TRL's fused LM head reads lm_head.weight) is seen unscaled.
    """

    name: str
    what: str
    noun: str
    is_adapter: bool
    needs_reference: bool = False
    copies_form_weights_per_module: bool = False


ADAPTER = Target(
    name="adapter",
    what="the trained PEFT adapter, re-scaled as W0 + s*dW",
    noun="an adapter",
    is_adapter=True,
)
FULL = Target(
    name="full",
    what="every trainable parameter, re-scaled as theta0 + s*(theta - theta0)",
    noun="a full fine-tune",
    is_adapter=False,
    needs_reference=True,
    copies_form_weights_per_module=True,
)
TARGETS: dict[str, Target] = {kind.name: kind for kind in (ADAPTER, FULL)}


def target(name: str) -> Target:
    """The declared kind `name` (a `trap_target` value), or a ValueError listing the known ones."""
    if name not in TARGETS:
        raise ValueError(f"Unknown trap_target {name!r}; use one of {', '.join(map(repr, TARGETS))}.")
    return TARGETS[name]


def card_target(update: str) -> Target:
    """The kind of update a model card's `update` names: a kind's own name, else an adapter's PEFT type ('lora')."""
    return TARGETS.get(update, ADAPTER)


def per_target(*implementations) -> dict:
    """{name: implementation} for one implementation per declared kind (each with the kind's `name`), refusing a
    set that misses a kind or names an undeclared one: how `updates.py` and the audit key theirs."""
    named = {implementation.name: implementation for implementation in implementations}
    if set(named) != set(TARGETS) or len(named) != len(implementations):
        raise ValueError(
            f"One implementation per declared trap_target ({', '.join(TARGETS)}) is needed; got "
            f"{', '.join(type(i).__name__ + '=' + repr(i.name) for i in implementations)}."
        )
    return {name: named[name] for name in TARGETS}


def help_text() -> str:
    """`trap_target`'s help."""
    kinds = " or ".join(f"{kind.name!r} ({kind.what})" for kind in TARGETS.values())
    return f"What the update is: {kinds}."
