"""Pseudo-partners: other updates of the same base that the library makes itself, for the 'foreign' partner of the
off-ray terms when the user has no other adapters (or wants partners no one merges with).

A pseudo-partner is a short LoRA fine-tune of the same base, with the protected adapter's LoraConfig, on the user's
own training inputs with labels drawn at random per input: a real update, shaped like a task vector of the same
base (trained by gradient on real inputs), that learns no task anyone has. Each one is saved as a PEFT adapter folder
(pass the folders as `trap_foreign_adapters`), then deleted from the model: it is never trained by the trap, never
part of the model's state, and never in the released adapter. Everything is drawn from `seed` (`seeding.PSEUDO`).
"""

import copy
import os

import torch
from torch import nn

from ..seeding import PSEUDO


def make_pseudo_partners(
    model: nn.Module,
    dataset,
    folder: str,
    n: int = 3,
    steps: int = 30,
    seed: int = 0,
    batch_size: int = 16,
    learning_rate: float = 1e-3,
    collate_fn=None,
    adapter: str | None = None,
) -> list[str]:
    """Train `n` pseudo-partners of `adapter` (default: the active adapter of the PEFT model in `model`) and save
    each under `folder`; returns their folders, for `trap_foreign_adapters`.

    `model(**batch)` must return the loss of a batch with integer class `labels` (one per row), as a transformers
    sequence classifier does; `dataset[i]` is a dict of tensors with a 'labels' entry, and `collate_fn` (default:
    stack each key) makes batches. Each partner trains `steps` AdamW steps of `batch_size` rows, every input with
    its own random label (fixed for the partner), from a fresh LoRA initialisation. The model is left as it was:
    the same adapters, active adapter, trainable parameters and train/eval mode."""
    peft_model = _peft_model_of(model)
    adapter = adapter or _active_adapter(peft_model)
    if adapter not in peft_model.peft_config:
        raise ValueError(
            f"make_pseudo_partners: the model has no adapter {adapter!r}; it has {sorted(peft_model.peft_config)}. "
            "Pass adapter= the name of the adapter to be protected."
        )
    if not (isinstance(n, int) and n >= 1 and isinstance(steps, int) and steps >= 1):
        raise ValueError(f"make_pseudo_partners needs n >= 1 and steps >= 1 (integers), got n={n!r}, steps={steps!r}.")
    labels = torch.as_tensor([int(dataset[i]["labels"]) for i in range(len(dataset))])
    if labels.numel() < 1 or labels.min() < 0:
        raise ValueError("make_pseudo_partners needs a dataset of rows with integer class labels >= 0 ('labels').")
    num_labels = int(labels.max()) + 1
    collate = collate_fn or _stack
    trainable = {name: p.requires_grad for name, p in model.named_parameters()}
    was_training = model.training
    folders = []
    try:
        for k in range(n):
            name = f"pseudo_partner_{k}"
            generator = PSEUDO.generator(seed, k)
            with torch.random.fork_rng():  # peft draws the initialisation from the global RNG
                torch.manual_seed(PSEUDO.seed(seed, k))
                peft_model.add_adapter(name, copy.deepcopy(peft_model.peft_config[adapter]))
            try:
                _train_pseudo(model, peft_model, name, dataset, labels, num_labels, steps, batch_size, learning_rate,
                              collate, generator)
                peft_model.save_pretrained(folder, selected_adapters=[name])
            finally:
                peft_model.set_adapter(adapter)
                peft_model.delete_adapter(name)
            folders.append(os.path.join(folder, name))
    finally:
        peft_model.set_adapter(adapter)
        for param_name, param in model.named_parameters():
            param.requires_grad_(trainable.get(param_name, False))
        model.train(was_training)
    return folders


def _train_pseudo(model, peft_model, name, dataset, labels, num_labels, steps, batch_size, learning_rate, collate,
                  generator) -> None:
    random_labels = torch.randint(0, num_labels, (len(dataset),), generator=generator)
    while num_labels > 1 and torch.equal(random_labels, labels):  # a relabelling that is the task itself
        random_labels = torch.randint(0, num_labels, (len(dataset),), generator=generator)
    peft_model.set_adapter(name)
    marker = f".{name}."
    params = []
    for param_name, param in model.named_parameters():
        param.requires_grad_("lora_" in param_name and marker in param_name)
        if param.requires_grad:
            params.append(param)
    optimizer = torch.optim.AdamW(params, lr=learning_rate, weight_decay=0.0)
    model.train()
    order = torch.randperm(len(dataset), generator=generator)
    position = 0
    for _ in range(steps):
        if position + batch_size > len(order):
            order, position = torch.randperm(len(dataset), generator=generator), 0
        rows = order[position : position + batch_size].tolist()
        position += batch_size
        batch = collate([dataset[i] for i in rows])
        batch["labels"] = random_labels[rows]
        loss = model(**batch)["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    for param in params:
        param.requires_grad_(False)


def _peft_model_of(model: nn.Module):
    from peft import PeftModel

    found = next((m for m in model.modules() if isinstance(m, PeftModel)), None)  # model itself comes first
    if found is None:
        raise ValueError(
            f"make_pseudo_partners needs a PEFT LoRA model (a PeftModel, or a module holding one); got "
            f"{type(model).__name__}. Wrap the base with peft.get_peft_model(base, LoraConfig(...)) first."
        )
    return found


def _active_adapter(peft_model) -> str:
    active = peft_model.active_adapter
    return active if isinstance(active, str) else active[0]


def _stack(rows: list[dict]) -> dict:
    return {key: torch.stack([torch.as_tensor(row[key]) for row in rows]) for key in rows[0]}
