import pytest
from transformers import HfArgumentParser, TrainingArguments

from trap2_hf import Trap2SFTConfig, Trap2TrainingArguments


def make(**kwargs):
    return Trap2TrainingArguments(output_dir="unused", report_to="none", **kwargs)


def test_defaults_match_the_method():
    args = make()
    assert args.trap_scale_min == 0.05 and args.trap_scale_max == 2.0 and args.trap_margin == 0.05
    assert args.trap_weighting == "inv" and args.trap_target == "adapter"
    assert isinstance(args, TrainingArguments)
    # Language models: the paper's 1/sqrt(s).
    assert Trap2SFTConfig(output_dir="unused", report_to="none", bf16=False).trap_weighting == "inv_sqrt"


@pytest.mark.parametrize(
    "kwargs, field_name",
    [
        ({"trap_margin": 0.0}, "trap_margin"),
        ({"trap_margin": -0.1}, "trap_margin"),
        ({"trap_scale_min": 0.0}, "trap_scale_min"),
        ({"trap_scale_min": 1.5, "trap_scale_max": 0.5}, "trap_scale_min"),
        ({"trap_scale_min": 0.97, "trap_scale_max": 1.03}, "outside the margin"),
        ({"trap_scale_min": 1.0, "trap_scale_max": 1.0}, "outside the margin"),
        ({"trap_lambda": -0.01}, "trap_lambda"),
        ({"trap_weighting": "sqrt"}, "trap_weighting"),
        ({"trap_target": "lora"}, "trap_target"),
        ({"trap_scales_per_step": 0}, "trap_scales_per_step"),
        ({"trap_scale_sampling": "sobol"}, "trap_scale_sampling"),
    ],
)
def test_bad_values_name_the_field(kwargs, field_name):
    with pytest.raises(ValueError, match=field_name):
        make(**kwargs)


def test_sft_config_validates_too():
    with pytest.raises(ValueError, match="trap_lambda"):
        Trap2SFTConfig(output_dir="unused", report_to="none", bf16=False, trap_lambda=-1)


def test_fixed_scale_outside_margin_is_allowed():
    args = make(trap_scale_min=0.5, trap_scale_max=0.5)
    assert args.trap_scale_min == args.trap_scale_max == 0.5


def test_fields_are_command_line_flags():
    (args,) = HfArgumentParser(Trap2TrainingArguments).parse_args_into_dataclasses(
        ["--output_dir", "x", "--trap_lambda", "0.05", "--trap_weighting", "none", "--trap_scales_per_step", "2"]
    )
    assert (args.trap_lambda, args.trap_weighting, args.trap_scales_per_step) == (0.05, "none", 2)
    with pytest.raises(SystemExit):
        HfArgumentParser(Trap2TrainingArguments).parse_args_into_dataclasses(
            ["--output_dir", "x", "--trap_weighting", "bogus"]
        )


def test_settings_dict_is_exactly_the_trap_fields():
    settings = make(trap_lambda=0.02).trap_settings_dict()
    assert settings["trap_lambda"] == 0.02
    assert all(key.startswith("trap_") for key in settings)
    assert {"trap_lambda", "trap_scale_min", "trap_scale_max", "trap_margin", "trap_weighting", "trap_target"} <= set(settings)


@pytest.mark.parametrize("config", [make, lambda **kw: Trap2SFTConfig(output_dir="unused", report_to="none", bf16=False, **kw)])
@pytest.mark.parametrize(
    "kwargs, message",
    [({"max_steps": 0}, "max_steps=0 trains nothing"), ({"num_train_epochs": 0}, "num_train_epochs=0 with max_steps=-1")],
)
def test_a_run_that_trains_nothing_is_refused(config, kwargs, message):
    """transformers runs one step for max_steps=0; its save would carry a protection card for an untrained update."""
    with pytest.raises(ValueError, match=message):
        config(**kwargs)
    assert config(max_steps=1).max_steps == 1


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"trap_lambda": "0.1"}, r"trap_lambda must be a number, got '0.1' \(a str\)"),
        ({"trap_rescaled_fraction": "0.25", "trap_mode": "fused"}, "trap_rescaled_fraction must be a number"),
        ({"trap_scales_per_step": 2.0}, "trap_scales_per_step must be an integer, got 2.0"),
        ({"trap_margin": True}, "trap_margin must be a number, got True"),
    ],
)
def test_values_of_the_wrong_type_name_the_field(kwargs, message):
    """In Python nothing parses the values; docs/settings.md promises a ValueError naming the field."""
    with pytest.raises(ValueError, match=message):
        make(**kwargs)
    assert make(trap_lambda=1, trap_rescaled_fraction=None).trap_lambda == 1


def test_sft_config_runs_on_the_machine_it_is_built_on(tmp_path):
    """TRL's default bf16=True fails on a machine without a bf16 device ("Your setup doesn't support bf16/gpu");
    left unset, it follows the machine. Without an accelerator the DataLoader cannot pin memory (torch warns on
    every run), so pinning is off."""
    import torch
    from transformers.utils import is_torch_bf16_gpu_available

    config = Trap2SFTConfig(output_dir=str(tmp_path), report_to="none")
    assert config.bf16 == is_torch_bf16_gpu_available()
    assert Trap2SFTConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True).bf16 is False
    accelerator = torch.accelerator.is_available()
    assert config.dataloader_pin_memory == make().dataloader_pin_memory == accelerator
    if not is_torch_bf16_gpu_available():
        with pytest.raises(ValueError, match="bf16"):  # asked for explicitly: TRL's and transformers' own refusal
            Trap2SFTConfig(output_dir=str(tmp_path), report_to="none", bf16=True)
