"""A starter tasks file for `trap2 audit` and the recipe's `--audit_tasks`: copy it, then replace the data and the
two tasks with yours. As it is, it runs on the tiny recipe's model and sentences (run from the repository root):

    python recipes/sft_protect.py --config recipes/tiny/config_lora.yaml --output_dir out/tiny
    python recipes/sft_protect.py --config recipes/tiny/config_lora.yaml --output_dir out/tiny-other --seed 1
    trap2 audit --base_model recipes/tiny/model --tasks recipes/tiny/audit_tasks.py --protected_task object \\
        --protected out/tiny --other relation=out/tiny-other --output_dir out/tiny-audit

The audit imports this file and calls `get_tasks(model, tokenizer)` once, with the base model and its tokenizer.
Each `AuditTask` has
- a `name`: what `--protected_task` and `--other NAME=FOLDER` refer to;
- `evaluate(model, split)`: the task's metric in [0, 1], higher is better, of the model as it is when called (the
  audit merges, then evaluates), on `split` "validation" (where the audit picks each merge's best settings) or
  "test" (what it reports). Keep the two disjoint, and both apart from what the updates were trained on (the
  tiny recipe trains on every sentence, so here the numbers only show that the file works);
- `chance`: the metric of a random guess, which the report compares against;
- for `--repair_ks` (the protected task only): `train_loss(model, indices)`, the mean loss with gradients on the
  labelled examples `indices` (ints below `num_train`), and `num_train`.
"""

import json
import os

import torch
import torch.nn.functional as F

from trap2_hf.audit import AuditTask

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "train.jsonl")


def get_tasks(model, tokenizer) -> list[AuditTask]:
    with open(DATA, encoding="utf-8") as f:
        sentences = [json.loads(line)["text"] for line in f]
    # Disjoint thirds: labelled examples for repair, validation, test.
    third = len(sentences) // 3
    splits = {"train": sentences[:third], "validation": sentences[third : 2 * third], "test": sentences[2 * third :]}
    return [
        next_word_task("object", splits, tokenizer, word=-1),  # "the big cow finds [grass]"
        next_word_task("relation", splits, tokenizer, word=-2),  # "the big cow [finds] grass"
    ]


def next_word_task(name: str, splits: dict[str, list[str]], tokenizer, word: int) -> AuditTask:
    """Accuracy of predicting the `word`-th word of each sentence from the words before it."""

    def examples(sentences):
        pairs = []
        for sentence in sentences:
            words = sentence.split()
            prefix = tokenizer(" ".join(words[:word]), add_special_tokens=False).input_ids
            target = tokenizer(" " + words[word], add_special_tokens=False).input_ids[0]
            pairs.append((prefix, target))
        return pairs

    data = {split: examples(sentences) for split, sentences in splits.items()}
    answers = {target for pairs in data.values() for _, target in pairs}

    def last_logits(model, prefix):
        return model(input_ids=torch.tensor([prefix], device=model.device)).logits[0, -1]

    def evaluate(model, split: str) -> float:
        with torch.no_grad():
            hits = sum(int(last_logits(model, prefix).argmax() == target) for prefix, target in data[split])
        return hits / len(data[split])

    def train_loss(model, indices: torch.Tensor) -> torch.Tensor:
        pairs = [data["train"][i] for i in indices.tolist()]
        losses = [F.cross_entropy(last_logits(model, prefix)[None], torch.tensor([target], device=model.device))
                  for prefix, target in pairs]
        return torch.stack(losses).mean()

    return AuditTask(name, evaluate, chance=1 / len(answers), train_loss=train_loss, num_train=len(data["train"]))
