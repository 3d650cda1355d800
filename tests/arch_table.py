"""The architecture matrix: model families x release formats, from tiny random configs (no download).

One table (`FAMILIES` x `FORMATS`) drives tests/test_architectures.py and docs/architectures.md's table
(`python docs/generate.py` pastes it there):

    PYTHONPATH=. python -m tests.arch_table

prints, per family and format, the mode `trap_mode='auto'` resolves to (and why it does not fuse),
or why PEFT or Trap² refuses the combination. The tests check every cell it prints: one real step
equals the direct gradient of L(1) - lambda * mean_k w(s_k) L(s_k) in two_pass and in the mode auto
picks (at trap_rescaled_fraction=1, where fused and sub_batch are exact), the adapter's save -> card ->
load_protected_adapter round trip, and one audit method.
"""

import logging
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable

import torch

VOCAB = 48
ROWS, LENGTH = 4, 8


@dataclass(frozen=True)
class Family:
    """A tiny model of one architecture: `build(seed)` (the same weights for the same seed), the inputs of a
    training row (`kind`), and the layers LoRA-like adapters target."""

    name: str
    build: Callable[[], torch.nn.Module]
    kind: str  # "causal", "seq2seq", "classify" (token sequences to one label) or "image"
    targets: tuple[str, ...]
    task_type: str | None = None
    modules_to_save: tuple[str, ...] = ()


def _seeded(make):
    def build(seed: int = 0):
        torch.manual_seed(seed)
        return make()

    return build


def _causal(config_class, model_class, **extra):
    def make():
        config = config_class(
            vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False, pad_token_id=0, **extra,
        )
        return model_class(config)

    return _seeded(make)


def _gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=1, eos_token_id=2,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )
    return GPT2LMHeadModel(config)


def _t5():
    from transformers import T5Config, T5ForConditionalGeneration

    config = T5Config(
        vocab_size=VOCAB, d_model=32, d_ff=64, d_kv=8, num_layers=2, num_heads=4, dropout_rate=0.0,
        decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
    )
    return T5ForConditionalGeneration(config)


def _bart():
    from transformers import BartConfig, BartForConditionalGeneration

    config = BartConfig(
        vocab_size=VOCAB, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64, dropout=0.0,
        attention_dropout=0.0, activation_dropout=0.0, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        decoder_start_token_id=2,
    )
    return BartForConditionalGeneration(config)


def _bert():
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=3,
    )
    return BertForSequenceClassification(config)


def _mamba():
    from transformers import MambaConfig, MambaForCausalLM

    config = MambaConfig(vocab_size=VOCAB, hidden_size=32, state_size=4, num_hidden_layers=2, expand=2, conv_kernel=3)
    return MambaForCausalLM(config)


def _vit():
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(
        image_size=8, patch_size=4, num_channels=3, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=3,
    )
    return ViTForImageClassification(config)


def _families() -> list[Family]:
    from transformers import (
        Gemma2Config, Gemma2ForCausalLM, LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM,
        MixtralConfig, MixtralForCausalLM, Phi3Config, Phi3ForCausalLM, Qwen2Config, Qwen2ForCausalLM,
    )

    attention = ("q_proj", "v_proj")
    return [
        Family("Llama", _causal(LlamaConfig, LlamaForCausalLM), "causal", (*attention, "up_proj")),
        Family("Qwen2", _causal(Qwen2Config, Qwen2ForCausalLM), "causal", (*attention, "up_proj")),
        Family("Gemma2", _causal(Gemma2Config, Gemma2ForCausalLM, head_dim=8), "causal", (*attention, "up_proj")),
        Family("Mistral", _causal(MistralConfig, MistralForCausalLM), "causal", (*attention, "up_proj")),
        Family("Phi-3", _causal(Phi3Config, Phi3ForCausalLM), "causal", ("qkv_proj", "gate_up_proj")),
        Family("GPT-2", _seeded(_gpt2), "causal", ("c_attn", "c_fc")),
        Family(
            "Mixtral (MoE, router loss)",
            _causal(MixtralConfig, MixtralForCausalLM, num_local_experts=4, num_experts_per_tok=2,
                    output_router_logits=True, router_aux_loss_coef=0.02),
            "causal", attention,
        ),
        Family(
            "Mixtral (MoE)",
            _causal(MixtralConfig, MixtralForCausalLM, num_local_experts=4, num_experts_per_tok=2),
            "causal", attention,
        ),
        Family("Mamba", _seeded(_mamba), "causal", ("in_proj", "x_proj")),
        Family("T5", _seeded(_t5), "seq2seq", ("q", "v", "wi"), task_type="SEQ_2_SEQ_LM"),
        Family("BART", _seeded(_bart), "seq2seq", ("q_proj", "v_proj", "fc1"), task_type="SEQ_2_SEQ_LM"),
        Family("BERT classifier", _seeded(_bert), "classify", ("query", "value"), task_type="SEQ_CLS"),
        Family("ViT classifier", _seeded(_vit), "image", ("q_proj", "v_proj"), modules_to_save=("classifier",)),
    ]


FAMILIES = _families()
FORMATS = ("LoRA", "DoRA", "LoHa", "full")
# Families whose LoRA trap is trained and measured by a slow test (Llama: tests/test_protection.py, which also
# covers a full fine-tune; the others: tests/test_protection_architectures.py, in the mode auto picks).
PROTECTION_CHECKED = ("Llama", "Qwen2", "GPT-2", "T5", "BERT classifier", "ViT classifier")


def family(name: str) -> Family:
    return next(f for f in FAMILIES if f.name == name)


def peft_config(fam: Family, fmt: str):
    """The adapter config of `fmt` on `fam` (None for a full fine-tune), initialised away from zero so that the
    re-scaled term has a gradient at the first step."""
    from peft import LoHaConfig, LoraConfig

    common = dict(target_modules=list(fam.targets), task_type=fam.task_type)
    if fam.modules_to_save:
        common["modules_to_save"] = list(fam.modules_to_save)
    if fmt == "full":
        return None
    if fmt == "LoHa":
        return LoHaConfig(r=2, alpha=4, init_weights=False, **common)
    return LoraConfig(
        r=4, lora_alpha=8, init_lora_weights=False, use_dora=fmt == "DoRA",
        fan_in_fan_out=fam.name == "GPT-2", **common,
    )


def build_model(fam: Family, fmt: str, seed: int = 0):
    """The model to train: the family's tiny model, wrapped in `fmt`'s adapter. Raises what PEFT raises."""
    from peft import get_peft_model

    model = fam.build(seed)
    config = peft_config(fam, fmt)
    if config is None:
        return model
    peft_model = get_peft_model(model, config)
    if fmt == "DoRA":  # magnitudes away from the base weights' norms, so DoRA is not LoRA in disguise
        with torch.no_grad():
            for name, param in peft_model.named_parameters():
                if "lora_magnitude_vector" in name:
                    param.mul_(1.2)
    return peft_model


def rows(fam: Family, num: int = ROWS, seed: int = 0) -> dict[str, torch.Tensor]:
    """A training batch for the family, as the Trainer's collator would give it (labels included)."""
    g = torch.Generator().manual_seed(seed)
    if fam.kind == "image":
        return {"pixel_values": torch.randn(num, 3, 8, 8, generator=g), "labels": torch.randint(0, 3, (num,), generator=g)}
    ids = torch.randint(3, VOCAB, (num, LENGTH), generator=g)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if fam.kind == "classify":
        batch["labels"] = ids[:, 0] % 3
    elif fam.kind == "seq2seq":
        labels = torch.randint(3, VOCAB, (num, LENGTH // 2), generator=g)
        labels[::2, -2:] = -100  # rows with different numbers of decoder tokens
        batch["labels"] = labels
    else:
        labels = ids.clone()
        labels[::2, :3] = -100  # rows with different numbers of tokens
        batch["labels"] = labels
    return batch


def dataset(fam: Family, num: int = ROWS, seed: int = 0):
    from datasets import Dataset

    return Dataset.from_dict({k: v.tolist() for k, v in rows(fam, num, seed).items()})


# ----------------------------------------------------------------------------- what each cell does
@lru_cache(maxsize=None)  # the cell tests and the docs check ask once each
def auto_choice(fam: Family, fmt: str) -> tuple[str, str]:
    """(cell, reason): 'refused by PEFT', or the mode trap_mode='auto' resolves to and, where it does not fuse,
    why (the first sentence of the reason it logs)."""
    from trap2_hf import Trap2Trainer, Trap2TrainingArguments

    try:
        model = build_model(fam, fmt)
    except Exception as error:  # PEFT's own refusal of the layer type: the cell says so
        return "refused by PEFT", _first_sentence(str(error))
    args = Trap2TrainingArguments(
        output_dir="unused", report_to="none", use_cpu=True, trap_lambda=0.3,
        trap_target="full" if fmt == "full" else "adapter",
    )
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("trap2_hf.trainer")
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.INFO)
    try:
        trainer = Trap2Trainer(model=model, args=args, train_dataset=dataset(fam))
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    chosen = trainer.args.trap_mode
    reason = ""
    for record in records:
        message = record.getMessage()
        if message.startswith("trap_mode='auto' chose") and ": " in message:
            reason = _first_sentence(message.split(": ", 1)[1])
    return chosen, reason


def _first_sentence(text: str) -> str:
    """The reason without the layer it was found on, so that one reason reads the same in every family."""
    text = " ".join(text.split())
    for end in (text.find("; "), text.find(". ")):
        if end >= 0:
            text = text[:end]
    return text.rstrip(".") + "."


def markdown_table() -> str:
    lines = [
        "| family | " + " | ".join(FORMATS) + " | trap measured (LoRA, slow test) |",
        "|---|" + "---|" * (len(FORMATS) + 1),
    ]
    reasons = []
    for fam in FAMILIES:
        cells = []
        for fmt in FORMATS:
            cell, reason = auto_choice(fam, fmt)
            if reason:
                if reason not in reasons:
                    reasons.append(reason)
                cell += f" [{reasons.index(reason) + 1}]"
            cells.append(cell)
        protected = "yes" if fam.name in PROTECTION_CHECKED else "–"
        lines.append(f"| {fam.name} | " + " | ".join(cells) + f" | {protected} |")
    lines.append("")
    lines += [f"[{i + 1}] {reason}" for i, reason in enumerate(reasons)]
    return "\n".join(lines)


if __name__ == "__main__":
    import os
    import warnings

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    warnings.filterwarnings("ignore")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    print(markdown_table())
