"""Trained tiny updates for the `trap2 trace` tests: one base, LoRA adapters trained for real on small synthetic
tasks (each a fixed next-token permutation), several seeds of the same task on the same data."""

import torch

VOCAB = 48
RANK = 8


def trace_base():
    """A 3-layer Llama (hidden 128): 21 weight matrices for the test to read, milliseconds per step on a CPU."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=32, tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config).eval()


def task_tokens(task: int, count: int = 256, length: int = 12) -> torch.Tensor:
    """Sequences that follow task `task`'s permutation of the vocabulary: token t+1 = perm[token t]."""
    generator = torch.Generator().manual_seed(1000 + task)
    perm = torch.randperm(VOCAB, generator=generator)
    tokens = torch.zeros(count, length, dtype=torch.long)
    tokens[:, 0] = torch.randint(0, VOCAB, (count,), generator=generator)
    for t in range(1, length):
        tokens[:, t] = perm[tokens[:, t - 1]]
    return tokens


def lora_config(rank: int = RANK, **kwargs):
    from peft import LoraConfig

    return LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules="all-linear", **kwargs)


def train_adapter(model, name: str, task: int, seed: int, steps: int = 40, config=None) -> float:
    """Add adapter `name` to the PEFT `model` (initialised under `seed`) and train it alone on `task`'s data, in
    an order drawn from `seed`. Returns the last loss."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model.add_adapter(name, config or lora_config())
    model.set_adapter(name)
    for param_name, param in model.named_parameters():
        param.requires_grad_(f".{name}." in param_name)
    data, generator = task_tokens(task), torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    model.train()
    for _ in range(steps):
        batch = data[torch.randint(0, len(data), (16,), generator=generator)]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    model.eval()
    model.requires_grad_(False)
    return float(loss.detach())


def train_full(task: int, seed: int, steps: int = 30) -> dict:
    """A full fine-tune of the base on `task`: {parameter name: fine-tuned tensor}."""
    model = trace_base()
    data, generator = task_tokens(task), torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.train()
    for _ in range(steps):
        batch = data[torch.randint(0, len(data), (16,), generator=generator)]
        model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return {name: p.detach().clone() for name, p in model.named_parameters()}
