"""The per-row losses of a model's own training loss, per model family: what the fused and split steps weigh row
by row (`fused_batch.py`), and why a model's loss over some rows would not estimate its loss over all (which
sub_batch below f = 1 needs too)."""

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

IGNORE_INDEX = -100


@dataclass(frozen=True)
class RowLosses:
    """`compute(outputs, labels, shift_labels) -> (loss sum, item count)` per row, and whether the model's own loss
    divides by num_items_in_batch when given one (else by the micro-batch's own item count)."""

    compute: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    uses_num_items: bool
    # Encoder-decoders: labels -> decoder_input_ids, which the model would derive from the labels fused takes away.
    decoder_inputs: Callable[[torch.Tensor], torch.Tensor] | None = None


def causal_lm_row_losses(outputs, labels: torch.Tensor, shift_labels: torch.Tensor | None = None):
    """(sum of token losses, number of tokens) per row, as transformers' ForCausalLMLoss counts them."""
    logits = outputs["logits"].float()
    if shift_labels is None:
        shift_labels = F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:]
    shift_labels = shift_labels.to(logits.device)
    tokens = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), shift_labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="none"
    )
    return tokens.view(shift_labels.shape).sum(-1), (shift_labels != IGNORE_INDEX).sum(-1)


def seq2seq_row_losses(outputs, labels: torch.Tensor, shift_labels=None):
    """(sum of decoder token losses, number of decoder tokens) per row: an encoder-decoder's labels are the
    decoder's targets as they stand (the model shifts them right for its decoder inputs, not its loss)."""
    logits = outputs["logits"].float()
    labels = labels.to(logits.device)
    tokens = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="none"
    )
    return tokens.view(labels.shape).sum(-1), (labels != IGNORE_INDEX).sum(-1)


def sequence_classification_row_losses(config, outputs, labels: torch.Tensor, shift_labels=None):
    """(loss, item count) per row, as transformers' ForSequenceClassificationLoss averages them."""
    logits = outputs["logits"]
    labels = labels.to(logits.device)
    num_labels = config.num_labels
    problem = config.problem_type
    if problem is None:
        if num_labels == 1:
            problem = "regression"
        elif labels.dtype in (torch.long, torch.int):
            problem = "single_label_classification"
        else:
            problem = "multi_label_classification"
    rows = logits.shape[0]
    per_item = torch.full((rows,), num_labels, device=logits.device)
    if problem == "regression":
        diff = logits.reshape(rows, -1) - labels.reshape(rows, -1).to(logits.dtype)
        return diff.pow(2).sum(-1), per_item
    if problem == "single_label_classification":
        labels = labels.view(-1)
        losses = F.cross_entropy(logits.view(-1, num_labels), labels, ignore_index=IGNORE_INDEX, reduction="none")
        return losses, (labels != IGNORE_INDEX).long()
    if problem == "multi_label_classification":
        losses = F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype), reduction="none")
        return losses.reshape(rows, -1).sum(-1), per_item
    raise NotImplementedError(f"Unknown problem_type {problem!r}; use trap_mode='two_pass'.")


def rows_interact(model: nn.Module) -> str | None:
    """Why the model's loss over some rows is no unbiased estimate of its loss over all (the premise of 'fused'
    and of 'sub_batch' below f = 1), with the fix; None where it is a sum over rows."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    norms = [name for name, m in inner.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if norms:
        return f"{norms[0]} is a batch norm, which mixes the rows. Use trap_mode='two_pass'."
    if getattr(getattr(inner, "config", None), "output_router_logits", False):
        return (
            f"the mixture-of-experts router loss of {type(inner).__name__} (output_router_logits=True) is a product "
            "of means over the whole batch, not a sum over rows. Use trap_mode='two_pass', or set "
            "output_router_logits=False."
        )
    return None


def row_loss_function(model: nn.Module) -> RowLosses:
    """How to compute the per-row losses of `model`'s own training loss, or NotImplementedError naming the fix.

    Known: transformers causal LMs (ForCausalLMLoss, the default of a model without a loss_type, as GPT-2),
    encoder-decoders (T5, BART: a token mean over the decoder's labels) and sequence/image classifiers; any model
    with a method `trap_sample_losses(outputs, labels) -> (loss sums, item counts)` per row, whose training loss
    is sums.sum() / counts.sum() over the micro-batch (a mean over rows: counts of ones). The first fused
    micro-batch checks the rule against the model's own loss (`fused_batch(check_model_loss=True)`)."""
    from transformers import PreTrainedModel
    from transformers.loss.loss_utils import ForCausalLMLoss, ForSequenceClassificationLoss

    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    reason = rows_interact(model)
    if reason:
        raise NotImplementedError(f"trap_mode='fused' needs a loss that is a sum over rows, but {reason}")
    config = getattr(inner, "config", None)
    custom = getattr(model, "trap_sample_losses", None) or getattr(inner, "trap_sample_losses", None)
    if custom is not None:
        return RowLosses(lambda outputs, labels, shift_labels=None: custom(outputs, labels), uses_num_items=False)
    # PreTrainedModel.loss_function: the loss_type's, else ForCausalLMLoss (GPT-2's LMHeadModel has no loss_type).
    own = isinstance(inner, PreTrainedModel) and "_loss_function" not in vars(inner)
    loss = inner.loss_function if own else None
    if getattr(config, "is_encoder_decoder", False) and hasattr(inner, "prepare_decoder_input_ids_from_labels"):
        return RowLosses(
            seq2seq_row_losses, uses_num_items=False, decoder_inputs=inner.prepare_decoder_input_ids_from_labels
        )
    if loss is ForCausalLMLoss and not getattr(config, "is_encoder_decoder", False):
        return RowLosses(causal_lm_row_losses, uses_num_items=True)
    if loss is ForSequenceClassificationLoss:  # divided by num_items_in_batch where the model passes it on: checked
        compute = partial(sequence_classification_row_losses, config)
        return RowLosses(lambda outputs, labels, shift_labels=None: compute(outputs, labels), uses_num_items=False)
    raise NotImplementedError(
        f"trap_mode='fused' computes per-row losses for causal LMs, encoder-decoders and sequence classifiers; "
        f"{type(inner).__name__} (loss_type {getattr(inner, 'loss_type', None)!r}) is none of them. Use "
        "trap_mode='two_pass' or 'sub_batch', or give the model a method trap_sample_losses(outputs, labels) -> "
        "(per-row loss sums, per-row item counts)."
    )
