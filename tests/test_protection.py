"""A short protected training: the update works at its nominal scale and breaks when re-scaled.

Task: a tiny causal LM learns the successor rule (next token = this token + 1) with LoRA. An
unprotected twin keeps it under re-scaling; the protected adapter matches the twin at s=1 and falls
far below it at s=0.5 and s=1.5. Measured (accuracy at s = 0.5 / 1 / 1.5; the protected runs in auto, fused):
  Trap2Trainer     twin 0.92 / 1.00 / 0.94   protected 0.22 / 1.00 / 0.00
  Trap2SFTTrainer  twin 0.79 / 1.00 / 0.67   protected 0.34 / 1.00 / 0.10
Full fine-tuning: theta0 is the same model trained on the +2 rule; the update theta - theta0 learns the
+1 rule. Measured (s = 0.75 / 1 / 1.5): twin 1.00 / 1.00 / 0.98, auto (sub_batch, f = 0.5) 0.00 / 1.00 /
0.08, two_pass 0.00 / 1.00 / 0.06.
"""

import copy

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig, get_peft_model

from conftest import VOCAB, WORDS, tiny_llama, tiny_tokenizer
from trap2_hf import (
    Trap2SFTConfig, Trap2SFTTrainer, Trap2Trainer, Trap2TrainingArguments, rescaled_adapter, rescaled_parameters,
    snapshot_parameters,
)

pytestmark = pytest.mark.slow

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PROTECTION = dict(trap_lambda=0.1, trap_scales_per_step=2, trap_scale_sampling="stratified")
TRAINING = dict(
    max_steps=300, per_device_train_batch_size=32, learning_rate=5e-3, report_to="none", use_cpu=True,
    save_strategy="no", disable_tqdm=True, seed=0,
)


def successor_ids(num, seed, length=10, offset=0, modulus=VOCAB, step=1):
    starts = torch.randint(0, modulus, (num,), generator=torch.Generator().manual_seed(seed))
    return offset + (starts[:, None] + step * torch.arange(length)) % modulus


def successor_accuracy(model, ids, rescaled):
    model.eval()
    with torch.no_grad(), rescaled:
        predicted = model(input_ids=ids).logits.argmax(-1)
    model.train()
    return (predicted[:, :-1] == ids[:, 1:]).float().mean().item()


def curve(model, ids, scales=(0.5, 1.0, 1.5), reference=None):
    def rescaled(s):
        return rescaled_adapter(model, s) if reference is None else rescaled_parameters(model, s, reference)

    return {s: successor_accuracy(model, ids, rescaled(s)) for s in scales}


def assert_protected(protected, twin, off_scales=(0.5, 1.5)):
    assert twin[1.0] > 0.95
    assert protected[1.0] >= twin[1.0] - 0.02  # within 2 points at the nominal scale
    for s in off_scales:
        assert twin[s] > 0.6  # merging-style re-scaling keeps an unprotected update working...
        assert protected[s] < twin[s] - 0.4  # ...and breaks the protected one


def rows(ids):
    return Dataset.from_dict(
        {"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist(), "labels": ids.tolist()}
    )


def test_trainer_protects_a_lora_adapter(tmp_path):
    ids = successor_ids(2048, seed=0)
    train = rows(ids)
    test_ids = successor_ids(128, seed=99)
    curves = {}
    for name, settings in [("twin", {"trap_lambda": 0.0}), ("protected", PROTECTION)]:
        model = get_peft_model(tiny_llama(), LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS))
        args = Trap2TrainingArguments(output_dir=str(tmp_path / name), **TRAINING, **settings)
        Trap2Trainer(model=model, args=args, train_dataset=train).train()
        curves[name] = curve(model, test_ids)
    print(curves)
    assert_protected(curves["protected"], curves["twin"])


def test_sft_trainer_protects_a_lora_adapter(tmp_path):
    tokenizer = tiny_tokenizer()
    words = successor_ids(2048, seed=0, modulus=len(WORDS))
    train = Dataset.from_dict({"text": [" ".join(WORDS[i] for i in row) for row in words.tolist()]})
    test_ids = successor_ids(128, seed=99, modulus=len(WORDS), offset=4)  # word i has token id i + 4
    assert tokenizer(WORDS[5])["input_ids"][0] == 9
    curves = {}
    for name, settings in [("twin", {"trap_lambda": 0.0}), ("protected", PROTECTION)]:
        args = Trap2SFTConfig(output_dir=str(tmp_path / name), bf16=False, max_length=16, **TRAINING, **settings)
        trainer = Trap2SFTTrainer(
            model=tiny_llama(), args=args, train_dataset=train, processing_class=tokenizer,
            peft_config=LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS),
        )
        trainer.train()
        curves[name] = curve(trainer.model, test_ids)
    print(curves)
    assert_protected(curves["protected"], curves["twin"])


def test_trainer_protects_a_full_fine_tune(tmp_path):
    """trap_target='full' in the default mode (auto: sub_batch, the scales sharing half the rows) and in two_pass."""
    from transformers import Trainer, TrainingArguments

    base = tiny_llama()
    pretraining = TrainingArguments(output_dir=str(tmp_path / "pre"), **{**TRAINING, "learning_rate": 5e-3})
    Trainer(model=base, args=pretraining, train_dataset=rows(successor_ids(2048, seed=100, step=2))).train()
    theta0 = snapshot_parameters(base)
    train = rows(successor_ids(2048, seed=0))
    test_ids = successor_ids(128, seed=99)
    scales = (0.75, 1.0, 1.5)  # theta0 is not robust to s=0.5 here: the twin keeps 0.2 of its accuracy there
    curves = {}
    for name, settings in [
        ("twin", {"trap_lambda": 0.0}),
        ("auto", PROTECTION),
        ("two_pass", {**PROTECTION, "trap_mode": "two_pass"}),
    ]:
        model = copy.deepcopy(base)
        args = Trap2TrainingArguments(
            output_dir=str(tmp_path / name), **{**TRAINING, "learning_rate": 1e-3}, trap_target="full", **settings
        )
        trainer = Trap2Trainer(model=model, args=args, train_dataset=train)
        trainer.train()
        if name == "auto":
            assert (trainer.args.trap_mode, trainer.args.trap_rescaled_fraction) == ("sub_batch", 0.25)
        curves[name] = curve(model, test_ids, scales, reference=theta0)
    print(curves)
    for name in ("auto", "two_pass"):
        assert_protected(curves[name], curves["twin"], off_scales=(0.75, 1.5))
