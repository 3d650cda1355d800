"""`ReleaseTracer`: the release prepared once, then any number of suspects traced against it, in memory.

    tracer = ReleaseTracer(release_vector, references=[ref_a, ref_b])
    result = tracer.trace(merged_vector, name="ties merge")
    print(result.verdict())   # "ties merge: contains the release (weight ~0.50, p = 3e-12; ...)"

Vectors are `{parameter name: delta}` (what the audit's task vectors are): the audit can trace every merge it makes
without writing a folder. `trace_release` does the same from folders and Hub repo ids.
"""

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field

import torch

from .settings import DECOYS, DEFAULT_ALPHA, REFERENCES, TraceSettings
from .stats import binomial_tail, layer_of, match_p_values, rank_sum_tail, scored_blocks


@dataclass
class TraceResult:
    """One suspect traced: the release's estimated weight in it (overall and per layer) and the p-value of the null
    "the suspect does not contain the release"; `contains` is p_value < alpha."""

    suspect: str
    weight: float
    p_value: float
    contains: bool
    alpha: float
    null: str
    blocks: int
    matches: int
    p_decoys: float
    layers: dict[str, float]
    p_references: float | None = None
    references: int = 0
    rank_sum: int | None = None
    wins: int | None = None
    settings: dict = field(default_factory=dict)

    def verdict(self) -> str:
        evidence = (
            f"the release ranks first in {self.wins} of {self.blocks} matrices against {self.references} references"
            if self.null == REFERENCES
            else f"{self.matches} of {self.blocks} matrices match"
        )
        said = "contains the release" if self.contains else "no evidence of the release"
        return f"{self.suspect}: {said} (weight ~{self.weight:.2f}, p = {_p(self.p_value)}; {evidence})"

    def to_dict(self) -> dict:
        return asdict(self)


class ReleaseTracer:
    """The release (and its references) prepared once: per matrix, the singular directions the test scores."""

    def __init__(
        self,
        release: Mapping[str, torch.Tensor],
        references: Sequence[Mapping[str, torch.Tensor]] = (),
        settings: TraceSettings | None = None,
    ):
        self.settings = settings or TraceSettings()
        self.blocks = scored_blocks(release, self.settings)
        if not self.blocks:
            raise ValueError(
                "The release changes no weight matrix of rank above shared_directions="
                f"{self.settings.shared_directions} (it may be all zeros, or hold only biases and norms): there is "
                "nothing to trace."
            )
        self.references = [{b.name: b for b in scored_blocks(ref, self.settings)} for ref in references]
        for index, ref in enumerate(self.references):
            unknown = sorted(set(ref) - {b.name for b in self.blocks})
            if len(ref) == 0 or unknown:
                raise ValueError(
                    f"Reference {index + 1} changes other matrices than the release ({unknown[:3] or 'none of them'}); "
                    "references are trainings of the release with its recipe and other seeds."
                )

    @property
    def names(self) -> list[str]:
        """The parameters the release changes and the test reads from a suspect."""
        return [b.name for b in self.blocks]

    def trace(self, suspect: Mapping[str, torch.Tensor], name: str = "suspect", alpha: float = DEFAULT_ALPHA):
        """Trace the release in `suspect` ({parameter name: delta from the base}; a matrix it lacks counts as
        unchanged)."""
        if not 0 < alpha < 1:
            raise ValueError(f"alpha must be between 0 and 1; got {alpha}.")
        deltas = {b.name: self._delta(suspect, b) for b in self.blocks}
        weights = [b.weight(b.core(deltas[b.name])) for b in self.blocks]
        cores = [self._core(b, deltas[b.name]) for b in self.blocks]
        energies = [float((b.values**2).sum()) for b in self.blocks]
        p_blocks = match_p_values(self.blocks, cores, self.settings)
        matches = sum(p <= self.settings.match_level for p in p_blocks)
        p_decoys = binomial_tail(matches, len(self.blocks), self.settings.null_match_rate)
        result = TraceResult(
            suspect=name,
            weight=_weighted(weights, energies),
            p_value=p_decoys,
            contains=False,
            alpha=alpha,
            null=DECOYS,
            blocks=len(self.blocks),
            matches=matches,
            p_decoys=p_decoys,
            layers=_per_layer([b.name for b in self.blocks], weights, energies),
            settings=asdict(self.settings),
        )
        if self.references:
            ranks = self._ranks(deltas, [b.z_score(core) for b, core in zip(self.blocks, cores)])
            result.null, result.references = REFERENCES, len(self.references)
            result.rank_sum, result.wins = sum(ranks), sum(r == len(self.references) + 1 for r in ranks)
            result.p_references = rank_sum_tail(ranks, len(self.references) + 1)
            result.p_value = result.p_references
        result.contains = result.p_value < alpha
        return result

    def _ranks(self, deltas: dict, scores: list[float]) -> list[int]:
        """Per matrix, the release's rank among release and references by how far each stands above its own decoys
        in the suspect (1 = lowest); a tie counts against the release."""
        ranks = []
        for block, score in zip(self.blocks, scores):
            others = []
            for ref in self.references:
                theirs = ref.get(block.name)
                others.append(theirs.z_score(self._core(theirs, deltas[block.name])) if theirs is not None else 0.0)
            ranks.append(1 + sum(score > other for other in others))
        return ranks

    def _core(self, block, delta: torch.Tensor) -> torch.Tensor:
        return block.core(delta, self.settings.suspect_directions, self.settings.seed)

    @staticmethod
    def _delta(suspect: Mapping[str, torch.Tensor], block) -> torch.Tensor:
        delta = suspect.get(block.name)
        if delta is None:
            return torch.zeros(block.shape, dtype=torch.float64)
        if tuple(delta.shape) != block.shape:
            raise ValueError(
                f"The suspect's {block.name!r} has shape {tuple(delta.shape)}, the release's {block.shape}: the "
                "suspect is not a model of the release's base."
            )
        return delta.detach().to(torch.float64)


def _weighted(weights: list[float], energies: list[float]) -> float:
    return sum(w * e for w, e in zip(weights, energies)) / sum(energies)


def _per_layer(names: list[str], weights: list[float], energies: list[float]) -> dict[str, float]:
    groups: dict[str, tuple[list, list]] = {}
    for name, weight, energy in zip(names, weights, energies):
        ws, es = groups.setdefault(layer_of(name), ([], []))
        ws.append(weight)
        es.append(energy)
    return {layer: _weighted(ws, es) for layer, (ws, es) in groups.items()}


def _p(value: float) -> str:
    return f"{value:.2g}" if value >= 1e-3 else f"{value:.0e}"
