"""mergekit's own merges of the demo's updates: what a merger who runs `mergekit-yaml` gets.

Trains the demo's updates exactly as `trap2 demo` does (same settings and seeds), then audits every mergekit
method (`mergekit:NAME`, run in memory by the audit's one engine) at naive weights (1/N, density 0.2 for
the sparsifying methods) and at its public points, merging the protected update (and, separately, its twin)
with the other tasks' updates, and prints the protected task and the all-task average on the test split.
With `--pairs` it also merges the protected update with each other update alone, where slerp and nuslerp
apply. The audit's own `task_arithmetic` at weights 1/N is printed beside mergekit's as a cross-check.

    pip install 'trap2_hf[demo,mergekit]'
    python benchmarks/mergekit_demo.py                      # ~2 min of training, then the merges
    python benchmarks/mergekit_demo.py --seed 1 --pairs --output_json mergekit_demo.json
"""

import argparse
import json
import sys
import time

import torch


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=0, help="The demo's seed (data, heads, adapters, training).")
    parser.add_argument("--methods", nargs="+", default=None,
                        help="mergekit methods, as mergekit:NAME (default: every one that applies).")
    parser.add_argument("--modes", nargs="+", default=["average", "public"], help="Audit modes to run.")
    parser.add_argument("--pairs", action="store_true", help="Also merge the protected update with each other alone.")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default).")
    parser.add_argument("--output_json", default=None, help="Write the audits and timings here.")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from trap2_hf.audit import format_table, methods, run_audit
    from trap2_hf.demo.pipeline import audit_tasks, build, train_plain, train_protected, with_foreign_updates
    from trap2_hf.demo.run import make_parser

    chosen = args.methods or [*methods.names(backend="mergekit"), "task_arithmetic"]
    demo, trap = make_parser().parse_args_into_dataclasses(args=["--seed", str(args.seed)])
    trap.validate_trap_settings()
    start = time.perf_counter()
    sizes = {"train": demo.train_size, "validation": demo.validation_size, "test": demo.test_size}
    setup = build(demo.task_set, demo.protected_task, demo.seed, demo.lora_rank, sizes)
    train_plain(setup, demo, log=lambda *a: None)
    train_protected(setup, demo, with_foreign_updates(setup, demo, trap), log=lambda *a: None)
    trained = time.perf_counter()
    tasks, task = audit_tasks(setup), setup.protected_task
    common = dict(seed=args.seed, modes=tuple(args.modes), sweep_scales=(1.0,), progress=False, benign=())

    audits = {"all": run_audit(setup.model, tasks, task, setup.protected, setup.unprotected, setup.others,
                               methods=chosen, **common)}
    merged = time.perf_counter()
    if args.pairs:
        for other, adapter in setup.others.items():
            pair_tasks = [t for t in tasks if t.name in (task, other)]
            audits[f"pair:{other}"] = run_audit(setup.model, pair_tasks, task, setup.protected, setup.unprotected,
                                                {other: adapter}, methods=chosen, **common)
    end = time.perf_counter()

    ours = next(e for e in audits["all"]["methods"] if e["method"] == "task_arithmetic" and e["mode"] == "average")
    print(f"Demo updates, seed {args.seed}; protected task `{task}`: base {audits['all']['base'][task]:.3f}; the "
          f"audit's own task_arithmetic, w=1/N: {ours['protected'][task]:.3f} w/ protected, "
          f"{ours['unprotected'][task]:.3f} w/ twin.\n")
    for name, results in audits.items():
        print(f"[{name}]\n" + format_table(results) + "\n")
    timings = {"train_s": trained - start, "mergekit_all_s": merged - trained, "total_s": end - start}
    print("timings: " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()))
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump({"audits": audits, "timings": timings}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
