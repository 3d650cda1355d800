"""The step object a trap mode drives (`TrapStep`): the passes it may run, the re-scaling context, the coefficient,
the rows, the metrics sink, and the facts its set-up checks. A trainer builds one for its life and lends it its own
training step (`Trap2TrainerMixin`); a test builds one around any model. A mode sees this object and the
micro-batch (`MicroBatch`), never the trainer.

Every backward of a micro-batch but its last runs under `not_last_backward`: no gradient reduction where the
backend can defer it, and never the end of the accumulation window (DeepSpeed steps its optimizer inside the
backward that ends it).
"""

import contextlib
import logging
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import nn

from ..best_response import bounded_loss
from ..choices import TrainerLoss
from ..objective import rescaled_loss_coefficient, sample_scales, scale_weight, step_generator
from ..offray import load_foreign_update, matched_foreign_updates, offray_inputs, offray_layers, offray_update
from ..offray.draws import draw_offray, draw_ranges, guard_draw
from ..rescale import split_in_place
from .rows import drawn_on_any_rank, drawn_rows

logger = logging.getLogger(__name__)


class MicroBatch(NamedTuple):
    """One micro-batch of an optimizer step, as the trainer hands it to its mode."""

    model: nn.Module  # as the trainer calls it (wrapped for data parallelism)
    inputs: dict
    num_items_in_batch: Any
    scales: list[float]  # the step's scales; none with trap_lambda = 0
    offray: list = []  # the step's off-ray and guard draws (`offray.draws`)


class TrapStep:
    """What a mode may use, for one trainer.

    Args:
        settings: gives the current settings (the trainer's arguments: Trap² fields, seed, world_size, ...).
        model: gives the model the update is re-scaled in (unwrapped).
        update: the update kind (`updates.update_kind`).
        run_pass: the trainer's own training step `(model, inputs, num_items_in_batch) -> loss`: forward, loss and
            backward, its loss passed through `weigh`.
        record: the metrics sink `(key, value, per_step=True)`.
        quiet: a context that keeps the trainer's own metrics from counting a side pass.
        loss_of: the trainer's loss `(model, inputs) -> loss` without backward (the best responses' candidates).
        trainer_loss: gives what the trainer's loss is (`choices.TrainerLoss`), for the modes that weigh row losses.
        accelerator: the trainer's accelerator (gradient sync, reductions over ranks); None: one process.
        global_step: gives the optimizer step the trainer is at.
        rescaled: the re-scaling context `(scale, weight_copy=False)`; None: `rescaled_update`.
        prepare_inputs: moves a batch to the device as the trainer does.
    """

    def __init__(
        self,
        settings: Callable[[], Any],
        model: Callable[[], nn.Module],
        update,
        run_pass: Callable,
        *,
        record: Callable | None = None,
        quiet: Callable[[], Any] = contextlib.nullcontext,
        loss_of: Callable | None = None,
        trainer_loss: Callable[[], TrainerLoss] = TrainerLoss,
        accelerator=None,
        global_step: Callable[[], int] = lambda: 0,
        rescaled: Callable | None = None,
        prepare_inputs: Callable[[dict], dict] = lambda inputs: inputs,
    ):
        self._settings, self._model, self.update, self._run_pass = settings, model, update, run_pass
        self._record = record or (lambda key, value, per_step=True: None)
        self._quiet, self._loss_of, self._trainer_loss = quiet, loss_of, trainer_loss
        self.accelerator, self._global_step, self._rescaled = accelerator, global_step, rescaled
        self._prepare_inputs = prepare_inputs
        self.reference = None  # theta0, where the update kind re-scales against it
        self.ascent_cap = None  # trap_ascent='capped': the cap of maximised losses (`best_response.ascent_cap`)
        self.chosen_by_auto = False  # the mode runs because trap_mode='auto' picked it
        # A full fine-tune's modules that form theta_s as they run, and the parameters read outside their module
        # (re-scaled in place instead); checked against the first nominal pass (`watching_pass_row_targets`).
        self.pass_row_targets, self.in_place, self._targets_checked = None, (), False
        self.offray_layers, self.foreign = None, []
        self.factor = None  # the factor on the loss of the side pass running now (`weigh`)
        self._micro_batch = (None, -1)
        self._scales = (None, [])

    @property
    def args(self):
        return self._settings()

    @property
    def model(self) -> nn.Module:
        return self._model()

    @property
    def global_step(self) -> int:
        return self._global_step()

    @property
    def trainer_loss(self) -> TrainerLoss:
        return self._trainer_loss()

    # ----------------------------------------------------------------------------- set-up
    def load_offray(self) -> None:
        """Off-ray terms: find the LoRA layers they transform and load the foreign updates once."""
        self.offray_layers, self.foreign = None, []
        args = self.args
        if not args.trap_offray_active:
            return
        model = self.model
        self.offray_layers = offray_layers(model)
        foreign = [load_foreign_update(path) for path in args.trap_foreign_adapters]
        self.foreign = matched_foreign_updates(model, foreign, self.offray_layers)

    # ----------------------------------------------------------------------------- draws, rows, contexts, coefficients
    def scales(self, step: int) -> list[float]:
        """The scales of optimizer step `step`: a function of (seed, step) only, so resumed runs and all ranks draw
        the same ones."""
        cached_step, scales = self._scales
        if cached_step != step:
            args = self.args
            scales = sample_scales(
                args.trap_scale_min,
                args.trap_scale_max,
                args.trap_margin,
                args.trap_scales_per_step,
                args.trap_scale_sampling,
                step_generator(args.seed, step),
                rim=(args.trap_rim_share, args.trap_rim_min, args.trap_rim_max),
            )
            self._scales = (step, scales)
        return scales

    def offray_draws(self, step: int) -> list:
        """The off-ray (and guard) draws of optimizer step `step`: a function of (seed, step) only."""
        args = self.args
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
                shared_weight=args.trap_offray_shared_weight,
            )
        if args.trap_guard_lambda > 0:
            draws.append(guard_draw(step, args.seed, args.trap_guard_noise))
        return draws

    def rows(self, batch_size: int) -> list[torch.Tensor]:
        """Per scale, the rows of this optimizer step's next micro-batch that it re-scales (`rows.drawn_rows`)."""
        step = self.global_step
        last_step, index = self._micro_batch
        index = index + 1 if last_step == step else 0
        self._micro_batch = (step, index)
        return drawn_rows(self.args, batch_size, step, index)

    def drawn_on_any_rank(self, batch_size: int) -> list[bool]:
        """Per scale, whether any rank re-scales a row of the micro-batch `rows` drew last
        (`rows.drawn_on_any_rank`)."""
        return drawn_on_any_rank(self.args, batch_size, *self._micro_batch)

    def rescaled(self, scale: float, weight_copy: bool = False):
        """Context in which the model computes with its update re-scaled by `scale`; `weight_copy`: the pass may hold
        a copy of the weights (a full fine-tune's pass over part of a micro-batch, `updates.FullUpdate.rescaled`)."""
        if self._rescaled is not None:
            return self._rescaled(scale, weight_copy=weight_copy)
        return self.rescaled_update(scale, weight_copy)

    def rescaled_update(self, scale: float, weight_copy: bool = False):
        """The update kind's re-scaling context, with theta0 and the pass row targets."""
        return self.update.rescaled(
            self.model, scale, self.reference,
            row_targets=self.pass_row_targets, in_place=self.in_place, weight_copy=weight_copy,
        )

    def offray_context(self, draw):
        """Context in which the model computes with the update as the off-ray `draw` transforms it (`offray/`)."""
        return offray_update(self.model, draw, self.foreign, self.offray_layers)

    def coefficient(self, scale: float, num_scales: int) -> float:
        """The factor on the loss of the pass at `scale`: -lambda * w(s) / K (maximised)."""
        return rescaled_loss_coefficient(scale, self.args.trap_lambda, self.args.trap_weighting, num_scales)

    def offray_coefficient(self, draw, num_offray: int) -> float:
        """The factor on the loss of an off-ray pass: -lambda_off * w(weight) / count (maximised), or
        +trap_guard_lambda for the guard pass (minimised)."""
        args = self.args
        if draw.is_guard:
            return args.trap_guard_lambda
        return -args.trap_offray_lambda * scale_weight(draw.weight, args.trap_weighting) / num_offray

    def weigh(self, loss: torch.Tensor) -> torch.Tensor:
        """The loss of the pass running now as the step counts it: times the side pass's factor (maximised losses
        capped, trap_ascent='capped'); the nominal pass's unchanged."""
        if self.factor is None:
            return loss
        cap = self.ascent_cap if self.factor < 0 else None  # only maximised losses are capped
        return bounded_loss(loss, cap) * self.factor

    # ----------------------------------------------------------------------------- passes
    def plain(self, model, inputs: dict, num_items_in_batch) -> torch.Tensor:
        """The trainer's own training step on `inputs` (forward, loss, backward)."""
        return self._run_pass(model, inputs, num_items_in_batch)

    def side(self, model, inputs, num_items_in_batch, rng_state, context, coefficient: float, last: bool):
        """One off-nominal forward/backward inside `context`: the nominal pass's dropout masks, the loss times
        `coefficient`, the trainer's metrics untouched; only the micro-batch's `last` backward reduces gradients."""
        restore_rng_state(rng_state)
        with contextlib.ExitStack() as stack:
            if not last:
                stack.enter_context(self.not_last_backward(model))
            stack.enter_context(context)
            stack.enter_context(self._quiet())
            self.factor = coefficient
            try:
                return self._run_pass(model, dict(inputs), num_items_in_batch)
            finally:
                self.factor = None

    def offray_passes(self, batch: MicroBatch, rng_state) -> None:
        """One forward/backward per off-ray draw of `batch` inside its context; the last ends the micro-batch."""
        draws = batch.offray
        num_offray = sum(not draw.is_guard for draw in draws)
        for k, draw in enumerate(draws):
            coefficient = self.offray_coefficient(draw, num_offray)
            inputs, items = offray_inputs(batch.inputs, batch.num_items_in_batch, self.args.trap_offray_fraction, draw)
            loss = self.side(
                batch.model, inputs, items, rng_state, self.offray_context(draw), coefficient, last=k == len(draws) - 1
            )
            if draw.is_guard:
                self.record("guard_loss", loss / coefficient)
            else:
                self.record("offray_loss", loss / coefficient / num_offray)

    @contextlib.contextmanager
    def not_last_backward(self, model):
        """Around every backward of a micro-batch but its last (see the module docstring)."""
        if self.accelerator is None:
            yield
            return
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

    @contextlib.contextmanager
    def watching_pass_row_targets(self):
        """Around the first nominal pass: if a module of the pass row targets does not run, the model reads its
        parameters some other way, which forming theta_s module by module would miss; write theta_s into those
        parameters instead (`rescale.split_in_place`)."""
        targets = self.pass_row_targets
        if targets is None or self._targets_checked:
            yield
            return
        called = set()
        handles = [m.register_forward_pre_hook(lambda *_, n=name: called.add(n)) for name, m, _ in targets]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()
        self._targets_checked = True
        skipped = [name for name, _, _ in targets if name not in called]
        if skipped:
            logger.info(
                "%s holds trainable parameters but did not run as a module: its parameters are read some other way, "
                "so the re-scaled passes write theta0 + s*(theta - theta0) into them instead.",
                skipped[0],
            )
            self.pass_row_targets, self.in_place = split_in_place(self.model, targets, skipped)

    def losses(self, model, inputs: dict, contexts: list) -> list[float]:
        """The trainer's loss on `inputs` without gradient inside each context, with the same dropout masks and the
        trainer's metrics untouched; averaged over ranks under data parallelism."""
        inputs = self._prepare_inputs(inputs)
        cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
        devices = list(range(torch.cuda.device_count())) if cuda else []
        losses = []
        with torch.no_grad(), self._quiet():
            for context in contexts:
                with torch.random.fork_rng(devices=devices), context:
                    losses.append(self._loss_of(model, dict(inputs)).detach().float())
        losses = torch.stack(losses)
        if self.args.world_size > 1:
            losses = self.accelerator.reduce(losses, reduction="mean")
        return losses.tolist()

    # ----------------------------------------------------------------------------- metrics
    def record(self, key: str, value, per_step: bool = True) -> None:
        self._record(key, value, per_step)

    def record_scale(self, k: int, scale: float) -> None:
        """The k-th scale of the step, logged as trap/scale (k = 0) or trap/scale_{k+1}."""
        self._record("scale" if k == 0 else f"scale_{k + 1}", scale, per_step=False)


def capture_rng_state() -> dict:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])
