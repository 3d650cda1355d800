"""Train a protected (unmergeable) update with Trap² and TRL's SFT: LoRA or full fine-tuning.

Run from the repository root. Every YAML key is a field name of `Trap2ScriptArguments` (below),
`trap2_hf.Trap2SFTConfig` (TRL's `SFTConfig` plus `trap_*`) or TRL's `ModelConfig`; flags given
on the command line override the YAML; an unknown key or flag is an error.

# The embedded tiny recipe: CPU, no download, under a minute
```bash
python recipes/sft_protect.py --config recipes/tiny/config_lora.yaml
python recipes/sft_protect.py --config recipes/tiny/config_full.yaml
```

# Two CPU processes (DDP over gloo), saved to out/tiny-lora-trap2: the same weights as one process with the same
# global batch (the tiny YAML has no dropout, whose masks are drawn per rank)
```bash
ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 --main_process_port 29511 \
    recipes/sft_protect.py --config recipes/tiny/config_lora.yaml --per_device_train_batch_size 4
```

# One GPU: LoRA on a 0.5B instruct model (chat data)
```bash
accelerate launch --config_file recipes/accelerate_configs/single_gpu.yaml recipes/sft_protect.py \
    --config recipes/qwen2.5-0.5b-instruct/sft/config_lora.yaml
```

# 8 GPUs, DDP: Llama-3.1-8B on GSM8K, LoRA r=32 (the paper's setup, with lambda 0.05 and 2 scales per step)
```bash
accelerate launch --config_file recipes/accelerate_configs/ddp.yaml --num_processes 8 recipes/sft_protect.py \
    --config recipes/llama-3.1-8b/sft/config_lora_r32.yaml
```

# FSDP2 (LoRA only) and a full fine-tune on DDP
```bash
accelerate launch --config_file recipes/accelerate_configs/fsdp2.yaml --num_processes 8 recipes/sft_protect.py \
    --config recipes/llama-3.1-8b/sft/config_lora_r32.yaml
accelerate launch --config_file recipes/accelerate_configs/ddp.yaml --num_processes 8 recipes/sft_protect.py \
    --config recipes/qwen2.5-0.5b-instruct/sft/config_full.yaml
```
DeepSpeed (zero2.yaml, zero3.yaml): see recipes/README.md, "What is verified", before using it.

# Override fields, audit the result, push it
```bash
python recipes/sft_protect.py --config recipes/tiny/config_lora.yaml \
    --trap_lambda 0.005 --output_dir out/tiny-l0.005 \
    --audit_tasks my_tasks.py --audit_protected_task topic \
    --audit_other city=out/city-lora kind=out/kind-lora --audit_unprotected out/topic-plain \
    --push_to_hub --hub_model_id me/tiny-trap2
```
The audit tasks file defines `get_tasks(model, tokenizer) -> list[trap2_hf.audit.AuditTask]` (start from
`recipes/tiny/audit_tasks.py`; `trap2 audit --help`); its report lands in `<output_dir>/_audit/` and in the model
card.

Errors in the settings, a mistyped model path and the like end in one line, `sft_protect.py: error: ...`, exit
code 2; `--debug` (or TRAP2_DEBUG=1) shows the traceback.
"""

import os
import string
import sys
from dataclasses import dataclass, field

from trap2_hf.cli_errors import one_line_error, run_command, unknown_names_message
from trap2_hf.files import missing_folder_hint

DATA_FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}


@dataclass
class Trap2ScriptArguments:
    """What to train on, and what to do with the result besides saving it."""

    dataset_name: str | None = field(
        default=None,
        metadata={
            "help": "Dataset to train on: a Hub dataset name (e.g. trl-lib/Capybara), a local folder of data files, "
            "or one local file (" + ", ".join(DATA_FILE_BUILDERS) + ")."
        },
    )
    dataset_config: str | None = field(
        default=None, metadata={"help": "Dataset configuration name (the `name` of datasets.load_dataset)."}
    )
    dataset_train_split: str = field(
        default="train", metadata={"help": "Training split; slices work, e.g. 'train[:20000]'."}
    )
    dataset_test_split: str = field(
        default="test", metadata={"help": "Evaluation split, used only when eval_strategy is not 'no'."}
    )
    dataset_prompt_template: str | None = field(
        default=None,
        metadata={
            "help": "Python format string over the dataset's columns that builds a `prompt` column, e.g. "
            "'Question: {question}\\nAnswer: '. Set with dataset_completion_template to turn any dataset into "
            "TRL's prompt-completion format (loss on the completion only)."
        },
    )
    dataset_completion_template: str | None = field(
        default=None, metadata={"help": "Format string that builds the `completion` column, e.g. '{answer}'."}
    )
    audit_tasks: str | None = field(
        default=None,
        metadata={
            "help": "Python file defining get_tasks(model, tokenizer) -> list[AuditTask]. When set, the merge-attack "
            "audit runs after training and its result goes into the model card."
        },
    )
    audit_protected_task: str | None = field(
        default=None, metadata={"help": "Name (in the tasks file) of the task this update is trained for."}
    )
    audit_other: list[str] = field(
        default_factory=list,
        metadata={"help": "Updates of other tasks to merge with, as TASK=FOLDER (at least one for an audit)."},
    )
    audit_unprotected: str | None = field(
        default=None, metadata={"help": "Folder of an unprotected twin of this update, for comparison (optional)."}
    )

    def __post_init__(self):
        if not self.dataset_name:
            raise ValueError("dataset_name is required: a Hub dataset name, a local folder or a local data file.")
        if bool(self.dataset_prompt_template) != bool(self.dataset_completion_template):
            raise ValueError(
                "dataset_prompt_template and dataset_completion_template go together: set both (to build "
                "prompt/completion columns) or neither."
            )
        if self.audit_tasks:
            if not os.path.isfile(self.audit_tasks):
                raise ValueError(f"audit_tasks {self.audit_tasks!r} is not a file; pass a Python file defining get_tasks.")
            if not self.audit_protected_task or not self.audit_other:
                raise ValueError(
                    "audit_tasks needs audit_protected_task and at least one audit_other TASK=FOLDER (the updates "
                    "the protected one is merged with)."
                )
            bad = [item for item in self.audit_other if not all(item.partition("="))]
            if bad:
                raise ValueError(f"audit_other entries must be TASK=FOLDER, e.g. city=out/city-lora; got {bad}.")


def load_split(script_args: Trap2ScriptArguments, split: str):
    """One split of the dataset, in a format TRL's SFT understands."""
    from datasets import load_dataset

    name = script_args.dataset_name
    if os.path.isfile(name):
        extension = os.path.splitext(name)[1].lower()
        if extension not in DATA_FILE_BUILDERS:
            raise ValueError(
                f"dataset_name {name!r}: cannot read {extension!r} files; use one of {', '.join(DATA_FILE_BUILDERS)} "
                "or a folder."
            )
        dataset = load_dataset(DATA_FILE_BUILDERS[extension], data_files=name, split=split)
    else:
        dataset = load_dataset(name, name=script_args.dataset_config, split=split)
    if script_args.dataset_prompt_template:
        dataset = _prompt_completion(
            dataset, script_args.dataset_prompt_template, script_args.dataset_completion_template
        )
    return dataset


def _prompt_completion(dataset, prompt_template: str, completion_template: str):
    used = {f for template in (prompt_template, completion_template) for _, f, _, _ in string.Formatter().parse(template) if f}
    missing = sorted(used - set(dataset.column_names))
    if missing:
        raise ValueError(
            f"The dataset templates use columns {missing} that the dataset lacks; its columns are {dataset.column_names}."
        )
    return dataset.map(
        lambda row: {"prompt": prompt_template.format(**row), "completion": completion_template.format(**row)},
        remove_columns=dataset.column_names,
    )


def main(script_args, training_args, model_args, callbacks=None):
    """Train, save (with the protection card), audit if asked, push if asked; returns the trainer."""
    from trl import get_peft_config, get_quantization_config

    from trap2_hf import Trap2SFTTrainer

    check_model(training_args, model_args)
    # The trainer loads the model (AutoModelForCausalLM.from_pretrained) after seeding, so LoRA starts the same
    # on every rank and in every run with this seed.
    training_args.model_init_kwargs = {
        "revision": model_args.model_revision,
        "attn_implementation": model_args.attn_implementation,
        "dtype": model_args.dtype,
        **(training_args.model_init_kwargs or {}),
    }
    train_dataset = load_split(script_args, script_args.dataset_train_split)
    eval_dataset = load_split(script_args, script_args.dataset_test_split) if training_args.eval_strategy != "no" else None

    trainer = Trap2SFTTrainer(
        model=model_args.model_name_or_path,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        quantization_config=get_quantization_config(model_args),
        peft_config=get_peft_config(model_args),
        callbacks=callbacks,
    )  # refuses the launchers whose Trap² step would be silently wrong (trap2_hf/launchers.py)
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model(training_args.output_dir)
    trainer.accelerator.print(f"Saved the protected update and its card to {training_args.output_dir}")
    # Every rank waits here for the others. On gloo (CPU), gloo's worker thread may still be releasing the tensors
    # of the Trainer's last all_gather, which takes the GIL: a rank that went straight on to exit would die with
    # SIGABRT ("terminate called without an active exception"), everything saved but the job failed. Waiting in
    # the barrier releases the GIL. Before the audit and the upload, so that no rank waits through an upload.
    trainer.accelerator.wait_for_everyone()

    if script_args.audit_tasks:
        audit_dir = run_audit(script_args, training_args, model_args, trainer)
        trainer.create_model_card(
            audit=os.path.join(audit_dir, "audit.json"), audit_plot=os.path.join(audit_dir, "audit.png")
        )
    if training_args.push_to_hub:
        trainer.push_to_hub(dataset_name=script_args.dataset_name)
        trainer.accelerator.print(f"Pushed to the Hub: {trainer.hub_model_id}")
    trainer.end()
    return trainer


def check_model(training_args, model_args) -> None:
    """Refuse, in the recipe's own words (flags and keys), a model path that is a mistyped local folder and an
    update kind the model settings do not make, before anything is loaded."""
    path = model_args.model_name_or_path
    if not path:
        raise ValueError("model_name_or_path is required: a local model folder or a Hub repo id.")
    if not os.path.isdir(path) and not _is_hub_id(path):
        hint = missing_folder_hint(path) or f"There is no local folder {path!r}. "
        raise FileNotFoundError(f"model_name_or_path: {hint}Pass a model folder or a Hub repo id (namespace/name).")
    if training_args.trap_target == "adapter" and not model_args.use_peft:
        raise ValueError(
            "trap_target is 'adapter' (the default), which protects a PEFT adapter, but use_peft is false, so none is "
            "trained: pass --use_peft true (with --lora_r, --lora_alpha, --lora_target_modules) to train a protected "
            "LoRA adapter, or --trap_target full to protect a full fine-tune."
        )
    if training_args.trap_target == "full" and model_args.use_peft:
        raise ValueError(
            "trap_target is 'full', which protects every parameter of a full fine-tune, but use_peft is true, so a "
            "LoRA adapter is trained: pass --trap_target adapter to protect the adapter, or --use_peft false for a "
            "full fine-tune."
        )


def _is_hub_id(path: str) -> bool:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if path.startswith((".", "/", "~")) or os.sep + os.sep in path:
        return False
    try:
        validate_repo_id(path)
    except HFValidationError:
        return False
    return True


def run_audit(script_args, training_args, model_args, trainer) -> str:
    """The merge-attack audit of the saved update (main process; the others wait): `trap2 audit`."""
    from trap2_hf.audit import cli

    # "_audit" stays local: the card carries audit.json and audit.png, and `_*` entries are never uploaded.
    audit_dir = os.path.join(training_args.output_dir, "_audit")
    argv = [
        "--base_model", model_args.model_name_or_path,
        "--tasks", script_args.audit_tasks,
        "--protected_task", script_args.audit_protected_task,
        "--protected", training_args.output_dir,
        "--target", training_args.trap_target,
        "--seed", str(training_args.seed),
        "--output_dir", audit_dir,
    ]
    argv += [arg for other in script_args.audit_other for arg in ("--other", other)]
    if script_args.audit_unprotected:
        argv += ["--unprotected", script_args.audit_unprotected]
    if trainer.accelerator.is_main_process:
        cli.main(argv)
    trainer.accelerator.wait_for_everyone()
    return audit_dir


def make_parser():
    from trl import ModelConfig, TrlParser

    from trap2_hf import Trap2SFTConfig

    class RecipeParser(TrlParser):
        """TRL's parser, refusing an unknown YAML key or flag before any argument is checked or model loaded,
        with the closest known name (TRL's own message only says to set fail_with_unknown_args=False); a value
        that does not parse or an unknown flag is one line (`cli_errors.one_line_error`), not the whole usage."""

        help_command = "python recipes/sft_protect.py --help"
        error = one_line_error

        def set_defaults_with_config(self, **kwargs) -> list[str]:
            remaining = super().set_defaults_with_config(**kwargs)
            if remaining:
                known = {action.dest for action in self._actions if action.dest != "help"}
                raise ValueError(
                    unknown_names_message([k.lstrip("-") for k in remaining[0::2]], known, "config key") + ". Every key is a "
                    f"field of Trap2ScriptArguments, Trap2SFTConfig or TRL's ModelConfig (`{self.help_command}`)."
                )
            return remaining

        def parse_args_into_dataclasses(self, args=None, **kwargs):
            flags = [arg.split("=", 1)[0] for arg in (args or []) if arg.startswith("--")]
            # argparse accepts unambiguous prefixes of a flag, so a prefix is not unknown.
            unknown = [f for f in flags if not any(o.startswith(f) for o in self._option_string_actions)]
            if unknown:
                self.error(f"unrecognized arguments: {' '.join(unknown)}")
            return super().parse_args_into_dataclasses(args, **kwargs)

    return RecipeParser((Trap2ScriptArguments, Trap2SFTConfig, ModelConfig), prog="sft_protect.py")


def parse_args(argv: list[str] | None = None):
    """(script_args, training_args, model_args) from `--config recipe.yaml` and flags; unknown keys raise."""
    return make_parser().parse_args_and_config(args=argv, fail_with_unknown_args=True)


def command(argv: list[str]) -> int:
    """The command line: parse, train; an error of ours is one line and exit code 2 (`--debug`: the traceback)."""
    main(*parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(run_command(command, sys.argv[1:], prog="sft_protect.py"))
