import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tiny models: one intra-op thread is as fast and does not oversubscribe a 2-core machine.
torch.set_num_threads(1)

VOCAB = 48


def tiny_llama(seed: int = 0, dropout: float = 0.0):
    """A 2-layer Llama built from a config: no download, runs in milliseconds on a CPU."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        attention_dropout=dropout,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config)


def audit_cli_inputs(tmp_path, tasks_file: str) -> tuple[str, dict[str, str], str]:
    """What `trap2 audit` reads from disk: a tiny Llama base folder, two LoRA adapter folders ("prot", "t1")
    and a tasks file. Returns (base folder, adapter folders by name, tasks file path)."""
    from peft import LoraConfig, get_peft_model

    base_dir = str(tmp_path / "base")
    tiny_llama().save_pretrained(base_dir)
    config = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"], init_lora_weights=False)
    folders = {}
    for seed, name in enumerate(("prot", "t1")):
        torch.manual_seed(seed)
        folders[name] = str(tmp_path / name)
        get_peft_model(tiny_llama(), config).save_pretrained(folders[name])
    (tmp_path / "tasks.py").write_text(tasks_file)
    return base_dir, folders, str(tmp_path / "tasks.py")


def token_dataset(num: int = 16, length: int = 12, seed: int = 0, ragged: bool = False):
    """Random token sequences; `ragged` pads some with -100 labels so token counts differ per example."""
    from datasets import Dataset

    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(num):
        ids = torch.randint(0, VOCAB, (length,), generator=g)
        labels = ids.clone()
        if ragged:
            labels[: 1 + (i * 5) % (length - 2)] = -100
        rows.append({"input_ids": ids.tolist(), "attention_mask": [1] * length, "labels": labels.tolist()})
    return Dataset.from_list(rows)


@pytest.fixture
def tmp_out(tmp_path):
    return str(tmp_path / "out")


WORDS = [f"w{i}" for i in range(VOCAB - 4)]


def tiny_tokenizer():
    """A word-level tokenizer over `WORDS`, built locally (ids line up with tiny_llama's vocabulary)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, **{w: i + 4 for i, w in enumerate(WORDS)}}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def text_dataset(num: int = 16, seed: int = 0):
    """Sentences of varying length, for SFTTrainer's text path."""
    from datasets import Dataset

    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(num):
        length = 4 + i % 7
        ids = torch.randint(0, len(WORDS), (length,), generator=g).tolist()
        rows.append({"text": " ".join(WORDS[j] for j in ids)})
    return Dataset.from_list(rows)
