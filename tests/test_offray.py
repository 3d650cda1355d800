"""Off-ray terms: each transform against a hand computation, the step's gradient against autograd,
settings validation, and foreign updates kept out of what is saved."""

import copy
import os

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file
from torch import nn
from torch.func import functional_call

from conftest import tiny_llama, token_dataset
from trap_checks import assert_grads_close, sgd_args, step_gradients, trainable_state
from trap2_hf import Trap2Settings, Trap2Trainer, Trap2TrainingArguments
from trap2_hf.objective import scale_weight
from trap2_hf.offray import OffrayDraw, draw_offray, load_foreign_update, offray_layers, offray_update, parse_terms


class Tiny(nn.Module):
    def __init__(self, d_in=50, d_out=40):
        super().__init__()
        self.lin = nn.Linear(d_in, d_out)

    def forward(self, x):
        return self.lin(x)


def tiny_lora(seed=0, r=2):
    torch.manual_seed(seed)
    base = Tiny()
    torch.manual_seed(seed + 1)
    return get_peft_model(base, LoraConfig(r=r, lora_alpha=4, target_modules=["lin"], init_lora_weights=False))


def layer_of(model):
    return model.base_model.model.lin


def nominal_delta(model):
    layer = layer_of(model)
    return (layer.scaling["default"] * layer.lora_B["default"].weight @ layer.lora_A["default"].weight).detach()


def effective_delta(model):
    """dW' as the layer computes it now: layer(I) - base(I) = I @ dW'^T."""
    layer = layer_of(model)
    eye = torch.eye(layer.in_features)
    with torch.no_grad():
        return (layer(eye) - layer.get_base_layer()(eye)).T


def saved_foreign(tmp_path, seed=5):
    other = tiny_lora(seed=seed)
    folder = str(tmp_path / "foreign")
    other.save_pretrained(folder)
    return folder, nominal_delta(other)


def test_scale_and_foreign_partner_is_w_dw_plus_c_dwj(tmp_path):
    model = tiny_lora()
    folder, foreign_delta = saved_foreign(tmp_path)
    draw = OffrayDraw("foreign", weight=0.7, coefs=(1.3,), seed=3)
    with offray_update(model, draw, [load_foreign_update(folder)]):
        got = effective_delta(model)
    torch.testing.assert_close(got, 0.7 * nominal_delta(model) + 1.3 * foreign_delta, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(effective_delta(model), nominal_delta(model), rtol=1e-5, atol=1e-6)  # restored


def test_dare_keeps_entries_rescaled_and_drops_the_rest():
    model = tiny_lora()
    delta = nominal_delta(model)
    draw = OffrayDraw("dare", weight=1.5, keep=0.3, seed=11)
    with offray_update(model, draw):
        got = effective_delta(model)
    with offray_update(model, draw):
        again = effective_delta(model)
    torch.testing.assert_close(got, again)  # the mask is a function of the draw: recomputation sees the same
    kept = got != 0
    torch.testing.assert_close(got[kept], 1.5 * delta[kept] / 0.3, rtol=1e-5, atol=1e-6)
    assert abs(kept.float().mean().item() - 0.3) < 0.06


def test_prune_keeps_the_top_density_entries_by_magnitude():
    model = tiny_lora()
    delta = nominal_delta(model)
    with offray_update(model, OffrayDraw("prune", weight=0.8, keep=0.25)):
        got = effective_delta(model)
    k = int(0.25 * delta.numel())
    threshold = delta.abs().reshape(-1).sort(descending=True).values[k - 1]
    expected = 0.8 * torch.where(delta.abs() >= threshold, delta, torch.zeros_like(delta))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_factor_dare_is_exact_at_keep_one_and_unbiased_below():
    model = tiny_lora()
    delta = nominal_delta(model)
    with offray_update(model, OffrayDraw("factor_dare", weight=0.6, keep=1.0)):
        torch.testing.assert_close(effective_delta(model), 0.6 * delta, rtol=1e-5, atol=1e-6)
    total = torch.zeros_like(delta)
    draws = 3000
    for seed in range(draws):
        with offray_update(model, OffrayDraw("factor_dare", weight=1.0, keep=0.7, seed=seed)):
            total += effective_delta(model)
    # E[(M_B*B/k)(M_A*A/k)] = B A for independent masks
    assert ((total / draws - delta).norm() / delta.norm()).item() < 0.05


def test_synthetic_partner_is_low_rank_with_the_updates_norm_times_c():
    model = tiny_lora(r=2)
    delta = nominal_delta(model)
    with offray_update(model, OffrayDraw("synthetic", weight=1.0, coefs=(0.5,), seed=4)):
        partner = effective_delta(model) - delta
    assert torch.linalg.matrix_rank(partner).item() == 2
    torch.testing.assert_close(partner.norm(), 0.5 * delta.norm(), rtol=1e-4, atol=1e-6)
    with offray_update(model, OffrayDraw("synthetic", weight=1.0, coefs=(0.5,), seed=5)):
        assert not torch.allclose(effective_delta(model) - delta, partner)  # redrawn with the seed


def test_guard_adds_noise_of_the_given_relative_norm():
    model = tiny_lora()
    delta = nominal_delta(model)
    with offray_update(model, OffrayDraw("guard", noise=0.05, seed=1)):
        noise = effective_delta(model) - delta
    torch.testing.assert_close(noise.norm(), 0.05 * delta.norm(), rtol=1e-4, atol=1e-7)


def test_draws_depend_on_seed_and_step_only_and_cycle_terms():
    args = dict(weight_range=(0.3, 2.0), keep_range=(0.1, 0.9), coef_range=(0.3, 2.0), num_foreign=2)
    a = draw_offray(["dare", "prune+foreign"], 3, step=4, seed=1, **args)
    assert a == draw_offray(["dare", "prune+foreign"], 3, step=4, seed=1, **args)
    assert a != draw_offray(["dare", "prune+foreign"], 3, step=5, seed=1, **args)
    assert [d.term for d in a] == ["dare", "prune+foreign", "dare"]
    assert len(a[1].coefs) == 2 and a[0].coefs == ()
    assert all(0.3 <= d.weight <= 2.0 and 0.1 <= d.keep <= 0.9 for d in a)


# ----------------------------------------------------------------------------- the trainer
LORA = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"], init_lora_weights=False)


def llama_lora(seed=0):
    base = tiny_llama()
    torch.manual_seed(seed)
    return get_peft_model(base, LoraConfig(**LORA))


def foreign_folder(tmp_path):
    folder = str(tmp_path / "foreign_llama")
    llama_lora(seed=42).save_pretrained(folder)
    return folder


def offray_effective_weights(peft_model, factors, draw, foreign, reference_masks):
    """{base weight name: W0 + dW'} with dW' = T(scaling*B@A) computed by hand from leaf `factors`."""
    weights = {}
    for name, module in peft_model.named_modules():
        if name not in reference_masks:
            continue
        key = name.removeprefix("base_model.model.") + ".weight"
        w0 = module.get_base_layer().weight.detach()
        a, b = factors[f"{name}.lora_A.default.weight"], factors[f"{name}.lora_B.default.weight"]
        delta = module.scaling["default"] * (b @ a)
        if draw.own == "dare":
            own = draw.weight * reference_masks[name] * delta / draw.keep
        elif draw.own == "prune":
            k = int(draw.keep * delta.numel())
            threshold = delta.detach().abs().reshape(-1).sort(descending=True).values[k - 1]
            own = draw.weight * (delta.detach().abs() >= threshold) * delta
        else:
            own = draw.weight * delta
        partner = 0
        if draw.partner == "foreign":
            for c, update in zip(draw.coefs, foreign):
                bj, aj = update.factors[name.removeprefix("base_model.model.")]
                partner = partner + c * bj @ aj
        weights[key] = w0 + own + partner
    return weights


def masks_in_context(model, draw, foreign):
    """The DARE keep mask of every layer, read off the layer's effective dW' (nonzero entries)."""
    masks = {}
    for name, layer, _ in offray_layers(model):
        eye = torch.eye(layer.in_features)
        with torch.no_grad(), offray_update(model, OffrayDraw(draw.term.split("+")[0], draw.weight, draw.keep, (), draw.seed)):
            masks[name] = ((layer(eye) - layer.get_base_layer()(eye)).T != 0).float()
    return masks


@pytest.mark.parametrize(
    "offray, mode",
    [
        ("prune+foreign,foreign", dict(trap_mode="two_pass")),
        ("dare", dict(trap_mode="two_pass")),
        # the fused pass over all rows is the two_pass step; the off-ray passes follow it
        ("prune+foreign,foreign", dict(trap_mode="fused", trap_rescaled_fraction=1.0)),
    ],
)
def test_step_with_offray_terms_equals_direct_autograd(tmp_out, tmp_path, offray, mode):
    dataset = token_dataset(8, ragged=True)
    folder = foreign_folder(tmp_path)
    model = llama_lora()
    reference = copy.deepcopy(model)
    uses_foreign = "foreign" in offray
    settings = dict(
        trap_lambda=0.3,
        trap_offray=offray,
        trap_offray_lambda=0.2,
        trap_offray_per_step=2,
        trap_foreign_adapters=[folder] if uses_foreign else [],
        **mode,
    )
    args = Trap2TrainingArguments(output_dir=tmp_out, max_steps=1, per_device_train_batch_size=8, **sgd_args(**settings))
    trainer = Trap2Trainer(model=model, args=args, train_dataset=dataset)
    before = trainable_state(model)
    trainer.train()
    grads = step_gradients(before, model)

    foreign = [load_foreign_update(folder)] if uses_foreign else []
    batch = {k: torch.tensor(dataset[k]) for k in ("input_ids", "attention_mask", "labels")}
    factors = {n: p.detach().clone().requires_grad_() for n, p in reference.named_parameters() if p.requires_grad}
    base = tiny_llama()
    from trap_checks import lora_effective_weights

    def loss(weights):
        return functional_call(base, weights, kwargs=batch).loss

    joint = loss(lora_effective_weights(reference, 1.0, factors))
    scales = trainer.trap_scales(0)
    for s in scales:
        joint = joint - 0.3 * scale_weight(s, "inv") * loss(lora_effective_weights(reference, s, factors)) / len(scales)
    draws = trainer.trap_offray_draws(0)
    assert len(draws) == 2
    for draw in draws:
        masks = masks_in_context(reference, draw, foreign)
        weights = offray_effective_weights(reference, factors, draw, foreign, masks)
        joint = joint - 0.2 * scale_weight(draw.weight, "inv") * loss(weights) / len(draws)
    expected = dict(zip(factors, torch.autograd.grad(joint, list(factors.values()))))
    assert_grads_close(grads, expected)
    logged = [log for log in trainer.state.log_history if "trap/offray_loss" in log]
    assert logged and torch.isfinite(torch.tensor(logged[0]["trap/offray_loss"]))


def test_foreign_adapters_never_reach_the_saved_adapter(tmp_out, tmp_path):
    folder = foreign_folder(tmp_path)
    model = llama_lora()
    settings = dict(trap_lambda=0.1, trap_offray="foreign,synthetic", trap_foreign_adapters=[folder])
    args = Trap2TrainingArguments(output_dir=tmp_out, max_steps=2, per_device_train_batch_size=4, **sgd_args(**settings))
    trainer = Trap2Trainer(model=model, args=args, train_dataset=token_dataset(8))
    trainer.train()
    out = str(tmp_path / "saved")
    trainer.save_model(out)
    saved = load_file(os.path.join(out, "adapter_model.safetensors"))
    foreign = load_file(os.path.join(folder, "adapter_model.safetensors"))
    assert set(saved) == set(foreign)  # the same layers, one adapter: nothing extra
    trained = {n.replace(".default", ""): p.detach() for n, p in model.named_parameters() if p.requires_grad}
    for key, value in saved.items():
        torch.testing.assert_close(value, trained[key])
        assert not torch.equal(value, foreign[key])
    assert not any(isinstance(b, torch.Tensor) and b.numel() for n, b in model.named_buffers() if "foreign" in n)


def test_lambda_zero_with_offray_trains_only_the_offray_term(tmp_out):
    model = llama_lora()
    args = Trap2TrainingArguments(
        output_dir=tmp_out, max_steps=1, per_device_train_batch_size=4,
        **sgd_args(trap_lambda=0.0, trap_offray="dare", trap_offray_lambda=0.1),
    )
    trainer = Trap2Trainer(model=model, args=args, train_dataset=token_dataset(4))
    trainer.train()
    logs = [log for log in trainer.state.log_history if "trap/offray_loss" in log]
    assert logs and not any("trap/rescaled_loss" in log for log in logs)


# ----------------------------------------------------------------------------- settings
@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(trap_offray="dropout"), "trap_offray term 'dropout'"),
        (dict(trap_offray="dare+prune"), "at most one of dare"),
        (dict(trap_offray="foreign"), "trap_foreign_adapters is empty"),
        (dict(trap_foreign_adapters=["x"]), "no trap_offray term uses it"),
        (dict(trap_offray="dare", trap_mode="sub_batch"), "use trap_mode='fused' or 'two_pass'"),
        (dict(trap_offray="dare", trap_target="full"), "trap_target='full'"),
        (dict(trap_offray="dare", trap_offray_keep_min=0.0), "trap_offray_keep_min"),
        (dict(trap_offray="dare", trap_offray_keep_max=1.5), "trap_offray_keep_max"),
        (dict(trap_offray="dare", trap_offray_weight_min=2.5), "trap_offray_weight_min"),
        (dict(trap_offray="dare", trap_offray_per_step=0), "trap_offray_per_step"),
        (dict(trap_offray_lambda=-1.0), "trap_offray_lambda"),
        (dict(trap_guard_lambda=0.1, trap_target="full"), "trap_target='full'"),
    ],
)
def test_offray_settings_are_validated_by_name(settings, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("+", r"\+")):
        Trap2Settings(**settings).validate_trap_settings()


def test_offray_settings_defaults_and_record():
    settings = Trap2Settings(trap_lambda=0.02, trap_offray=["dare", "synthetic+prune"])
    settings.validate_trap_settings()
    assert settings.trap_offray == "dare,synthetic+prune"
    assert settings.trap_offray_terms == ["dare", "prune+synthetic"]
    assert settings.trap_offray_lambda == 0.02
    recorded = settings.trap_settings_dict()
    assert recorded["trap_offray"] == "dare,synthetic+prune" and recorded["trap_foreign_adapters"] == []
    default = Trap2Settings()
    assert default.trap_offray == "" and not default.trap_offray_active
    assert parse_terms("") == []


def test_dora_adapter_is_refused_by_name(tmp_out):
    model = get_peft_model(tiny_llama(), LoraConfig(**LORA, use_dora=True))
    args = Trap2TrainingArguments(output_dir=tmp_out, max_steps=1, **sgd_args(trap_offray="dare"))
    with pytest.raises(ValueError, match="drop use_dora"):
        Trap2Trainer(model=model, args=args, train_dataset=token_dataset(4))


def test_foreign_adapter_of_another_shape_is_refused(tmp_out, tmp_path):
    other = get_peft_model(tiny_llama(), LoraConfig(**{**LORA, "target_modules": ["k_proj"]}))
    folder = str(tmp_path / "elsewhere")
    other.save_pretrained(folder)
    args = Trap2TrainingArguments(
        output_dir=tmp_out, max_steps=1, **sgd_args(trap_offray="foreign", trap_foreign_adapters=[folder])
    )
    with pytest.raises(ValueError, match="shares no LoRA layer"):
        Trap2Trainer(model=llama_lora(), args=args, train_dataset=token_dataset(4))
