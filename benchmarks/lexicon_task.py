"""Is the `lexicon` task worth stealing? Its plain update against the audit's repair reference.

Trains the plain updates of `trap2 demo --task_set lexicon --twin_steps 200` exactly as the demo does
(same settings and seeds: the lexicon update, then `topic` and `object`), then runs the audit's
naive merge (weights 1/N) and post-merge repair with the lexicon update in the protected place: the
reference row is a fresh LoRA on the base plus the partners' updates at 1/N, WITHOUT the lexicon
update, fine-tuned on k labelled examples (what an attacker gets without the released update). No
protected update is trained, so one seed takes a few minutes of CPU.

    python benchmarks/lexicon_task.py --seeds 0 1 2        # the README table ("A task worth stealing")
"""

import argparse
import json
import sys


def measure(seed: int, ks: tuple[int, ...]) -> dict:
    from trap2_hf.audit.informed import InformedSettings
    from trap2_hf.audit.repair import RepairSettings
    from trap2_hf.audit.run import run_audit
    from trap2_hf.demo.pipeline import REPAIR_METHODS, audit_tasks, build_for, train_plain
    from trap2_hf.demo.run import make_parser

    demo, _ = make_parser().parse_args_into_dataclasses(
        args=["--task_set", "lexicon", "--twin_steps", "200", "--seed", str(seed)]
    )
    setup = build_for(demo)
    train_plain(setup, demo, log=lambda line: print(line, file=sys.stderr))
    repair = RepairSettings(
        ks=ks, steps=demo.repair_steps, learning_rate=demo.learning_rate, batch_size=demo.batch_size,
        rank=demo.lora_rank, methods=REPAIR_METHODS, seed=seed,
    )
    results = run_audit(
        setup.model, audit_tasks(setup), setup.protected_task, setup.unprotected, None, setup.others,
        methods=list(REPAIR_METHODS), modes=("average",), seed=seed, progress=False, repair=repair,
        informed=InformedSettings(methods=()),
    )
    task = setup.protected_task
    row = results["repair"]["rows"][0]
    return {
        "seed": seed,
        "base": results["base"][task],
        "update": results["standalone"]["protected"],
        "merged_1_over_n": row["before"]["protected"],
        "repair_reference": {k: row["after"][k]["reference"] for k in row["after"]},
        "repair_merged_update": {k: row["after"][k]["protected"] for k in row["after"]},
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--repair_ks", type=int, nargs="+", default=[16, 64, 256])
    parser.add_argument("--output_json", default=None)
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    rows = [measure(seed, tuple(args.repair_ks)) for seed in args.seeds]
    ks = " / ".join(str(k) for k in args.repair_ks)
    print("| `lexicon` | " + " | ".join(f"seed {r['seed']}" for r in rows) + " |")
    print("|---|" + "---:|" * len(rows))
    print("| base | " + " | ".join(f"{r['base']:.3f}" for r in rows) + " |")
    print("| plain update alone, 200 steps | " + " | ".join(f"{r['update']:.3f}" for r in rows) + " |")
    for key, label in (("repair_reference", "repair reference"),
                       ("repair_merged_update", "the plain update merged at 1/N by task arithmetic, repaired")):
        cells = [" / ".join(f"{v:.3f}" for v in r[key].values()) for r in rows]
        print(f"| {label}, k = {ks} | " + " | ".join(cells) + " |")
    if args.output_json:
        with open(args.output_json, "w") as handle:
            json.dump(rows, handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
