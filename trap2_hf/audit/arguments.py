"""`AuditArguments`: the settings of `trap2 audit` (every field a flag, parsed by `HfArgumentParser`).

Plain data, no torch: `trap2 audit --help` parses these without loading a model library. The defaults of
the informed attacker, the public grid and repair are read from their settings classes (`settings.py`).
"""

from dataclasses import dataclass, field

from ..settings import TARGETS
from .settings import (
    DEFAULT_SCALES,
    MODES,
    PERTURBATIONS,
    TRANSFORMS,
    InformedSettings,
    PublicSettings,
    RepairSettings,
    TransformSettings,
)

_INFORMED, _REPAIR, _TRANSFORMS = InformedSettings(), RepairSettings(), TransformSettings()
# Flags that were removed, and what replaces them.
REMOVED_FLAGS = {
    "--mergekit_methods": "mergekit's methods are in the one registry: pass --methods mergekit:ties mergekit:della "
    "... (every name: --list_methods)",
    "--mergekit_informed": "the informed grid runs on every audited method that takes per-update weights: pass "
    "--methods mergekit:ties ... with --modes informed",
}


@dataclass
class AuditArguments:
    """What to audit and how; `informed_settings()`, `public_settings()` and `repair_settings()` build the
    settings `run_audit` takes."""

    base_model: str | None = field(default=None, metadata={"help": "Base model: a local folder or a Hub repo id."})
    model_class: str = field(
        default="AutoModelForCausalLM",
        metadata={"help": "transformers Auto class that loads the base model (e.g. AutoModelForSequenceClassification)."},
    )
    tasks: str | None = field(
        default=None, metadata={"help": "Python file defining get_tasks(model, tokenizer) -> list[AuditTask]."}
    )
    protected_task: str | None = field(default=None, metadata={"help": "Name of the task the protected update is for."})
    protected: str | None = field(
        default=None, metadata={"help": "Folder of the protected update (an adapter, or a full model with --target full)."}
    )
    unprotected: str | None = field(default=None, metadata={"help": "Folder of its unprotected twin (optional)."})
    other: list[str] = field(
        default_factory=list,
        metadata={"help": "An update of another task as TASK=FOLDER; repeat the flag (or list several) for each, at "
                  "least one.", "action": "extend", "metavar": "TASK=FOLDER"},
    )
    target: str = field(default="adapter", metadata={"help": "Kind of update.", "choices": list(TARGETS)})
    methods: list[str] | None = field(
        default=None,
        metadata={"help": "Merge methods to run, mergekit's as mergekit:NAME (default: every method that applies to "
                  "--target and to the number of updates; see --list_methods).", "metavar": "NAME"},
    )
    modes: list[str] = field(default_factory=lambda: list(MODES), metadata={"help": "Merge modes.", "choices": list(MODES)})
    sweep_scales: list[float] = field(
        default_factory=lambda: list(DEFAULT_SCALES),
        metadata={"help": "Scales s of the re-scaling sweep W0 + s*dW of each update alone."},
    )
    protected_weights: list[float] = field(
        default_factory=lambda: list(_INFORMED.protected_weights),
        metadata={"help": "informed mode: weights of the released update (must include 1.0)."},
    )
    other_weights: list[float] = field(
        default_factory=lambda: list(_INFORMED.other_weights),
        metadata={"help": "informed mode: weights shared by the other updates."},
    )
    min_gain_kept: float = field(
        default=_INFORMED.min_gain_kept,
        metadata={"help": "informed/search: the headline objective only counts merges where every other task keeps "
                  "this fraction of its gain over the base model."},
    )
    search_budget: int = field(default=_INFORMED.budget, metadata={"help": "search mode: random merges per method."})
    public_methods: list[str] | None = field(
        default=None,
        metadata={"help": "public mode: the methods whose public points run (default: every audited method that "
                  "declares them).", "metavar": "NAME"},
    )
    repair_ks: list[int] | None = field(
        default=None,
        metadata={"help": "Post-merge repair with K labelled examples of the protected task (e.g. 16 64 256); the "
                  "tasks file's protected AuditTask must define train_loss and num_train. Default: no repair.",
                  "metavar": "K"},
    )
    repair_steps: int = field(default=_REPAIR.steps, metadata={"help": "Repair: optimizer steps."})
    repair_learning_rate: float = field(default=_REPAIR.learning_rate, metadata={"help": "Repair: AdamW lr."})
    repair_batch_size: int = field(default=_REPAIR.batch_size, metadata={"help": "Repair: batch size."})
    repair_rank: int = field(default=_REPAIR.rank, metadata={"help": "Repair: rank of the fresh LoRA."})
    repair_methods: list[str] = field(
        default_factory=lambda: list(_REPAIR.methods), metadata={"help": "Repair: the merges repaired."}
    )
    benign: list[str] = field(
        default_factory=lambda: list(PERTURBATIONS),
        metadata={"help": "The guard: the protected update alone, folded into the base, with its weights as they are "
                  "(float32), cast to bfloat16 / float16, or 8-bit (int8) quantised, against its twin under each; "
                  "the flag with no name: no check.", "choices": list(PERTURBATIONS)},
    )
    transforms: list[str] = field(
        default_factory=lambda: list(TRANSFORMS),
        metadata={"help": "What merges do to each update alone before a partner enters, as curves: magnitude trim at "
                  "s = 1 (trim), DARE's and DELLA's rescaled drops (dare, della), per-tensor scales (tensor_scales); the "
                  "flag with no name: none.", "choices": list(TRANSFORMS)},
    )
    transform_densities: list[float] = field(
        default_factory=lambda: list(_TRANSFORMS.densities), metadata={"help": "Densities of trim, dare and della."}
    )
    tensor_spreads: list[float] = field(
        default_factory=lambda: list(_TRANSFORMS.tensor_spreads),
        metadata={"help": "tensor_scales: each tensor's scale drawn from [1 - spread, 1 + spread], per spread."},
    )
    tensor_draws: int = field(default=_TRANSFORMS.tensor_draws, metadata={"help": "tensor_scales: draws per spread."})
    seed: int = field(default=0, metadata={"help": "Seed of the randomised merges (DARE, DELLA) and the search."})
    device: str = field(default="auto", metadata={"help": "Model device: auto (cuda if available), cpu, cuda, ..."})
    output_dir: str = field(default="audit", metadata={"help": "Folder for audit.json, audit.md and audit.png."})
    no_progress: bool = field(default=False, metadata={"help": "Hide the progress bar."})
    list_methods: bool = field(default=False, metadata={"help": "List the merge methods and grids, then exit."})

    def __post_init__(self):
        if self.list_methods:
            return
        missing = [f"--{k}" for k in ("base_model", "tasks", "protected_task", "protected") if not getattr(self, k)]
        if missing or not self.other:
            raise ValueError(f"missing {', '.join(missing + ([] if self.other else ['--other TASK=FOLDER']))}")
        for item in self.other:
            task, sep, folder = item.partition("=")
            if not sep or not task or not folder:
                raise ValueError(f"--other {item!r}: write TASK=FOLDER, e.g. --other city=out/city-adapter")

    @property
    def others(self) -> dict[str, str]:
        """{task: folder} of the --other updates."""
        return dict(item.split("=", 1) for item in self.other)

    def informed_settings(self) -> InformedSettings:
        return InformedSettings(
            protected_weights=tuple(self.protected_weights), other_weights=tuple(self.other_weights),
            min_gain_kept=self.min_gain_kept, budget=self.search_budget,
        )

    def public_settings(self) -> PublicSettings:
        return PublicSettings(methods=None if self.public_methods is None else tuple(self.public_methods))

    def transform_settings(self) -> TransformSettings:
        return TransformSettings(
            kinds=tuple(self.transforms), densities=tuple(self.transform_densities),
            tensor_spreads=tuple(self.tensor_spreads), tensor_draws=self.tensor_draws,
        )

    def repair_settings(self) -> RepairSettings | None:
        if not self.repair_ks:
            return None
        return RepairSettings(
            ks=tuple(self.repair_ks), steps=self.repair_steps, learning_rate=self.repair_learning_rate,
            batch_size=self.repair_batch_size, rank=self.repair_rank, methods=tuple(self.repair_methods),
            seed=self.seed,
        )
