"""Trap2Trainer: the step's gradients, accumulation, resumption, skipping and the checks at construction."""

import copy
import functools
import os

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import Trainer, TrainingArguments

from conftest import tiny_llama, token_dataset
from trap_checks import (
    assert_grads_close,
    direct_full_gradients,
    direct_lora_gradients,
    exact_trap_args,
    sgd_args,
    step_gradients,
    trainable_state,
)
from trap2_hf import Trap2Settings, Trap2Trainer, Trap2TrainingArguments

LORA = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"], init_lora_weights=False)


def lora_model(**overrides):
    return get_peft_model(tiny_llama(), LoraConfig(**{**LORA, **overrides}))


def lora_model_with_seed(seed):
    base = tiny_llama()
    torch.manual_seed(seed)
    return get_peft_model(base, LoraConfig(**LORA))


def full_batch(dataset):
    return {k: torch.tensor(dataset[k]) for k in ("input_ids", "attention_mask", "labels")}


def one_step(model, tmp_out, dataset, trainer_cls=Trap2Trainer, args_cls=Trap2TrainingArguments, **overrides):
    make_args = exact_trap_args if issubclass(args_cls, Trap2Settings) else sgd_args
    args = args_cls(output_dir=tmp_out, max_steps=1, per_device_train_batch_size=len(dataset), **make_args(**overrides))
    trainer = trainer_cls(model=model, args=args, train_dataset=dataset)
    before = trainable_state(model)
    trainer.train()
    return trainer, step_gradients(before, model)


@pytest.mark.parametrize("weighting", ["inv", "inv_sqrt", "none"])
def test_lora_step_gradients_equal_direct_computation(tmp_out, weighting):
    dataset = token_dataset(8, ragged=True)
    model = lora_model()
    reference = copy.deepcopy(model)
    trainer, grads = one_step(model, tmp_out, dataset, trap_lambda=0.3, trap_weighting=weighting)
    scales = trainer.trap_scales(0)
    expected = direct_lora_gradients(reference, tiny_llama(), full_batch(dataset), scales, 0.3, weighting)
    assert_grads_close(grads, expected)
    # The re-scaled term matters: without it the gradients differ.
    plain = direct_lora_gradients(reference, tiny_llama(), full_batch(dataset), scales, 0.0, weighting)
    assert max((plain[k] - expected[k]).abs().max() for k in expected) > 1e-4


def test_dora_two_scales_with_checkpointing_equal_direct_computation(tmp_out):
    dataset = token_dataset(8, ragged=True)
    model = lora_model(use_dora=True)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "magnitude" in name:
                p.mul_(1.2)
    reference = copy.deepcopy(model)
    trainer, grads = one_step(
        model,
        tmp_out,
        dataset,
        trap_lambda=0.2,
        trap_scales_per_step=2,
        trap_scale_sampling="stratified",
        activation_checkpointing=True,
    )
    scales = trainer.trap_scales(0)
    assert scales[0] < 1 < scales[1]
    expected = direct_lora_gradients(reference, tiny_llama(), full_batch(dataset), scales, 0.2, "inv")
    assert_grads_close(grads, expected)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_full_finetune_step_gradients_equal_direct_computation(tmp_out, checkpointing):
    dataset = token_dataset(8, ragged=True)
    model = tiny_llama()
    generator = torch.Generator().manual_seed(3)
    # An explicit theta0 away from the current weights, so theta0 + s*(theta - theta0) is not trivial.
    theta0 = {k: p.detach() + 0.05 * torch.randn(p.shape, generator=generator) for k, p in model.named_parameters()}
    reference = copy.deepcopy(model)
    args = Trap2TrainingArguments(
        output_dir=tmp_out,
        max_steps=1,
        per_device_train_batch_size=8,
        **exact_trap_args(trap_target="full", trap_lambda=0.5, trap_weighting="inv_sqrt", activation_checkpointing=checkpointing),
    )
    trainer = Trap2Trainer(model=model, args=args, train_dataset=dataset, trap_reference=theta0)
    before = trainable_state(model)
    trainer.train()
    grads = step_gradients(before, model)
    expected = direct_full_gradients(reference, theta0, full_batch(dataset), trainer.trap_scales(0), 0.5, "inv_sqrt")
    assert_grads_close(grads, expected, rtol=5e-4, atol=2e-6)


def test_lambda_zero_is_exactly_the_plain_trainer(tmp_out):
    dataset = token_dataset(8, ragged=True)
    plain_model, trap_model = lora_model(), lora_model()
    _, plain = one_step(plain_model, tmp_out + "a", dataset, trainer_cls=Trainer, args_cls=TrainingArguments)
    _, trap = one_step(trap_model, tmp_out + "b", dataset, trap_lambda=0.0)
    for key in plain:
        assert torch.equal(plain[key], trap[key])


def train_weights(tmp_out, batch_size, accumulation, steps, model_fn=lora_model, **overrides):
    model = model_fn()
    args = Trap2TrainingArguments(
        output_dir=tmp_out,
        max_steps=steps,
        per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=accumulation,
        **exact_trap_args(**{"learning_rate": 0.5, **overrides}),
    )
    trainer = Trap2Trainer(model=model, args=args, train_dataset=token_dataset(16, ragged=True))
    trainer.train()
    return trainable_state(model), trainer


def test_accumulation_4x2_and_1x8_equal_8x1(tmp_out):
    """num_items_in_batch makes accumulated micro-batches exact, for both passes; one scale per step."""
    settings = dict(trap_lambda=0.3, trap_scales_per_step=2)
    direct, _ = train_weights(tmp_out + "a", 8, 1, 2, **settings)
    for batch, accumulation in [(4, 2), (1, 8)]:
        accumulated, trainer = train_weights(tmp_out + f"{batch}", batch, accumulation, 2, **settings)
        for key in direct:
            torch.testing.assert_close(accumulated[key], direct[key], rtol=1e-4, atol=1e-6)
        logged = [(log["trap/scale"], log["trap/scale_2"]) for log in trainer.state.log_history if "trap/scale" in log]
        assert logged == [pytest.approx(tuple(trainer.trap_scales(step))) for step in range(2)]


@pytest.mark.parametrize("target", ["adapter", "full"])
def test_resume_equals_a_straight_run(tmp_out, target):
    overrides = dict(trap_lambda=0.2, trap_target=target, optim="adamw_torch", learning_rate=1e-2)
    model_fn = lora_model if target == "adapter" else tiny_llama
    straight, _ = train_weights(tmp_out + "straight", 4, 1, 4, model_fn=model_fn, **overrides)

    run_dir = tmp_out + "resumed"
    _, first = train_weights(run_dir, 4, 1, 2, model_fn=model_fn, save_strategy="steps", save_steps=2, **overrides)
    checkpoint = os.path.join(run_dir, "checkpoint-2")
    if target == "full":
        assert os.path.exists(os.path.join(checkpoint, "trap2_reference.safetensors"))
    # Other trainable weights (same frozen base): weights, optimizer and theta0 must all come from the checkpoint.
    model = tiny_llama(seed=1) if target == "full" else lora_model_with_seed(99)
    args = Trap2TrainingArguments(output_dir=run_dir, max_steps=4, per_device_train_batch_size=4, **exact_trap_args(**overrides))
    trainer = Trap2Trainer(model=model, args=args, train_dataset=token_dataset(16, ragged=True))
    trainer.train(resume_from_checkpoint=checkpoint)
    resumed = trainable_state(model)
    for key in straight:
        torch.testing.assert_close(resumed[key], straight[key], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("norm_from", ["trainer", "callback"])
def test_non_finite_gradients_skip_the_step_and_training_continues(tmp_out, caplog, norm_from):
    """The check reads the gradient norm the Trainer computed; a Trainer that computed none gets it computed."""
    model = lora_model()
    args = Trap2TrainingArguments(output_dir=tmp_out, max_steps=3, per_device_train_batch_size=4, **exact_trap_args(learning_rate=0.1, trap_lambda=0.1))
    trainer = Trap2Trainer(model=model, args=args, train_dataset=token_dataset(16))
    if norm_from == "callback":
        trainer._get_grad_norm = functools.partial(Trainer._get_grad_norm, trainer)
    original_rescaled = trainer.trap_rescaled
    states = []

    def overflow_on_step_one(scale, **kwargs):
        context = original_rescaled(scale, **kwargs)
        if trainer.state.global_step == 1:
            hook = model.base_model.model.lm_head.register_forward_hook(lambda m, i, out: out * float("inf"))
            trainer.add_callback  # noqa: B018  (the hook is removed after this pass)
            class _Remove:
                def __enter__(self):
                    context.__enter__()
                def __exit__(self, *exc):
                    hook.remove()
                    return context.__exit__(*exc)
            return _Remove()
        return context

    trainer.trap_rescaled = overflow_on_step_one

    from transformers import TrainerCallback

    class RecordWeights(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            states.append(trainable_state(model))

    trainer.add_callback(RecordWeights())
    before = trainable_state(model)
    with caplog.at_level("WARNING"):
        trainer.train()
    assert trainer.trap_skipped_steps == 1
    assert "skipped" in caplog.text
    changed = [any(not torch.equal(a[k], b[k]) for k in a) for a, b in zip([before] + states, states)]
    assert changed == [True, False, True]
    assert [log.get("trap/skipped_steps") for log in trainer.state.log_history if "loss" in log] == [0, 1, 1]


def test_adapter_target_without_adapter_is_refused(tmp_out):
    args = Trap2TrainingArguments(output_dir=tmp_out, report_to="none", use_cpu=True)
    with pytest.raises(ValueError, match="no PEFT adapter.*trap_target='full'"):
        Trap2Trainer(model=tiny_llama(), args=args, train_dataset=token_dataset(4))


def test_full_target_on_peft_model_is_refused(tmp_out):
    args = Trap2TrainingArguments(output_dir=tmp_out, report_to="none", use_cpu=True, trap_target="full")
    with pytest.raises(ValueError, match="trap_target='adapter'"):
        Trap2Trainer(model=lora_model(), args=args, train_dataset=token_dataset(4))


def test_full_fine_tuning_under_fsdp_is_refused_when_the_trainer_is_built(tmp_out, monkeypatch):
    """A script calling Trap2Trainer directly (no recipe) gets the refusal, before theta0 is snapshotted."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedType

    import trap2_hf.updates

    snapshots = []
    monkeypatch.setattr(trap2_hf.updates, "snapshot_parameters", lambda *args: snapshots.append(args))
    monkeypatch.setattr(Accelerator, "distributed_type", property(lambda self: DistributedType.FSDP))
    args = Trap2TrainingArguments(output_dir=tmp_out, report_to="none", use_cpu=True, trap_target="full")
    with pytest.raises(NotImplementedError, match="trap_target='full' with FSDP or DeepSpeed ZeRO-3 is not supported"):
        Trap2Trainer(model=tiny_llama(), args=args, train_dataset=token_dataset(4))
    assert snapshots == []
    args = Trap2TrainingArguments(output_dir=tmp_out, report_to="none", use_cpu=True)  # a LoRA adapter: allowed
    assert Trap2Trainer(model=lora_model(), args=args, train_dataset=token_dataset(4)).trap_reference is None


def test_plain_training_arguments_get_default_protection(tmp_out):
    args = TrainingArguments(output_dir=tmp_out, report_to="none", use_cpu=True, max_steps=1, learning_rate=3e-3, logging_steps=1)
    trainer = Trap2Trainer(model=lora_model(), args=args, train_dataset=token_dataset(4))
    assert isinstance(trainer.args, Trap2TrainingArguments)
    assert trainer.args.learning_rate == 3e-3 and trainer.args.trap_lambda == 0.05
    trainer.train()
    assert any("trap/rescaled_loss" in log for log in trainer.state.log_history)


def test_bf16_mixed_precision_step_matches_direct_computation(tmp_out):
    dataset = token_dataset(8, ragged=True)
    model = lora_model()
    reference = copy.deepcopy(model)
    trainer, grads = one_step(model, tmp_out, dataset, trap_lambda=0.3, bf16=True)
    expected = direct_lora_gradients(reference, tiny_llama(), full_batch(dataset), trainer.trap_scales(0), 0.3, "inv")
    for key in expected:  # bf16 autocast: agreement to bf16 precision, relative to each tensor's size
        assert (grads[key] - expected[key]).abs().max() <= 0.03 * expected[key].abs().max() + 1e-6, key


def test_quantized_base_is_refused_clearly_without_a_gpu(tmp_out):
    model = lora_model()
    model.get_base_model().is_loaded_in_4bit = True  # what from_pretrained(..., load_in_4bit) marks
    args = Trap2TrainingArguments(output_dir=tmp_out, report_to="none", use_cpu=True)
    if torch.cuda.is_available():
        pytest.skip("bitsandbytes can run here")
    with pytest.raises(ValueError, match="quantized with bitsandbytes.*load the base unquantized"):
        Trap2Trainer(model=model, args=args, train_dataset=token_dataset(4))


def test_a_checkpoint_interrupted_while_saving_is_never_resumed_from(tmp_out):
    """A crash while checkpoint-4 was being written (its trainer state, written last, is missing): resuming with
    True takes checkpoint-2 and finishes the job, equal to a run that never crashed; naming checkpoint-4 fails."""
    overrides = dict(trap_lambda=0.2, optim="adamw_torch", learning_rate=1e-2, save_strategy="steps", save_steps=2)
    straight, _ = train_weights(tmp_out + "straight", 4, 1, 6, **overrides)
    run_dir = tmp_out + "crashed"
    train_weights(run_dir, 4, 1, 4, **overrides)
    os.remove(os.path.join(run_dir, "checkpoint-4", "trainer_state.json"))

    def resumed_trainer():
        args = Trap2TrainingArguments(output_dir=run_dir, max_steps=6, per_device_train_batch_size=4, **exact_trap_args(**overrides))
        return Trap2Trainer(model=lora_model_with_seed(5), args=args, train_dataset=token_dataset(16, ragged=True))

    with pytest.raises(ValueError, match="checkpoint-4 is incomplete.*checkpoint-2"):
        resumed_trainer().train(resume_from_checkpoint=os.path.join(run_dir, "checkpoint-4"))
    trainer = resumed_trainer()
    trainer.train(resume_from_checkpoint=True)
    resumed = trainable_state(trainer.model)
    for key in straight:
        torch.testing.assert_close(resumed[key], straight[key], rtol=1e-5, atol=1e-6)


def test_unsupported_peft_method_is_refused_by_name(tmp_out):
    from peft import PromptTuningConfig

    model = get_peft_model(tiny_llama(), PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    args = Trap2TrainingArguments(output_dir=tmp_out, report_to="none", use_cpu=True)
    with pytest.raises(NotImplementedError, match="PROMPT_TUNING.*not supported yet"):
        Trap2Trainer(model=model, args=args, train_dataset=token_dataset(4))


def test_the_output_folder_is_made_when_the_run_starts_and_removed_if_it_fails_empty(tmp_path, monkeypatch):
    """transformers makes output_dir when the Trainer is built: a trainer that fails to build, or a run that fails
    before writing anything, would leave an empty folder (and its missing parents) behind. A folder the user made,
    or one that holds anything, is never removed."""
    out = tmp_path / "runs" / "out"

    def args():
        return Trap2TrainingArguments(output_dir=str(out), max_steps=2, use_cpu=True, report_to="none",
                                      save_strategy="no", per_device_train_batch_size=4)

    with pytest.raises(ValueError, match="no PEFT adapter"):
        Trap2Trainer(model=tiny_llama(), args=args(), train_dataset=token_dataset(8))
    assert not (tmp_path / "runs").exists()

    trainer = Trap2Trainer(model=lora_model(), args=args(), train_dataset=token_dataset(8))
    assert not (tmp_path / "runs").exists()  # built, not yet run
    monkeypatch.setattr(Trainer, "training_step", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("OOM")))
    with pytest.raises(RuntimeError, match="OOM"):
        trainer.train()
    assert not (tmp_path / "runs").exists()

    out.mkdir(parents=True)  # the user's own (empty) folder stays
    with pytest.raises(RuntimeError, match="OOM"):
        Trap2Trainer(model=lora_model(), args=args(), train_dataset=token_dataset(8)).train()
    assert out.is_dir()
    out.rmdir()
    monkeypatch.undo()
    trainer = Trap2Trainer(model=lora_model(), args=args(), train_dataset=token_dataset(8))
    trainer.train()
    assert out.is_dir()  # made when the run started
    trainer.save_model()
    assert "adapter_model.safetensors" in os.listdir(out)
