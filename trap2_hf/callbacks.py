"""Training callbacks that watch the trap form.

Whether Trap² protects an update is decided by its re-scale curve: the task metric of W0 + s*dW as
a function of s. It must stay high at s = 1 and fall at the scales a merge puts the update at (1/N
for an N-way average, above 1 for full-weight merges). The curve forms at different speeds for
different tasks and random seeds, so rather than guess a step count, watch it and stop once it has
formed on both sides of 1.
"""

from collections.abc import Callable, Iterable, Sequence
from contextlib import AbstractContextManager

import torch
from torch import nn
from transformers import TrainerCallback

from .updates import rescaled_update, update_kind


class RescaleCurveCallback(TrainerCallback):
    """Every `every_n_steps` optimizer steps, evaluate the protected metric at `scales` (and at s = 1)
    with the update re-scaled, log it as `rescale/<metric_name>@<s>` with the Trainer's logs, and
    optionally stop training once the trap has formed.

    The trap has formed when the metric at s = 1 is at least `nominal_min` while at every given scale
    below 1 and every given scale above 1 (and under every transform) it is at most `trapped_max`, in
    `patience` evaluations in a row. Use validation data in `evaluate`, never the test split.

    Args:
        evaluate: `(model) -> float`, the protected task's metric of the model as it is now; called
            under `torch.no_grad()` with the model in eval mode.
        scales: the off-nominal scales to evaluate; stopping needs at least one on each side of 1.
        every_n_steps: evaluation period in optimizer steps.
        stop_when_trapped: stop training once the trap has formed.
        nominal_min, trapped_max: the thresholds of "formed" (required with `stop_when_trapped`).
        patience: how many evaluations in a row must show the trap before stopping.
        target, reference, adapter_names: what is re-scaled, as in `rescaled_update`. `target=None`
            takes `trap_target` from the training arguments; use `attach(trainer)` for full
            fine-tunes, which also takes the trainer's theta0.
        metric_name: the name in the log keys.
        transforms: {name: (model) -> context manager}: other places a merge puts the update (e.g. the
            update pruned and entering at s = 1, as a normalising TIES merge does), evaluated inside the
            context like the scales, logged as `rescale/<metric_name>@<name>`, and part of "formed".
    """

    def __init__(
        self,
        evaluate: Callable[[nn.Module], float],
        scales: Sequence[float] = (0.25, 0.5, 1.5, 2.0),
        every_n_steps: int = 25,
        stop_when_trapped: bool = False,
        nominal_min: float | None = None,
        trapped_max: float | None = None,
        patience: int = 1,
        target: str | None = None,
        reference: dict[str, torch.Tensor] | None = None,
        adapter_names: Iterable[str] | None = None,
        metric_name: str = "metric",
        transforms: dict[str, Callable[[nn.Module], AbstractContextManager]] | None = None,
    ):
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1, got {every_n_steps}.")
        if patience < 1:
            raise ValueError(f"patience must be >= 1, got {patience}.")
        self.scales = sorted(float(s) for s in scales if float(s) != 1.0)
        if stop_when_trapped:
            if nominal_min is None or trapped_max is None:
                raise ValueError(
                    "stop_when_trapped=True needs both thresholds: nominal_min (the metric to keep at s = 1) and "
                    "trapped_max (the most the metric may keep at the off-nominal scales)."
                )
            if not (any(s < 1 for s in self.scales) and any(s > 1 for s in self.scales)):
                raise ValueError(
                    f"stop_when_trapped=True needs scales on both sides of 1 to see the trap; got {list(scales)}."
                )
        self.evaluate = evaluate
        self.every_n_steps = every_n_steps
        self.stop_when_trapped = stop_when_trapped
        self.nominal_min = nominal_min
        self.trapped_max = trapped_max
        self.patience = patience
        self.target = target
        self.reference = reference
        self.adapter_names = None if adapter_names is None else list(adapter_names)
        self.metric_name = metric_name
        self.transforms = dict(transforms or {})
        self.history: list[dict] = []
        self.trapped_at_step: int | None = None
        self._streak = 0
        self._pending: dict[str, float] = {}

    def attach(self, trainer) -> "RescaleCurveCallback":
        """Add this callback first in `trainer`'s list, so every logger sees the curve, and take the
        trainer's update target (and theta0 for full fine-tunes)."""
        self.target = self.target or getattr(trainer.args, "trap_target", "adapter")
        if self.reference is None:
            self.reference = getattr(trainer, "trap_reference", None)
        trainer.callback_handler.callbacks.insert(0, self)
        return self

    def curve(self, model: nn.Module, target: str = "adapter") -> dict[float, float]:
        """The metric at s = 1 and at every scale, {scale: metric}; the model is left as it was."""
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                points = {1.0: float(self.evaluate(model))}
                for scale in self.scales:
                    with rescaled_update(model, scale, target, self.reference, self.adapter_names):
                        points[scale] = float(self.evaluate(model))
        finally:
            model.train(was_training)
        return dict(sorted(points.items()))

    def transformed(self, model: nn.Module) -> dict[str, float]:
        """The metric under each transform, {name: metric}; the model is left as it was."""
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                points = {}
                for name, make in self.transforms.items():
                    with make(model):
                        points[name] = float(self.evaluate(model))
        finally:
            model.train(was_training)
        return points

    def is_trapped(self, points: dict[float, float], transformed: dict[str, float] | None = None) -> bool:
        """Nominal metric intact and the trap formed on both sides of s = 1 (and under every transform)."""
        if self.nominal_min is None or self.trapped_max is None:
            return False
        below = [m for s, m in points.items() if s < 1]
        above = [m for s, m in points.items() if s > 1]
        return (
            points[1.0] >= self.nominal_min
            and bool(below)
            and bool(above)
            and max(below) <= self.trapped_max
            and max(above) <= self.trapped_max
            and all(m <= self.trapped_max for m in (transformed or {}).values())
        )

    # ----------------------------------------------------------------------------- events
    def on_train_begin(self, args, state, control, **kwargs):
        if self.target is None:
            self.target = getattr(args, "trap_target", "adapter")
        if update_kind(self.target).needs_reference and self.reference is None:
            raise ValueError(
                "RescaleCurveCallback on a full fine-tune needs theta0: use callback.attach(trainer) or pass "
                "reference=trainer.trap_reference."
            )

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step % self.every_n_steps:
            return
        points = self.curve(model, self.target)
        transformed = self.transformed(model)
        trapped = self.is_trapped(points, transformed)
        self._streak = self._streak + 1 if trapped else 0
        self.history.append({"step": state.global_step, "curve": points, "transforms": transformed, "trapped": trapped})
        self._pending = {f"rescale/{self.metric_name}@{s:g}": m for s, m in points.items()}
        self._pending |= {f"rescale/{self.metric_name}@{name}": m for name, m in transformed.items()}
        self._pending["rescale/trapped"] = float(trapped)
        control.should_log = True
        if self.stop_when_trapped and self._streak >= self.patience:
            self.trapped_at_step = state.global_step
            control.should_training_stop = True

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not self._pending or logs is None:
            return
        logs.update(self._pending)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(self._pending)
        self._pending = {}
