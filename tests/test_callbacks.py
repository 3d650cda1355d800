"""RescaleCurveCallback: it evaluates at the re-scaled update, logs the curve and stops when told."""

import pytest
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import LoraLayer

from conftest import tiny_llama, token_dataset
from trap2_hf import Trap2Trainer, Trap2TrainingArguments
from trap2_hf.callbacks import RescaleCurveCallback


def lora_model():
    return get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))


def effective_scale(model) -> float:
    """A stand-in metric that reads how much the adapter is re-scaled right now."""
    layer = next(m for m in model.modules() if isinstance(m, LoraLayer))
    return layer.scaling["default"] / (8 / 4)


def trap_shaped(model) -> float:
    """A metric with a perfect trap: 1 at s = 1, 0.1 anywhere else."""
    return 1.0 if abs(effective_scale(model) - 1.0) < 1e-9 else 0.1


def train(tmp_out, callback, max_steps=6, attach=False):
    args = Trap2TrainingArguments(
        output_dir=tmp_out, max_steps=max_steps, per_device_train_batch_size=4, logging_steps=100,
        save_strategy="no", report_to=[], disable_tqdm=True, learning_rate=1e-3, trap_lambda=0.0,
    )
    trainer = Trap2Trainer(model=lora_model(), args=args, train_dataset=token_dataset(8))
    if attach:
        callback.attach(trainer)
    else:
        trainer.add_callback(callback)
    trainer.train()
    return trainer


def test_curve_is_evaluated_at_the_rescaled_update_and_logged(tmp_out):
    callback = RescaleCurveCallback(effective_scale, scales=(0.5, 2.0), every_n_steps=2, metric_name="acc")
    trainer = train(tmp_out, callback, max_steps=6)
    assert [h["step"] for h in callback.history] == [2, 4, 6]
    assert callback.history[0]["curve"] == pytest.approx({0.5: 0.5, 1.0: 1.0, 2.0: 2.0})
    logged = [entry for entry in trainer.state.log_history if "rescale/acc@0.5" in entry]
    assert [entry["step"] for entry in logged] == [2, 4, 6]
    assert logged[0]["rescale/acc@2"] == pytest.approx(2.0)
    assert logged[0]["rescale/trapped"] == 0.0
    # The model is left as it was: scaling restored, still trainable.
    assert effective_scale(trainer.model) == pytest.approx(1.0)
    assert callback.trapped_at_step is None


def test_stops_once_trapped_with_patience(tmp_out):
    callback = RescaleCurveCallback(
        trap_shaped, scales=(0.25, 1.5), every_n_steps=2, stop_when_trapped=True, nominal_min=0.9,
        trapped_max=0.3, patience=2,
    )
    trainer = train(tmp_out, callback, max_steps=20, attach=True)
    assert callback.trapped_at_step == 4
    assert trainer.state.global_step == 4
    assert trainer.callback_handler.callbacks[0] is callback
    assert trainer.state.log_history[-2]["rescale/trapped"] == 1.0


def test_does_not_stop_while_the_trap_is_missing_on_one_side(tmp_out):
    def only_below(model):
        return 0.1 if effective_scale(model) < 1 else 1.0

    callback = RescaleCurveCallback(
        only_below, scales=(0.5, 1.5), every_n_steps=2, stop_when_trapped=True, nominal_min=0.9, trapped_max=0.3
    )
    trainer = train(tmp_out, callback, max_steps=6)
    assert trainer.state.global_step == 6 and callback.trapped_at_step is None
    assert not any(h["trapped"] for h in callback.history)


def test_a_transform_is_watched_logged_and_must_be_trapped_too(tmp_out):
    """A transform (here: the update re-scaled to 0.9 by hand, as a stand-in for a pruned update at weight 1) is
    evaluated inside its context, logged under its name, and keeps the trap from counting as formed until it too is
    at most trapped_max; the model is restored after it."""
    from trap2_hf.updates import rescaled_update

    def near_one(model):
        return rescaled_update(model, 0.9, "adapter")

    def rim_holds(model):  # trapped at 0.25 and 1.5, but not at 0.9
        scale = effective_scale(model)
        return 1.0 if abs(scale - 1.0) < 1e-9 or abs(scale - 0.9) < 1e-9 else 0.1

    watched = RescaleCurveCallback(
        rim_holds, scales=(0.25, 1.5), every_n_steps=2, stop_when_trapped=True, nominal_min=0.9, trapped_max=0.3,
        transforms={"rim": near_one}, metric_name="acc",
    )
    trainer = train(tmp_out, watched, max_steps=6)
    assert trainer.state.global_step == 6 and watched.trapped_at_step is None
    assert watched.history[0]["transforms"] == {"rim": 1.0} and not watched.history[0]["trapped"]
    assert [e["rescale/acc@rim"] for e in trainer.state.log_history if "rescale/acc@rim" in e] == [1.0] * 3
    assert effective_scale(trainer.model) == pytest.approx(1.0)
    blind = RescaleCurveCallback(
        rim_holds, scales=(0.25, 1.5), every_n_steps=2, stop_when_trapped=True, nominal_min=0.9, trapped_max=0.3
    )
    assert train(tmp_out, blind, max_steps=6).state.global_step == 2  # without the transform: "formed" at once


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(stop_when_trapped=True, trapped_max=0.3), "nominal_min"),
        (dict(stop_when_trapped=True, nominal_min=0.9, trapped_max=0.3, scales=(0.25, 0.5)), "both sides"),
        (dict(every_n_steps=0), "every_n_steps"),
    ],
)
def test_bad_arguments_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        RescaleCurveCallback(effective_scale, **kwargs)
