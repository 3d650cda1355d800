"""`DemoArguments`: the demo's own settings (every field a `trap2 demo` flag); the protection settings
are `Trap2Settings`' fields, parsed next to them."""

from dataclasses import dataclass, field

from .tasks import TASK_SETS

# The demo's share of the audit, trimmed to its time budget: a sparsifying mergekit merge of the demo's LoRAs costs
# a few seconds of CPU (mergekit sorts every update's entries again for each merge), so the demo audits every
# method of the audit's own and PEFT's, and of mergekit's TIES and DELLA (normalised by default), SCE, model_stock,
# karcher, slerp and nuslerp, at naive weights and at their public points; the best shared weight is searched for
# the audit's own and PEFT's methods only. Left out: mergekit's best shared weight, mergekit's dare_ties (its random
# drop is the audit's own dare_ties), task_arithmetic and linear (the audit's own task arithmetic to 1e-6),
# dare_linear, breadcrumbs, breadcrumbs_ties and della_linear. `trap2 audit` runs every method in every mode.
DEMO_MERGEKIT = ("ties", "della", "sce", "model_stock", "karcher", "slerp", "nuslerp")
DEMO_PUBLIC = ("task_arithmetic", *(f"mergekit:{name}" for name in DEMO_MERGEKIT))

# Flags that were removed, and what replaces them.
REMOVED_FLAGS = {
    "--mergekit_methods": "mergekit's methods are audited like the others (every one by default); pass --methods "
    "with mergekit:NAME entries to choose, e.g. --methods task_arithmetic mergekit:ties",
    "--mergekit_informed": "pass the mergekit methods to --informed_methods, e.g. --informed_methods mergekit:ties",
}


@dataclass
class DemoArguments:
    """The demo's own settings; the protection settings are `Trap2Settings`' fields."""

    output_dir: str = field(default="demo_output", metadata={"help": "Where audit.json, audit.md, audit.png go."})
    task_set: str = field(
        default="demo", metadata={"help": "Which synthetic task set to train on.", "choices": list(TASK_SETS)}
    )
    protected_task: str | None = field(
        default=None, metadata={"help": "The task whose update is protected (default: the set's first task)."}
    )
    seed: int = field(default=0, metadata={"help": "Seed of the data, the random heads, the adapters and training."})
    steps: int = field(default=60, metadata={"help": "Training steps of the other tasks' plain updates."})
    twin_steps: int | None = field(
        default=None,
        metadata={
            "help": "Training steps of the unprotected twin (the protected task's plain update; default: steps). "
            "The `lexicon` task, an arbitrary word -> class mapping, needs more (docs/threat_model.md)."
        },
    )
    protected_max_steps: int = field(
        default=350, metadata={"help": "Most steps for the protected update; it stops once the trap has formed."}
    )
    curve_every: int = field(default=25, metadata={"help": "Evaluate the re-scale curve every this many steps."})
    curve_scales: list[float] = field(
        default_factory=lambda: [0.25, 0.5, 0.75, 1.25, 1.5, 2.0],
        metadata={
            "help": "Off-nominal scales of the validation re-scale curve. The trap has formed when every one is "
            "trapped; 0.75 and 1.25 are where merges an attacker tunes put the update."
        },
    )
    curve_transforms: list[str] = field(
        default_factory=list,
        metadata={
            "help": "Also watch the update as normalising merges put it, at weight 1: 'prune@0.2' (its top fifth of "
            "entries, as TIES), 'della@0.2', 'dare@0.5', 'layer_scale@0.5' (each layer at its own weight in 1 +- 0.5). "
            "Each must be trapped too for the trap to have formed. Empty: scales only."
        },
    )
    stop_when_trapped: bool = field(
        default=True, metadata={"help": "Stop the protected run once the re-scale curve shows the trap."}
    )
    trapped_margin: float = field(
        default=0.0,
        metadata={"help": "The trap has formed when off-nominal validation accuracy is <= max(base, chance) + this."},
    )
    batch_size: int = field(default=16, metadata={"help": "Training batch size."})
    learning_rate: float = field(default=1e-3, metadata={"help": "Learning rate of every update."})
    lora_rank: int = field(default=8, metadata={"help": "LoRA rank (alpha = 2 * rank)."})
    train_size: int = field(default=512, metadata={"help": "Training sentences per task (multiple of 4)."})
    validation_size: int = field(default=32, metadata={"help": "Validation sentences per task (multiple of 4)."})
    test_size: int = field(default=120, metadata={"help": "Test sentences per task (multiple of 4)."})
    threads: int = field(default=0, metadata={"help": "torch CPU threads; 0 keeps torch's default."})
    methods: list[str] | None = field(
        default=None,
        metadata={"help": "Audit only these merge methods, mergekit's as mergekit:NAME (default: every method of the "
                  "audit's own and PEFT's, and with the mergekit extra mergekit's " + ", ".join(DEMO_MERGEKIT)
                  + ", trimmed to the demo's time budget; `trap2 audit` runs them all)."},
    )
    modes: list[str] = field(
        default_factory=lambda: ["average", "best", "public", "informed", "search"],
        metadata={"help": "Audit modes: average, best, public (the points public merge configs use), informed "
                  "(per-update weights), search (random, budgeted)."},
    )
    informed_methods: list[str] = field(
        default_factory=lambda: ["task_arithmetic"],
        metadata={
            "help": "The merge methods the informed and search modes attack, each on its full grid (default: task "
            "arithmetic only, to fit the demo's time budget; add ties dare_ties for the sparsifying merges)."
        },
    )
    search_budget: int = field(default=16, metadata={"help": "search mode: random merges per method and update."})
    repair_ks: list[int] = field(
        default_factory=lambda: [16, 64, 256],
        metadata={
            "help": "Post-merge repair with k labelled examples of the protected task (k above train_size are left "
            "out); empty: no repair."
        },
    )
    repair_steps: int = field(default=40, metadata={"help": "Repair: steps of the fresh LoRA."})
    public_methods: list[str] = field(
        default_factory=lambda: list(DEMO_PUBLIC),
        metadata={"help": "The merge methods whose public points run, among those audited (default: task arithmetic "
                  "and the demo's mergekit methods, trimmed to its time budget)."},
    )
    best_methods: list[str] | None = field(
        default=None,
        metadata={"help": "The merge methods whose best shared weight is searched, among those audited (default: "
                  "those --methods names; without it the audit's own and PEFT's, trimmed to the demo's time budget; "
                  "`trap2 audit` searches every method)."},
    )
    foreign_tasks: list[str] | None = field(
        default=None,
        metadata={
            "help": "Off-ray protection: the plain updates of these tasks are saved (output_dir/foreign_updates) and "
            "passed as trap_foreign_adapters to the protected run (with a 'foreign' trap_offray term). The audit then "
            "also merges the protected update with a held-out partner alone (see heldout_partner)."
        },
    )
    pseudo_partners: int = field(
        default=0,
        metadata={
            "help": "Off-ray protection without a real partner: with a 'foreign' term, train this many pseudo-partners "
            "(LoRAs on the protected task's inputs with random labels, trap2_hf.offray.make_pseudo_partners) and pass "
            "them as trap_foreign_adapters instead of --foreign_tasks' updates. 0: off."
        },
    )
    pseudo_partner_steps: int = field(default=40, metadata={"help": "Training steps of each pseudo-partner."})
    heldout_partner: str | None = field(
        default=None,
        metadata={
            "help": "Also audit merges of the protected update with this task's plain update ONLY (a partner not used "
            "in training). Default: the first task in neither protected_task nor foreign_tasks, when foreign_tasks is set."
        },
    )
    compare_variants: list[str] | None = field(
        default=None,
        metadata={
            "help": "Train and audit several protection variants on the same plain updates and write variants.json: "
            "preset names (none, paper, default, dare, prune, factor_dare, synthetic, foreign) or "
            "'label:field=value:field=value' over Trap2Settings fields and protected_max_steps / stop_when_trapped."
        },
    )
