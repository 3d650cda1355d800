"""The audit's settings: its modes, and the settings of the informed attacker, the public grid and repair.

Plain data, no torch: `trap2 audit --help` reads its defaults from here without loading a model library.
"""

from dataclasses import asdict, dataclass

from ..report.summary import TWIN_GAIN_KEPT

# The modes of the audit, in the order they run for each method: the naive merge (1/N), the best shared
# weight (searched on validation), the points public merge configurations use, the informed attacker's
# grid and its budgeted random search.
MODES = ("average", "best", "public", "informed", "search")
INFORMED_MODES = ("informed", "search")
# The re-scale curve of each update alone; 0.8-1.2 is the rim, where the merges that normalise or rescale put it.
DEFAULT_SCALES = (0.0, 0.25, 0.5, 0.75, 0.8, 0.85, 0.9, 0.95, 1.0, 1.05, 1.1, 1.15, 1.2, 1.25, 1.5, 1.75, 2.0)
# The guard's benign perturbations of the update alone (benign.py).
PERTURBATIONS = ("float32", "bfloat16", "float16", "int8")
# What merges do to an update alone before any partner enters (transforms.py).
TRANSFORMS = ("trim", "dare", "della", "tensor_scales")


@dataclass(frozen=True)
class InformedSettings:
    """The informed attacker's grids, constraint and search budget."""

    protected_weights: tuple[float, ...] = (0.8, 0.9, 1.0, 1.1, 1.2)
    other_weights: tuple[float, ...] = (0.25, 0.5, 0.75, 1.0, 1.5)
    min_gain_kept: float = 0.6
    budget: int = 32
    protected_range: tuple[float, float] = (0.7, 1.3)
    other_range: tuple[float, float] = (0.0, 1.5)
    density_range: tuple[float, float] = (0.2, 1.0)
    # The methods the informed modes attack; None: every audited method.
    methods: tuple[str, ...] | None = None

    def __post_init__(self):
        if 1.0 not in self.protected_weights:
            raise ValueError(
                f"protected_weights {self.protected_weights} must include exactly 1.0: the released update's "
                "nominal scale is the first thing an informed attacker tries."
            )
        if not self.other_weights or min(self.other_weights) <= 0:
            raise ValueError(
                f"other_weights {self.other_weights} must be positive: with the others at 0 it is not a merge."
            )
        if not 0.0 <= self.min_gain_kept <= 1.0:
            raise ValueError(f"min_gain_kept={self.min_gain_kept} must be a fraction in [0, 1], e.g. 0.6.")
        if self.budget < 1:
            raise ValueError(f"budget={self.budget} must be at least 1 merge per method.")

    def attacks(self, method: str) -> bool:
        return self.methods is None or method in self.methods

    def describe(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class PublicSettings:
    """The public grid: which methods it runs on and when one of its points counts."""

    # The methods the public mode runs; None: every audited method that declares public points.
    methods: tuple[str, ...] | None = None
    twin_gain_kept: float = TWIN_GAIN_KEPT

    def __post_init__(self):
        if not 0.0 <= self.twin_gain_kept <= 1.0:
            raise ValueError(f"twin_gain_kept={self.twin_gain_kept} must be a fraction in [0, 1], e.g. 0.6.")

    def runs(self, method: str) -> bool:
        return self.methods is None or method in self.methods

    def describe(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class TransformSettings:
    """The partner-independent transforms of the update alone (transforms.py): which run, at which points."""

    kinds: tuple[str, ...] = TRANSFORMS
    # The densities of trim, dare and della (public merge configs use 0.3-0.7; 0.9 is a light touch).
    densities: tuple[float, ...] = (0.3, 0.5, 0.7, 0.9)
    # DELLA's keep-probability spread around the density (mergekit's default), narrowed near 0 and 1.
    della_epsilon: float = 0.15
    # Per-tensor scales drawn uniformly from [1 - spread, 1 + spread], `tensor_draws` draws per spread.
    tensor_spreads: tuple[float, ...] = (0.1, 0.25)
    tensor_draws: int = 4

    def __post_init__(self):
        unknown = [k for k in self.kinds if k not in TRANSFORMS]
        if unknown:
            raise ValueError(f"Unknown transform(s) {unknown}; choose among {list(TRANSFORMS)}.")
        if any(not 0.0 < d <= 1.0 for d in self.densities):
            raise ValueError(f"densities {self.densities} must each be in (0, 1], e.g. 0.3 0.5 0.7 0.9.")
        if any(not 0.0 <= s < 1.0 for s in self.tensor_spreads) or self.tensor_draws < 1:
            raise ValueError(
                f"tensor_spreads {self.tensor_spreads} must each be in [0, 1) and tensor_draws ({self.tensor_draws}) "
                "at least 1."
            )
        if not 0.0 <= self.della_epsilon < 0.5:
            raise ValueError(f"della_epsilon={self.della_epsilon} must be in [0, 0.5), e.g. 0.15 (mergekit's default).")

    def evaluations(self, della: bool = True) -> int:
        """Evaluations per variant."""
        sparse = sum(k in self.kinds for k in ("trim", "dare")) + (della and "della" in self.kinds)
        scales = len(self.tensor_spreads) * self.tensor_draws if "tensor_scales" in self.kinds else 0
        return sparse * len(self.densities) + scales

    def describe(self) -> dict:
        """As audit.json holds it (lists, not tuples)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


@dataclass(frozen=True)
class RepairSettings:
    """The repair attacker's budget: a fresh LoRA, `steps` AdamW steps on k labelled examples."""

    ks: tuple[int, ...] = (16, 64, 256)
    steps: int = 40
    learning_rate: float = 1e-3
    batch_size: int = 16
    rank: int = 8
    # LoRA target modules; None: the released adapter's own targets (adapters), "all-linear" (full).
    target_modules: tuple[str, ...] | str | None = None
    methods: tuple[str, ...] = ("task_arithmetic",)
    seed: int = 0

    def check(self, tasks: list, protected_task: str, target: str, audited: list[str]) -> None:
        """Refuse settings the audit cannot run, naming the value and the fix."""
        task = next(t for t in tasks if t.name == protected_task)
        if task.train_loss is None or task.num_train < 1:
            raise ValueError(
                f"Repair needs labelled examples of {protected_task!r}: give its AuditTask train_loss(model, "
                "indices) and num_train, or pass repair=None."
            )
        too_many = [k for k in self.ks if not 1 <= k <= task.num_train]
        if too_many or not self.ks:
            raise ValueError(
                f"Repair ks {list(self.ks)}: each k must be between 1 and the task's {task.num_train} labelled examples."
            )
        from .methods import get

        for name in self.methods:
            get(name)
            if name not in audited:
                raise ValueError(f"Repair method {name!r} is not among the audited methods {audited}; audit it too.")
        if self.steps < 1 or self.batch_size < 1 or self.rank < 1 or self.learning_rate <= 0:
            raise ValueError(
                f"Repair needs steps, batch_size, rank >= 1 and learning_rate > 0; got steps={self.steps}, "
                f"batch_size={self.batch_size}, rank={self.rank}, learning_rate={self.learning_rate}."
            )

    def describe(self) -> dict:
        return asdict(self)
