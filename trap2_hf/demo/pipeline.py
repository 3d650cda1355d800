"""The demo's pipeline, shared by `trap2 demo` (run.py) and `--compare_variants` (variants.py): build the
base with one LoRA per update, train the plain updates and the protected one, audit them, and check the
demo's criteria. No printing beyond the progress lines of `log`."""

import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass

import torch
from peft import PeftModel
from transformers import PrinterCallback, TrainerCallback

from ..audit import methods as methods_registry
from ..audit.settings import InformedSettings, PublicSettings, RepairSettings, TransformSettings
from ..callbacks import RescaleCurveCallback
from ..config import Trap2TrainingArguments
from ..report.summary import HELD_MARGIN, floor
from ..settings import Trap2Settings
from ..trainer import Trap2Trainer
from . import model as demo_model
from .arguments import DEMO_MERGEKIT, DemoArguments
from .partners import heldout_partner, with_foreign_updates
from .tasks import make_task_set

# The merge the demo repairs (a weight-space merge: the fresh LoRA trains on the merged weights).
REPAIR_METHODS = ("task_arithmetic",)


@dataclass
class DemoSetup:
    """Everything trained and audited: one PeftModel (one adapter per update) over one base."""

    model: "PeftModel"
    tasks: list
    data: dict
    heads: dict
    protected_task: str

    @property
    def protected(self) -> str:
        return f"{self.protected_task}_protected"

    @property
    def unprotected(self) -> str:
        return f"{self.protected_task}_unprotected"

    @property
    def others(self) -> dict[str, str]:
        return {task.name: task.name for task in self.tasks if task.name != self.protected_task}

    def accuracy(self, task: str, split: str, adapter: str | None = None) -> float:
        """`task`'s accuracy on `split` with `adapter` active (default: whatever is active now)."""
        if adapter is not None:
            self.model.set_adapter(adapter, inference_mode=True)
        return demo_model.accuracy(self.model, self.heads[task], self.data[task][split])

    def chance(self, task: str) -> float:
        return next(t.chance for t in self.tasks if t.name == task)


def build(
    task_set: str = "demo",
    protected_task: str | None = None,
    seed: int = 0,
    lora_rank: int = 8,
    sizes: dict[str, int] | None = None,
) -> DemoSetup:
    """Load the base, generate the tasks and attach one fresh LoRA per update."""
    tasks = make_task_set(task_set, seed, sizes)
    names = [task.name for task in tasks]
    protected_task = protected_task or names[0]
    if protected_task not in names:
        raise ValueError(f"protected_task {protected_task!r} is not in task set {task_set!r}: {', '.join(names)}.")
    encoder, tokenizer = demo_model.load_encoder()
    data = {t.name: {split: demo_model.encode(tokenizer, *rows) for split, rows in t.splits.items()} for t in tasks}
    hidden = encoder.config.hidden_size
    heads = {t.name: demo_model.random_head(hidden, t.num_labels, seed * 1000 + i) for i, t in enumerate(tasks)}
    setup = DemoSetup(model=None, tasks=tasks, data=data, heads=heads, protected_task=protected_task)
    adapters = [setup.protected, setup.unprotected, *setup.others]
    # The twins start from the same initialisation: they differ only in the protection.
    init_seeds = {name: seed * 1000 + 100 + i for i, name in enumerate(adapters)}
    init_seeds[setup.unprotected] = init_seeds[setup.protected]
    setup.model = demo_model.add_adapters(encoder, adapters, demo_model.lora_config(lora_rank), init_seeds)
    return setup


def build_for(demo: DemoArguments) -> DemoSetup:
    """`build` with the demo's task set, seed, rank and split sizes."""
    sizes = {"train": demo.train_size, "validation": demo.validation_size, "test": demo.test_size}
    return build(demo.task_set, demo.protected_task, demo.seed, demo.lora_rank, sizes)


def run_demo(demo: DemoArguments, trap: Trap2Settings) -> tuple[dict, list, dict, dict]:
    """`trap2 demo`: build, train the plain updates then the protected one, audit, write the report and
    demo.json. Returns (audit results, criteria checks, timings, report paths)."""
    from ..report.tables import write_report

    start = time.perf_counter()
    setup = build_for(demo)
    runs = train_plain(setup, demo)
    trap = with_foreign_updates(setup, demo, trap)
    training = train_protected(setup, demo, trap)
    training["runs"] = runs + training["runs"]
    trained = time.perf_counter()
    if methods_registry.MERGEKIT_MISSING and demo.methods is None:
        print(f"[demo] mergekit's merges skipped: {methods_registry.MERGEKIT_MISSING}")
    results = audit_setup(setup, demo)
    paths = write_report(results, demo.output_dir)
    end = time.perf_counter()
    timings = {"train_s": trained - start, "audit_s": end - trained, "total_s": end - start,
               "audit_modes": audit_timings(results)}
    checks = check_criteria(results)
    summary = {
        "demo": asdict(demo),
        "protection": trap.trap_settings_dict(),
        "training": training,
        "timings": timings,
        "criteria": [{"name": n, "ok": ok, "detail": d} for n, ok, d in checks],
    }
    with open(os.path.join(demo.output_dir, "demo.json"), "w") as handle:
        json.dump(summary, handle, indent=2)
    return results, checks, timings, paths


def train_update(
    setup: DemoSetup,
    adapter: str,
    task: str,
    max_steps: int,
    trap: Trap2Settings | None = None,
    batch_size: int = 16,
    learning_rate: float = 1e-3,
    seed: int = 0,
    callbacks: tuple = (),
) -> dict:
    """Train one adapter on one task with `Trap2Trainer`: protected with `trap`'s settings, plain
    (lambda = 0, the ordinary Trainer step) without. Returns steps and seconds."""
    demo_model.train_only(setup.model, adapter)
    settings = trap.trap_settings_dict() if trap is not None else {"trap_lambda": 0.0}
    classifier = demo_model.TaskClassifier(setup.model, setup.heads[task])
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as scratch:  # nothing is saved: the adapters stay in the model
        args = Trap2TrainingArguments(
            output_dir=scratch,
            max_steps=max_steps,
            per_device_train_batch_size=batch_size,
            learning_rate=learning_rate,
            lr_scheduler_type="constant",
            seed=seed,
            logging_steps=max(1, max_steps // 4),
            save_strategy="no",
            report_to=[],
            disable_tqdm=True,
            use_cpu=True,
            dataloader_pin_memory=False,
            **settings,
        )
        train_data = demo_model.EncodedDataset(setup.data[task]["train"])
        trainer = Trap2Trainer(
            model=classifier, args=args, train_dataset=train_data, data_collator=demo_model.trimmed_collate
        )
        trainer.remove_callback(PrinterCallback)
        for callback in callbacks:
            if isinstance(callback, RescaleCurveCallback):
                callback.attach(trainer)
            else:
                trainer.add_callback(callback)
        trainer.train()
    demo_model.freeze_all_adapters(setup.model)
    seconds = time.perf_counter() - start
    return {
        "adapter": adapter,
        "task": task,
        "steps": trainer.state.global_step,
        "seconds": seconds,
        "trap_mode": trainer.args.trap_mode,  # what trap_mode='auto' chose
    }


def base_accuracy(setup: DemoSetup, task: str, split: str) -> float:
    with setup.model.disable_adapter():
        return setup.accuracy(task, split)


def audit_tasks(setup: DemoSetup) -> list:
    """One `AuditTask` per task: accuracy of the model's current weights with the task's head."""
    from ..audit.run import AuditTask

    def evaluator(task):
        return lambda model, split: demo_model.accuracy(model, setup.heads[task], setup.data[task][split])

    def train_loss(task):
        train = setup.data[task]["train"]

        def loss(model, indices):
            batch = demo_model.trimmed_collate([{k: v[i] for k, v in train.items()} for i in indices.tolist()])
            logits = demo_model.classify(model, setup.heads[task], batch["input_ids"], batch["attention_mask"])
            return torch.nn.functional.cross_entropy(logits, batch["labels"])

        return loss

    return [
        AuditTask(t.name, evaluator(t.name), t.chance, train_loss(t.name), len(setup.data[t.name]["train"]["labels"]))
        for t in setup.tasks
    ]


def train_all(setup: DemoSetup, demo: DemoArguments, trap: Trap2Settings, log=print) -> dict:
    """The demo's four-plus updates: twin and others plain, then the protected one until trapped."""
    runs = train_plain(setup, demo, log)
    training = train_protected(setup, demo, trap, log)
    training["runs"] = runs + training["runs"]
    return training


def train_plain(setup: DemoSetup, demo: DemoArguments, log=print) -> list[dict]:
    """The unprotected twin and the other tasks' updates (plain fine-tuning)."""
    common = dict(batch_size=demo.batch_size, learning_rate=demo.learning_rate, seed=demo.seed)
    runs = []
    plain = [(setup.unprotected, setup.protected_task, demo.twin_steps or demo.steps)]
    plain += [(adapter, task, demo.steps) for task, adapter in setup.others.items()]
    for adapter, task, steps in plain:
        runs.append(train_update(setup, adapter, task, steps, **common))
        log(f"[demo] {adapter}: {runs[-1]['steps']} steps in {runs[-1]['seconds']:.0f}s, "
            f"validation accuracy {setup.accuracy(task, 'validation', adapter):.2f}")
    return runs


def audit_setup(setup: DemoSetup, demo: DemoArguments, protected: str | None = None, unprotected="twin") -> dict:
    """The merge audit of the protected adapter (or `protected`), plus, with a held-out partner, a
    `heldout_partner` section: the same methods merging it with that partner's update alone."""
    from ..audit.run import run_audit

    protected = protected or setup.protected
    unprotected = setup.unprotected if unprotected == "twin" else unprotected
    audited = demo_methods(demo)
    common = dict(protected_task=setup.protected_task, protected=protected, unprotected=unprotected,
                  target="adapter", methods=audited, seed=demo.seed)
    attacked = tuple(m for m in demo.informed_methods if m in audited)
    informed = InformedSettings(budget=demo.search_budget, methods=attacked)
    public = PublicSettings(methods=tuple(m for m in demo.public_methods if m in audited))
    best = demo_best_methods(demo, audited)
    repair = None
    ks = tuple(k for k in demo.repair_ks if k <= demo.train_size)  # k labelled examples out of train_size
    if ks:
        repaired = tuple(m for m in REPAIR_METHODS if m in audited)
        repair = RepairSettings(
            ks=ks, steps=demo.repair_steps, learning_rate=demo.learning_rate,
            batch_size=demo.batch_size, rank=demo.lora_rank, methods=repaired, seed=demo.seed,
        ) if repaired else None
    results = run_audit(
        setup.model, audit_tasks(setup), others=setup.others, modes=tuple(demo.modes), informed=informed,
        public=public, repair=repair, best_methods=best, **common,
    )
    partner = heldout_partner(setup, demo)
    if partner is not None:
        tasks = [t for t in audit_tasks(setup) if t.name in (setup.protected_task, partner)]
        naive = tuple(m for m in demo.modes if m in ("average", "best"))
        section = run_audit(setup.model, tasks, others={partner: setup.others[partner]}, modes=naive,
                            transforms=TransformSettings(kinds=()), **common)  # the update alone: measured above
        results["heldout_partner"] = {"partner": partner, "methods": section["methods"], "skipped": section["skipped"]}
    return results


def demo_best_methods(demo: DemoArguments, audited: list[str]) -> tuple[str, ...] | None:
    """The methods whose best shared weight the demo searches: `demo.best_methods`; else, where `--methods` chose
    the methods, all of them (None); else the demo's trimmed share, the audit's own and PEFT's."""
    if demo.best_methods is not None:
        return tuple(m for m in demo.best_methods if m in audited)
    if demo.methods is not None:
        return None
    return tuple(m for m in audited if methods_registry.get(m).backend != methods_registry.MERGEKIT)


def demo_methods(demo: DemoArguments) -> list[str]:
    """`demo.methods`, or the demo's default: the audit's own and PEFT's methods, and the demo's share of
    mergekit's when it is installed."""
    if demo.methods is not None:
        return list(demo.methods)
    registered = methods_registry.names("adapter")
    own = [name for name in registered if methods_registry.get(name).backend != methods_registry.MERGEKIT]
    return own + [f"mergekit:{name}" for name in DEMO_MERGEKIT if f"mergekit:{name}" in registered]


def audit_timings(results: dict) -> dict:
    """Per audit mode: the merges evaluated per variant (the informed and public modes count their
    configurations; average one; best its grid and the test merge) and the seconds it took."""
    timings = {}
    for entry in results["methods"]:
        row = timings.setdefault(entry["mode"], {"methods": 0, "evaluations": 0, "seconds": 0.0})
        row["methods"] += 1
        row["seconds"] += entry.get("seconds", 0.0)
        if "evaluations" in entry:
            row["evaluations"] += entry["evaluations"]
        else:
            row["evaluations"] += 1 + len(entry.get("search", {}).get("protected", []))
    return timings


def train_protected(setup: DemoSetup, demo: DemoArguments, trap: Trap2Settings, log=print) -> dict:
    """The protected update, until its re-scale curve shows the trap (or protected_max_steps)."""
    common = dict(batch_size=demo.batch_size, learning_rate=demo.learning_rate, seed=demo.seed)
    runs = []
    twin = setup.accuracy(setup.protected_task, "validation", setup.unprotected)
    floor = max(base_accuracy(setup, setup.protected_task, "validation"), setup.chance(setup.protected_task))
    curve = RescaleCurveCallback(
        lambda _: setup.accuracy(setup.protected_task, "validation"),
        scales=demo.curve_scales,
        every_n_steps=demo.curve_every,
        stop_when_trapped=demo.stop_when_trapped,
        nominal_min=twin - 0.01,
        trapped_max=floor + demo.trapped_margin,
        metric_name="accuracy",
        transforms={spec: curve_transform(setup, spec) for spec in demo.curve_transforms},
    )
    run = train_update(
        setup, setup.protected, setup.protected_task, demo.protected_max_steps, trap,
        callbacks=(curve, _CurvePrinter(log)), **common,
    )
    run["curve"] = [{"step": h["step"], "curve": {f"{s:g}": m for s, m in h["curve"].items()}} for h in curve.history]
    run["trapped_at_step"] = curve.trapped_at_step
    runs.append(run)
    formed = f"trap formed at step {curve.trapped_at_step}" if curve.trapped_at_step else "trap NOT formed"
    last = curve.history[-1]["curve"] if curve.history else {}
    log(f"[demo] {setup.protected}: {run['steps']} steps in {run['seconds']:.0f}s, {formed}; "
        "validation curve " + ", ".join(f"s={s:g}: {m:.2f}" for s, m in last.items()))
    return {"runs": runs, "twin_validation": twin, "floor_validation": floor}


def curve_transform(setup: DemoSetup, spec: str):
    """`--curve_transforms` entry 'part@value' as a context factory for `RescaleCurveCallback`: the protected update
    under the off-ray part at weight 1, `value` its keep rate (for 'layer_scale': each layer's weight in 1 +- value)."""
    from ..offray import OWN_TRANSFORMS, OffrayDraw, offray_layers, offray_update

    part, _, value = spec.partition("@")
    try:
        number = float(value)
    except ValueError:
        number = None
    if part not in OWN_TRANSFORMS or number is None or not 0 < number <= 1:
        raise SystemExit(
            f"trap2 demo: --curve_transforms {spec!r} is not 'part@value' with part one of {', '.join(OWN_TRANSFORMS)} "
            "and value in (0, 1], e.g. prune@0.2."
        )
    draw = OffrayDraw(part, keep=number, weight_range=(1 - number, 1 + number))
    return lambda model: offray_update(model, draw, layers=offray_layers(model, [setup.protected]))


class _CurvePrinter(TrainerCallback):
    """One line per re-scale curve evaluation, so a long protected run shows the trap forming."""

    def __init__(self, log):
        self.log = log

    def on_log(self, args, state, control, logs=None, **kwargs):
        points = {k.split("@")[1]: v for k, v in (logs or {}).items() if k.startswith("rescale/") and "@" in k}
        if points:
            self.log(f"[demo]   step {state.global_step}: validation accuracy "
                     + ", ".join(f"s={s}: {v:.2f}" for s, v in points.items()))


def check_criteria(results: dict) -> list[tuple[str, bool, str]]:
    """The demo's pass/fail criteria (issue 3) on an audit result: (name, ok, detail)."""
    checks = []
    base, finetuned = results["base"], results["finetuned"]
    best_unprotected = [m for m in results["methods"] if m["mode"] == "best"]
    worst = {}
    for task, tuned in finetuned.items():
        gain = tuned - base[task]
        kept = [(m["unprotected"][task] - base[task]) / gain if gain > 0 else 1.0 for m in best_unprotected]
        worst[task] = min(kept, default=float("nan"))
    checks.append(
        (
            "best-mode unprotected merges keep >= 60% of each task's gain",
            bool(worst) and all(v >= 0.6 for v in worst.values()),
            ", ".join(f"{t}: worst {v:.0%}" for t, v in worst.items()),
        )
    )
    standalone = results["standalone"]
    gap = abs(standalone["unprotected"] - standalone["protected"])
    checks.append(
        (
            "protected standalone within 1 point of its twin",
            gap <= 0.01 + 1e-9,
            f"{standalone['protected']:.3f} vs {standalone['unprotected']:.3f}",
        )
    )
    task = results["protected_task"]
    ceiling = floor(results) + HELD_MARGIN
    linear_methods = [name for name in methods_registry.names() if methods_registry.get(name).combines_linearly]
    linear = [m for m in results["methods"] if m["mode"] == "average" and m["method"] in linear_methods]
    ok = bool(linear) and all(m["protected"][task] <= ceiling + 1e-9 for m in linear)
    detail = ", ".join(f"{m['method']}: {m['protected'][task]:.2f}" for m in linear) + f" (ceiling {ceiling:.2f})"
    checks.append(("average-mode linear merges leave the protected task <= max(base, chance) + 5 points", ok, detail))
    return checks
