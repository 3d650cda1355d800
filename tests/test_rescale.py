"""Re-scaling must be exactly W0 + s*dW, checked against merged weights."""

import copy

import pytest
import torch
from peft.tuners.lora import LoraLayer
from peft import LoHaConfig, LoraConfig, PrefixTuningConfig, PromptTuningConfig, get_peft_model
from torch import nn

from conftest import tiny_llama
from trap2_hf import rescaled_adapter, rescaled_parameters, snapshot_parameters
from trap2_hf.rescale.full_at_scale import _InPlaceRescale

INPUT = torch.randint(0, 48, (2, 10), generator=torch.Generator().manual_seed(1))


def logits(model):
    model.eval()
    with torch.no_grad():
        return model(input_ids=INPUT).logits


def merged_model_at(peft_model, scale):
    """A plain model holding W0 + s*(W_merged - W0) in every adapted layer."""
    base_state = {k: v.clone() for k, v in peft_model.get_base_model().state_dict().items()}
    merged = copy.deepcopy(peft_model).merge_and_unload()
    state = merged.state_dict()
    for key, w in state.items():
        base_key = key
        # The base model of a PEFT model names the original weights ...base_layer.weight.
        candidates = [k for k in base_state if k.replace(".base_layer", "") == base_key]
        if candidates:
            w0 = base_state[candidates[0]]
            state[key] = w0 + scale * (w - w0)
    merged.load_state_dict(state)
    return merged


@pytest.mark.parametrize(
    "config",
    [
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False),
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "o_proj"], use_rslora=True, init_lora_weights=False),
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "up_proj"], use_dora=True, init_lora_weights=False),
        LoHaConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"], init_weights=False),
    ],
    ids=["lora", "rslora", "dora", "loha"],
)
@pytest.mark.parametrize("scale", [0.3, 1.7])
def test_rescaled_adapter_equals_rescaled_merged_weights(config, scale):
    model = get_peft_model(tiny_llama(), config)
    if getattr(config, "use_dora", False):
        with torch.no_grad():  # a magnitude that differs from the weight norm, so DoRA is not trivial
            for name, p in model.named_parameters():
                if "lora_magnitude_vector" in name:
                    p.mul_(1.3)
    expected = logits(merged_model_at(model, scale))
    before = logits(model)
    with rescaled_adapter(model, scale):
        got = logits(model)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(logits(model), before)  # restored


def test_rescaling_dora_b_is_not_the_weight_space_delta():
    """Why DoRA needs the weight-space path: scaling B (what the LoRA path does) gives other outputs."""
    model = get_peft_model(
        tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"], use_dora=True, init_lora_weights=False)
    )
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(1.5)
    expected = logits(merged_model_at(model, 0.3))
    for module in model.modules():
        if isinstance(module, LoraLayer):
            module.scaling["default"] *= 0.3
    assert (logits(model) - expected).abs().max() > 1e-3


def test_only_the_trained_adapter_is_rescaled():
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False))
    model.add_adapter("frozen", LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False))
    for name, p in model.named_parameters():
        p.requires_grad = ".default." in name
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    frozen_before = layer.scaling["frozen"]
    with rescaled_adapter(model, 0.5):
        assert layer.scaling["default"] == pytest.approx(0.5 * 2.0)  # lora_alpha 8 / r 4 = 2
        assert layer.scaling["frozen"] == frozen_before
    assert layer.scaling["default"] == pytest.approx(2.0)


def test_state_is_restored_when_the_body_raises():
    model = get_peft_model(
        tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"], use_dora=True, init_lora_weights=False)
    )
    before = logits(model)
    with pytest.raises(RuntimeError):
        with rescaled_adapter(model, 0.2):
            raise RuntimeError("boom")
    torch.testing.assert_close(logits(model), before)
    assert not any("forward" in m.__dict__ for m in model.modules())


def test_no_adapter_and_unsupported_tuners_are_refused():
    with pytest.raises(ValueError, match="no trainable or active PEFT adapter"):
        with rescaled_adapter(tiny_llama(), 0.5):
            pass
    prefix = get_peft_model(tiny_llama(), PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    prompt = get_peft_model(tiny_llama(), PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    for model, name in ((prefix, "PREFIX_TUNING"), (prompt, "PROMPT_TUNING")):
        with pytest.raises(NotImplementedError, match=rf"PEFT method {name} is not supported yet: it adds no weight"):
            with rescaled_adapter(model, 0.5):
                pass


ADAPTERS = {
    "lora": LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
    "dora": LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "up_proj"], use_dora=True, init_lora_weights=False),
    "loha": LoHaConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"], init_weights=False),
}


@pytest.mark.parametrize("kind", sorted(ADAPTERS))
def test_a_saved_adapter_loaded_for_use_rescales_as_the_model_that_trained_it(tmp_path, kind):
    """Loaded adapters are frozen: with no trained adapter, the active one is re-scaled (issue #36), through plain
    PEFT and through load_protected_adapter."""
    from peft import PeftModel

    from conftest import token_dataset
    from trap2_hf import Trap2Trainer, Trap2TrainingArguments, load_protected_adapter

    out = str(tmp_path / kind)
    model = get_peft_model(tiny_llama(), ADAPTERS[kind])
    args = Trap2TrainingArguments(output_dir=out, max_steps=2, per_device_train_batch_size=4, learning_rate=1e-2,
                                  use_cpu=True, report_to="none", save_strategy="no")
    trainer = Trap2Trainer(model=model, args=args, train_dataset=token_dataset(8))
    trainer.train()
    trainer.save_model()
    scales = (0.5, 1.0, 1.25)

    def curve(m):
        curve = {}
        for scale in scales:
            with rescaled_adapter(m, scale):
                curve[scale] = logits(m)
        return curve

    expected = curve(model)
    assert not torch.allclose(expected[0.5], expected[1.0])
    loaded = {
        "PeftModel.from_pretrained": PeftModel.from_pretrained(tiny_llama(), out),
        "load_protected_adapter": load_protected_adapter(tiny_llama(), out)[0],
    }
    for how, model_back in loaded.items():
        assert not any(p.requires_grad for p in model_back.parameters()), how
        for scale, values in curve(model_back).items():
            torch.testing.assert_close(values, expected[scale], msg=f"{how}, s={scale}")


def test_rescaled_parameters_values_and_gradients():
    torch.manual_seed(0)
    layer = nn.Linear(3, 2)
    theta0 = {k: v + torch.randn_like(v) for k, v in snapshot_parameters(layer).items()}
    theta = {k: v.detach().clone() for k, v in layer.named_parameters()}
    x = torch.randn(4, 3)
    with rescaled_parameters(layer, 0.4, theta0):
        for k, p in layer.named_parameters():
            torch.testing.assert_close(p.data, theta0[k] + 0.4 * (theta[k] - theta0[k]))
        layer(x).pow(2).sum().backward()
    # Direct: d/dtheta of f(theta0 + s*(theta - theta0)).
    w = theta["weight"].clone().requires_grad_()
    b = theta["bias"].clone().requires_grad_()
    out = x @ (theta0["weight"] + 0.4 * (w - theta0["weight"])).T + theta0["bias"] + 0.4 * (b - theta0["bias"])
    out.pow(2).sum().backward()
    torch.testing.assert_close(layer.weight.grad, w.grad)
    torch.testing.assert_close(layer.bias.grad, b.grad)
    for k, p in layer.named_parameters():
        assert torch.equal(p.data, theta[k])  # restored bit for bit


def test_snapshot_offload_and_dtype():
    snap = snapshot_parameters(nn.Linear(3, 2), device="cpu", dtype="bfloat16")
    assert all(t.dtype == torch.bfloat16 and t.device.type == "cpu" for t in snap.values())


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("scale", [0.001, 0.05, 0.7, 1.3, 2.0])
def test_full_rescaling_is_in_place_and_restores_bit_for_bit(dtype, scale):
    """theta0 + s*(theta - theta0) is written into the parameter's own storage (no second copy of the weights),
    and theta comes back exactly, sign changes and values near zero included, in every float dtype."""
    torch.manual_seed(0)
    layer = nn.Linear(300, 200).to(dtype)
    theta0 = {k: (v.float() + 0.05 * torch.randn_like(v.float())).to(dtype) for k, v in layer.state_dict().items()}
    theta0["weight"][0, :20] = -layer.weight.data[0, :20]  # crossing zero: the residual does not fit a byte
    with torch.no_grad():  # signed zeros and subnormals, whose inverse may come back with the other sign
        layer.weight[1, :10], layer.weight[1, 10:20] = 0.0, -0.0
        layer.weight[1, 20:30] = torch.finfo(dtype).tiny * torch.linspace(-0.5, 0.5, 10)
    theta = {k: v.detach().clone() for k, v in layer.named_parameters()}
    storage = {k: p.data.data_ptr() for k, p in layer.named_parameters()}
    with rescaled_parameters(layer, scale, theta0):
        for k, p in layer.named_parameters():
            assert p.data.data_ptr() == storage[k]
            assert torch.equal(p.data, torch.lerp(theta0[k], theta[k], scale))
    for k, p in layer.named_parameters():
        assert torch.equal(p.data, theta[k]) and p.data.data_ptr() == storage[k]
        assert torch.equal(torch.signbit(p.data), torch.signbit(theta[k]))  # -0.0 stays -0.0


def test_full_rescaling_keeps_a_byte_per_element_besides_theta0():
    weights = torch.randn(1000, 100)
    theta0 = weights + 0.01 * torch.randn_like(weights)
    state = _InPlaceRescale(weights, theta0, 0.3)
    kept = sum(r.numel() * r.element_size() for r in state.residuals)
    kept += sum(w.numel() * 8 + v.numel() * v.element_size() for _, w, v in state.exceptions)
    assert kept < 0.3 * weights.numel() * weights.element_size()  # one byte per fp32 element, and a few exact values
    state.restore()
