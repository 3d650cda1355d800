"""The settings of `trap2 trace` (no torch here: `trap2 trace --help` stays fast)."""

from dataclasses import dataclass, field

DECOYS, REFERENCES = "decoys", "references"
DEFAULT_ALPHA = 1e-3


@dataclass(frozen=True)
class TraceSettings:
    """How the release is scored and the p-value formed (every field a `trap2 trace` flag)."""

    shared_directions: int = field(
        default=3,
        metadata={"help": "Per matrix, the release's strongest singular directions left out of the score: updates "
                          "of one base share them whatever their task."},
    )
    suspect_directions: int = field(
        default=8,
        metadata={"help": "Per matrix, the suspect's strongest directions outside the scored ones projected out "
                          "before scoring (other updates of a merge, the base's shared directions)."},
    )
    max_directions: int = field(
        default=64, metadata={"help": "Per matrix, at most this many of the release's next directions are scored."}
    )
    decoys: int = field(default=1999, metadata={"help": "Decoys per matrix (the release's directions re-paired)."})
    match_level: float = field(
        default=0.002,
        metadata={"help": "A matrix matches when the release outscores all but this fraction of its decoys."},
    )
    null_match_rate: float = field(
        default=0.03,
        metadata={"help": "The per-matrix match rate the p-value allows a suspect without the release "
                          "(a margin above match_level for what updates of one base share)."},
    )
    seed: int = field(default=0, metadata={"help": "Seed of the decoys (the p-value is a function of it)."})

    def __post_init__(self):
        if self.shared_directions < 0 or self.suspect_directions < 0 or self.max_directions < 1 or self.decoys < 1:
            raise ValueError(
                f"shared_directions must be >= 0 and max_directions, decoys >= 1; got shared_directions="
                f"{self.shared_directions}, max_directions={self.max_directions}, decoys={self.decoys}."
            )
        if not 0 < self.match_level <= self.null_match_rate < 1:
            raise ValueError(
                f"Need 0 < match_level <= null_match_rate < 1; got match_level={self.match_level}, "
                f"null_match_rate={self.null_match_rate}."
            )
