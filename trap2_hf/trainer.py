"""Trap2Trainer and Trap2SFTTrainer: the Trap² step and its bookkeeping.

One optimizer step, per micro-batch (trap_mode='two_pass', the reference):
1. nominal loss at s = 1 and its backward (never the step's gradient all-reduce);
2. for each scale drawn for this optimizer step (the same for all its micro-batches and all ranks):
   restore the RNG so dropout masks match, forward and backward inside the re-scaling context with
   the loss multiplied by -lambda*w(s)/K. The last of these backwards carries the DDP all-reduce.

This module holds the set-up, the draws of a step, the dispatch to the mode and the metrics. The mode runs the
step (`modes/`) through the trainer's step object (`modes.TrapStep`), which this trainer lends its own training
step. What the update is and how it is re-scaled: `updates.py`; the maths: `objective.py` and the modes; the
off-ray terms: `offray/`; theta0 in checkpoints: `checkpoints.py`.
"""

import contextlib
import copy
import dataclasses
import logging
from collections import defaultdict

import torch
from transformers import Trainer, TrainingArguments
from trl import SFTTrainer

from . import modes
from ._warnings import peft_deprecation_silenced
from .best_response import ascent_cap, best_response_offray, best_response_scales
from .checkpoints import (
    REFERENCE_WEIGHTS_NAME,
    checkpoint_to_resume,
    is_complete_checkpoint,
    last_complete_checkpoint,
    load_reference,
    save_reference,
)
from .choices import AUTO, TrainerLoss
from .config import Trap2SFTConfig, Trap2TrainingArguments, check_run_arguments
from .files import removed_if_left_empty
from .launchers import refuse_unsupported_launcher
from .modes.rows import drawn_rows
from .nonfinite import SkipNonFiniteStep
from .release.mixin import Trap2HubMixin
from .settings import Trap2Settings
from .updates import is_quantized, update_kind

logger = logging.getLogger(__name__)

__all__ = [
    "REFERENCE_WEIGHTS_NAME",
    "Trap2SFTTrainer",
    "Trap2Trainer",
    "Trap2TrainerMixin",
    "is_complete_checkpoint",
    "last_complete_checkpoint",
]


class Trap2TrainerMixin:
    """Adds the Trap² joint loss to a `transformers.Trainer` subclass."""

    _trap_args_class = Trap2TrainingArguments
    # Only the last backward of a micro-batch may end DeepSpeed's accumulation window (`TrapStep.not_last_backward`);
    # `launchers.refuse_unsupported_launcher` refuses DeepSpeed with trap_lambda > 0 unless this is set.
    trap_supports_deepspeed = True

    def __init__(self, *args, trap_reference: dict[str, torch.Tensor] | None = None, **kwargs):
        if len(args) >= 2:
            args = (args[0], self._with_trap_settings(args[1]), *args[2:])
        else:
            kwargs["args"] = self._with_trap_settings(kwargs.get("args"))
        output_dir = (args[1] if len(args) >= 2 else kwargs["args"]).output_dir
        # The Trainer makes output_dir; `train` makes it instead, so a trainer that fails leaves no empty folder.
        with peft_deprecation_silenced(), removed_if_left_empty(output_dir):  # TRL's SFTTrainer builds the PeftModel
            super().__init__(*args, **kwargs)
        self._trap_metrics = defaultdict(list)
        self._trap_steps_logged = set()
        self._trap_modes = {}
        self.trap_skipped_steps = 0
        self.trap_grad_norm = None  # the step's gradient norm, for the non-finite check (`nonfinite.py`)
        refuse_unsupported_launcher(self)
        update = update_kind(self.args)
        model = self.accelerator.unwrap_model(self.model)
        update.check(model)
        if is_quantized(model) and not torch.cuda.is_available():
            raise ValueError(
                "The base model is quantized with bitsandbytes (4/8-bit), which needs a CUDA GPU; none is available "
                "here. Train on a GPU, or load the base unquantized (drop quantization_config / load_in_4bit)."
            )
        self.trap_step = modes.TrapStep(
            lambda: self.args, lambda: self.accelerator.unwrap_model(self.model), update, self._trap_plain_step,
            record=self._trap_record, quiet=self._trap_side_pass, loss_of=lambda m, x: self.compute_loss(m, x),
            trainer_loss=self._trap_loss, accelerator=self.accelerator, global_step=lambda: self.state.global_step,
            rescaled=lambda scale, weight_copy=False: self.trap_rescaled(scale, weight_copy=weight_copy),
            prepare_inputs=self._prepare_inputs,
        )
        self.trap_step.chosen_by_auto = self.args.trap_mode == AUTO
        if self.args.trap_mode == AUTO:
            decision = modes.resolve_auto(self.trap_step, self._trap_mode_named)
            self._trap_use(decision)
            logger.info(decision.message)
        elif self.args.trap_lambda != 0:
            self._trap_mode_named(self.args.trap_mode).prepare(self.trap_step)  # refuses a mode not exact here
        self.trap_step.load_offray()
        # trap_ascent='capped': the re-scaled loss stops pulling once it passes the cap (`best_response.py`)
        self.trap_step.ascent_cap = ascent_cap(self.args, model)
        self.trap_step.reference = update.reference(model, self.args, trap_reference)
        self.trap_step.pass_row_targets = update.pass_row_targets(model, self.args)
        self.add_callback(SkipNonFiniteStep(self))

    # ----------------------------------------------------------------------------- set-up
    def _with_trap_settings(self, args):
        """Accept plain `TrainingArguments` (protection at its defaults), as `Trainer` does."""
        if args is None:
            return self._trap_args_class(output_dir="trainer_output")
        if isinstance(args, Trap2Settings):
            return args
        if isinstance(args, TrainingArguments):
            logger.warning(
                "%s got %s without protection settings; using the Trap2 defaults. Pass %s to set them.",
                type(self).__name__,
                type(args).__name__,
                self._trap_args_class.__name__,
            )
            values = {f.name: getattr(args, f.name) for f in dataclasses.fields(args) if f.init}
            known = {f.name for f in dataclasses.fields(self._trap_args_class)}
            return self._trap_args_class(**{k: v for k, v in values.items() if k in known})
        raise TypeError(f"args must be {self._trap_args_class.__name__}, got {type(args).__name__}.")

    @property
    def trap_reference(self) -> dict[str, torch.Tensor] | None:
        """theta0, where the update kind re-scales against it (full fine-tuning), else None."""
        return self.trap_step.reference

    @trap_reference.setter
    def trap_reference(self, reference) -> None:
        self.trap_step.reference = reference

    def trap_card_kind(self) -> str:
        """The `update` the model card records (`Trap2HubMixin`): this trainer's update kind says it."""
        return self.trap_step.update.card_kind(self.accelerator.unwrap_model(self.model))

    def _trap_mode_named(self, name: str) -> modes.TrapMode:
        """This trainer's instance of the mode `name` (a mode may keep what it prepared)."""
        if name not in self._trap_modes:
            self._trap_modes[name] = modes.get_mode(name)
        return self._trap_modes[name]

    def _trap_use(self, decision: modes.AutoDecision) -> None:
        """Record what 'auto' decided in the trainer's own copy of the arguments (a user may share one arguments
        object between trainers of different models), so logs, checkpoints and the model card say what runs."""
        self.args = copy.copy(self.args)
        self.args.trap_mode, self.args.trap_rescaled_fraction = decision.mode, decision.fraction
        self.args.derive_trap_defaults()

    def _trap_loss(self) -> TrainerLoss:
        """What this trainer's loss is, for the modes that weigh per-row losses."""
        return TrainerLoss(own_row_losses=self.compute_loss_func is None and not self.args.label_smoothing_factor)

    # ----------------------------------------------------------------------------- the step
    def trap_scales(self, step: int | None = None) -> list[float]:
        """The scales of an optimizer step (default: the current one), a function of (seed, step) only."""
        return self.trap_step.scales(self.state.global_step if step is None else step)

    def trap_rows(self, batch_size: int, step: int | None = None, micro_batch: int = 0) -> list[torch.Tensor]:
        """The rows of a micro-batch that each scale re-scales in sub_batch, fused and split (`modes/rows.py`)."""
        return drawn_rows(self.args, batch_size, self.state.global_step if step is None else step, micro_batch)

    def trap_offray_draws(self, step: int | None = None) -> list:
        """The off-ray (and guard) draws of an optimizer step (default: the current one), a function of (seed, step)."""
        return self.trap_step.offray_draws(self.state.global_step if step is None else step)

    def trap_rescaled(self, scale: float, weight_copy: bool = False):
        """Context in which the model computes with its update re-scaled by `scale` (`TrapStep.rescaled_update`)."""
        return self.trap_step.rescaled_update(scale, weight_copy)

    def training_step(self, model, inputs, num_items_in_batch=None):
        args = self.args
        offray = self.trap_offray_draws() if args.trap_offray_active else []
        if args.trap_lambda == 0 and not offray:
            return super().training_step(model, inputs, num_items_in_batch)
        scales = self.trap_scales() if args.trap_lambda > 0 else []
        scales = best_response_scales(self.trap_step, model, inputs, scales)  # trap_scale_candidates > 0
        offray = best_response_offray(self.trap_step, model, inputs, offray)  # trap_offray_candidates > 0
        batch = modes.MicroBatch(model, inputs, num_items_in_batch, scales, offray)
        try:
            return self._trap_mode_named(args.trap_mode).run(self.trap_step, batch)
        except modes.NotExactHere as error:  # raised before any backward: no gradient was touched yet
            if not self.trap_step.chosen_by_auto:
                raise
            self._trap_use(modes.fall_back(args, str(error)))
            return self.training_step(model, inputs, num_items_in_batch)

    def _trap_plain_step(self, model, inputs, num_items_in_batch):
        """The wrapped Trainer's own training step (forward, loss, backward): every pass of a mode."""
        return super().training_step(model, inputs, num_items_in_batch)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        output = super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        if return_outputs:
            loss, outputs = output
            return self.trap_step.weigh(loss), outputs
        return self.trap_step.weigh(output)

    def _trap_side_pass(self):
        """Context for the re-scaled passes: subclasses keep their own metrics from counting twice."""
        return contextlib.nullcontext()

    # ----------------------------------------------------------------------------- metrics
    def _trap_record(self, key: str, value, per_step: bool = True) -> None:
        # Tensors stay on their device until the next log: no host-device sync per micro-batch.
        self._trap_metrics[key].append(value.detach() if torch.is_tensor(value) else float(value))
        if per_step:
            self._trap_steps_logged.add(self.state.global_step)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        # The training-loss log is written on every rank (the Trainer gathers `loss` there), so the
        # trap metrics can be averaged over ranks at the same point; other logs leave them alone.
        if self.model.training and self._trap_metrics and "loss" in logs:
            steps = max(len(self._trap_steps_logged), 1)
            # Losses are summed over a step's micro-batches (as `loss` is); the k-th scale of each step is
            # logged as trap/scale_k (trap/scale for the first), averaged over the logged steps.
            keys = list(self._trap_metrics)
            values = [
                float(sum(v)) / (len(v) if key.startswith("scale") else steps) for key, v in self._trap_metrics.items()
            ]
            if self.args.world_size > 1:
                reduced = self.accelerator.reduce(torch.tensor(values, device=self.args.device), reduction="mean")
                values = reduced.tolist()
            logs.update({f"trap/{key}": value for key, value in zip(keys, values)})
            self._trap_metrics.clear()
            self._trap_steps_logged.clear()
        if "loss" in logs or self.trap_skipped_steps:
            logs["trap/skipped_steps"] = self.trap_skipped_steps
        super().log(logs, start_time)

    def _get_grad_norm(self, model, grad_norm=None):
        grad_norm = super()._get_grad_norm(model, grad_norm=grad_norm)
        self.trap_grad_norm = grad_norm  # the non-finite check reads it instead of computing another
        return grad_norm

    # ----------------------------------------------------------------------------- resuming, theta0 in checkpoints
    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        """As `Trainer.train`; `resume_from_checkpoint=True` takes the last *complete* checkpoint, so a run
        that crashed while saving resumes from the one before and finishes the job."""
        check_run_arguments(self.args)  # also when args were changed after they were built
        resume_from_checkpoint = checkpoint_to_resume(resume_from_checkpoint, self.args.output_dir)
        with removed_if_left_empty(self.args.output_dir if self.args.should_save else None, True, make=True):
            return super().train(resume_from_checkpoint, *args, **kwargs)

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        super()._save_optimizer_and_scheduler(output_dir)
        if self.trap_reference is not None and self.args.should_save:
            save_reference(self.trap_reference, output_dir)

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is not None and self.trap_reference is not None:
            self.trap_reference = load_reference(self.trap_reference, checkpoint)


class Trap2Trainer(Trap2TrainerMixin, Trap2HubMixin, Trainer):
    """`transformers.Trainer` that trains a protected (unmergeable) update. Settings: `Trap2TrainingArguments`."""


class Trap2SFTTrainer(Trap2TrainerMixin, Trap2HubMixin, SFTTrainer):
    """TRL's `SFTTrainer` that trains a protected (unmergeable) update. Settings: `Trap2SFTConfig`."""

    _trap_args_class = Trap2SFTConfig

    def _trap_loss(self) -> TrainerLoss:
        # TRL's fused LM head gives per-token log-probs, into which a mode can fold its terms exactly only for
        # loss_type='nll' on rows that are samples.
        inexact = self.args.loss_type != "nll" or self.padding_free
        why = f"loss_type={self.args.loss_type!r}, padding_free={self.padding_free} (packing)" if inexact else ""
        return dataclasses.replace(super()._trap_loss(), token_log_probs=True, log_probs_inexact=why)

    @contextlib.contextmanager
    def _trap_side_pass(self):
        # SFTTrainer.compute_loss counts tokens and appends accuracy/entropy: only the nominal pass counts.
        saved_metrics = {key: list(values) for key, values in self._metrics["train"].items()}
        saved_tokens = self._total_train_tokens
        try:
            yield
        finally:
            self._metrics["train"] = defaultdict(list, saved_metrics)
            self._total_train_tokens = saved_tokens
