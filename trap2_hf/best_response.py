"""The attacker's best response inside training; both settings are off by default.

Trap² as published draws its ascent scales at random along W0 + s*dW, so most of the ascent goes to
scales that are already broken (s <= 0.5, s >= 1.5) and little to the rim next to s = 1, where a
merger who read the model card puts the update. Two cheap answers:

- worst-case scales (`trap_scale_candidates` = C > 0): each micro-batch, the loss is evaluated
  without gradient at C candidate scales on a slice of its rows (`trap_candidate_fraction`), drawn
  stratified from the scale support split at the rim (0.75 <= s <= 1.3), and the K ascent scales of
  the step go to the lowest-loss candidates: where the update still works, i.e. where the trap is
  weakest. Cost: C forwards (no backward) over that slice, on top of the step. The same for off-ray draws
  (`trap_offray_candidates`): the off-ray passes go to the lowest-loss of C drawn terms (e.g. the own update
  near weight 1 plus a partner at 0.2-1: the attacker's merge where it still recovers the task).
- bounded ascent (`trap_ascent='capped'`): each re-scaled row's loss enters the ascent as
  min(loss, cap), with the cap at the loss of a chance-level prediction (log of the number of
  classes) unless set. A row that is already broken past chance gets no gradient, so the ascent is
  spent on rows that still recover; the paper's unbounded ascent keeps pushing broken rows further.

The choice is a function of the losses only, so it is tested on hand-made losses. The trainer calls
`best_response_scales` in `training_step` with its step object (`modes.TrapStep`), whose `weigh` applies
`bounded_loss`; the fused step caps its copies' rows through `FusedPlan.rescaled_cap` (`modes/fused.py`).
"""

import math

import torch

from .batch import batch_size_of, select_rows
from .seeding import CANDIDATES, OFFRAY_CANDIDATES
from .settings import trap_scale_intervals

# The rim of the scale support: where merges an attacker tunes put the released update (0.75-1.3).
RIM = (0.75, 1.3)


def candidate_strata(scale_min: float, scale_max: float, margin: float) -> list[tuple[float, float]]:
    """The scale support cut at the rim, left to right: far below, rim below, rim above, far above
    (the parts that exist), so that a draw of four candidates has one in each."""
    strata = []
    for lo, hi in trap_scale_intervals(scale_min, scale_max, margin):
        cuts = sorted({lo, hi, *(c for c in RIM if lo < c < hi)})
        strata += list(zip(cuts[:-1], cuts[1:])) or [(lo, hi)]
    return strata


def candidate_scales(
    scale_min: float, scale_max: float, margin: float, num_candidates: int, generator: torch.Generator
) -> list[float]:
    """`num_candidates` scales, candidate k uniform in stratum k mod (number of strata)."""
    strata = candidate_strata(scale_min, scale_max, margin)
    uniforms = torch.rand(num_candidates, generator=generator, dtype=torch.float64).tolist()
    return [lo + u * (hi - lo) for (lo, hi), u in zip((strata[k % len(strata)] for k in range(num_candidates)), uniforms)]


def select_scales(
    candidates: list[float],
    losses: list[float],
    num_scales: int,
    sampling: str,
    temperature: float = 0.0,
    generator: torch.Generator | None = None,
) -> list[float]:
    """The `num_scales` candidates with the lowest loss (the most-recovering ones), or with `temperature` > 0 a draw
    without replacement, each pick with probability proportional to exp(-loss / temperature): mostly where the
    trap is weakest, sometimes where it already holds.

    'stratified' keeps the step's scales alternating between the two sides of 1, as the random draw
    does: pick k comes from the remaining candidates below 1 for even k, above 1 for odd k (the
    other side where one side has none left); 'uniform' picks among all of them."""
    if len(candidates) != len(losses):
        raise ValueError(f"{len(candidates)} candidate scales but {len(losses)} losses.")
    if num_scales > len(candidates):
        raise ValueError(f"Cannot pick {num_scales} scales from {len(candidates)} candidates.")
    remaining = sorted(range(len(candidates)), key=lambda k: (losses[k], k))
    picked = []
    for k in range(num_scales):
        pool = remaining
        if sampling == "stratified":
            pool = [j for j in remaining if (candidates[j] < 1) == (k % 2 == 0)] or remaining
        choice = pool[0]
        if temperature > 0:
            logits = -torch.tensor([losses[j] for j in pool], dtype=torch.float64) / temperature
            choice = pool[int(torch.multinomial(torch.softmax(logits, 0), 1, generator=generator))]
        picked.append(candidates[choice])
        remaining.remove(choice)
    return picked


def bounded_loss(loss: torch.Tensor, cap: float | None) -> torch.Tensor:
    """min(loss, cap): the plain gradient below the cap, none above it (None: unbounded)."""
    return loss if cap is None else torch.clamp(loss, max=cap)


def bounded_row_losses(row_sums: torch.Tensor, counts: torch.Tensor, cap: float | None) -> torch.Tensor:
    """Each row's summed loss capped at cap times its item count (its mean capped at `cap`)."""
    if cap is None:
        return row_sums
    return torch.minimum(row_sums, cap * counts.to(row_sums.dtype))


def chance_loss(model) -> float:
    """The cross-entropy of a uniform prediction: log(number of classes) of a sequence classifier, log(vocabulary)
    of a causal LM; else a ValueError naming the fix."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(inner, "config", None)
    name = type(inner).__name__
    problem = getattr(config, "problem_type", None)
    if name.endswith("ForSequenceClassification") and getattr(config, "num_labels", 1) > 1:
        if problem not in (None, "single_label_classification"):
            raise ValueError(
                f"trap_ascent='capped' picks its cap from the number of classes, but {name} has problem_type "
                f"{problem!r}; set trap_ascent_cap to the loss of a chance-level prediction."
            )
        return math.log(config.num_labels)
    if name.endswith("ForCausalLM") or name.endswith("LMHeadModel"):
        return math.log(config.vocab_size)
    raise ValueError(
        f"trap_ascent='capped' cannot tell the chance-level loss of {name}; set trap_ascent_cap to it (the "
        "cross-entropy of a uniform prediction: log of the number of classes, e.g. 1.386 for 4 classes)."
    )


def ascent_cap(args, model) -> float | None:
    """The cap of the re-scaled loss that this run uses: None (unbounded), trap_ascent_cap, or `chance_loss`."""
    if args.trap_ascent != "capped":
        return None
    return args.trap_ascent_cap if args.trap_ascent_cap is not None else chance_loss(model)


def step_candidates(args, step: int) -> tuple[list[float], torch.Generator]:
    """The candidate scales of an optimizer step, a function of (seed, step) only, and the generator that then
    draws the rows they are evaluated on."""
    generator = CANDIDATES.generator(args.seed, step)
    candidates = candidate_scales(
        args.trap_scale_min, args.trap_scale_max, args.trap_margin, args.trap_scale_candidates, generator
    )
    return candidates, generator


def candidate_rows(batch_size: int, fraction: float, generator: torch.Generator) -> torch.Tensor:
    """The rows the candidates are evaluated on: ceil(fraction * b) of them, at random."""
    count = max(1, math.ceil(fraction * batch_size))
    return torch.randperm(batch_size, generator=generator)[:count].sort().values


def best_response_scales(step, model, inputs: dict, scales: list[float]) -> list[float]:
    """The step's ascent scales at the lowest-loss candidates of this micro-batch (`trap_scale_candidates` > 0),
    else `scales` (the random draw) unchanged.

    Each candidate's loss is the model's own loss on the same rows with the same dropout masks, with no gradient;
    the RNG is restored afterwards so the step's own passes draw what they would have. Under data parallelism
    the losses are averaged over ranks first, so every rank picks the same scales. `step`: the trainer's
    `modes.TrapStep`."""
    args = step.args
    if not args.trap_scale_candidates or not scales:
        return scales
    candidates, generator = step_candidates(args, step.global_step)
    values = candidate_losses(step, model, inputs, generator, [step.rescaled(s) for s in candidates])
    picked = select_scales(
        candidates, values, len(scales), args.trap_scale_sampling, args.trap_candidate_temperature, generator
    )
    step.record("candidate_passes", float(len(candidates)), per_step=False)
    step.record("candidate_min_loss", min(values))
    return picked


def best_response_offray(step, model, inputs: dict, draws: list) -> list:
    """The step's off-ray draws: with `trap_offray_candidates` > 0, `draws` holds that many candidates, and the
    trap_offray_per_step lowest-loss ones (where the merge they stand for recovers the task most) are kept, in
    their order; the guard draw is always kept. Else `draws` unchanged. Losses as in `best_response_scales`."""
    args = step.args
    pool = [draw for draw in draws if not draw.is_guard]
    if not args.trap_offray_candidates or len(pool) <= args.trap_offray_per_step:
        return draws
    contexts = [step.offray_context(d) for d in pool]
    generator = OFFRAY_CANDIDATES.generator(args.seed, step.global_step)
    values = candidate_losses(step, model, inputs, generator, contexts)
    kept = sorted(sorted(range(len(pool)), key=lambda k: (values[k], k))[: args.trap_offray_per_step])
    step.record("offray_candidate_passes", float(len(pool)), per_step=False)
    step.record("offray_candidate_min_loss", min(values))
    return [pool[k] for k in kept] + [draw for draw in draws if draw.is_guard]


def candidate_losses(step, model, inputs: dict, generator: torch.Generator, contexts: list) -> list[float]:
    """The model's loss without gradient inside each context, on trap_candidate_fraction of the micro-batch's rows
    (drawn with `generator`), with the same dropout masks; averaged over ranks under data parallelism
    (`modes.TrapStep.losses`)."""
    batch_size = batch_size_of(inputs)
    rows = candidate_rows(batch_size, step.args.trap_candidate_fraction, generator)
    sliced = inputs if len(rows) == batch_size else select_rows(inputs, rows, batch_size)
    return step.losses(model, sliced, contexts)
