"""The re-scaled term on part of a batch: which rows, with what weight, and the fused step's one loss.

`sub_batch` and `fused` re-scale, for each scale s_k of the step, a random set R_k of rows of each
micro-batch. Each of the K*b (scale, row) pairs is drawn with probability f (`trap_rescaled_fraction`),
by systematic sampling: the pairs are laid out row by row (each row's K scales in a random order) and
every 1/f-th is taken from a random start. So weighting those rows by 1/f makes each scale's re-scaled
loss an unbiased estimate of the whole micro-batch's, micro-batch by micro-batch, under any gradient
accumulation, and any run of consecutive rows holds floor or ceil of K*f*(its rows) drawn pairs: a
micro-batch never carries more than ceil(K*f*b) re-scaled copies, which bounds fused's memory.
f = 1 takes every row, in order: exactly two_pass.

Under data parallelism the draw is made once for the global micro-batch (the W ranks' b rows, rank by
rank), from (seed, step, micro-batch) alone, and each rank takes its own b rows of it: the union of the
ranks' rows is what one process with the global micro-batch draws, so W processes train the same
update as one (up to float error, where nothing else differs per rank, such as dropout masks), and
each rank's share still holds at most ceil(K*f*b) copies.

The fused step runs ONE forward/backward over the b rows plus copies of the rows of every R_k, copy
j computing with its own scale s_j (`rescale.rescaled_adapter_per_sample`), with the loss

    loss = sum_{i<b} l_i / D  +  sum_j c_j * l_{b+j} / D,      c_j = -lambda * w(s_j) / (K * f),

l_i the summed loss of row i (its tokens, or its one label), K the scales per step and D the
normaliser of the model's own loss: num_items_in_batch where that loss divides by it (transformers'
causal LMs, TRL's SFT: the items of the whole optimizer step, all micro-batches and ranks), else
the micro-batch's own item count (sequence classifiers: its rows). The first sum is exactly the
nominal loss, so the gradient is, in expectation over the drawn rows, two_pass's gradient of J,
micro-batch by micro-batch, for any accumulation. The loss's value is the nominal loss alone (the
copies enter as x - x.detach()), so logs read as two_pass's.
"""

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from .best_response import bounded_row_losses
from .rows import FusedUnsupported, append_rows, is_batched

IGNORE_INDEX = -100


@dataclass
class FusedPlan:
    """One micro-batch of the fused step: b original rows, then copies of `rows` at `copy_scales`.

    `nominal_sum` and `rescaled_sums` (per scale, already weighted 1/f) are filled by the forward, for the logs."""

    batch_size: int
    rows: torch.Tensor
    copy_scales: torch.Tensor
    copy_weights: torch.Tensor
    copy_scale_index: torch.Tensor
    num_scales: int
    fraction: float
    nominal_sum: torch.Tensor | None = None
    rescaled_sums: torch.Tensor | None = None
    calls: int = field(default=0)
    rescaled_cap: float | None = None  # trap_ascent='capped' (best_response.py)
    nominal_weight: float = 1.0  # the original rows' weight in the nominal loss (`split.SplitPlan`: 1 / (1 - K*f))

    @classmethod
    def build(
        cls, batch_size: int, rows: list[torch.Tensor], scales: list[float], coefficients: list[float], fraction: float
    ) -> "FusedPlan":
        """`coefficients[k]` multiplies L(s_k) in J (-lambda * w(s_k) / K); copies weigh it 1/fraction."""
        counts = [len(r) for r in rows]

        def per_copy(values, dtype):
            return torch.tensor([v for v, n in zip(values, counts) for _ in range(n)], dtype=dtype)

        return cls(
            batch_size=batch_size,
            rows=torch.cat(rows) if rows else torch.zeros(0, dtype=torch.long),
            copy_scales=per_copy(scales, torch.float32),
            copy_weights=per_copy([c / fraction for c in coefficients], torch.float64),
            copy_scale_index=per_copy(range(len(rows)), torch.long),
            num_scales=len(scales),
            fraction=fraction,
        )

    @property
    def num_copies(self) -> int:
        return len(self.rows)

    @property
    def weighs_rows(self) -> bool:
        """Whether the loss is not the model's own: copies to weigh, or original rows weighted other than 1."""
        return self.num_copies > 0 or self.nominal_weight != 1

    def arrange(self, inputs: dict) -> dict:
        """The model's inputs for the fused batch: the micro-batch followed by the copies."""
        return append_rows(inputs, self.rows, self.batch_size)

    def sample_scales(self, device) -> torch.Tensor:
        """The scale of every row of the fused batch: 1 for the originals, then the copies'."""
        return torch.cat([torch.ones(self.batch_size), self.copy_scales]).to(device)

    def combine(self, row_sums: torch.Tensor, normaliser, counts: torch.Tensor | None = None) -> torch.Tensor:
        """sum_{i<b} l_i / D + (x - x.detach()) with x = sum_j c_j l_{b+j} / D: J's gradient, the nominal value."""
        b = self.batch_size
        normaliser = torch.as_tensor(normaliser, device=row_sums.device)
        nominal = row_sums[:b].sum() * self.nominal_weight / normaliser
        weights = self.copy_weights.to(device=row_sums.device, dtype=row_sums.dtype)
        ascended = row_sums[b:]
        if self.rescaled_cap is not None:
            ascended = bounded_row_losses(ascended, counts[b:], self.rescaled_cap)
        copies = (ascended * weights).sum() / normaliser
        self.record(row_sums[:b].sum(), row_sums[b:])
        return nominal + (copies - copies.detach())

    def record(self, nominal_sum: torch.Tensor, copy_sums: torch.Tensor) -> None:
        """Keep the originals' summed loss and, per scale, the copies' (weighted 1/f), for the logs."""
        index = self.copy_scale_index.to(copy_sums.device)
        per_scale = torch.zeros(self.num_scales, device=copy_sums.device, dtype=torch.float32)
        per_scale.index_add_(0, index, copy_sums.detach().float())
        self.nominal_sum = nominal_sum.detach().float() * self.nominal_weight
        self.rescaled_sums = per_scale / self.fraction

    def rescaled_loss(self, nominal_loss: torch.Tensor) -> torch.Tensor:
        """The re-scaled loss averaged over the scales, scaled like the nominal loss: two_pass's trap/rescaled_loss."""
        if not self.num_copies:
            return torch.zeros(())
        ratio = self.rescaled_sums.mean() / self.nominal_sum
        return torch.where(self.nominal_sum != 0, nominal_loss * ratio, torch.zeros_like(ratio))


# ----------------------------------------------------------------------------- per-row losses
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


# ----------------------------------------------------------------------------- the fused forward
@contextmanager
def fused_batch(
    model: nn.Module, plan: FusedPlan, row_losses: RowLosses, check_model_loss: bool = False
) -> Iterator[None]:
    """While inside, `model(**inputs)` runs on the inputs plus the plan's copies and returns outputs for the
    original rows whose loss is the fused loss (TRL's per-token log-probs get the copies folded in instead).

    `check_model_loss`: leave the labels to the model this once and raise FusedUnsupported (before any backward)
    unless its own loss over all the rows equals the per-row losses' (`check_row_losses`); the context then
    yields {"uses_num_items": ...}, which normaliser matched (a classifier's loss takes num_items_in_batch where
    its model passes it on)."""
    state, found = {}, {}

    def before(module, args, kwargs):
        plan.calls += 1
        if plan.calls > 1:
            raise RuntimeError("trap_mode='fused' expects one model call per micro-batch; use trap_mode='two_pass'.")
        if args:
            raise FusedUnsupported("trap_mode='fused' needs the model called with keyword arguments, as Trainer does")
        kwargs = plan.arrange(kwargs)
        state["token_log_probs"] = bool(kwargs.get("fused_lm_head"))
        if not state["token_log_probs"]:
            if kwargs.get("labels") is None:
                raise FusedUnsupported("trap_mode='fused' needs labels in the model's inputs; use trap_mode='two_pass'.")
            decoder_given = any(kwargs.get(k) is not None for k in ("decoder_input_ids", "decoder_inputs_embeds"))
            if row_losses.decoder_inputs is not None and not decoder_given:
                kwargs["decoder_input_ids"] = row_losses.decoder_inputs(kwargs["labels"])
            take = kwargs.get if check_model_loss else kwargs.pop
            state["labels"] = take("labels")
            state["shift_labels"] = take("shift_labels", None)
            state["num_items"] = take("num_items_in_batch", None)
            if check_model_loss and state["num_items"] is not None:
                # A value no item count can equal, so that the check tells the two normalisers apart.
                state["probe"] = kwargs["num_items_in_batch"] = state["num_items"] + 0.5
        return args, kwargs

    def after(module, args, kwargs, outputs):
        if state["token_log_probs"]:
            return fold_token_log_probs(outputs, plan)
        sums, counts = row_losses.compute(outputs, state["labels"], state["shift_labels"])
        uses_num_items = row_losses.uses_num_items and state["num_items"] is not None
        if check_model_loss:
            candidates = {False: counts.sum()} | ({True: state["probe"]} if state["num_items"] is not None else {})
            order = sorted(candidates, key=lambda uses: uses != row_losses.uses_num_items)  # the rule's guess first
            uses_num_items = check_row_losses(module, outputs, {uses: sums.sum() / candidates[uses] for uses in order})
            found["uses_num_items"] = uses_num_items
        normaliser = state["num_items"] if uses_num_items else counts[: plan.batch_size].sum()
        return _original_rows(outputs, plan, loss=plan.combine(sums, normaliser, counts))

    handles = [
        model.register_forward_pre_hook(before, with_kwargs=True),
        model.register_forward_hook(after, with_kwargs=True),
    ]
    try:
        yield found
    finally:
        for handle in handles:
            handle.remove()


def check_row_losses(model: nn.Module, outputs, from_rows: dict, rtol: float = 1e-3):
    """The first key of `from_rows` ({key: the per-row losses' sum over a normaliser}) whose value is the model's
    own loss, else FusedUnsupported: a model whose loss is not what `row_loss_function` assumed (a shift it does
    not make, an extra term, another reduction) is found at its first fused micro-batch, before any backward."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    own = outputs.get("loss") if isinstance(outputs, dict) else None
    if own is None:
        raise FusedUnsupported(
            f"{type(inner).__name__} returned no loss for its labels, so the per-row losses of trap_mode='fused' "
            "cannot be checked against it; use trap_mode='two_pass'."
        )
    own = own.detach().float()
    values = {key: torch.as_tensor(value).detach().float().to(own.device) for key, value in from_rows.items()}
    for key, value in values.items():
        if torch.isclose(own, value, rtol=rtol, atol=1e-6):
            return key
    shown = ", ".join(f"{value.item():.6g}" for value in values.values())
    raise FusedUnsupported(
        f"{type(inner).__name__}'s own loss ({own.item():.6g}) is not the sum of the per-row losses that "
        f"trap_mode='fused' weights ({shown}): the model computes its loss in a way fused does not "
        "know. Use trap_mode='two_pass' or 'sub_batch', or give the model a method trap_sample_losses(outputs, "
        "labels) -> (per-row loss sums, per-row item counts)."
    )


def fold_token_log_probs(outputs, plan: FusedPlan):
    """TRL's fused-head outputs for the original rows, each copy's weighted log-probs added (as x - x.detach())
    to the row it copies: TRL's loss -sum(log_probs)/D then is the fused loss, its metrics the nominal ones."""
    b = plan.batch_size
    log_probs = outputs["log_probs"]
    weights = plan.copy_weights.to(device=log_probs.device, dtype=log_probs.dtype)
    # trap_ascent='capped': a copy's token stops pulling once its loss -log p passes the cap
    ascended = log_probs[b:] if plan.rescaled_cap is None else log_probs[b:].clamp(min=-plan.rescaled_cap)
    copies = ascended * weights.view(-1, *([1] * (log_probs.dim() - 1)))
    added = torch.zeros_like(log_probs[:b]).index_add(0, plan.rows.to(log_probs.device), copies)
    plan.record(-log_probs[:b].sum(), -log_probs[b:].flatten(1).sum(-1))
    folded = log_probs[:b] + (added - added.detach())
    label_mask = outputs["label_mask"][:b]
    return _original_rows(outputs, plan, loss=-folded.sum() / label_mask.sum().clamp(min=1), log_probs=folded)


def _original_rows(outputs, plan: FusedPlan, **replace):
    """The outputs cut to the original rows, with `replace`d fields (a new object, loss first)."""
    if not isinstance(outputs, dict):
        raise RuntimeError("trap_mode='fused' needs dict-like model outputs (return_dict=True).")
    total = plan.batch_size + plan.num_copies
    values = {
        key: value[: plan.batch_size] if is_batched(value, total) else value
        for key, value in outputs.items()
        if key not in replace
    }
    values = {**replace, **values}
    return type(outputs)(**values) if type(outputs) is not dict else values
