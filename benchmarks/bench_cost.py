"""Cost of protection: step time and peak memory of Trap2Trainer / Trap2SFTTrainer in each `trap_mode`, as
ratios to the plain Trainer / SFTTrainer on the same model and data, alternating in one process.

    python benchmarks/bench_cost.py                 # CPU: a tiny (overhead-bound) and a small (compute-bound) model
    python benchmarks/bench_cost.py --device cuda   # GPU, bf16: ~0.34B (launch-bound) and ~1.6B (compute-bound)
    python benchmarks/bench_cost.py --trainers sft --modes fused --trap_rescaled_fraction 0.125 --rounds 5
    python benchmarks/bench_cost.py --full_finetuning false   # LoRA only
    python benchmarks/bench_cost.py --lora false              # full fine-tuning only
    python benchmarks/bench_cost.py --lora false --modes auto sub_batch@0.125 sub_batch@0.25 fused@0.125 fused@0.25
                                                              # mode@fraction: that trap_rescaled_fraction
    python benchmarks/bench_cost.py --shapes gpt2 t5 --trainers trainer --modes auto two_pass --full_finetuning false
    python benchmarks/bench_cost.py --trainers trainer --modes auto --full_finetuning false \
        --variants "della:trap_offray=della:trap_offray_fraction=0.25" "rim:trap_rim_share=0.5"
                                                              # LoRA on GPT-2 (Conv1D) and T5 (encoder-decoder)

Every round runs each variant (plain, then each mode, in an order rotated every round) for
`warmup + steps + 1` optimizer steps with a fresh trainer on the same LoRA model; machine load
therefore affects all variants alike. Reported per variant:
- step time: median over all rounds' timed steps of one optimizer step (forward, backward, clipping,
  optimizer), data loading excluded; CUDA events on GPU, perf_counter on CPU. Its ratio to plain is
  taken round by round (each run's median against the same round's plain run) and the median of those
  ratios is reported, so a machine whose speed drifts between rounds does not tilt it;
- step peak: the most tensor memory live during one step above what was live when it began
  (weights, optimizer state): activations, gradients, temporaries. GPU: max_memory_allocated minus
  memory_allocated at the step's start. CPU: the running sum of the profiler's allocation/free
  events over the step (torch's CPU tensor allocations; the allocator's caching and Python objects
  are not counted). Measured on the run's last step, which is not timed;
- total peak: step peak plus what was live at the step's start (GPU: max_memory_allocated).
"""

import gc
import itertools
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field

import datasets
import torch
import transformers
from datasets import Dataset
from peft import LoraConfig, get_peft_model
from transformers import (
    GPT2Config, GPT2LMHeadModel, HfArgumentParser, LlamaConfig, LlamaForCausalLM, T5Config, T5ForConditionalGeneration,
    Trainer, TrainerCallback, TrainingArguments,
)
from transformers.trainer_callback import PrinterCallback
from trl import SFTConfig, SFTTrainer

from trap2_hf import Trap2SFTConfig, Trap2SFTTrainer, Trap2Settings, Trap2Trainer, Trap2TrainingArguments

# name: (Llama config, sequence length, batch size)
SHAPES = {
    "tiny": (dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=256), 64, 8),
    "small": (dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8,
                   num_key_value_heads=4, vocab_size=1024), 128, 4),
    "launch": (dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=24, num_attention_heads=16,
                    num_key_value_heads=8, vocab_size=32000), 1024, 8),
    "compute": (dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=28, num_attention_heads=16,
                     num_key_value_heads=16, vocab_size=32000), 2048, 4),
    # other architectures, "small"-sized (LoRA rows with --trainers trainer --full_finetuning false)
    "gpt2": (dict(n_embd=256, n_layer=4, n_head=8, vocab_size=1024), 128, 4),
    "t5": (dict(d_model=256, d_ff=688, d_kv=32, num_layers=2, num_heads=8, vocab_size=1024), 128, 4),
}
DEFAULT_SHAPES = {"cpu": ["tiny", "small"], "cuda": ["launch", "compute"]}
# LoRA targets per architecture: GPT-2's Conv1D layers (fan_in_fan_out), T5's attention projections
LORA_TARGETS = {"gpt2": (["c_attn", "c_proj"], True), "t5": (["q", "k", "v", "o"], False)}
MODES = ["auto", "two_pass", "sub_batch", "fused", "split"]
OFFLOAD = ", theta0 offloaded"


@dataclass
class BenchArguments:
    device: str = field(default="auto", metadata={"help": "'cpu', 'cuda' or 'auto' (cuda when available)."})
    shapes: list[str] = field(
        default_factory=list,
        metadata={"help": f"Model shapes among {list(SHAPES)}; default tiny+small on CPU, launch+compute on GPU."},
    )
    trainers: list[str] = field(
        default_factory=lambda: ["trainer", "sft"], metadata={"help": "'trainer' and/or 'sft'."}
    )
    modes: list[str] = field(
        default_factory=lambda: list(MODES),
        metadata={"help": f"trap_mode values among {MODES}; 'mode@f' runs it with trap_rescaled_fraction f."},
    )
    trap_rescaled_fraction: float | None = field(
        default=None,
        metadata={"help": "For sub_batch and fused (and auto where it fuses); unset: the library's default."},
    )
    trap_scales_per_step: int = field(
        default=Trap2Settings.trap_scales_per_step, metadata={"help": "Scales drawn per optimizer step."}
    )
    trap_lambda: float = field(
        default=Trap2Settings.trap_lambda, metadata={"help": "lambda (its value does not change the cost)."}
    )
    rounds: int = field(default=4, metadata={"help": "How many times every variant runs, alternating."})
    steps: int = field(default=8, metadata={"help": "Timed optimizer steps per run."})
    warmup: int = field(default=2, metadata={"help": "Untimed steps at the start of every run."})
    lora_rank: int = field(default=16, metadata={"help": "LoRA rank, on q/k/v/o projections."})
    activation_checkpointing: bool = field(
        default=False, metadata={"help": "Activation checkpointing, for every variant."}
    )
    lora: bool = field(default=True, metadata={"help": "The LoRA rows (every trainer of --trainers in every mode)."})
    full_finetuning: bool = field(
        default=True,
        metadata={
            "help": "Also full fine-tuning (no LoRA, Trainer only): plain against each of --modes, and on GPU auto and "
            "two_pass with theta0 offloaded (trap_reference_device='cpu'); prints the memory beyond the theta0 copy."
        },
    )
    variants: list[str] = field(
        default_factory=list,
        metadata={
            "help": "LoRA rows only: protection variants timed beside the modes, each 'label:field=value:...' over "
            "Trap2Settings fields (trap_mode 'auto' unless given), e.g. 'della:trap_offray=della:trap_offray_fraction=0.25'."
        },
    )
    threads: int = field(default=1, metadata={"help": "torch threads on CPU."})
    seed: int = field(default=0, metadata={"help": "Seed of the model and data."})
    output_json: str | None = field(default=None, metadata={"help": "Also write the results here."})


def make_parser() -> HfArgumentParser:
    return HfArgumentParser(BenchArguments, description=__doc__.split("\n")[0])


class StepClock(TrainerCallback):
    """Times steps warmup..warmup+steps-1 and measures memory on step warmup+steps (untimed)."""

    def __init__(self, device: str, warmup: int, steps: int, trainer_ref: list):
        self.device, self.warmup, self.steps, self.trainer_ref = device, warmup, steps, trainer_ref
        self.marks, self.seconds, self.memory = [], [], {}

    def on_step_begin(self, args, state, control, **kwargs):
        step = state.global_step
        if step == self.warmup + self.steps:
            self._memory_begin()
        elif step >= self.warmup:
            self.marks.append([self._now()])

    def on_step_end(self, args, state, control, **kwargs):
        step = state.global_step - 1
        if step == self.warmup + self.steps:
            self._memory_end()
        elif step >= self.warmup:
            self.marks[-1].append(self._now())

    def _now(self):
        if self.device == "cuda":
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def finish(self) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()
            self.seconds = [begin.elapsed_time(end) / 1000 for begin, end in self.marks]
        else:
            self.seconds = [end - begin for begin, end in self.marks]

    def _memory_begin(self) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()
            self.memory["resident"] = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        else:
            self.memory["resident"] = resident_bytes(self.trainer_ref[0])
            cpu = torch.profiler.ProfilerActivity.CPU
            self.profiler = torch.profiler.profile(activities=[cpu], profile_memory=True)
            self.profiler.start()

    def _memory_end(self) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()
            self.memory["total_peak"] = torch.cuda.max_memory_allocated()
            self.memory["step_peak"] = self.memory["total_peak"] - self.memory["resident"]
        else:
            self.profiler.stop()
            events = [e for e in self.profiler.profiler.kineto_results.events() if e.name() == "[memory]"]
            events.sort(key=lambda e: e.start_ns())
            self.memory["step_peak"] = max(itertools.accumulate((e.nbytes() for e in events), initial=0))
            self.memory["total_peak"] = self.memory["resident"] + self.memory["step_peak"]
            del self.profiler


def resident_bytes(trainer) -> int:
    """Bytes of the tensors live between steps: parameters, buffers, gradients, optimizer state."""
    tensors = list(trainer.model.parameters()) + list(trainer.model.buffers())
    tensors += [p.grad for p in trainer.model.parameters() if p.grad is not None]
    if trainer.optimizer is not None:
        tensors += [v for state in trainer.optimizer.state.values() for v in state.values() if torch.is_tensor(v)]
    device = next(trainer.model.parameters()).device
    tensors += [t for t in (getattr(trainer, "trap_reference", None) or {}).values() if t.device == device]
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values())


def build_model(shape: str, rank: int, device: str, seed: int, full: bool = False):
    config, _, _ = SHAPES[shape]
    torch.manual_seed(seed)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    with torch.device(device):
        if shape == "gpt2":
            base = GPT2LMHeadModel(GPT2Config(**config, n_positions=1024))
        elif shape == "t5":
            base = T5ForConditionalGeneration(T5Config(**config, decoder_start_token_id=0, pad_token_id=0))
        else:
            base = LlamaForCausalLM(LlamaConfig(**config, max_position_embeddings=4096, tie_word_embeddings=False))
    base = base.to(dtype)
    if full:
        return base
    targets, fan_in_fan_out = LORA_TARGETS.get(shape, (["q_proj", "k_proj", "v_proj", "o_proj"], False))
    lora = LoraConfig(
        r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=targets, fan_in_fan_out=fan_in_fan_out
    )
    return get_peft_model(base, lora)


def build_data(shape: str, num_rows: int, seed: int, with_labels: bool) -> Dataset:
    config, seq_len, _ = SHAPES[shape]
    ids = torch.randint(0, config["vocab_size"], (num_rows, seq_len), generator=torch.Generator().manual_seed(seed))
    rows = {"input_ids": ids.tolist()}
    if with_labels:  # an encoder-decoder's labels are its decoder's targets: a quarter of the input's length
        labels = ids[:, : seq_len // 4] if shape == "t5" else ids
        rows |= {"attention_mask": torch.ones_like(ids).tolist(), "labels": labels.tolist()}
    return Dataset.from_dict(rows)


def word_tokenizer(vocab_size: int):
    """A word-level tokenizer whose ids cover the model's vocabulary; SFTTrainer needs one for padding."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, **{f"w{i}": i for i in range(2, vocab_size)}}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="</s>")


def run_variant(
    bench: BenchArguments, shape: str, kind: str, variant: str, model, data, tokenizer, device: str, full: bool = False
) -> StepClock:
    _, seq_len, batch = SHAPES[shape]
    common = dict(
        output_dir="/tmp/trap2_bench", max_steps=bench.warmup + bench.steps + 1, per_device_train_batch_size=batch,
        learning_rate=1e-4, lr_scheduler_type="constant", optim="adamw_torch", logging_steps=100_000,
        save_strategy="no", report_to="none", disable_tqdm=True, seed=bench.seed, use_cpu=device == "cpu",
        bf16=device == "cuda", activation_checkpointing=bench.activation_checkpointing, dataloader_drop_last=True,
    )
    if kind == "sft":
        common |= dict(max_length=seq_len)
    overrides = protection_variants(bench).get(variant)
    mode, _, fraction = ("auto", "", "") if overrides is not None else variant.partition(OFFLOAD)[0].partition("@")
    trap = dict(
        trap_lambda=bench.trap_lambda, trap_mode=mode, trap_scales_per_step=bench.trap_scales_per_step,
        trap_weighting="inv_sqrt",
    ) | (overrides or {})
    if full:
        trap |= dict(trap_target="full", trap_reference_device="cpu" if variant.endswith(OFFLOAD) else "same")
    if mode != "two_pass" and bench.trap_rescaled_fraction is not None:
        trap["trap_rescaled_fraction"] = bench.trap_rescaled_fraction
    if fraction:
        trap["trap_rescaled_fraction"] = float(fraction)
    if variant == "plain":
        trainer_cls = SFTTrainer if kind == "sft" else Trainer
        args = SFTConfig(**common) if kind == "sft" else TrainingArguments(**common)
    elif kind == "sft":
        trainer_cls, args = Trap2SFTTrainer, Trap2SFTConfig(**common, **trap)
    else:
        trainer_cls, args = Trap2Trainer, Trap2TrainingArguments(**common, **trap)
    extra = {"processing_class": tokenizer} if kind == "sft" else {}
    holder = []
    clock = StepClock(device, bench.warmup, bench.steps, holder)
    trainer = trainer_cls(model=model, args=args, train_dataset=data, callbacks=[clock], **extra)
    trainer.remove_callback(PrinterCallback)
    holder.append(trainer)
    clock.mode = getattr(trainer.args, "trap_mode", None)  # what 'auto' chose
    clock.fraction = getattr(trainer.args, "trap_rescaled_fraction", None)
    trainer.train()
    clock.finish()
    holder.clear()
    del trainer
    model.zero_grad(set_to_none=True)
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return clock


def protection_variants(bench: BenchArguments) -> dict[str, dict]:
    """{label: Trap2Settings overrides} of --variants (the demo's variant syntax, protection fields only)."""
    from trap2_hf.demo.variants import parse_variant

    parsed = {}
    for spec in bench.variants:
        label, overrides, demo = parse_variant(spec)
        if overrides is None or demo or label in MODES or label == "plain":
            raise SystemExit(f"bench_cost: --variants {spec!r} must be 'label:field=value:...' over Trap2Settings fields.")
        parsed[label] = overrides
    return parsed


def bench_one(bench: BenchArguments, shape: str, kind: str, device: str, full: bool = False) -> dict:
    _, seq_len, batch = SHAPES[shape]
    model = build_model(shape, bench.lora_rank, device, bench.seed, full=full)
    theta0_bytes = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad) if full else 0
    rows = batch * (bench.warmup + bench.steps + 1)
    data = build_data(shape, rows, bench.seed, with_labels=kind == "trainer")
    tokenizer = word_tokenizer(SHAPES[shape][0]["vocab_size"]) if kind == "sft" else None
    if full:  # theta0 offloading only means something on GPU, and fused needs theta0 on the device
        modes = list(bench.modes)
        offloaded = [m + OFFLOAD for m in modes if m.partition("@")[0] in ("auto", "two_pass")]
        offloaded = offloaded if device == "cuda" else []
        variants = ["plain", *modes, *offloaded]
    else:
        variants = ["plain", *bench.modes, *protection_variants(bench)]
    seconds = {v: [] for v in variants}
    round_medians = {v: [] for v in variants}
    memory = {}
    chosen = {}
    for round_index in range(bench.rounds):
        order = variants[round_index % len(variants):] + variants[: round_index % len(variants)]
        for variant in order:
            clock = run_variant(bench, shape, kind, variant, model, data, tokenizer, device, full)
            seconds[variant] += clock.seconds
            round_medians[variant].append(statistics.median(clock.seconds))
            memory.setdefault(variant, clock.memory)
            chosen.setdefault(variant, (clock.mode, clock.fraction))
    results = {}
    for variant in variants:
        median = statistics.median(seconds[variant])
        results[variant] = {
            "median_step_s": median,
            # per round against that round's plain run, then the median over rounds: drift between rounds cancels
            "time_ratio": statistics.median(
                mine / plain for mine, plain in zip(round_medians[variant], round_medians["plain"])
            ),
            "step_peak_bytes": memory[variant]["step_peak"],
            "step_peak_ratio": memory[variant]["step_peak"] / memory["plain"]["step_peak"],
            "total_peak_bytes": memory[variant]["total_peak"],
            "total_peak_ratio": memory[variant]["total_peak"] / memory["plain"]["total_peak"],
            "timed_steps": len(seconds[variant]),
            "trap_mode": chosen[variant][0],
            "trap_rescaled_fraction": chosen[variant][1],
            # full fine-tuning: total peak above plain's beyond the theta0 copy kept on the device, x theta0's size
            "beyond_theta0_ratio": (
                (memory[variant]["total_peak"] - memory["plain"]["total_peak"]
                 - (0 if variant.endswith(OFFLOAD) or variant == "plain" else theta0_bytes)) / theta0_bytes
                if full else None
            ),
        }
    params = sum(p.numel() for p in model.parameters())
    return {
        "shape": shape, "trainer": kind, "update": "full" if full else f"lora r={bench.lora_rank} {'/'.join(LORA_TARGETS.get(shape, (['q/k/v/o'], 0))[0])}",
        "params": params, "theta0_bytes": theta0_bytes, "seq_len": seq_len, "batch": batch, "variants": results,
    }


def print_table(result: dict, bench: BenchArguments, device: str) -> None:
    trainer = "Trainer/Trap2Trainer" if result["trainer"] == "trainer" else "SFTTrainer/Trap2SFTTrainer"
    print(
        f"\n{result['shape']} ({result['params'] / 1e6:.1f}M params, seq {result['seq_len']} x batch {result['batch']}, "
        f"{result['update']}, {device}) -- {trainer}"
    )
    full = result["update"] == "full"
    beyond = " beyond theta0 (x theta0) |" if full else ""
    print("| variant | step ms | time x plain | step peak MB | x plain | total peak MB | x plain |" + beyond)
    print("|---|---|---|---|---|---|---|" + ("---|" if full else ""))
    for variant, r in result["variants"].items():
        label = variant.partition("@")[0] + variant.partition("@")[2].partition(OFFLOAD)[1]
        if r["trap_mode"] not in (None, variant.partition(OFFLOAD)[0].partition("@")[0]):
            label += f" ({r['trap_mode']})"
        if r["trap_mode"] in ("sub_batch", "fused"):
            label += f", f={r['trap_rescaled_fraction']:g}"
        print(
            f"| {label} | {1000 * r['median_step_s']:.1f} | {r['time_ratio']:.2f} | {r['step_peak_bytes'] / 2**20:.1f} "
            f"| {r['step_peak_ratio']:.2f} | {r['total_peak_bytes'] / 2**20:.1f} | {r['total_peak_ratio']:.2f} |"
            + (f" {r['beyond_theta0_ratio']:+.2f} |" if full else "")
        )
    if full:
        print(f"theta0 copy: {result['theta0_bytes'] / 2**20:.1f} MB")


def main(argv: list[str] | None = None) -> int:
    (bench,) = make_parser().parse_args_into_dataclasses(args=sys.argv[1:] if argv is None else argv)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if bench.device == "auto" else bench.device
    unknown = [m for m in bench.modes if m.partition("@")[0] not in MODES]
    unknown += [t for t in bench.trainers if t not in ("trainer", "sft")]
    if unknown:
        raise ValueError(f"Unknown modes/trainers {unknown}; modes: {MODES}, trainers: ['trainer', 'sft'].")
    shapes = bench.shapes or DEFAULT_SHAPES[device]
    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()
    if device == "cpu":
        torch.set_num_threads(bench.threads)
    print(
        f"torch {torch.__version__}, {device}" + (f" ({torch.cuda.get_device_name()}, bf16)" if device == "cuda" else
        f" ({bench.threads} thread(s), fp32)") + f"; trap_lambda {bench.trap_lambda}, scales/step "
        f"{bench.trap_scales_per_step}; {bench.rounds} rounds "
        f"x {bench.steps} timed steps per variant"
    )
    results = []
    for shape, kind in itertools.product(shapes, bench.trainers if bench.lora else []):
        result = bench_one(bench, shape, kind, device)
        print_table(result, bench, device)
        results.append(result)
    if bench.full_finetuning:
        for shape in shapes:
            result = bench_one(bench, shape, "trainer", device, full=True)
            print_table(result, bench, device)
            results.append(result)
    if bench.output_json:
        fields = {k: v for k, v in asdict(bench).items()}
        with open(bench.output_json, "w") as f:
            json.dump({"device": device, "settings": fields, "results": results}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
