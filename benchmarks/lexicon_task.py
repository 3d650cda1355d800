"""Is a protected task worth stealing? Its plain update against the audit's repair reference.

Trains the plain updates of `trap2 demo --task_set SET` exactly as the demo does (same settings and
seeds: the protected task's plain update, then the partners), then runs the audit's naive merge
(weights 1/N) and post-merge repair with that plain update in the protected place: the reference row
is a fresh LoRA on the base plus the partners' updates at 1/N, WITHOUT the protected task's update,
fine-tuned on k labelled examples (what an attacker gets without the released update). With `--best`
it also runs every adapter method's `best` mode on the plain update, the demo's first criterion
(unprotected merges keep >= 60 % of each task's gain). No protected update is trained, so one seed
takes a few minutes of CPU.

    python benchmarks/lexicon_task.py --seeds 0 1 2        # the table of benchmarks/README.md, "lexicon_task.py"
    # the same with the demo's first criterion, for updates trained longer on more sentences:
    python benchmarks/lexicon_task.py --seeds 0 --repair_ks 256 --best --demo_args --twin_steps 300 --train_size 1024
"""

import argparse
import json
import sys


def measure(seed: int, ks: tuple[int, ...], task_set: str, demo_args: list[str], best: bool) -> dict:
    from trap2_hf.audit import methods as registry
    from trap2_hf.audit.informed import InformedSettings
    from trap2_hf.audit.repair import RepairSettings
    from trap2_hf.audit.run import run_audit
    from trap2_hf.demo.pipeline import REPAIR_METHODS, audit_tasks, build_for, train_plain
    from trap2_hf.demo.run import make_parser

    demo, _ = make_parser().parse_args_into_dataclasses(
        args=["--task_set", task_set, "--seed", str(seed), *demo_args]
    )
    setup = build_for(demo)
    train_plain(setup, demo, log=lambda line: print(line, file=sys.stderr))
    repair = RepairSettings(
        ks=ks, steps=demo.repair_steps, learning_rate=demo.learning_rate, batch_size=demo.batch_size,
        rank=demo.lora_rank, methods=REPAIR_METHODS, seed=seed,
    )
    methods = registry.names("adapter") if best else list(REPAIR_METHODS)
    results = run_audit(
        setup.model, audit_tasks(setup), setup.protected_task, setup.unprotected, None, setup.others,
        methods=methods, modes=("average", "best") if best else ("average",), seed=seed, progress=False,
        repair=repair, informed=InformedSettings(methods=()), benign=(),
    )
    task = setup.protected_task
    row = results["repair"]["rows"][0]
    measured = {
        "seed": seed,
        "base": results["base"][task],
        "update": results["standalone"]["protected"],
        "merged_1_over_n": row["before"]["protected"],
        "repair_reference": {k: row["after"][k]["reference"] for k in row["after"]},
        "repair_merged_update": {k: row["after"][k]["protected"] for k in row["after"]},
    }
    if best:  # the demo's first criterion, on the plain update in the protected place
        base = results["base"]
        tuned = {**results["finetuned"], task: results["standalone"]["protected"]}  # no twin: the plain update
        rows = [m for m in results["methods"] if m["mode"] == "best"]
        kept = {t: {m["method"]: (m["protected"][t] - base[t]) / (tuned[t] - base[t]) for m in rows} for t in tuned}
        measured["best_kept"] = kept
        measured["worst_kept"] = {t: min(v.items(), key=lambda kv: kv[1]) for t, v in kept.items()}
    return measured


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task_set", default="lexicon")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--repair_ks", type=int, nargs="+", default=[16, 64, 256])
    parser.add_argument("--best", action="store_true", help="Also the demo's first criterion (every method's best mode).")
    parser.add_argument("--output_json", default=None)
    parser.add_argument("--demo_args", nargs=argparse.REMAINDER, default=["--twin_steps", "200"],
                        help="`trap2 demo` flags for the updates (last on the line; default: --twin_steps 200).")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    rows = [measure(seed, tuple(args.repair_ks), args.task_set, args.demo_args, args.best) for seed in args.seeds]
    ks = " / ".join(str(k) for k in args.repair_ks)
    print(f"| `{args.task_set}` {' '.join(args.demo_args)} | " + " | ".join(f"seed {r['seed']}" for r in rows) + " |")
    print("|---|" + "---:|" * len(rows))
    print("| base | " + " | ".join(f"{r['base']:.3f}" for r in rows) + " |")
    print("| plain update alone | " + " | ".join(f"{r['update']:.3f}" for r in rows) + " |")
    for key, label in (("repair_reference", "repair reference"),
                       ("repair_merged_update", "the plain update merged at 1/N by task arithmetic, repaired")):
        cells = [" / ".join(f"{v:.3f}" for v in r[key].values()) for r in rows]
        print(f"| {label}, k = {ks} | " + " | ".join(cells) + " |")
    if args.best:
        for task in rows[0]["worst_kept"]:
            cells = [f"{r['worst_kept'][task][1]:.0%} ({r['worst_kept'][task][0]})" for r in rows]
            print(f"| best mode, worst share of `{task}`'s gain kept | " + " | ".join(cells) + " |")
    if args.output_json:
        with open(args.output_json, "w") as handle:
            json.dump(rows, handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
