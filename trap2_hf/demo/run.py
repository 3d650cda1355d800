"""The embedded demo behind `make demo`: protection holding against the merges people use.

On one shared base (a pretrained MiniLM) it trains, with the project's own trainer, a protected and
an unprotected LoRA for one task and plain LoRAs for the other tasks, then runs the merge audit and
writes audit.json, audit.md and audit.png. CPU only, no network.

    trap2 demo --output_dir demo_output
    trap2 demo --output_dir demo_output --seed 1 --trap_lambda 0.1      # any protection setting
    trap2 demo --task_set heldout --protected_task emotion               # the other task set
    trap2 demo --task_set lexicon --twin_steps 200                      # a task worth stealing

The protected update uses the library's default protection settings (`Trap2Settings`; every field
is a flag) and trains until its re-scale curve on validation data shows the trap on both sides of
s = 1 with its accuracy intact (`RescaleCurveCallback`), at most `--protected_max_steps` steps.
"""

import sys

import torch
from transformers import HfArgumentParser

from .._args import refuse_removed_flags
from .._lazy import lazy_exports
from ..choices import target
from ..settings import Trap2Settings
from .arguments import REMOVED_FLAGS, DemoArguments

# The pipeline lived here before pipeline.py: `from trap2_hf.demo.run import build` (benchmarks) still works,
# importing the pipeline (and the trainer) only when such a name is asked for.
_MOVED = ("DemoSetup", "audit_setup", "audit_tasks", "base_accuracy", "build", "check_criteria", "heldout_partner",
          "train_all", "train_plain", "train_protected", "train_update", "with_foreign_updates")
__getattr__ = lazy_exports(__name__, dict.fromkeys(_MOVED, "trap2_hf.demo.pipeline"))


def make_parser() -> HfArgumentParser:
    return HfArgumentParser((DemoArguments, Trap2Settings), prog="trap2 demo", description=__doc__.split("\n")[0])


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = make_parser()
    refuse_removed_flags(parser, argv, REMOVED_FLAGS)
    demo, trap = parser.parse_args_into_dataclasses(args=argv)
    trap.validate_trap_settings()
    if not target(trap.trap_target).is_adapter:
        raise SystemExit(
            f"trap2 demo: the demo's updates are LoRA adapters; trap_target must be 'adapter', not {trap.trap_target!r}."
        )
    if demo.threads:
        torch.set_num_threads(demo.threads)
    from ..report.summary import cost_lines, public_summary, trace_lines
    from ..report.tables import format_table
    from .pipeline import build_for, run_demo
    from .variants import compare_variants, format_heldout

    if demo.compare_variants:
        return compare_variants(build_for(demo), demo, trap)
    results, checks, timings, paths = run_demo(demo, trap)
    print(format_table(results))
    if "heldout_partner" in results:
        print(format_heldout(results))
    for name, ok, detail in checks:
        print(f"[{'PASS' if ok else 'FAIL'}] {name}: {detail}")
    if public_summary(results):
        print(f"[demo] {public_summary(results)}")
    for line in trace_lines(results):
        print(f"[demo] {line}")
    print("[demo] audit per mode (merges evaluated per variant, seconds): " + ", ".join(
        f"{mode} {row['evaluations']} over {row['methods']} methods in {row['seconds']:.0f}s"
        for mode, row in timings["audit_modes"].items()
    ))
    for line in cost_lines(results):
        print(f"[demo] {line}")
    print(f"[demo] trained in {timings['train_s']:.0f}s, audited in {timings['audit_s']:.0f}s; wrote "
          + ", ".join(sorted(paths.values())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
