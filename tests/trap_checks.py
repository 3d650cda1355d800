"""Direct (trainer-free) computation of the Trap² gradient, to check the trainers against."""

import torch
from peft.tuners.lora import LoraLayer
from torch.func import functional_call

from trap2_hf.objective import scale_weight


def sgd_args(**overrides):
    """Arguments under which one optimizer step moves each parameter by exactly -grad."""
    args = dict(
        optim="sgd",
        learning_rate=1.0,
        lr_scheduler_type="constant",
        max_grad_norm=0.0,
        weight_decay=0.0,
        report_to="none",
        use_cpu=True,
        seed=7,
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
    )
    args.update(overrides)
    return args


def trainable_state(model):
    return {k: p.detach().clone() for k, p in model.named_parameters() if p.requires_grad}


def step_gradients(before, model):
    after = trainable_state(model)
    return {k: before[k] - after[k] for k in before}


def lora_effective_weights(peft_model, scale, factors):
    """{base weight name: W0 + s*dW} for a LoRA/DoRA PEFT model, built from leaf `factors`."""
    weights = {}
    for name, module in peft_model.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        key = name.removeprefix("base_model.model.") + ".weight"
        w0 = module.get_base_layer().weight.detach()
        a, b = factors[f"{name}.lora_A.default.weight"], factors[f"{name}.lora_B.default.weight"]
        w_adapted = w0 + module.scaling["default"] * (b @ a)
        magnitude_key = f"{name}.lora_magnitude_vector.default.weight"
        if magnitude_key in factors:
            norm = w_adapted.norm(dim=1, keepdim=True).detach()  # peft detaches the DoRA norm
            w_adapted = factors[magnitude_key].view(-1, 1) * w_adapted / norm
        weights[key] = w0 + scale * (w_adapted - w0)
    return weights


def direct_lora_gradients(peft_model, base_model, batch, scales, trap_lambda, weighting):
    """grad of L(1) - lambda * mean_k w(s_k) L(s_k) w.r.t. the adapter's factors (names as in peft_model)."""
    factors = {name: p.detach().clone().requires_grad_() for name, p in peft_model.named_parameters() if p.requires_grad}

    def loss_at(scale):
        weights = lora_effective_weights(peft_model, scale, factors)
        return functional_call(base_model, weights, kwargs=batch).loss

    joint = loss_at(1.0)
    for s in scales:
        joint = joint - trap_lambda * scale_weight(s, weighting) * loss_at(s) / len(scales)
    grads = torch.autograd.grad(joint, list(factors.values()))
    return dict(zip(factors, grads))


def direct_full_gradients(model, theta0, batch, scales, trap_lambda, weighting):
    theta = {k: p.detach().clone().requires_grad_() for k, p in model.named_parameters() if p.requires_grad}

    def loss_at(scale):
        return functional_call(model, {k: theta0[k] + scale * (v - theta0[k]) for k, v in theta.items()}, kwargs=batch).loss

    joint = loss_at(1.0)
    for s in scales:
        joint = joint - trap_lambda * scale_weight(s, weighting) * loss_at(s) / len(scales)
    grads = torch.autograd.grad(joint, list(theta.values()))
    return dict(zip(theta, grads))


def assert_grads_close(got, expected, rtol=2e-4, atol=1e-6):
    assert set(got) == set(expected)
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=rtol, atol=atol, msg=lambda m: f"{key}: {m}")


def exact_trap_args(**overrides):
    """sgd_args for Trap2 arguments, with the reference step (trap_mode='two_pass') unless told otherwise:
    the gradient checks compare against the exact objective, which 'auto' only estimates where it fuses."""
    return sgd_args(**{"trap_mode": "two_pass", **overrides})

