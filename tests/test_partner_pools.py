"""Partner pools of the off-ray terms: the 'spectral' partner, pseudo-partners the library makes itself, and the
worst case over a pool of off-ray draws (`trap_offray_candidates`)."""

import copy
import os

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from conftest import token_dataset
from test_offray import Tiny, effective_delta, llama_lora, tiny_lora
from trap_checks import assert_grads_close, sgd_args, step_gradients, trainable_state
from trap2_hf import Trap2Settings, Trap2Trainer, Trap2TrainingArguments
from trap2_hf.offray import OffrayDraw, layer_parts, load_foreign_update, make_pseudo_partners, offray_update
from trap2_hf.offray.transforms import SPECTRAL_DIRECTIONS_PER_RANK


def test_spectral_partner_lies_in_the_top_singular_directions_of_w0_with_the_target_norm():
    model = tiny_lora(r=2)
    delta = effective_delta(model)
    w0 = model.base_model.model.lin.get_base_layer().weight.detach()
    u, _, vh = torch.linalg.svd(w0, full_matrices=False)
    k = SPECTRAL_DIRECTIONS_PER_RANK * 2
    with offray_update(model, OffrayDraw("spectral", weight=1.0, coefs=(0.6,), seed=4)):
        partner = effective_delta(model) - delta
    left, right = u[:, :k], vh[:k].T
    # nothing of it outside span(U_k) on the left or span(V_k) on the right ...
    assert (partner - left @ (left.T @ partner)).norm() < 1e-4 * partner.norm()
    assert (partner - (partner @ right) @ right.T).norm() < 1e-4 * partner.norm()
    # ... while an isotropic partner of the same norm has most of its mass outside (k = 8 of 40 directions)
    with offray_update(model, OffrayDraw("synthetic", weight=1.0, coefs=(0.6,), seed=4)):
        isotropic = effective_delta(model) - delta
    assert (isotropic - left @ (left.T @ isotropic)).norm() > 0.5 * isotropic.norm()
    assert torch.linalg.matrix_rank(partner).item() == 2
    torch.testing.assert_close(partner.norm(), 0.6 * delta.norm(), rtol=1e-4, atol=1e-6)
    with offray_update(model, OffrayDraw("spectral", weight=1.0, coefs=(0.6,), seed=5)):
        assert not torch.allclose(effective_delta(model) - delta, partner)  # redrawn with the seed


def test_spectral_partner_without_the_base_weight_is_refused_by_name():
    a, b = torch.randn(2, 50), torch.randn(40, 2)
    with pytest.raises(ValueError, match="'spectral' partner needs the layer's base weight"):
        layer_parts(a, b, 2.0, OffrayDraw("spectral", coefs=(0.5,), seed=1), 0)


# ----------------------------------------------------------------------------- pseudo-partners
class TinyClassifier(nn.Module):
    """model(**batch) -> {'loss': ...}, as a transformers classifier returns it."""

    def __init__(self, seed=0):
        super().__init__()
        self.peft = tiny_lora(seed)
        self.head = nn.Linear(40, 4)

    def forward(self, x, labels):
        return {"loss": nn.functional.cross_entropy(self.head(self.peft(x)), labels)}


def class_rows(num=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(num, 50, generator=g)
    return [{"x": x[i], "labels": torch.tensor(i % 4)} for i in range(num)]


def partner_deltas(folders):
    return [load_foreign_update(f).factors["lin"] for f in folders]


def test_pseudo_partners_are_deterministic_for_a_seed_and_leave_the_model_as_it_was(tmp_path):
    model = TinyClassifier()
    model.peft.base_model.model.lin.lora_A["default"].weight.requires_grad_(False)  # a state to be restored
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    state = copy.deepcopy(model.state_dict())
    folders = make_pseudo_partners(model, class_rows(), str(tmp_path / "a"), n=2, steps=5, seed=3, batch_size=8)
    assert [os.path.basename(f) for f in folders] == ["pseudo_partner_0", "pseudo_partner_1"]
    assert list(model.peft.peft_config) == ["default"] and model.peft.active_adapter == "default"
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())  # nothing of the model trained
    again = make_pseudo_partners(TinyClassifier(), class_rows(), str(tmp_path / "b"), n=2, steps=5, seed=3, batch_size=8)
    other = make_pseudo_partners(TinyClassifier(), class_rows(), str(tmp_path / "c"), n=1, steps=5, seed=4, batch_size=8)
    first, second, third = partner_deltas(folders), partner_deltas(again), partner_deltas(other)
    for (b1, a1), (b2, a2) in zip(first, second):
        assert torch.equal(b1, b2) and torch.equal(a1, a2)
    assert not torch.equal(first[0][0] @ first[0][1], first[1][0] @ first[1][1])  # two different partners
    assert not torch.equal(first[0][1], third[0][1])  # another seed, another partner
    # each was trained away from its initialisation (B starts at zero with peft's default init)
    assert all(b.norm() > 0 for b, _ in first)


def test_pseudo_partners_are_frozen_and_never_in_the_saved_adapter(tmp_out, tmp_path):
    model = TinyClassifier()
    folders = make_pseudo_partners(model, class_rows(), str(tmp_path / "pseudo"), n=1, steps=3, seed=0, batch_size=8)
    update = load_foreign_update(folders[0])
    assert not any(t.requires_grad for pair in update.factors.values() for t in pair)
    out = str(tmp_path / "released")
    model.peft.save_pretrained(out)
    saved = load_file(os.path.join(out, "adapter_model.safetensors"))
    assert saved and not any("pseudo" in key for key in saved)
    assert not any("pseudo" in name for name, _ in model.named_parameters())
    own = model.peft.base_model.model.lin.lora_A["default"].weight.detach()
    assert not torch.equal(update.factors["lin"][1], own)  # its own initialisation, not the protected adapter's


def test_pseudo_partner_arguments_are_checked_by_name(tmp_path):
    with pytest.raises(ValueError, match="n >= 1 and steps >= 1.*n=0"):
        make_pseudo_partners(TinyClassifier(), class_rows(), str(tmp_path), n=0)
    with pytest.raises(ValueError, match="no adapter 'other'"):
        make_pseudo_partners(TinyClassifier(), class_rows(), str(tmp_path), adapter="other")
    with pytest.raises(ValueError, match="needs a PEFT LoRA model.*get_peft_model"):
        make_pseudo_partners(Tiny(), class_rows(), str(tmp_path))


# ----------------------------------------------------------------------------- worst case over off-ray draws
def test_nominal_scale_partner_ascent_goes_to_the_lowest_loss_draw_of_the_pool(tmp_out):
    """Own update at weight 1 plus a synthetic partner at 0.2-1: of 3 drawn partners the step ascends only at the
    one where the loss is lowest, with the gradient of L(W0 + dW) - lambda_off * L(W0 + dW + tau*)."""
    dataset = token_dataset(8, ragged=True)
    model = llama_lora()
    reference = copy.deepcopy(model)
    settings = dict(
        trap_lambda=0.0, trap_mode="two_pass", trap_offray="synthetic", trap_offray_lambda=0.5,
        trap_offray_weight_min=1.0, trap_offray_weight_max=1.0, trap_foreign_coef_min=0.2, trap_foreign_coef_max=1.0,
        trap_offray_candidates=3, trap_candidate_fraction=1.0,
    )
    args = Trap2TrainingArguments(output_dir=tmp_out, max_steps=1, per_device_train_batch_size=8, **sgd_args(**settings))
    trainer = Trap2Trainer(model=model, args=args, train_dataset=dataset)
    pool = trainer.trap_offray_draws(0)
    assert len(pool) == 3 and all(d.weight == 1.0 and 0.2 <= d.coefs[0] <= 1.0 for d in pool)
    before = trainable_state(model)
    trainer.train()
    grads = step_gradients(before, model)

    batch = {k: torch.tensor(dataset[k]) for k in ("input_ids", "attention_mask", "labels")}
    reference.train()
    with torch.no_grad():
        losses = []
        for draw in pool:
            with offray_update(reference, draw):
                losses.append(reference(**batch).loss.item())
    worst = pool[min(range(3), key=lambda k: losses[k])]
    assert len(set(losses)) == 3  # the pick is not a tie
    params = {n: p for n, p in reference.named_parameters() if p.requires_grad}
    nominal = reference(**batch).loss
    with offray_update(reference, worst):
        at_partner = reference(**batch).loss
    expected = dict(zip(params, torch.autograd.grad(nominal - 0.5 * at_partner, list(params.values()))))
    assert_grads_close(grads, expected)
    logged = next(log for log in trainer.state.log_history if "trap/offray_candidate_min_loss" in log)
    assert logged["trap/offray_candidate_min_loss"] == pytest.approx(min(losses), rel=1e-5)


@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(trap_offray="synthetic", trap_offray_candidates=1, trap_offray_per_step=2),
         r"trap_offray_candidates must be 0 \(off\) or an integer >= trap_offray_per_step \(2\), got 1"),
        (dict(trap_offray="synthetic", trap_offray_candidates=2.5), "trap_offray_candidates must be an integer, got 2.5"),
        (dict(trap_offray_candidates=4), "trap_offray is empty. Set trap_offray"),
        (dict(trap_offray="spectral", trap_mode="sub_batch"), "use trap_mode='fused' or 'two_pass'"),
    ],
)
def test_partner_pool_settings_are_validated_by_name(settings, message):
    with pytest.raises(ValueError, match=message):
        Trap2Settings(**settings).validate_trap_settings()
