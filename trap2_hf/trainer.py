"""Trap2Trainer and Trap2SFTTrainer: the Trap² step and its bookkeeping.

One optimizer step, per micro-batch (trap_mode='two_pass', the reference):
1. nominal loss at s = 1 and its backward (never the step's gradient all-reduce);
2. for each scale drawn for this optimizer step (the same for all its micro-batches and all ranks):
   restore the RNG so dropout masks match, forward and backward inside the re-scaling context with
   the loss multiplied by -lambda*w(s)/K. The last of these backwards carries the DDP all-reduce.
'sub_batch' runs step 2 on random rows of the micro-batch; 'fused' folds step 2 into step 1 as
re-scaled copies of random rows (see `fused.py`); 'auto' (the default) is 'fused' where that is
exact for the model and settings, 'sub_batch' with the scales sharing the rows for full fine-tuning,
else 'two_pass'. The maths lives in `objective.py` and `fused.py`, the re-scaling in `rescale.py`
and, for full fine-tuning's passes and fused copies, `fused_full.py`.
"""

import contextlib
import copy
import dataclasses
import json
import logging
import math
import os
import re
from collections import defaultdict

import torch
from safetensors.torch import load_file, save_file
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from trl import SFTTrainer

from ._warnings import peft_deprecation_silenced
from .config import Trap2SFTConfig, Trap2TrainingArguments
from .settings import FULL_RESCALED_SHARE, Trap2Settings, check_run_arguments
from .hub.card import ordinary_permissions
from .hub.push import Trap2HubMixin
from .fused import (
    FusedPlan,
    FusedUnsupported,
    batch_size_of,
    check_rows_are_samples,
    fused_batch,
    rescaled_rows,
    row_loss_function,
    rows_generator,
    rows_interact,
    select_rows,
)
from .fused_full import RowGroups, full_row_targets, rescaled_parameters_per_row
from .best_response import ascent_cap, best_response_scales, bounded_loss  # best-response hook (#19)
from .objective import rescaled_loss_coefficient, sample_scales, scale_weight, step_generator
from .offray import draw_offray, guard_draw, load_foreign_update, matched_foreign_updates, offray_layers, offray_update
from .rescale import (
    per_sample_targets,
    refuse_methods_without_weight_delta,
    rescaled_adapter_per_sample,
    rescaled_update,
    snapshot_parameters,
    trained_adapter_names,
)

logger = logging.getLogger(__name__)

REFERENCE_WEIGHTS_NAME = "trap2_reference.safetensors"


class Trap2TrainerMixin:
    """Adds the Trap² joint loss to a `transformers.Trainer` subclass."""

    _trap_args_class = Trap2TrainingArguments
    # Only the last backward of a micro-batch may end DeepSpeed's accumulation window (_trap_not_last_backward);
    # recipes/sft_protect.py refuses DeepSpeed with trap_lambda > 0 unless this is set.
    trap_supports_deepspeed = True

    def __init__(self, *args, trap_reference: dict[str, torch.Tensor] | None = None, **kwargs):
        if len(args) >= 2:
            args = (args[0], self._with_trap_settings(args[1]), *args[2:])
        else:
            kwargs["args"] = self._with_trap_settings(kwargs.get("args"))
        with peft_deprecation_silenced():  # TRL's SFTTrainer builds the PeftModel here
            super().__init__(*args, **kwargs)
        self._trap_metrics = defaultdict(list)
        self._trap_steps_logged = set()
        self._trap_scales_cache = (None, [])
        self._trap_coefficient = None
        self._trap_micro_batch = (None, -1)
        self._trap_row_losses = None
        self._trap_per_sample_targets = None
        self._trap_warned_token_mean = False
        self.trap_skipped_steps = 0
        self._trap_grad_norm = None
        self._trap_check_target()
        self._trap_check_quantization()
        self._trap_resolve_mode()
        self._trap_check_mode()
        self._trap_check_offray()
        self._trap_ascent_cap = ascent_cap(self.args, self.accelerator.unwrap_model(self.model))  # best-response hook (#19)
        self.trap_reference = None
        self._trap_full_rows, self._trap_full_rows_checked = None, False
        if self.args.trap_target == "full":
            self.trap_reference = trap_reference or snapshot_parameters(
                self.model, self.args.trap_reference_device, self.args.trap_reference_dtype
            )
            self._trap_full_rows = self._trap_full_row_targets()
        self.add_callback(_SkipNonFiniteStep(self))

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

    def _trap_check_target(self) -> None:
        from peft.tuners.tuners_utils import BaseTunerLayer

        model = self.accelerator.unwrap_model(self.model)
        has_adapter = any(isinstance(module, BaseTunerLayer) for module in model.modules())
        if self.args.trap_target == "adapter":
            if not has_adapter:
                refuse_methods_without_weight_delta(model)
                raise ValueError(
                    "trap_target='adapter' but the model has no PEFT adapter. Wrap the model with "
                    "peft.get_peft_model(model, LoraConfig(...)) (or pass peft_config=... to Trap2SFTTrainer), "
                    "or set trap_target='full' to protect a full fine-tune."
                )
            if not trained_adapter_names(model):
                raise ValueError(
                    "trap_target='adapter' but no adapter of the model has trainable parameters. Load the adapter "
                    "with is_trainable=True."
                )
        elif has_adapter:
            raise ValueError(
                "trap_target='full' re-scales parameters (theta0 + s*(theta - theta0)), which for a PEFT model is "
                "not the adapter's W0 + s*dW. Use trap_target='adapter' for PEFT models."
            )

    def _trap_check_quantization(self) -> None:
        model = self.accelerator.unwrap_model(self.model)
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        if not (getattr(base, "is_loaded_in_4bit", False) or getattr(base, "is_loaded_in_8bit", False)):
            return
        if self.args.trap_target == "full":
            raise ValueError(
                "trap_target='full' on a quantized (bitsandbytes) model: quantized weights cannot hold "
                "theta0 + s*(theta - theta0). Protect a LoRA adapter on the quantized base (trap_target='adapter', "
                "QLoRA) or load the model unquantized."
            )
        if not torch.cuda.is_available():
            raise ValueError(
                "The base model is quantized with bitsandbytes (4/8-bit), which needs a CUDA GPU; none is available "
                "here. Train on a GPU, or load the base unquantized (drop quantization_config / load_in_4bit)."
            )

    def _trap_resolve_mode(self) -> None:
        """trap_mode='auto': 'fused' where it is exact for this model and these settings; for full fine-tuning
        'sub_batch' with the scales sharing one micro-batch's rows (`FULL_RESCALED_SHARE`); else 'two_pass'.

        The choice goes into this trainer's own copy of the arguments (a user may share one arguments object
        between trainers of different models), so the logs, checkpoints and model card record what runs."""
        self._trap_mode_requested = self.args.trap_mode
        if self.args.trap_mode != "auto":
            return
        self.args = copy.copy(self.args)
        if self.args.trap_target == "full":
            rows_reason = rows_interact(self.accelerator.unwrap_model(self.model))
            if rows_reason is not None:
                self._trap_use_mode("two_pass")
                logger.info("trap_mode='auto' chose 'two_pass': a re-scaled pass over part of the rows needs a loss "
                            "that is a sum over rows, but %s", rows_reason)
                return
            if self.args.trap_rescaled_fraction is None:
                self.args.trap_rescaled_fraction = FULL_RESCALED_SHARE / self.args.trap_scales_per_step
            # Not 'fused' (fused_full.py): at the fraction that protects as two_pass does, it is no faster than
            # sub_batch and holds the copies' activations on top (benchmarks/README.md).
            self._trap_use_mode("sub_batch")
            logger.info(
                "trap_mode='auto' chose 'sub_batch' (trap_rescaled_fraction=%g): re-scaled passes over part of the rows "
                "keep theta0 the only extra memory.",
                self.args.trap_rescaled_fraction,
            )
            return
        reason = None
        if self.args.trap_offray_active:
            reason = "trap_offray / trap_guard_lambda run extra full passes, which only two_pass does"
        else:
            try:
                self._trap_prepare_fused()
            except (ValueError, NotImplementedError) as error:
                reason = str(error)
                self._trap_row_losses = self._trap_per_sample_targets = None
        self._trap_use_mode("fused" if reason is None else "two_pass")
        logger.info("trap_mode='auto' chose %r%s.", self.args.trap_mode, "" if reason is None else f": {reason}")

    def _trap_fall_back_to_two_pass(self, reason: str) -> None:
        """'auto' found, at a step, that the mode it chose would not be exact here: whole micro-batches from now on."""
        logger.warning("trap_mode='auto' switches from %r to 'two_pass': %s", self.args.trap_mode, reason)
        self.args.trap_rescaled_fraction = None  # the chosen mode's derived share; two_pass takes whole micro-batches
        self._trap_use_mode("two_pass")

    def _trap_use_mode(self, mode: str) -> None:
        if mode == "two_pass" and self.args.trap_rescaled_fraction not in (None, 1, 1.0):
            logger.warning(
                "trap_rescaled_fraction=%s is not used: trap_mode='auto' chose 'two_pass', which re-scales whole "
                "micro-batches.",
                self.args.trap_rescaled_fraction,
            )
            self.args.trap_rescaled_fraction = 1.0
        self.args.trap_mode = mode
        self.args.derive_trap_defaults()

    def _trap_check_mode(self) -> None:
        """trap_mode='fused' runs only where it is exact; refuse the rest here, naming the fix."""
        if self.args.trap_mode == "fused" and self.args.trap_lambda != 0 and self._trap_row_losses is None:
            self._trap_prepare_fused()  # unless trap_mode='auto' just did

    def _trap_prepare_fused(self) -> None:
        """The fused step's per-row losses and per-row scale targets, or the error that names the fix."""
        if self.compute_loss_func is not None or self.args.label_smoothing_factor:
            raise ValueError(
                "trap_mode='fused' weights the model's own per-row losses, which a compute_loss_func or label "
                "smoothing replaces. Use trap_mode='two_pass' or 'sub_batch'."
            )
        model = self.accelerator.unwrap_model(self.model)
        if self.args.trap_target == "full":
            if self.args.trap_reference_device == "cpu":
                raise ValueError(
                    "trap_mode='fused' on a full fine-tune reads theta0 at every step, which "
                    "trap_reference_device='cpu' offloads. Use trap_mode='sub_batch' or keep theta0 on the device."
                )
            self._trap_per_sample_targets = full_row_targets(model)
        else:
            self._trap_per_sample_targets = per_sample_targets(model)
        self._trap_row_losses = row_loss_function(model)
        self._trap_row_losses_checked = False  # against the model's own loss, at the first fused micro-batch

    def _trap_full_row_targets(self):
        """The modules that let a full fine-tune's re-scaled passes form theta0 + s*(theta - theta0) as they run
        (`fused_full.py`: no write into the weights, no residual, no restore), or None: then they re-scale the
        weights in place (`rescale.rescaled_parameters`)."""
        if self.args.trap_reference_device == "cpu":
            return None
        try:
            return full_row_targets(self.accelerator.unwrap_model(self.model))
        except (ValueError, NotImplementedError):
            return None

    @contextlib.contextmanager
    def _trap_watch_full_rows(self):
        """Around the first nominal pass: if a module of `_trap_full_rows` does not run, the model reads its
        parameters some other way, which forming theta_s module by module would miss; re-scale in place instead."""
        targets = self._trap_full_rows
        if targets is None or self._trap_full_rows_checked:
            yield
            return
        called = set()
        handles = [m.register_forward_pre_hook(lambda *_, n=name: called.add(n)) for name, m, _ in targets]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()
        self._trap_full_rows_checked = True
        skipped = [name for name, _, _ in targets if name not in called]
        if skipped:
            logger.info(
                "%s holds trainable parameters but did not run as a module: its parameters are read some other way, so "
                "the re-scaled passes write theta0 + s*(theta - theta0) into the weights instead.",
                skipped[0],
            )
            self._trap_full_rows = None

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
        """The rows of a micro-batch that each scale re-scales in 'sub_batch' and 'fused' modes: this rank's share
        of the global micro-batch's draw, a function of (seed, step, micro-batch) only."""
        step = self.state.global_step if step is None else step
        args = self.args
        generator = rows_generator(args.seed, step, micro_batch)
        return rescaled_rows(
            batch_size, args.trap_rescaled_fraction, args.trap_scales_per_step, generator,
            rank=args.process_index, world_size=args.world_size,
        )

    def _trap_next_rows(self, batch_size: int) -> list[torch.Tensor]:
        step = self.state.global_step
        last_step, index = self._trap_micro_batch
        index = index + 1 if last_step == step else 0
        self._trap_micro_batch = (step, index)
        return self.trap_rows(batch_size, step, index)

    def trap_rescaled(self, scale: float):
        """Context in which the model computes with its update re-scaled by `scale`."""
        if self._trap_full_rows is not None:
            unwrapped = self.accelerator.unwrap_model(self.model)
            groups = RowGroups.at_scale(scale)
            return rescaled_parameters_per_row(unwrapped, groups, self.trap_reference, self._trap_full_rows)
        return rescaled_update(
            self.accelerator.unwrap_model(self.model),
            scale,
            target=self.args.trap_target,
            reference=self.trap_reference,
        )

    def training_step(self, model, inputs, num_items_in_batch=None):
        args = self.args
        offray = self.trap_offray_draws() if args.trap_offray_active else []
        if args.trap_lambda == 0 and not offray:
            return super().training_step(model, inputs, num_items_in_batch)
        scales = self.trap_scales() if args.trap_lambda > 0 else []
        scales = best_response_scales(self, model, inputs, scales)  # best-response hook (#19)
        if args.trap_mode == "fused":
            try:
                return self._trap_fused_step(model, inputs, num_items_in_batch, scales)
            except FusedUnsupported as error:  # raised before any backward: no gradient was touched yet
                if self._trap_mode_requested != "auto":
                    raise
                self._trap_fall_back_to_two_pass(str(error))
                return self.training_step(model, inputs, num_items_in_batch)
        passes = self._trap_rescaled_passes(inputs, num_items_in_batch, len(scales))
        last = max((k for k, p in enumerate(passes) if p is not None), default=-1)
        if offray:  # the step's last backward is its last off-ray pass
            last = len(scales)
        rng_state = _capture_rng_state()
        not_last = self._trap_not_last_backward(model) if last >= 0 else contextlib.nullcontext()
        with not_last, self._trap_watch_full_rows():
            nominal = super().training_step(model, dict(inputs), num_items_in_batch)
        self._trap_record("nominal_loss", nominal)
        for k, scale in enumerate(scales):
            if passes[k] is None:  # no row of this micro-batch drawn for this scale: an unbiased zero
                self._trap_record("rescaled_loss", 0.0)
                self._trap_record("scale" if k == 0 else f"scale_{k + 1}", scale, per_step=False)
                continue
            pass_inputs, pass_items = passes[k]
            coefficient = rescaled_loss_coefficient(scale, args.trap_lambda, args.trap_weighting, len(scales))
            rescaled = self._trap_side_backward(
                model, pass_inputs, pass_items, rng_state, self.trap_rescaled(scale), coefficient, last=k == last
            )
            self._trap_record("rescaled_loss", rescaled / coefficient / len(scales))
            self._trap_record("scale" if k == 0 else f"scale_{k + 1}", scale, per_step=False)
        if offray:
            self._trap_offray_passes(model, inputs, num_items_in_batch, rng_state, offray)
        return nominal

    def _trap_side_backward(self, model, inputs, num_items_in_batch, rng_state, context, coefficient, last: bool):
        """One off-nominal forward/backward inside `context`: the nominal pass's dropout masks, the loss times
        `coefficient`, TRL's metrics untouched; only the micro-batch's last backward reduces gradients."""
        _restore_rng_state(rng_state)
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
                args.trap_offray_per_step,
                step,
                args.seed,
                (args.trap_offray_weight_min, args.trap_offray_weight_max),
                (args.trap_offray_keep_min, args.trap_offray_keep_max),
                (args.trap_foreign_coef_min, args.trap_foreign_coef_max),
                num_foreign=len(args.trap_foreign_adapters),
            )
        if args.trap_guard_lambda > 0:
            draws.append(guard_draw(step, args.seed, args.trap_guard_noise))
        return draws

    def trap_offray_coefficient(self, draw, num_offray: int) -> float:
        """The factor on the loss of an off-ray pass: -lambda_off * w(weight) / count (maximised), or
        +trap_guard_lambda for the guard pass (minimised)."""
        if draw.term == "guard":
            return self.args.trap_guard_lambda
        return -self.args.trap_offray_lambda * scale_weight(draw.weight, self.args.trap_weighting) / num_offray

    def _trap_offray_passes(self, model, inputs, num_items_in_batch, rng_state, draws) -> None:
        """One forward/backward per draw inside its `offray_update` context (see `offray.py`)."""
        num_offray = sum(draw.term != "guard" for draw in draws)
        unwrapped = self.accelerator.unwrap_model(self.model)
        for k, draw in enumerate(draws):
            coefficient = self.trap_offray_coefficient(draw, num_offray)
            context = offray_update(unwrapped, draw, self._trap_foreign, self._trap_offray_layers)
            loss = self._trap_side_backward(
                model, inputs, num_items_in_batch, rng_state, context, coefficient, last=k == len(draws) - 1
            )
            if draw.term == "guard":
                self._trap_record("guard_loss", loss / coefficient)
            else:
                self._trap_record("offray_loss", loss / coefficient / num_offray)

    def _trap_rescaled_passes(self, inputs, num_items_in_batch, num_scales: int) -> list:
        """Per scale, the (inputs, num_items_in_batch) of its re-scaled pass; None where it re-scales no row.
        sub_batch: the drawn rows, with num_items_in_batch times the fraction (their weight 1/f)."""
        if self.args.trap_mode == "two_pass":
            return [(inputs, num_items_in_batch)] * num_scales
        batch_size = batch_size_of(inputs)
        fraction = self.args.trap_rescaled_fraction
        if num_items_in_batch is None and torch.is_tensor(inputs.get("labels")) and inputs["labels"].dim() > 1:
            if self._trap_mode_requested == "auto":  # auto only picks what is unbiased: re-scale whole micro-batches
                self._trap_fall_back_to_two_pass(
                    "the model averages its loss over each pass's own tokens (no num_items_in_batch), so a loss over "
                    "some rows would be a ratio estimate"
                )
                return [(inputs, num_items_in_batch)] * num_scales
            self._trap_warn_token_mean()
        items = num_items_in_batch if num_items_in_batch is None or fraction == 1 else num_items_in_batch * fraction
        passes = []
        for rows in self._trap_next_rows(batch_size):
            if len(rows) == 0:
                passes.append(None)
            else:
                passes.append((inputs if len(rows) == batch_size else select_rows(inputs, rows, batch_size), items))
        return passes

    def _trap_warn_token_mean(self) -> None:
        if not self._trap_warned_token_mean:
            self._trap_warned_token_mean = True
            logger.warning(
                "trap_mode='sub_batch' without num_items_in_batch: the model averages its loss over each pass's own "
                "tokens, so the re-scaled loss of the drawn rows is a ratio estimate (unbiased only when rows have "
                "equal token counts). Models that accept num_items_in_batch (transformers' causal LMs) are exact."
            )

    def _trap_fused_step(self, model, inputs, num_items_in_batch, scales: list[float]):
        """One forward/backward over the micro-batch and re-scaled copies of its drawn rows (`fused.py`)."""
        args = self.args
        if self._trap_row_losses is None:  # trap_mode or trap_lambda set after construction
            self._trap_check_mode()
        check_rows_are_samples(inputs)
        batch_size = batch_size_of(inputs)
        coefficients = [
            rescaled_loss_coefficient(scale, args.trap_lambda, args.trap_weighting, len(scales)) for scale in scales
        ]
        plan = FusedPlan.build(
            batch_size, self._trap_next_rows(batch_size), scales, coefficients, args.trap_rescaled_fraction
        )
        plan.rescaled_cap = self._trap_ascent_cap  # best-response hook (#19)
        unwrapped = self.accelerator.unwrap_model(self.model)
        check = plan.num_copies > 0 and not self._trap_row_losses_checked
        with contextlib.ExitStack() as stack:
            if plan.num_copies:
                targets = self._trap_per_sample_targets
                if args.trap_target == "full":
                    groups = RowGroups.of_copies(batch_size, plan.copy_scale_index, scales)
                    stack.enter_context(rescaled_parameters_per_row(unwrapped, groups, self.trap_reference, targets))
                else:
                    scales_per_row = plan.sample_scales(args.device)
                    stack.enter_context(rescaled_adapter_per_sample(unwrapped, scales_per_row, targets=targets))
                found = stack.enter_context(fused_batch(unwrapped, plan, self._trap_row_losses, check_model_loss=check))
            nominal = super().training_step(model, dict(inputs), num_items_in_batch)
            if check:  # the normaliser the model's own loss was found to use, from now on
                self._trap_row_losses = dataclasses.replace(self._trap_row_losses, **found)
                self._trap_row_losses_checked = True
        self._trap_record("nominal_loss", nominal)
        self._trap_record("rescaled_loss", plan.rescaled_loss(nominal))
        for k, scale in enumerate(scales):
            self._trap_record("scale" if k == 0 else f"scale_{k + 1}", scale, per_step=False)
        return nominal

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
        cap = self._trap_ascent_cap if self._trap_coefficient < 0 else None  # best-response hook (#19)
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
        if resume_from_checkpoint is True:
            resume_from_checkpoint = last_complete_checkpoint(self.args.output_dir)
            if resume_from_checkpoint is None:
                raise ValueError(f"No complete checkpoint in {self.args.output_dir} to resume from.")
        elif isinstance(resume_from_checkpoint, str) and not is_complete_checkpoint(resume_from_checkpoint):
            previous = last_complete_checkpoint(os.path.dirname(os.path.abspath(resume_from_checkpoint)))
            raise ValueError(
                f"Checkpoint {resume_from_checkpoint} is incomplete (its {TRAINER_STATE_NAME}, written last, is "
                f"missing or unreadable: the save was interrupted). Resume from {previous or 'an earlier checkpoint'} "
                "or pass resume_from_checkpoint=True to take the last complete one."
            )
        return super().train(resume_from_checkpoint, *args, **kwargs)

    # ----------------------------------------------------------------------------- theta0 in checkpoints
    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        super()._save_optimizer_and_scheduler(output_dir)
        if self.trap_reference is not None and self.args.should_save:
            path = os.path.join(output_dir, REFERENCE_WEIGHTS_NAME)
            tmp = path + ".tmp"
            save_file({k: v.contiguous() for k, v in self.trap_reference.items()}, tmp)
            ordinary_permissions(tmp)
            os.replace(tmp, path)

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is None or self.trap_reference is None:
            return
        path = os.path.join(checkpoint, REFERENCE_WEIGHTS_NAME)
        if not os.path.exists(path):
            raise FileNotFoundError(
                f"Resuming a full fine-tune from {checkpoint}, but it has no {REFERENCE_WEIGHTS_NAME} (theta0). "
                "Without it the resumed run would protect against the wrong reference; resume from a checkpoint "
                "written by Trap2Trainer."
            )
        loaded = load_file(path)
        self.trap_reference = {
            name: loaded[name].to(device=current.device, dtype=current.dtype) for name, current in self.trap_reference.items()
        }


class Trap2Trainer(Trap2HubMixin, Trap2TrainerMixin, Trainer):
    """`transformers.Trainer` that trains a protected (unmergeable) update. Settings: `Trap2TrainingArguments`."""


class Trap2SFTTrainer(Trap2HubMixin, Trap2TrainerMixin, SFTTrainer):
    """TRL's `SFTTrainer` that trains a protected (unmergeable) update. Settings: `Trap2SFTConfig`."""

    _trap_args_class = Trap2SFTConfig

    def _trap_prepare_fused(self) -> None:
        if self.args.trap_target == "full":
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
        super()._trap_prepare_fused()

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


class _SkipNonFiniteStep(TrainerCallback):
    """Drops the gradients of a step whose gradients are not finite, so the optimizer skips it.

    The test is the step's gradient norm, which the Trainer has just computed (`_get_grad_norm`): a norm is
    finite exactly when every gradient is (an overflowing sum of squares counts as not finite)."""

    def __init__(self, trainer: Trap2TrainerMixin):
        self.trainer = trainer
        self.trainable = None

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        norm, self.trainer._trap_grad_norm = self.trainer._trap_grad_norm, None
        if norm is None:  # a Trainer that computed none: take it here
            if self.trainable is None:
                self.trainable = [p for p in model.parameters() if p.requires_grad]
            grads = [p.grad for p in self.trainable if p.grad is not None]
            if not grads:
                return
            norm = torch.nn.utils.get_total_norm(grads)
        if math.isfinite(norm.item() if torch.is_tensor(norm) else norm):
            return
        for p in model.parameters():
            p.grad = None
        self.trainer.trap_skipped_steps += 1
        logger.warning(
            "Step %d: non-finite gradients (an overflow at an off-nominal scale?); the optimizer step is skipped "
            "(%d skipped so far).",
            state.global_step + 1,
            self.trainer.trap_skipped_steps,
        )


def is_complete_checkpoint(folder: str) -> bool:
    """A Trainer checkpoint is complete once its trainer state, which the Trainer writes last, reads back."""
    try:
        with open(os.path.join(folder, TRAINER_STATE_NAME)) as f:
            json.load(f)
    except (OSError, ValueError):
        return False
    return True


def last_complete_checkpoint(output_dir: str) -> str | None:
    if not os.path.isdir(output_dir):
        return None
    steps = {}
    for name in os.listdir(output_dir):
        match = re.fullmatch(rf"{PREFIX_CHECKPOINT_DIR}-(\d+)", name)
        if match and is_complete_checkpoint(os.path.join(output_dir, name)):
            steps[int(match.group(1))] = os.path.join(output_dir, name)
    return steps[max(steps)] if steps else None


def _capture_rng_state():
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _restore_rng_state(state) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])
