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


def test_della_keeps_entries_by_magnitude_rank_and_restores_the_l1_norm():
    """mergekit's della_magprune: within each row the largest entries are kept with probability keep + e, the
    smallest with keep - e (e = 0.15), and the kept ones rescaled so the layer's L1 norm is w times dW's."""
    model = tiny_lora()
    delta = nominal_delta(model)
    ranks = delta.abs().argsort(dim=1).argsort(dim=1)
    largest, smallest = ranks == delta.shape[1] - 1, ranks == 0
    kept_largest = kept_smallest = 0.0
    draws = 400
    for seed in range(draws):
        with offray_update(model, OffrayDraw("della", weight=0.8, keep=0.4, seed=seed)):
            got = effective_delta(model)
        kept = got != 0
        torch.testing.assert_close(got.abs().sum(), 0.8 * delta.abs().sum(), rtol=1e-4, atol=1e-6)
        ratio = got[kept] / delta[kept]
        torch.testing.assert_close(ratio, ratio[0].expand_as(ratio), rtol=1e-4, atol=1e-6)  # one rescale per layer
        kept_largest += kept[largest].float().mean().item() / draws
        kept_smallest += kept[smallest].float().mean().item() / draws
    assert abs(kept_largest - 0.55) < 0.03 and abs(kept_smallest - 0.25) < 0.03
    with offray_update(model, OffrayDraw("della", weight=0.8, keep=0.4, seed=3)):
        first = effective_delta(model)
    with offray_update(model, OffrayDraw("della", weight=0.8, keep=0.4, seed=3)):
        torch.testing.assert_close(effective_delta(model), first)  # a function of the draw's seed


def layer_deltas(model, draw=None):
    """{layer name: dW'} of every LoRA layer of the adapter, inside `draw`'s context (None: nominal)."""
    from contextlib import nullcontext

    deltas = {}
    for name, layer, _ in offray_layers(model):
        eye = torch.eye(layer.in_features)
        with torch.no_grad(), (offray_update(model, draw) if draw is not None else nullcontext()):
            deltas[name] = (layer(eye) - layer.get_base_layer()(eye)).T
    return deltas


def test_layer_scale_puts_each_layer_at_its_own_weight_from_the_range():
    model = llama_lora()
    nominal = layer_deltas(model)
    draw = draw_offray(["layer_scale"], 1, step=3, seed=0, weight_range=(0.5, 1.5), keep_range=(0.1, 0.9),
                       coef_range=(0.3, 2.0))[0]
    assert draw.weight == 1.0 and draw.weight_range == (0.5, 1.5)
    weights = []
    for name, got in layer_deltas(model, draw).items():
        weight = (got * nominal[name]).sum() / (nominal[name] ** 2).sum()
        torch.testing.assert_close(got, weight * nominal[name], rtol=1e-4, atol=1e-6)
        weights.append(weight.item())
    assert all(0.5 <= w <= 1.5 for w in weights) and len(set(round(w, 6) for w in weights)) == len(weights)
    again = layer_deltas(model, draw)
    assert all(torch.equal(again[name], got) for name, got in layer_deltas(model, draw).items())
    other = OffrayDraw("layer_scale", seed=draw.seed + 1, weight_range=(0.5, 1.5))
    assert not torch.allclose(next(iter(layer_deltas(model, other).values())), next(iter(layer_deltas(model, draw).values())))


def test_a_shared_weight_sets_every_partner_coefficient_to_the_own_weight():
    args = dict(weight_range=(0.3, 1.3), keep_range=(0.1, 0.9), coef_range=(0.3, 2.0), num_foreign=3)
    own = draw_offray(["foreign", "prune+spectral"], 4, step=2, seed=9, **args)
    shared = draw_offray(["foreign", "prune+spectral"], 4, step=2, seed=9, shared_weight=True, **args)
    assert [d.weight for d in shared] == [d.weight for d in own] and [d.seed for d in shared] == [d.seed for d in own]
    assert [d.coefs for d in shared] == [(d.weight,) * len(d.coefs) for d in own]
    assert [len(d.coefs) for d in shared] == [3, 1, 3, 1] and own[0].coefs != shared[0].coefs


def test_an_offray_pass_takes_the_drawn_share_of_the_rows_with_its_share_of_the_items():
    from trap2_hf.offray import offray_inputs

    inputs = {"input_ids": torch.arange(40).view(8, 5), "labels": torch.arange(40).view(8, 5), "flag": torch.tensor(1)}
    draw = OffrayDraw("dare", seed=123)
    assert offray_inputs(inputs, 30, 1.0, draw) == (inputs, 30)
    rows, items = offray_inputs(inputs, torch.tensor(30.0), 0.25, draw)
    assert rows["input_ids"].shape == (2, 5) and torch.equal(rows["input_ids"], rows["labels"])
    assert torch.equal(rows["flag"], inputs["flag"]) and items.item() == pytest.approx(7.5)
    again, _ = offray_inputs(inputs, None, 0.25, draw)
    assert torch.equal(again["input_ids"], rows["input_ids"])  # a function of the pass's seed
    picks = {tuple(offray_inputs(inputs, None, 0.25, OffrayDraw("dare", seed=s))[0]["input_ids"][:, 0].tolist())
             for s in range(30)}
    assert len(picks) > 5
    assert offray_inputs(inputs, None, 0.01, draw)[0]["input_ids"].shape == (1, 5)  # never an empty pass


def test_offray_pass_on_a_share_of_the_rows_equals_direct_autograd(tmp_out, monkeypatch):
    """Two off-ray passes ('dare', 'layer_scale') over half the rows each: the step's gradient is autograd's on
    those rows, each pass's token loss divided by half the batch's tokens (num_items_in_batch times the share)."""
    import trap2_hf.modes.step as step_module
    from trap2_hf.offray import offray_inputs

    seen = []  # the micro-batch as the trainer's data loader ordered it

    def spy(inputs, *args):
        seen.append({k: v.clone() for k, v in inputs.items()})
        return offray_inputs(inputs, *args)

    monkeypatch.setattr(step_module, "offray_inputs", spy)

    dataset = token_dataset(8, ragged=True)
    model = llama_lora()
    reference = copy.deepcopy(model)
    settings = dict(trap_lambda=0.0, trap_offray="dare,layer_scale", trap_offray_lambda=0.2, trap_offray_per_step=2,
                    trap_offray_fraction=0.5, trap_offray_weight_min=0.6, trap_offray_weight_max=1.4,
                    trap_mode="two_pass")
    args = Trap2TrainingArguments(output_dir=tmp_out, max_steps=1, per_device_train_batch_size=8, **sgd_args(**settings))
    trainer = Trap2Trainer(model=model, args=args, train_dataset=dataset)
    before = trainable_state(model)
    trainer.train()
    grads = step_gradients(before, model)

    batch = {k: seen[0][k] for k in ("input_ids", "attention_mask", "labels")}
    tokens = (batch["labels"][:, 1:] != -100).sum()
    params = [p for p in reference.parameters() if p.requires_grad]
    joint = reference(**batch).loss
    for draw in trainer.trap_offray_draws(0):
        rows, _ = offray_inputs(batch, None, 0.5, draw)
        with offray_update(reference, draw):
            mean = reference(**rows).loss  # the mean over the pass's own tokens
        share = (rows["labels"][:, 1:] != -100).sum() / (0.5 * tokens)
        joint = joint - 0.2 * scale_weight(draw.weight, "inv") * mean * share / 2
    expected = dict(zip([n for n, p in reference.named_parameters() if p.requires_grad], torch.autograd.grad(joint, params)))
    assert_grads_close(grads, expected)


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
        (dict(trap_offray="dare", trap_offray_fraction=0.0), "trap_offray_fraction must be in"),
        (dict(trap_offray="dare", trap_offray_shared_weight=True), "has no partner term"),
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
