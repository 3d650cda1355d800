"""Protection of a full fine-tune per trap_mode: accuracy of theta0 + s*(theta - theta0) along the ray.

    python benchmarks/protection_full.py                     # twin, two_pass, auto, sub_batch; seeds 0-4 (~5 minutes)
    python benchmarks/protection_full.py --trap_lambda 0.1 --variants two_pass:trap_mode=two_pass \\
        half:trap_mode=sub_batch:trap_rescaled_fraction=0.25

Variants are written as for `trap2 demo --compare_variants`: 'none' (the unprotected twin), 'default',
or 'label:field=value:field=value' with Trap2Settings fields.

Besides the mean curves it prints, for every variant, its paired difference to --reference (same seed,
same theta0, same data): the mean over seeds and its standard deviation per scale, and the largest mean
difference over the scales (positive: the variant keeps more accuracy there, i.e. protects less).
--output_json keeps every seed's curve.

Task (that of tests/test_protection.py): a tiny Llama built from a config is first trained on the +2
rule (next token = this token + 2; --pretraining_rule), which gives theta0; each variant then fully
fine-tunes a copy of it on the +1 rule (--rule). The update theta - theta0 is re-scaled as merging
does, and the rule's next-token accuracy on held-out sequences is printed per scale, as the mean
over seeds.
"""

import copy
import json
import statistics
import sys
from dataclasses import dataclass, field

import datasets
import torch
import transformers
from datasets import Dataset
from transformers import HfArgumentParser, LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

from trap2_hf import Trap2Trainer, Trap2TrainingArguments, rescaled_parameters, snapshot_parameters
from trap2_hf.demo.variants import parse_variant

VOCAB = 48
SCALES = (0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0)
COMMON = dict(
    per_device_train_batch_size=32, report_to="none", use_cpu=True, save_strategy="no", disable_tqdm=True,
    logging_steps=100_000,
)


@dataclass
class ProtectionArguments:
    variants: list[str] = field(
        default_factory=lambda: [
            "none", "two_pass:trap_mode=two_pass", "auto:trap_mode=auto", "sub_batch:trap_mode=sub_batch",
        ],
        metadata={"help": "As trap2 demo --compare_variants: 'none' (twin), or 'label:field=value:...'."},
    )
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2, 3, 4], metadata={"help": "Seeds of model and data."})
    trap_lambda: float = field(default=0.05, metadata={"help": "lambda of every variant that does not set its own."})
    steps: int = field(default=300, metadata={"help": "Fine-tuning steps (batch 32)."})
    rule: int = field(default=1, metadata={"help": "The fine-tuning rule: next token = this token + rule."})
    pretraining_rule: int = field(default=2, metadata={"help": "theta0's rule, learnt first."})
    learning_rate: float = field(default=1e-3, metadata={"help": "Fine-tuning learning rate."})
    threads: int = field(default=1, metadata={"help": "torch threads."})
    reference: str = field(
        default="two_pass", metadata={"help": "The variant every other one is paired against (its label)."}
    )
    output_json: str | None = field(default=None, metadata={"help": "Write every seed's curves here."})


def tiny_llama(seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config)


def rule_ids(num: int, seed: int, step: int, length: int = 10) -> torch.Tensor:
    starts = torch.randint(0, VOCAB, (num,), generator=torch.Generator().manual_seed(seed))
    return (starts[:, None] + step * torch.arange(length)) % VOCAB


def rows(ids: torch.Tensor) -> Dataset:
    return Dataset.from_dict(
        {"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist(), "labels": ids.tolist()}
    )


def accuracy(model, ids: torch.Tensor, theta0: dict, scale: float) -> float:
    model.eval()
    with torch.no_grad(), rescaled_parameters(model, scale, theta0):
        predicted = model(input_ids=ids).logits.argmax(-1)
    model.train()
    return (predicted[:, :-1] == ids[:, 1:]).float().mean().item()


def run_seed(bench: ProtectionArguments, seed: int, variants: list[tuple[str, dict]]) -> dict[str, dict]:
    base = tiny_llama(seed)
    pretraining = TrainingArguments(
        output_dir="/tmp/trap2_protection/pre", max_steps=300, learning_rate=5e-3, seed=seed, **COMMON
    )
    pretraining_rows = rows(rule_ids(2048, seed + 100, step=bench.pretraining_rule))
    Trainer(model=base, args=pretraining, train_dataset=pretraining_rows).train()
    theta0 = snapshot_parameters(base)
    train, test = rows(rule_ids(2048, seed, step=bench.rule)), rule_ids(128, 99, step=bench.rule)
    curves = {}
    for name, overrides in variants:
        model = copy.deepcopy(base)
        protection = {"trap_lambda": 0.0} if overrides is None else {"trap_lambda": bench.trap_lambda, **overrides}
        args = Trap2TrainingArguments(
            output_dir=f"/tmp/trap2_protection/{name}", max_steps=bench.steps, learning_rate=bench.learning_rate,
            seed=seed, trap_target="full", **COMMON, **protection,
        )
        Trap2Trainer(model=model, args=args, train_dataset=train).train()
        curves[name] = {s: accuracy(model, test, theta0, s) for s in SCALES}
    return curves


def main(argv: list[str] | None = None) -> int:
    (bench,) = HfArgumentParser(ProtectionArguments).parse_args_into_dataclasses(
        args=sys.argv[1:] if argv is None else argv
    )
    torch.set_num_threads(bench.threads)
    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()
    variants = [parse_variant(spec)[:2] for spec in bench.variants]
    per_seed = [run_seed(bench, seed, variants) for seed in bench.seeds]
    print(
        f"full fine-tuning, +{bench.rule} rule on a +{bench.pretraining_rule}-rule theta0; lambda {bench.trap_lambda} "
        f"unless set, {bench.steps} steps, lr {bench.learning_rate}; accuracy at theta0 + s*(theta - theta0), mean of "
        f"seeds {bench.seeds}\n"
    )
    print("| variant | " + " | ".join(f"s={s:g}" for s in SCALES) + " |")
    print("|---|" + "---|" * len(SCALES))
    for name, _ in variants:
        means = [statistics.mean(curves[name][s] for curves in per_seed) for s in SCALES]
        print(f"| {name} | " + " | ".join(f"{m:.3f}" for m in means) + " |")
    if any(name == bench.reference for name, _ in variants):
        print_paired(per_seed, [name for name, _ in variants], bench.reference)
    if bench.output_json:
        with open(bench.output_json, "w") as f:
            json.dump({"arguments": vars(bench), "per_seed": per_seed}, f, indent=1)
    return 0


def print_paired(per_seed: list[dict], names: list[str], reference: str) -> None:
    """Each variant minus the reference, seed by seed: mean +- standard deviation over seeds, in points."""
    print(f"\npaired difference to {reference}, points (variant - {reference}; mean +- sd over seeds)\n")
    print("| variant | " + " | ".join(f"s={s:g}" for s in SCALES) + " | max mean |")
    print("|---|" + "---|" * (len(SCALES) + 1))
    for name in names:
        if name == reference:
            continue
        cells, means = [], []
        for s in SCALES:
            diffs = [100 * (curves[name][s] - curves[reference][s]) for curves in per_seed]
            mean = statistics.mean(diffs)
            spread = statistics.stdev(diffs) if len(diffs) > 1 else 0.0
            means.append(mean)
            cells.append(f"{mean:+.1f} ± {spread:.1f}")
        print(f"| {name} | " + " | ".join(cells) + f" | {max(means):+.1f} |")


if __name__ == "__main__":
    raise SystemExit(main())
