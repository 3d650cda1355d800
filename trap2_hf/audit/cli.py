"""`trap2 audit`: the merge-attack audit from the command line.

Adapters (LoRA folders saved by `save_pretrained`):

    trap2 audit --base_model path/or/repo-id --tasks my_tasks.py --protected_task topic \\
        --protected out/topic-trap2 --unprotected out/topic-plain \\
        --other city=out/city --other kind=out/kind --output_dir audit/

Full fine-tunes (model folders of the same architecture): the same with `--target full`.

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

from . import methods as registry
from .benign import PERTURBATIONS
from .informed import InformedSettings
from .kinds import AUDITED_KINDS, audited_kind
from .repair import RepairSettings
from .run import DEFAULT_SCALES, MODES
from .summary import attack_rows


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="trap2 audit",
        description=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--base_model", help="Base model: a local folder or a Hub repo id.")
    parser.add_argument(
        "--model_class", default="AutoModelForCausalLM",
        help="transformers Auto class that loads the base model (e.g. AutoModelForSequenceClassification).",
    )
    parser.add_argument("--tasks", help="Python file defining get_tasks(model, tokenizer) -> list[AuditTask].")
    parser.add_argument("--protected_task", help="Name of the task the protected update is for.")
    parser.add_argument(
        "--protected", help="Folder of the protected update (an adapter, or a full model with --target full)."
    )
    parser.add_argument("--unprotected", default=None, help="Folder of its unprotected twin (optional).")
    parser.add_argument(
        "--other", action="append", default=[], metavar="TASK=FOLDER",
        help="An update of another task; repeat for each (at least one).",
    )
    parser.add_argument("--target", choices=tuple(AUDITED_KINDS), default="adapter", help="Kind of update.")
    parser.add_argument(
        "--methods", nargs="+", default=None, metavar="NAME",
        help="Merge methods to run (default: all that apply to --target; see --list_methods).",
    )
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES), help="Merge modes.")
    parser.add_argument(
        "--sweep_scales", nargs="+", type=float, default=list(DEFAULT_SCALES),
        help="Scales s of the re-scaling sweep W0 + s*dW of each update alone.",
    )
    parser.add_argument(
        "--mergekit_methods", nargs="*", default=None, metavar="NAME",
        help="Also merge with mergekit's own methods, naive weights (needs pip install 'trap2_hf[mergekit]'): "
        "the names given, or with no name every method that applies to the number of updates.",
    )
    parser.add_argument(
        "--mergekit_informed", nargs="+", default=[], metavar="NAME",
        help="Also run the informed grid (--protected_weights x --other_weights, the others' densities, the "
        "released update whole and unnormalised) on these mergekit methods: one mergekit merge per configuration.",
    )
    informed, repair = InformedSettings(), RepairSettings()
    parser.add_argument(
        "--protected_weights", nargs="+", type=float, default=list(informed.protected_weights),
        help="informed mode: weights of the released update (must include 1.0).",
    )
    parser.add_argument(
        "--other_weights", nargs="+", type=float, default=list(informed.other_weights),
        help="informed mode: weights shared by the other updates.",
    )
    parser.add_argument(
        "--min_gain_kept", type=float, default=informed.min_gain_kept,
        help="informed/search: the headline objective only counts merges where every other task keeps this "
        "fraction of its gain over the base model.",
    )
    parser.add_argument(
        "--search_budget", type=int, default=informed.budget, help="search mode: random merges per method."
    )
    parser.add_argument(
        "--repair_ks", nargs="+", type=int, default=None, metavar="K",
        help="Post-merge repair with K labelled examples of the protected task (e.g. 16 64 256); the tasks file's "
        "protected AuditTask must define train_loss and num_train. Default: no repair.",
    )
    parser.add_argument("--repair_steps", type=int, default=repair.steps, help="Repair: optimizer steps.")
    parser.add_argument("--repair_learning_rate", type=float, default=repair.learning_rate, help="Repair: AdamW lr.")
    parser.add_argument("--repair_batch_size", type=int, default=repair.batch_size, help="Repair: batch size.")
    parser.add_argument("--repair_rank", type=int, default=repair.rank, help="Repair: rank of the fresh LoRA.")
    parser.add_argument(
        "--repair_methods", nargs="+", default=list(repair.methods), help="Repair: weight-space merges repaired."
    )
    parser.add_argument(
        "--benign", nargs="*", choices=PERTURBATIONS, default=list(PERTURBATIONS),
        help="The guard: the protected update alone, folded into the base, with its weights as they are (float32), "
        "cast to bfloat16 / float16, or 8-bit (int8) quantised, against its twin under each; no name: no check.",
    )
    parser.add_argument("--seed", type=int, default=0, help="Seed of the randomised merges (DARE) and the search.")
    parser.add_argument("--device", default="auto", help="Model device: auto (cuda if available), cpu, cuda, ...")
    parser.add_argument("--output_dir", default="audit", help="Folder for audit.json, audit.md and audit.png.")
    parser.add_argument("--no_progress", action="store_true", help="Hide the progress bar.")
    parser.add_argument("--list_methods", action="store_true", help="List the merge methods and grids, then exit.")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = make_parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if args.list_methods:
        print(list_methods())
        print("\nmergekit's methods, for --mergekit_methods:\n" + _mergekit_table())
        return 0
    missing = [f"--{k}" for k in ("base_model", "tasks", "protected_task", "protected") if not getattr(args, k)]
    if missing or not args.other:
        parser.error(f"missing {', '.join(missing + ([] if args.other else ['--other TASK=FOLDER']))}")
    others = dict(_task_and_folder(parser, item) for item in args.other)

    import torch

    from .report import format_table, write_report
    from .run import run_audit

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    model_class = _model_class(parser, args.model_class)
    model = model_class.from_pretrained(args.base_model).to(device)
    folders = {"protected": args.protected, **({"unprotected": args.unprotected} if args.unprotected else {})}
    folders.update({f"other:{task}": folder for task, folder in others.items()})
    model, loaded = audited_kind(args.target).loaded(model, model_class, folders, device)
    protected, unprotected = loaded["protected"], loaded.get("unprotected")
    other_updates = {task: loaded[f"other:{task}"] for task in others}
    tasks = _load_tasks(args.tasks, model, _tokenizer(args.base_model))
    informed = InformedSettings(
        protected_weights=tuple(args.protected_weights), other_weights=tuple(args.other_weights),
        min_gain_kept=args.min_gain_kept, budget=args.search_budget,
    )
    results = run_audit(
        model, tasks, args.protected_task, protected, unprotected, other_updates,
        target=args.target, methods=args.methods, modes=tuple(args.modes),
        sweep_scales=tuple(args.sweep_scales), seed=args.seed, progress=not args.no_progress,
        informed=informed, benign=tuple(args.benign),
        repair=None if not args.repair_ks else RepairSettings(
            ks=tuple(args.repair_ks), steps=args.repair_steps, learning_rate=args.repair_learning_rate,
            batch_size=args.repair_batch_size, rank=args.repair_rank, methods=tuple(args.repair_methods),
            seed=args.seed,
        ),
    )
    if args.mergekit_methods is not None or args.mergekit_informed:
        from .mergekit_audit import audit_mergekit, format_mergekit_table

        results["mergekit"] = audit_mergekit(
            model, tasks, protected, unprotected, other_updates, target=args.target,
            methods=[] if args.mergekit_methods is None else args.mergekit_methods or None, seed=args.seed,
            protected_task=args.protected_task, informed_methods=args.mergekit_informed, informed=informed,
        )
        results["attacks"] = attack_rows(results)  # with mergekit's rows
    paths = write_report(results, args.output_dir)
    print(format_table(results))
    if "mergekit" in results:
        print("\n" + format_mergekit_table(results["mergekit"], args.protected_task))
    print("\nWrote " + ", ".join(paths.values()))
    return 0


def list_methods() -> str:
    lines = []
    for name in registry.names():
        method = registry.get(name)
        params = "; ".join(f"{p.name}: average {p.default}, best grid {list(p.grid)}" for p in method.params)
        lines.append(f"{name:<22} [{'/'.join(method.targets)}] {params}\n{'':<22} {method.summary}")
    return "\n".join(lines)


def _mergekit_table() -> str:
    from .mergekit_backend import method_table

    try:
        return method_table()
    except ImportError as error:
        return str(error)


def _task_and_folder(parser, item: str) -> tuple[str, str]:
    task, sep, folder = item.partition("=")
    if not sep or not task or not folder:
        parser.error(f"--other {item!r}: write TASK=FOLDER, e.g. --other city=out/city-adapter")
    return task, folder


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
