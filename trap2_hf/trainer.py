"""Trap2Trainer and Trap2SFTTrainer: the Trap² step and its bookkeeping.

One optimizer step, per micro-batch (trap_mode='two_pass', the reference):
1. nominal loss at s = 1 and its backward (never the step's gradient all-reduce);
2. for each scale drawn for this optimizer step (the same for all its micro-batches and all ranks):
   restore the RNG so dropout masks match, forward and backward inside the re-scaling context with
   the loss multiplied by -lambda*w(s)/K. The last of these backwards carries the DDP all-reduce.

This module holds the set-up, the dispatch to the mode (`modes/`: how a step computes the re-scaled term, and
what 'auto' picks), the side passes (re-scaled and off-ray) and the metrics. What the update is and how it is
re-scaled: `updates.py`; the maths: `objective.py` and `fused.py`; the off-ray terms: `offray/`; theta0 in
checkpoints: `checkpoints.py`.
"""

import contextlib
import dataclasses
import logging
from collections import defaultdict

import torch
from transformers import Trainer, TrainingArguments
from trl import SFTTrainer

from . import modes
from ._warnings import peft_deprecation_silenced
from .best_response import ascent_cap, best_response_offray, best_response_scales, bounded_loss
from .checkpoints import (
    REFERENCE_WEIGHTS_NAME,
    checkpoint_to_resume,
    is_complete_checkpoint,
    last_complete_checkpoint,
    load_reference,
    save_reference,
)
from .config import Trap2SFTConfig, Trap2TrainingArguments, check_run_arguments
from .hub.files import removed_if_left_empty
from .hub.mixin import Trap2HubMixin
from .launchers import refuse_unsupported_launcher
from .nonfinite import SkipNonFiniteStep
from .objective import rescaled_loss_coefficient, sample_scales, scale_weight, step_generator
from .offray import load_foreign_update, matched_foreign_updates, offray_layers, offray_update
from .offray.draws import draw_offray, draw_ranges, guard_draw
from .rows import drawn_rows
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
    # Only the last backward of a micro-batch may end DeepSpeed's accumulation window (_trap_not_last_backward);
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
        self._trap_scales_cache = (None, [])
        self._trap_coefficient = None
        self._trap_micro_batch = (None, -1)
        self._trap_modes = {}
        self.trap_skipped_steps = 0
        self._trap_grad_norm = None
        refuse_unsupported_launcher(self)
        self._trap_update = update_kind(self.args)
        model = self.accelerator.unwrap_model(self.model)
        self._trap_update.check(model)
        if is_quantized(model) and not torch.cuda.is_available():
            raise ValueError(
                "The base model is quantized with bitsandbytes (4/8-bit), which needs a CUDA GPU; none is available "
                "here. Train on a GPU, or load the base unquantized (drop quantization_config / load_in_4bit)."
            )
        self._trap_mode_requested = self.args.trap_mode
        if self.args.trap_mode == "auto":
            logger.info(modes.resolve_auto(self))
        elif self.args.trap_lambda != 0:
            self._trap_mode_named(self.args.trap_mode).prepare(self)  # refuses a mode that is not exact here
        self._trap_check_offray()
        # trap_ascent='capped': the re-scaled loss stops pulling once it passes the cap (`best_response.py`)
        self._trap_ascent_cap = ascent_cap(self.args, model)
        self.trap_reference = self._trap_update.reference(model, self.args, trap_reference)
        self._trap_full_rows = self._trap_update.pass_row_targets(model, self.args)
        self._trap_full_rows_checked, self._trap_in_place = False, ()
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

    def trap_card_kind(self) -> str:
        """The `update` the model card records (`Trap2HubMixin`): this trainer's update kind says it."""
        return self._trap_update.card_kind(self.accelerator.unwrap_model(self.model))

    def _trap_mode_named(self, name: str) -> modes.TrapMode:
        """This trainer's instance of the mode `name` (a mode may keep what it prepared)."""
        if name not in self._trap_modes:
            self._trap_modes[name] = modes.get_mode(name)
        return self._trap_modes[name]

    def _trap_check_fused(self, mode: str = "fused") -> None:
        """Refuse trap_mode=`mode` (fused or split) where this trainer's loss is not the model's own per-row loss."""
        if self.compute_loss_func is not None or self.args.label_smoothing_factor:
            raise ValueError(
                f"trap_mode={mode!r} weights the model's own per-row losses, which a compute_loss_func or label "
                "smoothing replaces. Use trap_mode='two_pass' or 'sub_batch'."
            )

    def _trap_check_offray(self) -> None:
        """Off-ray terms: find the LoRA layers they transform and load the foreign updates once."""
        self._trap_offray_layers, self._trap_foreign = None, []
        if not self.args.trap_offray_active:
            return
        model = self.accelerator.unwrap_model(self.model)
        self._trap_offray_layers = offray_layers(model)
        foreign = [load_foreign_update(path) for path in self.args.trap_foreign_adapters]
        self._trap_foreign = matched_foreign_updates(model, foreign, self._trap_offray_layers)

    # ----------------------------------------------------------------------------- the step
    def trap_scales(self, step: int | None = None) -> list[float]:
        """The scales of an optimizer step: a function of (seed, step) only, so resumed runs and all
        ranks draw the same ones."""
        step = self.state.global_step if step is None else step
        cached_step, scales = self._trap_scales_cache
        if cached_step != step:
            args = self.args
            scales = sample_scales(
                args.trap_scale_min,
                args.trap_scale_max,
                args.trap_margin,
                args.trap_scales_per_step,
                args.trap_scale_sampling,
                step_generator(args.seed, step),
            )
            self._trap_scales_cache = (step, scales)
        return scales

    def trap_rows(self, batch_size: int, step: int | None = None, micro_batch: int = 0) -> list[torch.Tensor]:
        """The rows of a micro-batch that each scale re-scales in sub_batch, fused and split (`rows.drawn_rows`)."""
        return drawn_rows(self.args, batch_size, self.state.global_step if step is None else step, micro_batch)

    def _trap_next_rows(self, batch_size: int) -> list[torch.Tensor]:
        step = self.state.global_step
        last_step, index = self._trap_micro_batch
        index = index + 1 if last_step == step else 0
        self._trap_micro_batch = (step, index)
        return self.trap_rows(batch_size, step, index)

    def trap_rescaled(self, scale: float, weight_copy: bool = False):
        """Context in which the model computes with its update re-scaled by `scale`; `weight_copy`: it may hold a
        copy of the weights (a full fine-tune's pass over part of a micro-batch, `updates.FullUpdate.rescaled`)."""
        return self._trap_update.rescaled(
            self.accelerator.unwrap_model(self.model), scale, self.trap_reference,
            row_targets=self._trap_full_rows, in_place=self._trap_in_place, weight_copy=weight_copy,
        )

    def trap_coefficient(self, scale: float, num_scales: int) -> float:
        """The factor on the loss of the pass at `scale`: -lambda * w(s) / K (maximised)."""
        return rescaled_loss_coefficient(scale, self.args.trap_lambda, self.args.trap_weighting, num_scales)

    def training_step(self, model, inputs, num_items_in_batch=None):
        args = self.args
        offray = self.trap_offray_draws() if args.trap_offray_active else []
        if args.trap_lambda == 0 and not offray:
            return super().training_step(model, inputs, num_items_in_batch)
        scales = self.trap_scales() if args.trap_lambda > 0 else []
        scales = best_response_scales(self, model, inputs, scales)  # trap_scale_candidates > 0: the weakest scales
        offray = best_response_offray(self, model, inputs, offray)  # trap_offray_candidates > 0: the weakest draws
        mode = self._trap_mode_named(args.trap_mode)
        try:
            return mode.step(self, model, inputs, num_items_in_batch, scales, offray)
        except modes.NotExactHere as error:  # raised before any backward: no gradient was touched yet
            if self._trap_mode_requested != "auto":
                raise
            modes.fall_back(self, str(error))
            return self.training_step(model, inputs, num_items_in_batch)

    def _trap_plain_step(self, model, inputs, num_items_in_batch):
        """The wrapped Trainer's own training step (forward, loss, backward)."""
        return super().training_step(model, inputs, num_items_in_batch)

    def _trap_side_backward(self, model, inputs, num_items_in_batch, rng_state, context, coefficient, last: bool):
        """One off-nominal forward/backward inside `context`: the nominal pass's dropout masks, the loss times
        `coefficient`, TRL's metrics untouched; only the micro-batch's last backward reduces gradients."""
        modes.restore_rng_state(rng_state)
        with contextlib.ExitStack() as stack:
            if not last:
                stack.enter_context(self._trap_not_last_backward(model))
            stack.enter_context(context)
            stack.enter_context(self._trap_side_pass())
            self._trap_coefficient = coefficient
            try:
                return super().training_step(model, dict(inputs), num_items_in_batch)
            finally:
                self._trap_coefficient = None

    def trap_offray_draws(self, step: int | None = None) -> list:
        """The off-ray (and guard) draws of an optimizer step: a function of (seed, step) only."""
        args = self.args
        step = self.state.global_step if step is None else step
        draws = []
        terms = args.trap_offray_terms
        if terms and args.trap_offray_lambda > 0:
            draws = draw_offray(
                terms,
                args.trap_offray_candidates or args.trap_offray_per_step,  # the pool `best_response_offray` picks from
                step,
                args.seed,
                **draw_ranges(args),
                num_foreign=len(args.trap_foreign_adapters),
            )
        if args.trap_guard_lambda > 0:
            draws.append(guard_draw(step, args.seed, args.trap_guard_noise))
        return draws

    def trap_offray_coefficient(self, draw, num_offray: int) -> float:
        """The factor on the loss of an off-ray pass: -lambda_off * w(weight) / count (maximised), or
        +trap_guard_lambda for the guard pass (minimised)."""
        if draw.is_guard:
            return self.args.trap_guard_lambda
        return -self.args.trap_offray_lambda * scale_weight(draw.weight, self.args.trap_weighting) / num_offray

    def _trap_offray_passes(self, model, inputs, num_items_in_batch, rng_state, draws) -> None:
        """One forward/backward per draw inside its `offray_update` context (see `offray/`)."""
        num_offray = sum(not draw.is_guard for draw in draws)
        unwrapped = self.accelerator.unwrap_model(self.model)
        for k, draw in enumerate(draws):
            coefficient = self.trap_offray_coefficient(draw, num_offray)
            context = offray_update(unwrapped, draw, self._trap_foreign, self._trap_offray_layers)
            loss = self._trap_side_backward(
                model, inputs, num_items_in_batch, rng_state, context, coefficient, last=k == len(draws) - 1
            )
            if draw.is_guard:
                self._trap_record("guard_loss", loss / coefficient)
            else:
                self._trap_record("offray_loss", loss / coefficient / num_offray)

    @contextlib.contextmanager
    def _trap_not_last_backward(self, model):
        """Around every backward of a micro-batch but its last: no gradient reduction where the backend can defer
        it, and never the end of the accumulation window, since DeepSpeed steps its optimizer inside the backward
        that ends it (accelerate's DeepSpeedEngineWrapper.backward)."""
        gradient_state = self.accelerator.gradient_state
        syncs = gradient_state.sync_gradients
        # Off a step boundary the Trainer's loop already holds no_sync; entering it again would re-enable the
        # reduction on exit under FSDP2 (accelerate's no_sync ends with set_requires_gradient_sync(True)).
        hold = self.accelerator.no_sync(model) if syncs else contextlib.nullcontext()
        gradient_state._set_sync_gradients(False)
        try:
            with hold:
                yield
        finally:
            gradient_state._set_sync_gradients(syncs)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        output = super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        if self._trap_coefficient is None:
            return output
        cap = self._trap_ascent_cap if self._trap_coefficient < 0 else None  # only maximised losses are capped
        if return_outputs:
            loss, outputs = output
            return bounded_loss(loss, cap) * self._trap_coefficient, outputs
        return bounded_loss(output, cap) * self._trap_coefficient

    def _trap_side_pass(self):
        """Context for the re-scaled passes: subclasses keep their own metrics from counting twice."""
        return contextlib.nullcontext()

    # ----------------------------------------------------------------------------- metrics
    def _trap_record(self, key: str, value, per_step: bool = True) -> None:
        # Tensors stay on their device until the next log: no host-device sync per micro-batch.
        self._trap_metrics[key].append(value.detach() if torch.is_tensor(value) else float(value))
        if per_step:
            self._trap_steps_logged.add(self.state.global_step)

    def _trap_record_scale(self, k: int, scale: float) -> None:
        """The k-th scale of the step, logged as trap/scale (k = 0) or trap/scale_{k+1}."""
        self._trap_record("scale" if k == 0 else f"scale_{k + 1}", scale, per_step=False)

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
        self._trap_grad_norm = grad_norm  # the non-finite check reads it instead of computing another
        return grad_norm

    # ----------------------------------------------------------------------------- resuming
    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        """As `Trainer.train`; `resume_from_checkpoint=True` takes the last *complete* checkpoint, so a run
        that crashed while saving resumes from the one before and finishes the job."""
        check_run_arguments(self.args)  # also when args were changed after they were built
        resume_from_checkpoint = checkpoint_to_resume(resume_from_checkpoint, self.args.output_dir)
        with removed_if_left_empty(self.args.output_dir if self.args.should_save else None, True, make=True):
            return super().train(resume_from_checkpoint, *args, **kwargs)

    # ----------------------------------------------------------------------------- theta0 in checkpoints
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

    def _trap_check_fused(self, mode: str = "fused") -> None:
        if mode == "split":
            raise ValueError(
                "trap_mode='split' weights per-row losses, which TRL's fused LM head (SFTTrainer's loss) folds into "
                "per-token log-probs. Use trap_mode='fused' for an adapter, 'sub_batch' (auto's choice) for a full "
                "fine-tune, or Trap2Trainer."
            )
        if self._trap_update.copies_form_weights_per_module:
            raise ValueError(
                "trap_mode='fused' on a full fine-tune forms theta0 + s*(theta - theta0) module by module, but TRL's "
                "fused LM head reads lm_head.weight directly, so the copies would see theta there. Use "
                "trap_mode='sub_batch' (auto's choice) or 'two_pass'."
            )
        if self.args.loss_type != "nll" or self.padding_free:
            raise ValueError(
                f"trap_mode='fused' folds re-scaled copies into TRL's per-token log-probs, which is exact for "
                f"loss_type='nll' on rows that are samples; got loss_type={self.args.loss_type!r}, padding_free="
                f"{self.padding_free} (packing). Use trap_mode='two_pass' or 'sub_batch'."
            )
        super()._trap_check_fused(mode)

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
