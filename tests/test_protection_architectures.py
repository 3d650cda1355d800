"""A short protected training per architecture (slow): the trap forms where `auto` fuses LoRA on GPT-2 and T5.

Task: the successor rule of tests/test_protection.py (GPT-2: next token = this token + 1; T5: each decoder
target is its input token + 1). An unprotected twin keeps it under re-scaling; the protected adapter, trained in
the default trap_mode='auto' (fused for both), matches the twin at s = 1 and breaks at s = 0.5 and 1.5.
Measured (accuracy at s = 0.5 / 1 / 1.5):
  GPT-2  twin 0.78 / 1.00 / 0.81   protected 0.26 / 1.00 / 0.12
  T5     twin 0.84 / 1.00 / 0.87   protected 0.03 / 1.00 / 0.03
"""

import pytest
import torch
from datasets import Dataset
from peft import get_peft_model

from arch_table import VOCAB, build_model, family, peft_config
from test_protection import PROTECTION, TRAINING, assert_protected, successor_ids
from trap2_hf import Trap2Trainer, Trap2TrainingArguments, rescaled_adapter

pytestmark = pytest.mark.slow

TARGETS = {"GPT-2": ["c_attn", "c_proj", "c_fc"], "T5": ["q", "k", "v", "o", "wi", "wo"]}


def task(name: str, num: int, seed: int) -> dict:
    ids = successor_ids(num, seed, modulus=VOCAB - 3, offset=3)  # ids 0-2 are pad/eos/start tokens
    if name == "T5":  # the decoder writes each input token's successor
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": 3 + (ids - 3 + 1) % (VOCAB - 3)}
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def accuracy(model, batch, scale: float, name: str) -> float:
    model.eval()
    with torch.no_grad(), rescaled_adapter(model, scale):
        predicted = model(**batch).logits.argmax(-1)
    model.train()
    if name == "T5":
        return (predicted == batch["labels"]).float().mean().item()
    return (predicted[:, :-1] == batch["labels"][:, 1:]).float().mean().item()


@pytest.mark.parametrize("name", ["GPT-2", "T5"])
def test_auto_fused_lora_protects(tmp_path, name):
    fam = family(name)
    train = Dataset.from_dict({k: v.tolist() for k, v in task(name, 2048, seed=0).items()})
    test = task(name, 128, seed=99)
    config = peft_config(fam, "LoRA")
    config.target_modules, config.r, config.lora_alpha, config.init_lora_weights = set(TARGETS[name]), 8, 16, True
    curves = {}
    for variant, settings in [("twin", {"trap_lambda": 0.0}), ("protected", PROTECTION)]:
        model = get_peft_model(fam.build(0), config)
        args = Trap2TrainingArguments(output_dir=str(tmp_path / variant), **TRAINING, **settings)
        trainer = Trap2Trainer(model=model, args=args, train_dataset=train)
        if variant == "protected":
            assert trainer.args.trap_mode == "fused"
        trainer.train()
        curves[variant] = {s: accuracy(model, test, s, name) for s in (0.5, 1.0, 1.5)}
    print(name, curves)
    assert_protected(curves["protected"], curves["twin"])
