"""Regenerate the embedded tiny Llama, its tokenizer and its data (deterministic, no network).

    python recipes/tiny/make_tiny_model.py

Writes `recipes/tiny/model/` (config, word-level tokenizer, random-init safetensors weights, about
100 KB) and `recipes/tiny/data/train.jsonl` (short synthetic sentences). They let
`recipes/tiny/config_*.yaml` run end to end on a CPU with no download: the recipe is exercised,
the model learns nothing worth keeping.
"""

import json
import os
import random

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

HERE = os.path.dirname(os.path.abspath(__file__))
SPECIAL = ["<pad>", "<s>", "</s>", "<unk>"]
SUBJECTS = ["cat", "dog", "fox", "owl", "bee", "ant", "cow", "hen"]
RELATIONS = ["eats", "likes", "sees", "finds"]
OBJECTS = ["grass", "seeds", "fish", "honey", "bread", "milk", "corn", "rice"]
COLOURS = ["red", "blue", "green", "black", "white", "brown"]
FILLERS = ["the", "a", "and", "then", "very", "small", "big", "old"]
WORDS = SUBJECTS + RELATIONS + OBJECTS + COLOURS + FILLERS
NUM_EXAMPLES = 64


def make_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {token: i for i, token in enumerate(SPECIAL + WORDS)}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        model_max_length=64,
    )


def make_model(vocab_size: int) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    return LlamaForCausalLM(config)


def make_rows() -> list[dict]:
    rng = random.Random(0)
    rows = []
    for _ in range(NUM_EXAMPLES):
        subject, relation, obj = rng.choice(SUBJECTS), rng.choice(RELATIONS), rng.choice(OBJECTS)
        adjectives = rng.sample(COLOURS + FILLERS[4:], rng.randint(0, 2))
        rows.append({"text": " ".join(["the", *adjectives, subject, relation, obj])})
    return rows


def main() -> None:
    model_dir, data_dir = os.path.join(HERE, "model"), os.path.join(HERE, "data")
    tokenizer = make_tokenizer()
    tokenizer.save_pretrained(model_dir)
    make_model(len(tokenizer)).save_pretrained(model_dir)
    os.makedirs(data_dir, exist_ok=True)
    with open(os.path.join(data_dir, "train.jsonl"), "w") as f:
        for row in make_rows():
            f.write(json.dumps(row) + "\n")
    print(f"Wrote {model_dir} and {data_dir}/train.jsonl")


if __name__ == "__main__":
    main()
