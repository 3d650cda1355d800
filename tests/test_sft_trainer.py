"""Trap2SFTTrainer: TRL's SFT path, activation checkpointing on (SFTConfig's default), metrics counted once."""

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model
from trl import SFTConfig, SFTTrainer

from conftest import text_dataset, tiny_llama, tiny_tokenizer
from trap_checks import assert_grads_close, direct_lora_gradients, exact_trap_args, sgd_args, step_gradients, trainable_state
from trap2_hf import Trap2SFTConfig, Trap2SFTTrainer, Trap2Settings

LORA = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "gate_proj"], init_lora_weights=False)


def sft_args(config_cls, tmp_out, **overrides):
    make_args = exact_trap_args if issubclass(config_cls, Trap2Settings) else sgd_args
    return config_cls(output_dir=tmp_out, **make_args(**{"bf16": False, "activation_checkpointing": True, "max_length": 16, "per_device_train_batch_size": 8, **overrides}))


def test_sft_step_gradients_equal_direct_computation(tmp_out):
    args = sft_args(Trap2SFTConfig, tmp_out, max_steps=1, trap_lambda=0.4, trap_scales_per_step=2)
    assert args.activation_checkpointing  # TRL's default: each backward must run inside its own scale
    trainer = Trap2SFTTrainer(
        model=tiny_llama(), args=args, train_dataset=text_dataset(8), processing_class=tiny_tokenizer(), peft_config=LORA
    )
    reference = copy.deepcopy(trainer.model)
    batch = next(iter(trainer.get_train_dataloader()))
    before = trainable_state(trainer.model)
    trainer.train()
    grads = step_gradients(before, trainer.model)
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "labels")}
    expected = direct_lora_gradients(reference, tiny_llama(), inputs, trainer.trap_scales(0), 0.4, "inv_sqrt")
    assert_grads_close(grads, expected, rtol=5e-4, atol=2e-6)


def test_token_metrics_are_not_double_counted(tmp_out):
    common = dict(max_steps=2, logging_steps=1, learning_rate=1e-3, optim="adamw_torch", per_device_train_batch_size=4)
    logs = {}
    for name, trainer_cls, config_cls, extra in [
        ("plain", SFTTrainer, SFTConfig, {}),
        ("trap", Trap2SFTTrainer, Trap2SFTConfig, {"trap_lambda": 0.5, "trap_scales_per_step": 2}),
    ]:
        args = sft_args(config_cls, f"{tmp_out}/{name}", **common, **extra)
        trainer = trainer_cls(
            model=tiny_llama(), args=args, train_dataset=text_dataset(16), processing_class=tiny_tokenizer(),
            peft_config=LORA,
        )
        trainer.train()
        logs[name] = [log for log in trainer.state.log_history if "loss" in log]
    for plain, trap in zip(logs["plain"], logs["trap"]):
        assert trap["num_tokens"] == plain["num_tokens"] > 0
    first_plain, first_trap = logs["plain"][0], logs["trap"][0]
    # Before the first update both models are the same: the nominal pass's metrics must be the plain ones.
    assert first_trap["mean_token_accuracy"] == pytest.approx(first_plain["mean_token_accuracy"])
    assert first_trap["entropy"] == pytest.approx(first_plain["entropy"], rel=1e-5)
    assert first_trap["loss"] == pytest.approx(first_plain["loss"], rel=1e-5)
    assert "trap/rescaled_loss" in first_trap and "trap/scale" in first_trap


def test_sft_adapter_target_needs_peft(tmp_out):
    args = sft_args(Trap2SFTConfig, tmp_out, max_steps=1)
    with pytest.raises(ValueError, match="peft_config"):
        Trap2SFTTrainer(model=tiny_llama(), args=args, train_dataset=text_dataset(4), processing_class=tiny_tokenizer())


def test_building_the_peft_model_prints_no_foreign_deprecation(tmp_out):
    """PEFT reads transformers' deprecated is_gradient_checkpointing while it builds the PeftModel; our users
    never wrote that name, so the FutureWarning is not shown to them."""
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        Trap2SFTTrainer(
            model=tiny_llama(), args=sft_args(Trap2SFTConfig, tmp_out), train_dataset=text_dataset(8),
            processing_class=tiny_tokenizer(), peft_config=LORA,
        )
    assert not [w for w in caught if "is_gradient_checkpointing" in str(w.message)]
    with pytest.warns(FutureWarning, match="is_gradient_checkpointing"):  # the warning this guards against
        get_peft_model(tiny_llama(), LORA)
