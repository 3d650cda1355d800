"""`trace_release`: trace a release in suspects given as folders or Hub repo ids (what `trap2 trace` runs)."""

from collections.abc import Sequence

from .deltas import load_base, update_vector
from .settings import DEFAULT_ALPHA, TraceSettings
from .tracer import ReleaseTracer, TraceResult


def trace_release(
    base_model,
    release: str,
    suspects: Sequence[str],
    references: Sequence[str] = (),
    alpha: float = DEFAULT_ALPHA,
    settings: TraceSettings | None = None,
) -> list[TraceResult]:
    """Trace the update `release` in each of `suspects`, one `TraceResult` per suspect.

    Args:
        base_model: the base model (a transformers model) or its folder / Hub repo id.
        release: the released update: an adapter folder (LoRA, rsLoRA, DoRA, LoHa, ...) or a full fine-tune, or a
            Hub repo id.
        suspects: full model folders (mergekit's output, a merge_and_unload'ed model) or adapters of the same base.
        references: independent trainings of the release with its recipe and other seeds (the author's own); with
            them the p-value tells a copy of the release from a re-training of its task.
        alpha: a suspect `contains` the release when its p-value is below this.
        settings: how the release is scored (`TraceSettings`).
    """
    if isinstance(suspects, str):
        suspects = [suspects]
    if isinstance(references, str):
        references = [references]
    base = load_base(base_model) if isinstance(base_model, str) else base_model
    tracer = ReleaseTracer(
        update_vector(base, release, "release"),
        [update_vector(base, ref, f"reference {ref!r}") for ref in references],
        settings,
    )
    return [
        tracer.trace(update_vector(base, suspect, "suspect", tracer.names), name=suspect, alpha=alpha)
        for suspect in suspects
    ]
