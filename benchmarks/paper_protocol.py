"""The paper's protocol (issue #30, item 4): one protected update among eight, merged by every method with ONE
weight shared by all updates, searched on validation over 0.1-2.0 (step 0.1), reported on test; the protected
update's unprotected twin audited in its place. Several seeds; protection variants paired on the same plain
updates (the demo's `--compare_variants` specs). MiniLM on the synthetic word-list tasks, CPU, no network.

    OMP_NUM_THREADS=1 python benchmarks/paper_protocol.py --seeds 0 1 --variants default --output_dir runs/paper
    OMP_NUM_THREADS=1 python benchmarks/paper_protocol.py --seeds 0 1 --output_dir runs/paper \\
        --variants default "rim:trap_rim_share=0.5" "della:trap_offray=della:trap_offray_fraction=0.25"
    python benchmarks/paper_protocol.py --report runs/paper          # the tables again, from the JSON

Per seed: the task set's tasks, heads and adapter initialisations are built (`trap2_hf.demo.pipeline.build`), the
twin and the seven other tasks' plain updates trained once (the demo's plain budget: 60 steps), and each variant
trains the protected update from the same initialisation as `trap2 demo` does (until its validation re-scale curve
shows the trap, at most --protected_max_steps steps), then `run_audit(..., modes=("best",), grids={"weight": ...})`
over the registry's adapter methods (ours, PEFT's and, when installed, mergekit's as mergekit:NAME; those that
merge two updates only are reported as skipped), the guard (the update alone under bf16 / fp16 / int8) included; the
audit's transforms section and traced column are left out (the protocol reads the best mode only). No real partner
is used in training: a 'foreign' variant needs `pseudo_partners=N`. A seed's results go to
OUTPUT_DIR/<task set>_seed<seed>.json after each variant; a variant already there is not run again (everything is
seeded, so the set-up is the same).

The report: per variant and method, the protected task's test accuracy merged with the protected update (median and
worst over seeds) against the twin's, the ceiling max(base, chance) + 5 points, and whether the twin's merge keeps
>= 60 % of the protected task's gain (where the bar applies); per task, its accuracy alone and the worst share of
its gain the twin's best merges keep (the task set's own check: merging eight plain updates must be worth it).
"""

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time

from informed_protection import previous, save  # the same resumable JSON file per seed

PAPER_WEIGHTS = tuple(round(0.1 * k, 1) for k in range(1, 21))  # 0.1, 0.2, ..., 2.0
MARGIN = 0.05  # the bar: max(base, chance) + 5 points (median over seeds)
GAIN_KEPT = 0.6  # where the twin's merge keeps at least this share of the protected task's gain


def run_seed(seed: int, args, log) -> dict:
    import torch

    from trap2_hf.audit import methods as registry
    from trap2_hf.audit.run import run_audit
    from trap2_hf.audit.settings import TransformSettings
    from trap2_hf.demo.arguments import DemoArguments
    from trap2_hf.demo.pipeline import audit_tasks, build_for, train_plain, train_protected, with_foreign_updates
    from trap2_hf.demo.variants import adapter_state, load_adapter_state, parse_variant
    from trap2_hf.settings import Trap2Settings

    demo = DemoArguments(
        output_dir=os.path.join(args.output_dir, f"{args.task_set}_seed{seed}"), task_set=args.task_set,
        protected_task=args.protected_task, seed=seed, protected_max_steps=args.protected_max_steps,
        steps=args.steps, train_size=args.train_size,
    )
    result = previous(args.output_dir, args.task_set, seed) or {
        "seed": seed, "task_set": args.task_set, "weights": list(args.weights), "variants": {},
    }
    todo = [spec for spec in args.variants if parse_variant(spec)[0] not in result["variants"]]
    if not todo:
        return result
    torch.manual_seed(seed)
    setup = build_for(demo)
    result["plain_runs"] = train_plain(setup, demo, log)
    initial = adapter_state(setup.model, setup.protected)
    methods = args.methods or registry.names("adapter")
    for spec in todo:
        label, overrides, demo_overrides = parse_variant(spec)
        if overrides is None:
            raise SystemExit(f"paper_protocol: {spec!r} is the twin, which every audit carries already.")
        start = time.perf_counter()
        variant_demo = dataclasses.replace(demo, **demo_overrides)
        if "trap_lambda" in overrides and "trap_offray_lambda" not in overrides:
            overrides["trap_offray_lambda"] = None
        settings = with_foreign_updates(setup, variant_demo, Trap2Settings(**overrides))
        settings.validate_trap_settings()
        load_adapter_state(setup.model, initial)
        run = train_protected(setup, variant_demo, settings, log)["runs"][-1]
        first = "twin" not in result
        audit = run_audit(
            setup.model, audit_tasks(setup), setup.protected_task, setup.protected,
            setup.unprotected if first else None, setup.others, target="adapter", methods=methods, modes=("best",),
            seed=seed, grids={"weight": tuple(args.weights)}, progress=args.progress,
            transforms=TransformSettings(kinds=()), trace=False,
        )
        if first:
            result.update(twin_cells(audit))
        result["variants"][label] = {
            "spec": spec, "settings": {**settings.trap_settings_dict(), **demo_overrides},
            "steps": run["steps"], "trapped_at_step": run["trapped_at_step"], "train_s": run["seconds"],
            "audit_s": time.perf_counter() - start - run["seconds"], **variant_cells(audit),
        }
        log(f"[paper] seed {seed} {label}: alone {audit['standalone']['protected']:.3f}, best merges "
            + ", ".join(f"{m}: {v['protected']:.2f}" for m, v in result["variants"][label]["best"].items()))
        save(args.output_dir, result)
    return result


def variant_cells(audit: dict) -> dict:
    """What a variant's row needs: the update alone, its guard, and per method the protected task's test accuracy
    at the weight chosen on validation (with that weight and the merged average over every task)."""
    task = audit["protected_task"]
    best = {
        e["method"]: {"protected": e["protected"][task], "average": e["protected"]["average"], "params": e["params"]}
        for e in audit["methods"] if e["mode"] == "best"
    }
    return {
        "alone": audit["standalone"]["protected"],
        "guard": (audit.get("benign") or {}).get("protected"),
        "rescale_curve": dict(zip(map(str, audit["rescale_curve"]["scales"]), audit["rescale_curve"]["protected"])),
        "best": best,
        "skipped": audit["skipped"],
    }


def twin_cells(audit: dict) -> dict:
    """The seed's reference: base, chance, each task's update alone (test), and the twin's best merges (every
    task's accuracy, so the share of each task's gain they keep can be read)."""
    task = audit["protected_task"]
    return {
        "protected_task": task,
        "base": audit["base"],
        "chance": audit["chance"],
        "finetuned": audit["finetuned"],
        "twin": audit["standalone"]["unprotected"],
        "twin_guard": (audit.get("benign") or {}).get("unprotected"),
        "twin_best": {
            e["method"]: {**{t: e["unprotected"][t] for t in audit["tasks"]}, "average": e["unprotected"]["average"],
                          "params": e["unprotected_params"]}
            for e in audit["methods"] if e["mode"] == "best"
        },
    }


# ----------------------------------------------------------------------------- the report
def ceiling(result: dict) -> float:
    task = result["protected_task"]
    return max(result["base"][task], result["chance"][task]) + MARGIN


def kept(result: dict, task: str, merged: float) -> float:
    """The share of `task`'s gain over the base that a merge scoring `merged` keeps."""
    gain = result["finetuned"][task] - result["base"][task]
    return (merged - result["base"][task]) / gain if gain > 0 else 1.0


def report(results: list[dict]) -> str:
    """Markdown: the task set's own check, then per variant x method the protected task under the best shared
    weight (median / worst over seeds) against the twin's."""
    results = sorted(results, key=lambda r: (r["task_set"], r["seed"]))
    lines = []
    for task_set in dict.fromkeys(r["task_set"] for r in results):
        runs = [r for r in results if r["task_set"] == task_set and "twin" in r]
        if not runs:
            continue
        task = runs[0]["protected_task"]
        seeds = ", ".join(str(r["seed"]) for r in runs)
        lines += [f"## `{task_set}`, protected task `{task}`, seeds {seeds}", ""]
        lines += _task_check(runs)
        lines += ["", _variant_table(runs, task)]
    return "\n".join(lines)


def _task_check(runs: list[dict]) -> list[str]:
    """Per task: accuracy alone (test, min over seeds) and the worst share of its gain the twin's best merges keep."""
    tasks = list(runs[0]["finetuned"])
    lines = ["| task | base | alone (min over seeds) | twin's best merges keep of its gain: worst method (min over seeds) |",
             "|---|---:|---:|---|"]
    for task in tasks:
        alone = min(r["finetuned"][task] for r in runs)
        base = statistics.median(r["base"][task] for r in runs)
        worst = min(((kept(r, task, scores[task]), m) for r in runs for m, scores in r["twin_best"].items()),
                    default=(float("nan"), "-"))
        lines.append(f"| {task} | {base:.3f} | {alone:.3f} | {worst[0]:.0%} ({worst[1]}) |")
    return lines


def _variant_table(runs: list[dict], task: str) -> str:
    labels = list(dict.fromkeys(label for r in runs for label in r["variants"]))
    methods = list(dict.fromkeys(m for r in runs for v in r["variants"].values() for m in v["best"]))
    head = ["variant", "alone (worst gap to twin)", "steps", *methods, "holds"]
    lines = [
        f"`{task}` test accuracy at the best shared weight: median / worst over seeds (the twin's median in brackets); "
        f"ceiling max(base, chance) + {MARGIN:.2f}: {statistics.median(ceiling(r) for r in runs):.3f} (median). "
        f"'holds': every method's median at or below the ceiling and its worst at most 5 points above, where the "
        f"twin's merge keeps >= {GAIN_KEPT:.0%} of the task's gain.",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    twin = {m: [r["twin_best"][m][task] for r in runs if m in r["twin_best"]] for m in methods}
    for label in labels:
        rows = [r for r in runs if label in r["variants"]]
        alone = [r["variants"][label]["alone"] - r["twin"] for r in rows]
        steps = [r["variants"][label]["steps"] for r in rows]
        cells = [label, f"{statistics.median(r['variants'][label]['alone'] for r in rows):.3f} "
                        f"({max(alone, key=abs):+.3f})",
                 "/".join(str(s) for s in steps)]
        holds = True
        for method in methods:
            values = [r["variants"][label]["best"][method]["protected"] for r in rows if method in r["variants"][label]["best"]]
            bars = [r for r in rows if method in r["twin_best"] and kept(r, task, r["twin_best"][method][task]) >= GAIN_KEPT]
            if not values:
                cells.append("–")
                continue
            median, worst = statistics.median(values), max(values)
            cells.append(f"{median:.2f} / {worst:.2f} ({statistics.median(twin[method]):.2f})")
            limit = statistics.median(ceiling(r) for r in rows)
            if bars and (median > limit + 1e-9 or worst > limit + MARGIN + 1e-9):
                holds = False
        cells.append("yes" if holds else "no")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def load_results(folders: list[str]) -> list[dict]:
    results = []
    for folder in folders:
        for name in sorted(os.listdir(folder)):
            if name.endswith(".json") and "_seed" in name:
                with open(os.path.join(folder, name)) as handle:
                    results.append(json.load(handle))
    return results


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task_set", default="eight", help="Task set (default: eight, the paper's 8-way merge).")
    parser.add_argument("--protected_task", default=None, help="Protected task (default: the set's first).")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--variants", nargs="+", default=["default"],
                        help="Protection variants, as `trap2 demo --compare_variants` takes them (presets or "
                        "'label:field=value:...'); the twin is audited with the first.")
    parser.add_argument("--methods", nargs="+", default=None, help="Merge methods (default: every adapter method).")
    parser.add_argument("--weights", type=float, nargs="+", default=list(PAPER_WEIGHTS),
                        help="The shared-weight grid (default 0.1-2.0, step 0.1).")
    parser.add_argument("--protected_max_steps", type=int, default=350)
    parser.add_argument("--steps", type=int, default=60, help="Plain updates' steps (the demo's budget).")
    parser.add_argument("--train_size", type=int, default=512, help="Training sentences per task.")
    parser.add_argument("--output_dir", default="runs/paper_protocol")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--progress", action="store_true", help="Show the audit's progress bar.")
    parser.add_argument("--report", nargs="*", default=None, metavar="FOLDER",
                        help="Only print the tables of the JSON in these folders (default: --output_dir).")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    if args.report is not None:
        print(report(load_results(args.report or [args.output_dir])))
        return 0
    import torch

    torch.set_num_threads(args.threads)
    for seed in args.seeds:
        run_seed(seed, args, lambda line: print(line, flush=True))
    text = report(load_results([args.output_dir]))
    with open(os.path.join(args.output_dir, "paper_protocol.md"), "w") as handle:
        handle.write(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
