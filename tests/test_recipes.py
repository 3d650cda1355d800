"""recipes/: every recipe parses with the real parser; the tiny recipe trains end to end in one process
and in two (CPU DDP): the same weights as one process with the same global batch, the same scales on
every rank, and one gradient all-reduce per optimizer step."""

import importlib.util
import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from trap2_hf import Trap2SFTConfig
from trap2_hf.modes.rows import rescaled_rows, rows_generator

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"
SCRIPT = RECIPES / "sft_protect.py"
ACCELERATE_CONFIGS = sorted((RECIPES / "accelerate_configs").glob("*.yaml"))
TRAINING_RECIPES = sorted(p for p in RECIPES.rglob("*.yaml") if p.parent.name != "accelerate_configs")
TINY_LORA = "recipes/tiny/config_lora.yaml"

# Strong protection and two scales per step, so a wrong Trap² term under DDP would show in the weights;
# no dropout, so one process and two see the same computation.
# The reference step, so one process and two can be compared weight for weight.
TRAP_FLAGS = [
    "--trap_lambda", "0.5", "--trap_scales_per_step", "2", "--lora_dropout", "0", "--max_steps", "4",
    "--trap_mode", "two_pass",
]
STEPS, SCALES_PER_STEP = 4, 2


def load_recipe():
    spec = importlib.util.spec_from_file_location("sft_protect", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def parse(argv):
    # The GPU recipes ask for bf16, which TrainingArguments refuses on a CPU-only machine unless use_cpu.
    device = [] if torch.cuda.is_available() else ["--use_cpu", "true"]
    return load_recipe().parse_args([*argv, *device])


def rel(path: Path) -> str:
    return str(path.relative_to(RECIPES))


# ----------------------------------------------------------------------------- every recipe parses
@pytest.mark.parametrize("path", TRAINING_RECIPES, ids=rel)
def test_training_recipe_parses(path):
    script_args, training_args, model_args = parse(["--config", str(path)])
    assert isinstance(training_args, Trap2SFTConfig)
    assert model_args.model_name_or_path and script_args.dataset_name
    assert training_args.trap_target == ("adapter" if model_args.use_peft else "full")


def test_recipe_folders_hold_the_promised_recipes():
    names = {rel(p) for p in TRAINING_RECIPES}
    assert {
        "tiny/config_lora.yaml",
        "tiny/config_full.yaml",
        "qwen2.5-0.5b-instruct/sft/config_lora.yaml",
        "qwen2.5-0.5b-instruct/sft/config_full.yaml",
        "llama-3.1-8b/sft/config_lora_r32.yaml",
    } <= names
    assert {p.name for p in ACCELERATE_CONFIGS} == {"single_gpu.yaml", "ddp.yaml", "zero2.yaml", "zero3.yaml", "fsdp2.yaml"}


def test_paper_recipe_has_the_paper_setup():
    script_args, args, model_args = parse(["--config", str(RECIPES / "llama-3.1-8b/sft/config_lora_r32.yaml")])
    assert (args.trap_weighting, model_args.lora_r, model_args.lora_alpha) == ("inv_sqrt", 32, 32)
    assert (args.trap_scale_min, args.trap_scale_max, args.trap_margin, args.max_grad_norm) == (0.05, 2.0, 0.05, 1.0)
    assert script_args.dataset_prompt_template.endswith("step by step.\n")


@pytest.mark.parametrize("path", TRAINING_RECIPES, ids=rel)
def test_recipes_use_settings_measured_to_protect(path):
    """The paper's lambda 0.01 with one uniform scale per step left every demo merge at 1.00; lambda 0.05 with two
    stratified scales brought naive merges to chance (recipes/README.md, "Protection settings"). The tiny recipes
    too: they are the templates users copy first."""
    _, args, _ = parse(["--config", str(path)])
    assert args.trap_lambda >= 0.05 and args.trap_scales_per_step >= 2, (args.trap_lambda, args.trap_scales_per_step)
    assert args.trap_scale_sampling == "stratified" and args.trap_weighting == "inv_sqrt"


@pytest.mark.parametrize("path", ACCELERATE_CONFIGS, ids=rel)
def test_accelerate_config_loads(path):
    """accelerate's own loader rejects unknown top-level keys; nested keys must be launcher options."""
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.commands.launch import launch_command_parser

    config = load_config_from_file(str(path))
    options = {action.dest for action in launch_command_parser()._actions}
    nested = dict(config.deepspeed_config or {})
    nested |= {k if k.startswith("fsdp") else f"fsdp_{k}": v for k, v in (config.fsdp_config or {}).items()}
    assert set(nested) <= options, sorted(set(nested) - options)


def test_unknown_yaml_key_is_an_error(tmp_path):
    bad = tmp_path / "typo.yaml"
    bad.write_text((ROOT / TINY_LORA).read_text() + "trap_lamda: 0.1\n")
    with pytest.raises(ValueError, match=r"unknown config key trap_lamda \(did you mean trap_lambda\?\)"):
        parse(["--config", str(bad)])
    # Refused before the dataclasses are built: a typo'd required key is reported as a typo, not as missing.
    bad.write_text((ROOT / TINY_LORA).read_text().replace("dataset_name:", "dataset_nme:"))
    with pytest.raises(ValueError, match=r"dataset_nme \(did you mean dataset_name\?\)"):
        parse(["--config", str(bad)])


def test_unknown_flag_is_an_error(capsys):
    with pytest.raises(SystemExit):
        parse(["--config", str(ROOT / TINY_LORA), "--trap_lamda", "0.1"])
    assert capsys.readouterr().err == (
        "sft_protect.py: error: unknown flag --trap_lamda (did you mean --trap_lambda?) (`python "
        "recipes/sft_protect.py --help` lists the options)\n"
    )
    _, args, _ = parse(["--config", str(ROOT / TINY_LORA), "--trap_lamb=0.2"])  # argparse's unambiguous prefix
    assert args.trap_lambda == 0.2


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--config", "{typo_yaml}"], "unknown config key trap_lamda (did you mean trap_lambda?)"),
        (["--trap_lambda", "-1"], "trap_lambda must be >= 0, got -1.0."),
        (["--trap_lambda", "abc"], "argument --trap_lambda: invalid float value: 'abc' (`python recipes/"),
        (["--trap_scale_min", "1.5", "--trap_scale_max", "1.2"], "trap_scale_min (1.5) must be <= trap_scale_max"),
        (["--output_dir", "{file}"], "is a file, not a folder"),
        (["--max_steps", "0"], "max_steps=0 trains nothing"),
        (["--trap_target", "full"], "use_peft is true, so a LoRA adapter is trained: pass --trap_target adapter"),
        (["--use_peft", "false"], "use_peft is false, so none is trained: pass --use_peft true"),
        (["--model_name_or_path", "recipes/tiny/modle"], "did you mean 'recipes/tiny/model'?"),
        (["--model_name_or_path", "recipes/tiny/nothing-like-it"], "no local folder 'recipes/tiny/nothing-like-it'"),
    ],
)
def test_the_command_line_gets_one_line_per_error(tmp_path, monkeypatch, capsys, flags, message):
    """What the recipe refuses prints as one `sft_protect.py: error: ...` line (exit code 2), in the words of the
    command line: flags, not Python calls; and before a model is loaded or an output folder made."""
    import transformers

    from trap2_hf.cli_errors import run_command

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", _no_loading)
    (tmp_path / "file").write_text("not a folder")
    (tmp_path / "typo.yaml").write_text((ROOT / TINY_LORA).read_text().replace("trap_lambda:", "trap_lamda:"))
    flags = [f.format(file=tmp_path / "file", typo_yaml=tmp_path / "typo.yaml") for f in flags]
    monkeypatch.chdir(ROOT)
    config = [] if flags[0] == "--config" else ["--config", TINY_LORA]
    argv = [*config, "--output_dir", str(tmp_path / "out"), *flags]
    try:
        code = run_command(load_recipe().command, argv, prog="sft_protect.py")
    except SystemExit as exit:  # the parser's own exit, for a value that does not parse
        code = exit.code
    captured = capsys.readouterr()
    assert code == 2
    assert captured.err.startswith("sft_protect.py: error: ") and captured.err.count("\n") == 1, captured.err
    assert message in captured.err and "get_peft_model" not in captured.err
    assert not (tmp_path / "out").exists()


def test_a_wrong_model_path_ends_the_recipe_in_one_line(tmp_path):
    """`python recipes/sft_protect.py` itself: exit code 2 and one line, the traceback only with --debug."""
    command = [sys.executable, str(SCRIPT), "--config", TINY_LORA, "--model_name_or_path", "recipes/tiny/modle",
               "--output_dir", str(tmp_path / "out")]
    env = {**_env(tmp_path), "PYTHONPATH": str(ROOT)}
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert "did you mean 'recipes/tiny/model'?" in result.stderr
    debug = subprocess.run([*command, "--debug"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert debug.returncode == 1 and "Traceback" in debug.stderr and "FileNotFoundError" in debug.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--max_steps", "0"], "max_steps=0 trains nothing"),
        (["--output_dir", "{file}"], "is a file, not a folder"),
    ],
)
def test_run_arguments_are_refused_before_the_model_loads(tmp_path, monkeypatch, flags, message):
    import transformers

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", _no_loading)
    (tmp_path / "file").write_text("not a folder")
    flags = [flag.format(file=tmp_path / "file") for flag in flags]
    with pytest.raises(ValueError, match=message):
        load_recipe().main(*parse(["--config", str(ROOT / TINY_LORA), *flags]))


def _no_loading(*args, **kwargs):
    raise AssertionError("the model was loaded before the arguments were checked")


def test_flags_override_yaml():
    _, args, model_args = parse(["--config", str(ROOT / TINY_LORA), "--trap_lambda", "0.25", "--lora_r", "2"])
    assert (args.trap_lambda, model_args.lora_r, args.trap_weighting) == (0.25, 2, "inv_sqrt")


def test_invalid_trap_value_names_the_field(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text((ROOT / TINY_LORA).read_text().replace("trap_weighting: inv_sqrt", "trap_weighting: cubic"))
    with pytest.raises(ValueError, match="trap_weighting must be one of"):
        parse(["--config", str(bad)])
    with pytest.raises(SystemExit):
        parse(["--config", str(ROOT / TINY_LORA), "--trap_weighting", "cubic"])
    assert "--trap_weighting" in capsys.readouterr().err


def test_prompt_completion_templates():
    from datasets import Dataset

    recipe = load_recipe()
    data = Dataset.from_list([{"question": "1+1?", "answer": "2", "id": 7}])
    pairs = recipe._prompt_completion(data, "Q: {question}\nA: ", "{answer}")
    assert pairs.column_names == ["prompt", "completion"] and pairs[0] == {"prompt": "Q: 1+1?\nA: ", "completion": "2"}
    with pytest.raises(ValueError, match="qestion"):
        recipe._prompt_completion(data, "Q: {qestion}", "{answer}")


def _launch(kind: str, zero_stage=None, trap_target="adapter", trap_lambda=0.01, **trainer_attrs):
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    plugin = SimpleNamespace(zero_stage=zero_stage) if zero_stage else None
    accelerator = SimpleNamespace(distributed_type=DistributedType[kind], state=SimpleNamespace(deepspeed_plugin=plugin))
    args = SimpleNamespace(trap_target=trap_target, trap_lambda=trap_lambda)
    return SimpleNamespace(args=args, accelerator=accelerator, **trainer_attrs)


def test_launcher_check_refuses_silently_wrong_combinations():
    from trap2_hf.launchers import refuse_unsupported_launcher as check

    for ok in [_launch("MULTI_GPU"), _launch("MULTI_GPU", trap_target="full"), _launch("FSDP"), _launch("NO"),
               _launch("DEEPSPEED", zero_stage=2, trap_lambda=0.0),
               _launch("DEEPSPEED", zero_stage=3, trap_supports_deepspeed=True)]:
        check(ok)
    with pytest.raises(NotImplementedError, match="optimizer steps per step"):
        check(_launch("DEEPSPEED", zero_stage=2))
    for kind, stage in [("FSDP", None), ("DEEPSPEED", 3)]:
        with pytest.raises(NotImplementedError, match="trap_target='full'"):
            check(_launch(kind, zero_stage=stage, trap_target="full", trap_supports_deepspeed=True))


# ----------------------------------------------------------------------------- end to end
def _env(tmp_path) -> dict:
    env = dict(os.environ)
    env.update(
        OMP_NUM_THREADS="1",
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        HF_DATASETS_CACHE=str(tmp_path / "datasets-cache"),
        PYTHONUNBUFFERED="1",
        PYTHONFAULTHANDLER="1",
    )
    return env


def _run(command, env, timeout=300):
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{' '.join(map(str, command))}\n{result.stdout[-4000:]}\n{result.stderr[-6000:]}"
    return result


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


RECIPE_FILES = {"lora": TINY_LORA, "full": "recipes/tiny/config_full.yaml"}
WEIGHTS = {"lora": "adapter_model.safetensors", "full": "model.safetensors"}


_ONE_PROCESS_RUNS = {}


def one_process(kind: str, tmp_path_factory, *flags: str) -> Path:
    """A tiny recipe as users run it: `python recipes/sft_protect.py --config ...`, global batch 4 (run once)."""
    if (kind, flags) not in _ONE_PROCESS_RUNS:
        out = tmp_path_factory.mktemp(f"one-{kind}") / "out"
        _run(
            [sys.executable, str(SCRIPT), "--config", RECIPE_FILES[kind], "--output_dir", str(out),
             "--per_device_train_batch_size", "4", "--disable_tqdm", "true", *TRAP_FLAGS, *flags],
            _env(out.parent),
        )
        _ONE_PROCESS_RUNS[kind, flags] = out
    return _ONE_PROCESS_RUNS[kind, flags]


@pytest.fixture(scope="module", params=sorted(RECIPE_FILES))
def one_process_run(request, tmp_path_factory):
    return request.param, one_process(request.param, tmp_path_factory)


@pytest.mark.slow
def test_tiny_recipe_single_process(one_process_run):
    kind, out = one_process_run
    files = set(os.listdir(out))
    assert {WEIGHTS[kind], "README.md"} <= files
    assert ("adapter_config.json" if kind == "lora" else "config.json") in files
    card = (out / "README.md").read_text()
    assert "trap_lambda: 0.5" in card and "trap_scales_per_step: 2" in card
    assert f"trap_target: {'adapter' if kind == 'lora' else 'full'}" in card
    assert all(torch.isfinite(t).all() for t in load_file(out / WEIGHTS[kind]).values())


AUDIT_TASKS = textwrap.dedent(
    """
    import json
    import torch
    from trap2_hf.audit import AuditTask

    def get_tasks(model, tokenizer):
        rows = [json.loads(line)["text"] for line in open("recipes/tiny/data/train.jsonl")]

        def last_word(name, texts):
            def evaluate(model, split):
                chosen = texts[:6] if split == "validation" else texts[6:12]
                hits = 0
                for text in chosen:
                    ids = tokenizer(text, return_tensors="pt").input_ids.to(model.device)
                    with torch.no_grad():
                        hits += int(model(input_ids=ids[:, :-1]).logits[0, -1].argmax() == ids[0, -1])
                return hits / len(chosen)
            return AuditTask(name, evaluate, chance=1 / len(tokenizer))

        return [last_word("head", rows), last_word("tail", rows[::-1])]
    """
)


@pytest.mark.slow
def test_tiny_recipe_with_audit(tmp_path, tmp_path_factory):
    """--audit_tasks: the audit runs on the saved adapter after training and lands in the card."""
    tasks, out = tmp_path / "tasks.py", tmp_path / "out"
    tasks.write_text(AUDIT_TASKS)
    other = one_process("lora", tmp_path_factory)
    _run(
        [sys.executable, str(SCRIPT), "--config", TINY_LORA, "--output_dir", str(out), "--max_steps", "2",
         "--disable_tqdm", "true", "--audit_tasks", str(tasks), "--audit_protected_task", "head",
         "--audit_other", f"tail={other}"],
        _env(tmp_path),
    )
    results = json.loads((out / "_audit" / "audit.json").read_text())
    assert results["protected_task"] == "head" and results["methods"]
    assert "audit.png" in (out / "README.md").read_text()


# Runs the recipe's own main() under `accelerate launch`, recording per rank what a log cannot show: the
# scales each re-scaled pass used, every backward, and every DDP gradient all-reduce (a comm hook).
PROBE = textwrap.dedent(
    """
    import importlib.util, json, sys
    import accelerate
    import torch
    from torch.nn.parallel import DistributedDataParallel
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
    from trap2_hf import Trap2SFTTrainer

    script, record_path = sys.argv[1], sys.argv[2]
    spec = importlib.util.spec_from_file_location("sft_protect", script)
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    record = {"allreduces": 0, "buckets": 0, "backwards": 0, "scales": []}

    def counting_hook(state, bucket):
        record["buckets"] += 1
        record["allreduces"] += bucket.is_last()  # one gradient all-reduce = all buckets of one backward
        return allreduce_hook(state, bucket)

    ddp_init = DistributedDataParallel.__init__
    def init(self, *args, **kwargs):
        ddp_init(self, *args, **kwargs)
        self.register_comm_hook(None, counting_hook)
    DistributedDataParallel.__init__ = init

    backward = accelerate.Accelerator.backward
    def counting_backward(self, loss, **kwargs):
        record["backwards"] += 1
        return backward(self, loss, **kwargs)
    accelerate.Accelerator.backward = counting_backward

    # The order of the process group's last calls: no rank may exit while gloo still releases a collective.
    record["calls"] = []
    for name in ["all_gather", "all_reduce", "broadcast", "barrier", "destroy_process_group"]:
        def recording(*args, _name=name, _call=getattr(torch.distributed, name), **kwargs):
            record["calls"].append(_name)
            return _call(*args, **kwargs)
        setattr(torch.distributed, name, recording)

    rescaled = Trap2SFTTrainer.trap_rescaled
    def recording_rescaled(self, scale, **kwargs):
        record["scales"].append([self.state.global_step, scale])
        return rescaled(self, scale, **kwargs)
    Trap2SFTTrainer.trap_rescaled = recording_rescaled

    from trap2_hf.modes.fused import FusedPlan
    build = FusedPlan.build.__func__
    def recording_build(cls, batch_size, rows, *args):
        record.setdefault("copies", []).append([r.tolist() for r in rows])
        return build(cls, batch_size, rows, *args)
    FusedPlan.build = classmethod(recording_build)

    trainer = recipe.main(*recipe.parse_args(sys.argv[3:]))
    record["rank"], record["world_size"] = trainer.args.process_index, trainer.args.world_size
    record["global_step"] = trainer.state.global_step
    record["drawn"] = {step: trainer.trap_scales(step) for step in range(trainer.state.global_step)}
    with open(f"{record_path}.rank{record['rank']}.json", "w") as f:
        json.dump(record, f)
    """
)


@pytest.mark.slow
def test_tiny_recipe_two_process_ddp_matches_one_process(tmp_path, one_process_run):
    """2 ranks x batch 1 x 2 accumulation steps == 1 process x batch 4: the same samples per optimizer step
    (accelerate shards the seeded sampler's batches round-robin), so the same trained LoRA adapter or model."""
    kind, one_out = one_process_run
    out = tmp_path / "out"
    ranks = run_two_processes(tmp_path, kind, out)

    # Every rank re-scaled with the same scales: per micro-batch, the step's draws, in order.
    micro_batches = 2
    assert ranks[0]["scales"] == ranks[1]["scales"]
    expected = [[step, s] for step in range(STEPS) for _ in range(micro_batches) for s in ranks[0]["drawn"][str(step)]]
    assert ranks[0]["scales"] == expected
    assert len({s for _, s in expected}) == STEPS * SCALES_PER_STEP

    # (1 nominal + 2 re-scaled) backwards per micro-batch, but one gradient all-reduce per optimizer step.
    for r in ranks:
        assert r["backwards"] == STEPS * micro_batches * (1 + SCALES_PER_STEP)
        assert r["allreduces"] == STEPS, r

    one, two = load_file(one_out / WEIGHTS[kind]), load_file(out / WEIGHTS[kind])
    assert one.keys() == two.keys()
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=1e-4, atol=1e-6, msg=name)


def run_two_processes(tmp_path, kind: str, out: Path, *flags: str) -> list[dict]:
    """The recipe on 2 CPU ranks (DDP over gloo), batch 1 x 2 accumulation steps each; each rank's PROBE record."""
    probe, record = tmp_path / "probe.py", tmp_path / "record"
    probe.write_text(PROBE)
    env = _env(tmp_path)
    env["ACCELERATE_USE_CPU"] = "1"
    _run(
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
         "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
         "--main_process_port", str(_free_port()),
         str(probe), str(SCRIPT), str(record),
         "--config", RECIPE_FILES[kind], "--output_dir", str(out), "--per_device_train_batch_size", "1",
         "--gradient_accumulation_steps", "2", "--disable_tqdm", "true", *TRAP_FLAGS, *flags],
        env,
        timeout=400,
    )
    ranks = [json.loads((tmp_path / f"record.rank{r}.json").read_text()) for r in range(2)]
    assert [r["world_size"] for r in ranks] == [2, 2] and [r["global_step"] for r in ranks] == [STEPS, STEPS]
    # Every rank waits for the other (a barrier) right before the group is destroyed: on gloo, exiting while the
    # worker thread still releases the last all_gather's tensors aborts the process after everything is saved.
    for r in ranks:
        assert r["calls"][-2:] == ["barrier", "destroy_process_group"], r["calls"][-6:]
    return ranks


@pytest.mark.slow
def test_tiny_recipe_two_process_ddp_runs_the_default_fused_step(tmp_path, tmp_path_factory):
    """The default trap_mode ('auto') runs a LoRA recipe fused, re-scaling a quarter of the (scale, row) pairs: one
    backward per micro-batch and one all-reduce per optimizer step on each of 2 ranks. The rows are drawn once for
    the global micro-batch and each rank takes its share (here the one copy of each micro-batch's 2 rows x 2
    scales x 0.25 lands on one rank), so 2 ranks x batch 1 train exactly what one process trains on the same
    micro-batches (batch 2), both with 2 accumulation steps and no dropout."""
    default = ("--trap_mode", "auto", "--gradient_accumulation_steps", "2")
    one_out = one_process("lora", tmp_path_factory, *default, "--per_device_train_batch_size", "2")
    out = tmp_path / "out"
    ranks = run_two_processes(tmp_path, "lora", out, *default)
    for r in ranks:
        assert r["backwards"] == STEPS * 2 and r["allreduces"] == STEPS and r["scales"] == [], r
    fraction = 0.25 / SCALES_PER_STEP  # the default share of re-scaled rows, split among the scales
    for card in (out / "README.md").read_text(), (one_out / "README.md").read_text():
        assert "trap_mode: fused" in card and f"trap_rescaled_fraction: {fraction}" in card
    # Per micro-batch, rank r re-scaled global row r exactly where one process's draw for the 2 rows does.
    drawn = [
        rescaled_rows(2, fraction, SCALES_PER_STEP, rows_generator(42, step, micro_batch))
        for step in range(STEPS) for micro_batch in range(2)
    ]
    for rank, r in enumerate(ranks):
        assert r["copies"] == [[[0] if rank in rows.tolist() else [] for rows in per_scale] for per_scale in drawn]
    assert 0 < sum(len(rows) for per_scale in drawn for rows in per_scale) < 2 * SCALES_PER_STEP * len(drawn)
    one, two = load_file(one_out / WEIGHTS["lora"]), load_file(out / WEIGHTS["lora"])
    assert one.keys() == two.keys()
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.slow
def test_tiny_recipe_two_process_ddp_runs_the_default_full_fine_tuning_step(tmp_path, tmp_path_factory):
    """The default trap_mode ('auto') runs a full fine-tune as sub_batch, the two scales sharing half the rows of the
    global micro-batch (one row on each of 2 ranks): one re-scaled row per global micro-batch, on one rank, at one of
    the step's scales. The other rank runs the same pass with weight 0, so both run TRL's metric gathers in the same
    order (2 backwards per micro-batch each), and still one gradient all-reduce per optimizer step. They train
    exactly what one process trains on the same micro-batches (batch 2)."""
    one_out = one_process(
        "full", tmp_path_factory, "--trap_mode", "auto", "--gradient_accumulation_steps", "2",
        "--per_device_train_batch_size", "2",
    )
    out = tmp_path / "out"
    ranks = run_two_processes(tmp_path, "full", out, "--trap_mode", "auto")
    for r in ranks:
        assert r["backwards"] == STEPS * 2 * 2 and r["allreduces"] == STEPS, r
        assert len(r["scales"]) == STEPS * 2  # one re-scaled pass per micro-batch, at one of the step's scales
        assert all(s in r["drawn"][str(step)] for step, s in r["scales"])
    assert ranks[0]["scales"] == ranks[1]["scales"]
    card = (out / "README.md").read_text()
    assert "trap_mode: sub_batch" in card and "trap_rescaled_fraction: 0.25" in card
    one, two = load_file(one_out / WEIGHTS["full"]), load_file(out / WEIGHTS["full"])
    assert one.keys() == two.keys()
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=1e-4, atol=1e-6, msg=name)


# ----------------------------------------------------------------------------- the starter tasks file
STARTER_TASKS = RECIPES / "tiny" / "audit_tasks.py"
TINY_MODEL = RECIPES / "tiny" / "model"


def test_the_starter_audit_tasks_file_runs_through_the_audit(tmp_path, capsys):
    """recipes/tiny/audit_tasks.py, as `trap2 audit --tasks` loads it, on the tiny model: both tasks measured,
    the protected one's repair loss differentiable."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trap2_hf.cli import main

    folders = {}
    for seed, name in enumerate(("object", "relation")):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_pretrained(TINY_MODEL)
        config = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
        folders[name] = str(tmp_path / name)
        get_peft_model(model, config).save_pretrained(folders[name])
    out = tmp_path / "audit"
    code = main([
        "audit", "--base_model", str(TINY_MODEL), "--tasks", str(STARTER_TASKS), "--protected_task", "object",
        "--protected", folders["object"], "--other", f"relation={folders['relation']}", "--methods", "task_arithmetic",
        "--modes", "average", "--sweep_scales", "1", "--device", "cpu", "--output_dir", str(out), "--no_progress",
    ])
    assert code == 0, capsys.readouterr().err
    results = json.loads((out / "audit.json").read_text())
    assert results["protected_task"] == "object"
    assert set(results["base"]) >= {"object", "relation"} and set(results["chance"]) >= {"object", "relation"}
    assert results["chance"]["object"] == 1 / 8 and results["chance"]["relation"] == 1 / 4  # 8 objects, 4 verbs

    spec = importlib.util.spec_from_file_location("starter_tasks", STARTER_TASKS)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    base = AutoModelForCausalLM.from_pretrained(TINY_MODEL)
    tasks = module.get_tasks(base, AutoTokenizer.from_pretrained(TINY_MODEL))
    protected = tasks[0]
    assert protected.num_train > 0 and all(0 <= t.evaluate(base, split) <= 1 for t in tasks for split in ("validation", "test"))
    loss = protected.train_loss(base, torch.arange(4))
    loss.backward()
    assert loss.ndim == 0 and base.lm_head.weight.grad is not None
