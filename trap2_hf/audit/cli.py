"""`trap2 audit`: the merge-attack audit from the command line.

Adapters (LoRA folders saved by `save_pretrained`):

    trap2 audit --base_model path/or/repo-id --tasks my_tasks.py --protected_task topic \\
        --protected out/topic-trap2 --unprotected out/topic-plain \\
        --other city=out/city --other kind=out/kind --output_dir audit/

Full fine-tunes (model folders of the same architecture): the same with `--target full`. mergekit's
methods (with the `mergekit` extra) are audited like the others, as `--methods mergekit:ties ...`.

The tasks file is a Python file defining

    def get_tasks(model, tokenizer) -> list[trap2_hf.audit.AuditTask]

where each AuditTask's `evaluate(model, split)` returns a metric in [0, 1] on split "validation" or
"test" with the model's current weights (`trap2_hf.audit.load_metric("accuracy")` is available
offline); for --repair_ks the protected task's AuditTask also gives `train_loss(model, indices)` and
`num_train`. It writes audit.json, audit.md and audit.png to --output_dir and prints the table.
"""

import argparse
import importlib.util
import os
import sys

from .._args import refuse_removed_flags
from .arguments import REMOVED_FLAGS, AuditArguments


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """The description as written, each flag with its default."""


def make_parser():
    from transformers import HfArgumentParser

    parser = HfArgumentParser(
        AuditArguments, prog="trap2 audit", description=__doc__.split("\n\n", 1)[1], formatter_class=_HelpFormatter
    )
    for action in parser._actions:
        if action.dest in ("benign", "transforms"):
            action.nargs = "*"  # the flag alone: no guard, no transforms
    return parser


def parse_args(argv: list[str]) -> tuple[AuditArguments, object]:
    """The arguments of `argv`, or exit with argparse's usage and a message naming the bad flag."""
    parser = make_parser()
    refuse_removed_flags(parser, argv, REMOVED_FLAGS)
    try:
        (args,) = parser.parse_args_into_dataclasses(args=argv)
    except ValueError as error:  # __post_init__'s checks, or a flag the parser does not know
        parser.error(str(error))
    return args, parser


def main(argv: list[str] | None = None) -> int:
    args, parser = parse_args(sys.argv[1:] if argv is None else argv)
    if args.list_methods:
        print(list_methods())
        return 0

    import torch

    from .kinds import audited_kind
    from ..report.tables import format_table, write_report
    from .run import run_audit

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    model_class = _model_class(parser, args.model_class)
    model = model_class.from_pretrained(args.base_model).to(device)
    others = args.others
    folders = {"protected": args.protected, **({"unprotected": args.unprotected} if args.unprotected else {})}
    folders.update({f"other:{task}": folder for task, folder in others.items()})
    model, loaded = audited_kind(args.target).loaded(model, model_class, folders, device)
    protected, unprotected = loaded["protected"], loaded.get("unprotected")
    other_updates = {task: loaded[f"other:{task}"] for task in others}
    tasks = _load_tasks(args.tasks, model, _tokenizer(args.base_model))
    results = run_audit(
        model, tasks, args.protected_task, protected, unprotected, other_updates,
        target=args.target, methods=args.methods, modes=tuple(args.modes),
        sweep_scales=tuple(args.sweep_scales), seed=args.seed, progress=not args.no_progress,
        informed=args.informed_settings(), public=args.public_settings(), benign=tuple(args.benign),
        repair=args.repair_settings(), transforms=args.transform_settings(),
    )
    paths = write_report(results, args.output_dir)
    print(format_table(results))
    print("\nWrote " + ", ".join(paths.values()))
    return 0


def list_methods() -> str:
    """Every registered method, from the one registry: backend, targets, updates, parameters, public points."""
    from . import methods as registry

    lines = []
    for name in registry.names():
        method = registry.get(name)
        params = "; ".join(f"{p.name}: average {p.default}, best grid {list(p.grid) or 'not searched'}"
                           for p in method.params)
        public = len(method.public.points("released", ["a", "b"])) if method.public else "none"
        extra = [f"updates: {method.describe_updates()}", *(f"{k}: {v}" for k, v in method.wiring.items())]
        if method.backend_defaults:
            extra.append("left at mergekit's defaults: " + ", ".join(f"{k}={v}" for k, v in method.backend_defaults.items()))
        lines.append(
            f"{name:<26} [{method.backend}; {'/'.join(method.targets)}] {params or 'no parameters'}\n"
            f"{'':<26} {'; '.join(extra)}; public points with 3 updates: {public}\n"
            f"{'':<26} {method.summary}"
        )
    if registry.MERGEKIT_MISSING:
        lines.append(f"\nmergekit's methods are not listed: {registry.MERGEKIT_MISSING}")
    return "\n".join(lines)


def _model_class(parser, name: str):
    import transformers

    cls = getattr(transformers, name, None)
    if cls is None or not hasattr(cls, "from_pretrained"):
        parser.error(f"--model_class {name!r} is not a transformers Auto class (e.g. AutoModelForCausalLM).")
    return cls


def _tokenizer(base_model: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(base_model)
    except (OSError, ValueError):
        return None


def _load_tasks(path: str, model, tokenizer) -> list:
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"--tasks {path!r} is not a file; pass a Python file defining get_tasks(model, tokenizer)."
        )
    spec = importlib.util.spec_from_file_location("trap2_audit_tasks", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_tasks"):
        raise AttributeError(f"{path} defines no get_tasks(model, tokenizer) -> list[AuditTask].")
    return list(module.get_tasks(model, tokenizer))
