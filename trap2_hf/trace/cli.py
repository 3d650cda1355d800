"""`trap2 trace`: does a merged model contain your released update? Its estimated weight and a p-value.

    trap2 trace merged-model other-adapter --base_model BASE --release ./my-adapter
    trap2 trace merged-model --base_model BASE --release ./my-adapter --reference ./seed1 ./seed2 \\
        --output_json trace.json

SUSPECT: a full model folder or Hub repo id (a mergekit output, a merge_and_unload'ed model) or an adapter of the
same base (a PEFT add_weighted_adapter combination). RELEASE and each REFERENCE: an adapter folder (LoRA, rsLoRA,
DoRA, LoHa, ...) or a full fine-tune. Put the suspects first (or after `--`): --reference takes every name after it.

Without references the null is "the suspect was made without the release": an independent re-training of the
release's task on the same data is not that, and is flagged. --reference (independent trainings of the release with
its recipe and other seeds) makes the null "the suspect contains none of them", which tells a copy from a
re-training. docs/trace.md has the method and its measured calibration.
"""

import argparse
import json
import sys
from dataclasses import dataclass, field

from .settings import DEFAULT_ALPHA, TraceSettings



@dataclass
class TraceArguments:
    """What is traced in what (every field a `trap2 trace` flag); the suspects are positional."""

    base_model: str = field(metadata={"help": "The base model the release was trained on: folder or Hub repo id."})
    release: str = field(
        metadata={"help": "The released update: an adapter folder (LoRA, DoRA, LoHa, ...) or a full fine-tune folder; "
                          "or a Hub repo id."}
    )
    reference: list[str] = field(
        default_factory=list,
        metadata={"help": "Independent trainings of the release with its recipe and other seeds (two or more): "
                          "the p-value then separates a copy from a re-training of the same task."},
    )
    output_json: str | None = field(default=None, metadata={"help": "Also write the results here as JSON."})
    alpha: float = field(
        default=DEFAULT_ALPHA, metadata={"help": "A suspect contains the release when its p-value is below this."}
    )


def make_parser() -> argparse.ArgumentParser:
    from transformers import HfArgumentParser

    parser = HfArgumentParser(
        (TraceArguments, TraceSettings), prog="trap2 trace", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "suspect", nargs="+",
        help="The models to test: full model folders or adapters of the base, or Hub repo ids.",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = make_parser()
    arguments, settings, rest = parser.parse_args_into_dataclasses(args=argv)
    from .run import trace_release  # torch, transformers and PEFT: only once the arguments parse

    try:
        results = trace_release(
            arguments.base_model, arguments.release, rest.suspect, arguments.reference, arguments.alpha, settings,
        )
    except (FileNotFoundError, ValueError) as err:
        print(f"trap2 trace: {err}", file=sys.stderr)
        return 2
    null = results[0].null if results else "decoys"
    header = (
        f"null: the suspect contains none of the release and its {len(arguments.reference)} references"
        if arguments.reference
        else "null: the suspect was made without the release (decoys: its directions re-paired)"
    )
    print(f"trap2 trace: release {arguments.release}; {header}; contains when p < {arguments.alpha:g}")
    for result in results:
        print(result.verdict())
        print("  per layer: " + ", ".join(f"{layer} {weight:.2f}" for layer, weight in result.layers.items()))
    if arguments.output_json:
        records = [{"release": arguments.release, "reference_folders": arguments.reference, **r.to_dict()}
                   for r in results]
        with open(arguments.output_json, "w", encoding="utf-8") as handle:
            json.dump(records, handle, indent=2)
        print(f"Wrote {arguments.output_json} ({null} null)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
