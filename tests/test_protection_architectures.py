"""A short protected training per architecture (slow): the trap forms where `auto` runs it, family by family.

Tasks the tiny models learn in a few hundred steps: the successor rule of tests/test_protection.py for causal LMs
(next token = this token + 1) and encoder-decoders (each decoder target is its input token + 1); for the BERT
classifier the first token's id mod 3; for the ViT classifier which colour channel is brightest. An unprotected
twin keeps the rule under re-scaling; the protected adapter, trained in the default trap_mode='auto', matches the
twin at s = 1 and breaks at s = 0.5 and 1.5. Measured (accuracy at s = 0.5 / 1 / 1.5):
  GPT-2            twin 0.78 / 1.00 / 0.81   protected 0.26 / 1.00 / 0.12
  Qwen2            twin 0.91 / 1.00 / 0.85   protected 0.25 / 1.00 / 0.01
  T5               twin 0.84 / 1.00 / 0.87   protected 0.03 / 1.00 / 0.03
  BERT classifier  twin 0.92 / 1.00 / 0.88   protected 0.26 / 1.00 / 0.37
  ViT classifier   twin 1.00 / 1.00 / 1.00   protected 0.34 / 0.99 / 0.39
All of them in 'fused'. Llama is tests/test_protection.py; Gemma2, Mistral and Phi-3 are Llama's blocks under other
names and are not repeated (the step itself is checked on each in tests/test_architectures.py). Mamba is left out:
on this task its unprotected twin does not keep the rule when re-scaled (0.58 / 0.99 / 0.52, in_proj, x_proj and
dt_proj adapted), so there is nothing for the trap to take away that plain re-scaling does not (protected: 0.24 /
0.98 / 0.18).
"""

import pytest
import torch
from datasets import Dataset
from peft import get_peft_model

from arch_table import PROTECTION_CHECKED, VOCAB, family, peft_config
from test_protection import PROTECTION, TRAINING, assert_protected, successor_ids
from trap2_hf import Trap2Trainer, Trap2TrainingArguments, rescaled_adapter

pytestmark = pytest.mark.slow

# Every linear layer of the blocks, as the paper's LoRA does; the families here are arch_table.PROTECTION_CHECKED.
TARGETS = {
    "GPT-2": ["c_attn", "c_proj", "c_fc"],
    "T5": ["q", "k", "v", "o", "wi", "wo"],
    "Qwen2": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "BERT classifier": ["query", "key", "value", "dense"],
    "ViT classifier": ["q_proj", "k_proj", "v_proj", "o_proj", "fc1", "fc2"],
}


# Training steps where 300 (test_protection.TRAINING) is not enough on every CPU. The ViT classifier at 300 steps
# ended on one 2-core Xeon at 0.94 alone against its twin's 1.00 (seed 0) and untrapped at s = 1.5 (0.87, seed 1);
# at 600 steps seeds 0-2 read 0.997-1.000 alone and 0.33 at s = 0.5 and 1.5 (1024 test images).
STEPS = {"ViT classifier": 600}


def task(name: str, num: int, seed: int) -> dict:
    fam = family(name)
    g = torch.Generator().manual_seed(seed)
    if fam.kind == "image":
        pixels = torch.randn(num, 3, 8, 8, generator=g)
        labels = torch.randint(0, 3, (num,), generator=g)
        pixels[torch.arange(num), labels] += 1.0  # the brightest channel is the label
        return {"pixel_values": pixels, "labels": labels}
    ids = successor_ids(num, seed, modulus=VOCAB - 3, offset=3)  # ids 0-2 are pad/eos/start tokens
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if fam.kind == "classify":
        return batch | {"labels": ids[:, 0] % 3}
    if fam.kind == "seq2seq":  # the decoder writes each input token's successor
        return batch | {"labels": 3 + (ids - 3 + 1) % (VOCAB - 3)}
    return batch | {"labels": ids}


def accuracy(model, batch, scale: float, name: str) -> float:
    model.eval()
    with torch.no_grad(), rescaled_adapter(model, scale):
        predicted = model(**batch).logits.argmax(-1)
    model.train()
    labels = batch["labels"]
    if family(name).kind == "causal":
        return (predicted[:, :-1] == labels[:, 1:]).float().mean().item()
    return (predicted == labels).float().mean().item()


@pytest.mark.parametrize("name", [name for name in PROTECTION_CHECKED if name != "Llama"])  # Llama: test_protection.py
def test_auto_protects_lora(tmp_path, name):
    fam = family(name)
    train = Dataset.from_dict({k: v.tolist() for k, v in task(name, 2048, seed=0).items()})
    test = task(name, 128, seed=99)
    config = peft_config(fam, "LoRA")
    config.target_modules, config.r, config.lora_alpha, config.init_lora_weights = set(TARGETS[name]), 8, 16, True
    curves = {}
    for variant, settings in [("twin", {"trap_lambda": 0.0}), ("protected", PROTECTION)]:
        model = get_peft_model(fam.build(0), config)
        training = TRAINING | {"max_steps": STEPS.get(name, TRAINING["max_steps"])}
        args = Trap2TrainingArguments(output_dir=str(tmp_path / variant), **training, **settings)
        trainer = Trap2Trainer(model=model, args=args, train_dataset=train)
        if variant == "protected":
            assert trainer.args.trap_mode == "fused"
        trainer.train()
        curves[variant] = {s: accuracy(model, test, s, name) for s in (0.5, 1.0, 1.5)}
    print(name, curves)
    assert_protected(curves["protected"], curves["twin"])
