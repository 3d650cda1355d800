"""Protection against the informed attacker (issue #19): the best-response variants against the default,
paired by seed, on the embedded demo (MiniLM, synthetic word-list tasks; CPU, no network).

    OMP_NUM_THREADS=1 python benchmarks/informed_protection.py --seeds 0 1 2 --output_dir runs/informed
    python benchmarks/informed_protection.py --report runs/informed          # the tables again, from the JSON
    python benchmarks/informed_protection.py --report runs/informed runs/other  # variants merged across folders

Per seed, one set-up (tasks, heads, adapter initialisations) is built, the unprotected twin and the
partners' plain updates are trained once, and each variant trains the protected update from the same
initialisation (the demo's protocol: until the validation re-scale curve shows the trap, at most 350
steps), then is audited on the test split: the update alone (vs its twin), task arithmetic at weights
1/N (`average`) and at the best shared weight (`best`), the informed grid on task arithmetic with both
objectives (best mean; the headline: best protected-task accuracy among merges in which every other
task keeps >= 60 % of its gain), `peft_cat` average/best and informed (both objectives), and post-merge
repair (a fresh LoRA on k labelled examples, after the naive merge and after the informed pick, against
the same merge without the released update, `reference`). No variant here trains against a real partner:
the partner pools are synthetic ('spectral') or pseudo-partners the library trains on the protected task's own
inputs with random labels ('pseudo'), so every partner in the audit is held out. A seed's results go to OUTPUT_DIR/<task set>_seed<seed>.json
after each variant; a variant already there is not run again (all is seeded: the set-up is the same).

Training cost per step is counted in passes over a micro-batch (a forward and backward over its b rows
= 1; a forward alone = 1/3): the default fuses the re-scaled copies of a quarter of the rows into the
nominal pass (1.25), worst-case scales (and worst-case off-ray draws) add C forwards over
trap_candidate_fraction of the rows, an off-ray pass 1. Making pseudo-partners (n x steps plain steps, once
before training) is not in the per-step count; it is in the JSON's "seconds". The
measured seconds per step are printed too, but they were measured on a shared machine.
"""

import argparse
import dataclasses
import json
import math
import os
import sys
import tempfile
import time

import torch

NOMINAL = {"trap_offray_weight_min": 0.85, "trap_offray_weight_max": 1.15, "trap_foreign_coef_min": 0.2,
           "trap_foreign_coef_max": 1.0}
VARIANTS = {
    "default": {},
    "worst": {"trap_scale_candidates": 4},
    "soft": {"trap_scale_candidates": 4, "trap_candidate_temperature": 1.0},
    "capped": {"trap_ascent": "capped", "trap_ascent_cap": math.log(4)},
    # At chance-level loss a row's prediction is near uniform but its argmax can still be right: a cap above it.
    "capped_2x": {"trap_ascent": "capped", "trap_ascent_cap": 2 * math.log(4)},
    "worst_capped": {"trap_scale_candidates": 4, "trap_ascent": "capped", "trap_ascent_cap": math.log(4)},
    # Off the ray, at the informed attacker's point: the own update at weight 0.85-1.15 plus partners at 0.2-1
    # (one off-ray pass per step, after the fused pass). 'pseudo': the library's pseudo-partners (short LoRA
    # fine-tunes on the protected task's inputs, random labels, each through its own random head), never a real task.
    "pseudo": {"trap_offray": "foreign", **NOMINAL},
    "spectral": {"trap_offray": "spectral", **NOMINAL},
    # The attacker's best response among the pool: 3 drawn partner terms evaluated without gradient, the ascent
    # at the one where the task recovers most (3 x 1/4 of the rows x 1/3: 0.25 passes; 2.5 in all, the 2x limit).
    "pseudo_worst": {"trap_offray": "foreign", "trap_offray_candidates": 3, **NOMINAL},
}
# Variants whose 'foreign' partners are pseudo-partners made before training: (how many, steps each).
PSEUDO_PARTNERS = {"pseudo": (3, 40), "pseudo_worst": (3, 40)}
FORWARD_ONLY = 1 / 3  # a forward without backward, in passes
MARGIN = 0.05


def passes_per_step(settings: dict) -> float:
    """Passes over a micro-batch per step of the fused demo step (see the module docstring)."""
    share = settings.get("trap_rescaled_fraction") or 0.25 / settings.get("trap_scales_per_step", 2)
    passes = 1 + settings.get("trap_scales_per_step", 2) * share
    candidates = settings.get("trap_scale_candidates", 0)
    passes += candidates * settings.get("trap_candidate_fraction", 0.25) * FORWARD_ONLY
    if settings.get("trap_offray"):  # one forward/backward per off-ray pass, over the whole micro-batch
        passes += settings.get("trap_offray_per_step", 1)
        passes += settings.get("trap_offray_candidates", 0) * settings.get("trap_candidate_fraction", 0.25) * FORWARD_ONLY
    return passes


def run_seed(seed: int, variants: list[str], args, log) -> dict:
    from trap2_hf.demo.run import DemoArguments, audit_setup, build, train_plain, train_protected
    from trap2_hf.demo.variants import adapter_state, load_adapter_state
    from trap2_hf.settings import Trap2Settings

    started = time.perf_counter()
    torch.manual_seed(seed)
    scratch = tempfile.mkdtemp(prefix=f"informed_seed{seed}_")
    demo = DemoArguments(
        output_dir=scratch, task_set=args.task_set, protected_task=args.protected_task, seed=seed,
        methods=args.methods, modes=["average", "best", "informed"], informed_methods=args.informed_methods,
        repair_ks=args.repair_ks,
    )
    sizes = {"train": demo.train_size, "validation": demo.validation_size, "test": demo.test_size}
    setup = build(demo.task_set, demo.protected_task, seed, demo.lora_rank, sizes)
    train_plain(setup, demo, log)
    initial = adapter_state(setup.model, setup.protected)
    result = previous(args.output_dir, args.task_set, seed) or {"seed": seed, "task_set": args.task_set, "variants": {}}
    for name in variants:
        measured = result["variants"].get(name)  # by an earlier run of this seed (same set-up: all is seeded)
        if measured is not None and not (args.fill_benign and "benign/float32" not in measured):
            continue
        load_adapter_state(setup.model, initial)
        pseudo = pseudo_partners(setup, seed, name, scratch)
        settings = Trap2Settings(**VARIANTS[name], **({"trap_foreign_adapters": pseudo} if pseudo else {}))
        settings.validate_trap_settings()
        run = train_protected(setup, demo, settings, log)["runs"][-1]
        if measured is not None:  # only the guard is missing: an audit of one naive merge carries it
            cheap = dataclasses.replace(demo, methods=["task_arithmetic"], modes=["average"], informed_methods=[],
                                        repair_ks=[])
            audit = audit_setup(setup, cheap)
            measured.update(benign_cells(audit, "protected"), benign_retrained_alone=audit["standalone"]["protected"])
            result.setdefault("twin_merges", {}).update(benign_cells(audit, "unprotected"))
            log(f"[informed] seed {seed} {name}: guard filled in, retrained alone "
                f"{audit['standalone']['protected']:.3f} (first run: {measured['alone']:.3f})")
            save(args.output_dir, result)
            continue
        start = time.perf_counter()
        first = "twin" not in result
        audit = audit_setup(setup, demo, unprotected="twin" if first else None)
        row = summarize(audit, setup.protected_task)
        if settings.trap_offray_terms:
            row["pool_protected"] = pool_accuracy(setup, settings, seed)
        row.update(
            steps=run["steps"], trapped_at_step=run["trapped_at_step"], train_s=run["seconds"],
            s_per_step=run["seconds"] / max(run["steps"], 1), audit_s=time.perf_counter() - start,
            passes_per_step=passes_per_step(VARIANTS[name]), settings=VARIANTS[name],
        )
        if first:
            result["twin"] = audit["standalone"]["unprotected"]
            result["twin_merges"] = summarize_twin(audit, setup.protected_task)
        result["variants"][name] = row
        result.setdefault("seconds", {})[name] = time.perf_counter() - started  # set-up included, under load
        started = time.perf_counter()
        log(f"[informed] seed {seed} {name}: " + json.dumps({k: v for k, v in row.items() if k != "settings"}))
        save(args.output_dir, result)
    return result


def pseudo_partners(setup, seed: int, variant: str, scratch: str) -> list[str]:
    """The folders of the variant's pseudo-partners (`make_pseudo_partners`), each trained through its own random
    head on the protected task's training inputs with random labels; none for a variant without them."""
    if variant not in PSEUDO_PARTNERS:
        return []
    from trap2_hf.demo.partners import pseudo_partner_folders

    count, steps = PSEUDO_PARTNERS[variant]
    return pseudo_partner_folders(setup, seed, count, steps, scratch)


def pool_accuracy(setup, settings, seed: int) -> float:
    """The protected task's test accuracy in a merge drawn from the variant's own training pool: the update at 0.9
    plus each of its partners at 0.75 (the informed attacker's usual pick, with the pool in the partners' place),
    to tell a trap that does not form in the pool from one that forms there and does not reach held-out partners."""
    from trap2_hf.demo import model as demo_model
    from trap2_hf.offray import OffrayDraw, load_foreign_update, offray_layers, offray_update

    foreign = [load_foreign_update(folder) for folder in settings.trap_foreign_adapters]
    term = settings.trap_offray_terms[0]
    draw = OffrayDraw(term, weight=0.9, coefs=(0.75,) * max(len(foreign), 1), seed=seed)
    setup.model.set_adapter(setup.protected, inference_mode=True)
    layers = offray_layers(setup.model, [setup.protected])
    task = setup.protected_task
    with torch.no_grad(), offray_update(setup.model, draw, foreign if foreign else (), layers):
        return demo_model.accuracy(setup.model, setup.heads[task], setup.data[task]["test"])


def measure_cost(variants: list[str], rounds: int, steps: int, log) -> dict:
    """Seconds per training step of each variant, measured side by side: the variants take turns for `rounds`
    rounds of `steps` steps each on the demo's protected task, in one process; the ratio to 'default' is
    what to read (the machine's load changes between rounds, and each round has all variants)."""
    from trap2_hf.demo.run import build, train_update
    from trap2_hf.settings import Trap2Settings

    setup = build()
    seconds = {name: 0.0 for name in variants}
    for _ in range(rounds):
        for name in variants:
            run = train_update(setup, setup.protected, setup.protected_task, steps, Trap2Settings(**VARIANTS[name]))
            seconds[name] += run["seconds"]
    per_step = {name: total / (rounds * steps) for name, total in seconds.items()}
    result = {name: {"s_per_step": value, "vs_default": value / per_step["default"]} for name, value in per_step.items()}
    log("[cost] " + json.dumps(result))
    return result


def _entry(audit: dict, method: str, mode: str) -> dict | None:
    return next((e for e in audit["methods"] if e["method"] == method and e["mode"] == mode), None)


def summarize(audit: dict, task: str) -> dict:
    """The protected task's test accuracy under each attack, with the protected update."""
    row = {
        "alone": audit["standalone"]["protected"],
        "ceiling": max(audit["base"][task], audit["chance"][task]) + MARGIN,
        "curve": dict(zip(map(str, audit["rescale_curve"]["scales"]), audit["rescale_curve"]["protected"])),
    }
    for entry in audit["methods"]:
        method, mode = entry["method"], entry["mode"]
        if mode in ("average", "best"):
            row[f"{method}/{mode}"] = entry["protected"][task]
        elif mode == "informed":
            for objective, picks in entry["objectives"].items():
                pick = picks.get("protected")
                row[f"{method}/informed_{objective}"] = None if pick is None else pick["test"][task]
                row[f"{method}/informed_{objective}_weights"] = None if pick is None else pick["config"]["weights"]
    row.update(repair_cells(audit, "protected"))
    row.update(benign_cells(audit, "protected"))
    row["repair_reference"] = repair_cells(audit, "reference")
    return row


def benign_cells(audit: dict, variant: str) -> dict:
    """The guard (the audit's `benign` section): the update alone, folded into the base, under each
    benign perturbation; for the protected update also whether it holds within a point of its twin."""
    section = audit.get("benign")
    if not section or not section.get(variant):
        return {}
    cells = {f"benign/{p}": value for p, value in section[variant].items()}
    if variant == "protected" and section["held"] is not None:
        cells["benign/held"] = section["all_held"]
    return cells


def repair_cells(audit: dict, run: str) -> dict:
    """The protected-task test accuracy of one repair run ("protected", "unprotected" or "reference",
    the same merge without the released update) before repair and after it with each k, per method and
    stage (`average`: the naive merge; `informed`: the informed attacker's pick)."""
    cells = {}
    for entry in audit.get("repair", {}).get("rows", []):
        prefix = f"repair/{entry['method']}/{entry['stage']}"
        if run not in entry["before"]:
            continue
        cells[f"{prefix}/before"] = entry["before"][run]
        for k, scores in entry["after"].items():
            cells[f"{prefix}/k{k}"] = scores[run]
    return cells


def summarize_twin(audit: dict, task: str) -> dict:
    out = {}
    for entry in audit["methods"]:
        if entry["mode"] in ("average", "best") and entry.get("unprotected"):
            out[f"{entry['method']}/{entry['mode']}"] = entry["unprotected"][task]
        elif entry["mode"] == "informed":
            for objective, picks in entry["objectives"].items():
                pick = picks.get("unprotected")
                out[f"{entry['method']}/informed_{objective}"] = None if pick is None else pick["test"][task]
    out.update(repair_cells(audit, "unprotected"))
    out.update(benign_cells(audit, "unprotected"))
    return out


def result_path(folder: str, task_set: str, seed: int) -> str:
    return os.path.join(folder, f"{task_set}_seed{seed}.json")


def previous(folder: str, task_set: str, seed: int) -> dict | None:
    path = result_path(folder, task_set, seed)
    if not os.path.exists(path):
        return None
    with open(path) as handle:
        return json.load(handle)


def save(folder: str, result: dict) -> None:
    os.makedirs(folder, exist_ok=True)
    path = result_path(folder, result["task_set"], result["seed"])
    with open(path + ".tmp", "w") as handle:
        json.dump(result, handle, indent=2)
    os.replace(path + ".tmp", path)


COLUMNS = (
    ("alone", "alone"),
    ("task_arithmetic/average", "TA 1/N"),
    ("task_arithmetic/best", "TA best"),
    ("task_arithmetic/informed_mean", "TA informed mean"),
    ("task_arithmetic/informed_constrained", "TA informed ≥60 %"),
    ("peft_cat/average", "peft_cat 1/N"),
    ("peft_cat/best", "peft_cat best"),
    ("peft_cat/informed_mean", "peft_cat informed mean"),
    ("peft_cat/informed_constrained", "peft_cat informed ≥60 %"),
    ("pool_protected", "own pool (0.9 + 0.75 each)"),
)
REPAIR_STAGES = (("average", "naive"), ("informed", "informed pick"))


def _fmt(value) -> str:
    return "none" if value is None else f"{value:.3f}"


def goal(row: dict, twin: float, default_passes: float) -> bool:
    """The issue's goal: every attacked method's informed headline at or below the ceiling, alone within
    1 point of the twin, at most 2x the default's passes."""
    headlines = [v for k, v in row.items() if k.endswith("/informed_constrained") and v is not None]
    held = all(headline <= row["ceiling"] + 1e-9 for headline in headlines)
    return held and abs(row["alone"] - twin) <= 0.01 + 1e-9 and row["passes_per_step"] <= 2 * default_passes + 1e-9


def report(results: list[dict]) -> str:
    results = sorted(results, key=lambda r: (r["task_set"], r["seed"]))
    shown = [c for c in COLUMNS if any(c[0] in v for r in results for v in r["variants"].values())]
    lines = ["| task set | seed | variant | " + " | ".join(h for _, h in shown)
             + " | twin alone | steps | passes/step | s/step | goal |",
             "|" + "---|" * (len(shown) + 8)]
    for r in results:
        default_passes = passes_per_step(VARIANTS["default"])
        for name, row in r["variants"].items():
            cells = [r["task_set"], str(r["seed"]), name, *(_fmt(row.get(key)) for key, _ in shown),
                     f"{r['twin']:.3f}", f"{row['steps']}{'' if row['trapped_at_step'] else ' (no trap)'}",
                     f"{row['passes_per_step']:.2f}", f"{row['s_per_step']:.2f}",
                     "yes" if goal(row, r["twin"], default_passes) else "no"]
            lines.append("| " + " | ".join(cells) + " |")
    ceilings = sorted({f"{r['task_set']} seed {r['seed']}: {next(iter(r['variants'].values()))['ceiling']:.3f}"
                       for r in results})
    lines.append("")
    lines.append("Ceiling max(base, chance) + 5 points: " + "; ".join(ceilings) + ".")
    keys = {key for key, _ in shown}
    twins = [f"{r['task_set']} seed {r['seed']}: "
             + ", ".join(f"{k} {_fmt(v)}" for k, v in r["twin_merges"].items() if k in keys)
             for r in results if r.get("twin_merges")]
    if twins:
        lines.append("Twin in the protected update's place: " + "; ".join(twins) + ".")
    benign = benign_table(results)
    if benign:
        lines += ["", benign]
    repair = repair_columns(results)
    if repair:
        lines += ["", repair_table(results, repair)]
    lines.append("")
    lines.append(paired(results, shown + repair))
    return "\n".join(lines)


def benign_table(results: list[dict]) -> str:
    """The guard: each variant and the twin alone under the benign perturbations (the audit's `benign`)."""
    perturbations = list(dict.fromkeys(key.split("/", 1)[1] for r in results for v in r["variants"].values()
                                       for key in v if key.startswith("benign/") and key != "benign/held"))
    if not perturbations:
        return ""
    lines = ["The update alone, folded into the base, under benign perturbations (protected-task test accuracy; "
             "holds: no perturbation puts it more than 1 point below the twin under the same one):", "",
             "| task set | seed | run | " + " | ".join(perturbations) + " | holds |", "|" + "---|" * (len(perturbations) + 4)]
    for r in results:
        runs = [(name, row) for name, row in r["variants"].items()] + [("twin", r.get("twin_merges", {}))]
        for label, cells in runs:
            if any(f"benign/{p}" in cells for p in perturbations):
                held = cells.get("benign/held")
                lines.append("| " + " | ".join([r["task_set"], str(r["seed"]), label,
                                                *(_fmt(cells.get(f"benign/{p}")) for p in perturbations),
                                                "–" if held is None else ("yes" if held else "no")]) + " |")
    return "\n".join(lines)


def repair_columns(results: list[dict]) -> list[tuple[str, str]]:
    """The repair cells present in `results`, in (method, stage, before, k ascending) order."""
    present = {key for r in results for v in r["variants"].values() for key in v if key.startswith("repair/")}
    methods = sorted({key.split("/")[1] for key in present})
    ks = sorted({int(key.rsplit("/k", 1)[1]) for key in present if "/k" in key})
    columns = []
    for method in methods:
        for stage, label in REPAIR_STAGES:
            for cell, head in (("before", "before"), *((f"k{k}", f"k={k}") for k in ks)):
                key = f"repair/{method}/{stage}/{cell}"
                if key in present:
                    columns.append((key, f"{method} {label} {head}"))
    return columns


def repair_table(results: list[dict], columns: list[tuple[str, str]]) -> str:
    """Post-merge repair: the protected task after a fresh LoRA on k labelled examples, for each
    variant, for the same merge without the released update (`reference`) and with the twin."""
    lines = ["Post-merge repair (protected-task test accuracy; reference = the same merge without the released "
             "update, what the attacker has without it):", "",
             "| task set | seed | run | " + " | ".join(h for _, h in columns) + " |", "|" + "---|" * (len(columns) + 3)]
    for r in results:
        runs = []
        for name, row in r["variants"].items():
            runs += [(name, row), (f"{name}: reference", row.get("repair_reference", {}))]
        runs.append(("twin", r.get("twin_merges", {})))
        for label, cells in runs:
            if any(key in cells for key, _ in columns):
                lines.append("| " + " | ".join([r["task_set"], str(r["seed"]), label,
                                                *(_fmt(cells.get(key)) for key, _ in columns)]) + " |")
    return "\n".join(lines)


def paired(results: list[dict], shown) -> str:
    """Per variant, the mean over seeds of (variant - default) for each column, with the per-seed values."""
    variants = list(dict.fromkeys(v for r in results for v in r["variants"] if v != "default"))
    lines = ["Paired differences, variant - default (mean over seeds; per seed in brackets):", "",
             "| task set | variant | " + " | ".join(h for _, h in shown) + " | steps |", "|" + "---|" * (len(shown) + 3)]
    for task_set in sorted({r["task_set"] for r in results}):
        for variant in variants:
            runs = [r for r in results if r["task_set"] == task_set and variant in r["variants"] and "default" in r["variants"]]
            if not runs:
                continue
            cells = [task_set, variant]
            for key, _ in [*shown, ("steps", "")]:
                diffs = []
                for r in runs:
                    a, b = r["variants"][variant].get(key), r["variants"]["default"].get(key)
                    if a is not None and b is not None:
                        diffs.append(a - b)
                if not diffs:
                    cells.append("–")
                    continue
                fmt = "{:+.0f}" if key == "steps" else "{:+.3f}"
                cells.append(fmt.format(sum(diffs) / len(diffs)) + " [" + ", ".join(fmt.format(d) for d in diffs) + "]")
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def load(*folders: str) -> list[dict]:
    """The results in `folders`, one per (task set, seed): variants of the same (task set, seed) from
    several folders are merged (another helper's variants pair with this folder's default); where two
    folders hold the same variant, the first folder's is kept."""
    merged: dict[tuple, dict] = {}
    for folder in folders:
        for name in sorted(os.listdir(folder)):
            if not name.endswith(".json"):
                continue
            with open(os.path.join(folder, name)) as handle:
                result = json.load(handle)
            key = (result["task_set"], result["seed"])
            if key not in merged:
                merged[key] = result
                continue
            into = merged[key]
            for variant, row in result["variants"].items():
                into["variants"].setdefault(variant, row)
            for field in ("twin", "twin_merges"):
                if field not in into and field in result:
                    into[field] = result[field]
    return list(merged.values())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--task_set", default="demo")
    parser.add_argument("--protected_task", default=None)
    parser.add_argument("--methods", nargs="+", default=["task_arithmetic", "peft_cat"])
    parser.add_argument("--informed_methods", nargs="+", default=["task_arithmetic", "peft_cat"])
    parser.add_argument("--repair_ks", type=int, nargs="*", default=[16, 64, 256])
    parser.add_argument("--output_dir", default="informed_protection")
    parser.add_argument("--fill_benign", action="store_true",
                        help="Retrain the variants already measured without the guard (the audit's benign "
                        "section) and add it to their rows.")
    parser.add_argument("--cost_rounds", type=int, default=0,
                        help="Instead of the audit: seconds per step of the variants, side by side, this many rounds.")
    parser.add_argument("--cost_steps", type=int, default=20)
    parser.add_argument("--report", nargs="+", default=None,
                        help="Only print the tables of the JSON files in these folders (variants of one task set "
                        "and seed merged across folders).")
    args = parser.parse_args(argv)
    if args.report:
        print(report(load(*args.report)))
        return 0
    if args.variants[0] != "default":
        parser.error("--variants must start with 'default': the others are compared to it, paired by seed.")
    if args.cost_rounds:
        measure_cost(args.variants, args.cost_rounds, args.cost_steps, print)
        return 0

    def log(message):
        print(message, flush=True)

    for seed in args.seeds:
        run_seed(seed, args.variants, args, log)
    print(report(load(args.output_dir)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
