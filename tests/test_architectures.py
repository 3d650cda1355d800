"""The architecture matrix (tests/arch_table.py: families x release formats), from tiny random configs.

Per cell: one real Trainer step in two_pass and in the mode trap_mode='auto' picks (at f = 1, where fused and
sub_batch are exact) equals the direct gradient of L(1) - lambda * mean_k w(s_k) L(s_k), computed here from the
weights W0 + s*dW (adapters: peft's own delta weights; full: theta0 + s*(theta - theta0)) without trap2_hf's
re-scaling code; auto picks what `python -m tests.arch_table` prints (docs/architectures.md's table); an adapter
goes through save -> card -> load_protected_adapter unchanged. Per family: the audit runs one merge method on the
trained adapter.
"""

import copy
import os

import pytest
import torch
from peft.tuners.lora import LoraLayer
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils.other import ModulesToSaveWrapper
from torch.func import functional_call

from arch_table import FAMILIES, FORMATS, auto_choice, build_model, dataset, family, rows
from trap_checks import assert_grads_close, direct_full_gradients, exact_trap_args, step_gradients, trainable_state
from trap2_hf import Trap2Trainer, Trap2TrainingArguments, load_protected_adapter
from trap2_hf.objective import scale_weight

SETTINGS = dict(trap_lambda=0.3, trap_scales_per_step=2, trap_scale_sampling="stratified")
PREFIX = "base_model.model."


def adapted_weights(peft_model, scale: float) -> dict[str, torch.Tensor]:
    """{base parameter name: W0 + s*(W_adapted - W0)} for every adapted layer, differentiable in the adapter's
    parameters: peft's get_delta_weight (fan_in_fan_out, LoHa included), DoRA's m * (W0 + dW) / ||W0 + dW||
    (the norm detached, as peft does), and modules_to_save copies blended parameter by parameter."""
    weights = {}
    for name, module in peft_model.named_modules():
        key = name.removeprefix(PREFIX)
        if isinstance(module, ModulesToSaveWrapper):
            original = dict(module.original_module.named_parameters())
            for param_name, param in module.modules_to_save["default"].named_parameters():
                w0 = original[param_name].detach()
                weights[f"{key}.{param_name}"] = w0 + scale * (param - w0)
            continue
        if not isinstance(module, BaseTunerLayer):
            continue
        w0 = module.get_base_layer().weight.detach()
        delta = module.get_delta_weight("default")
        adapted = w0 + delta
        if isinstance(module, LoraLayer) and "default" in module.lora_magnitude_vector:
            transpose = module.fan_in_fan_out
            oriented = adapted.T if transpose else adapted
            norm = oriented.norm(p=2, dim=1, keepdim=True).detach()
            magnitude = module.lora_magnitude_vector["default"].weight.view(-1, 1)
            oriented = magnitude * oriented / norm
            adapted = oriented.T if transpose else oriented
        weights[f"{key}.weight"] = w0 + scale * (adapted - w0)
    return weights


def direct_adapter_gradients(peft_model, base_model, batch, scales, trap_lambda, weighting):
    """grad of L(1) - lambda * mean_k w(s_k) L(s_k) w.r.t. the adapter's trainable parameters."""
    model = copy.deepcopy(peft_model)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}

    def loss_at(scale):
        return functional_call(base_model, adapted_weights(model, scale), kwargs=batch).loss

    joint = loss_at(1.0)
    for s in scales:
        joint = joint - trap_lambda * scale_weight(s, weighting) * loss_at(s) / len(scales)
    return dict(zip(params, torch.autograd.grad(joint, list(params.values()))))


def theta0_away_from(model, seed: int = 3) -> dict[str, torch.Tensor]:
    """An explicit theta0 off the current weights, so theta0 + s*(theta - theta0) is not trivial at step one."""
    g = torch.Generator().manual_seed(seed)
    return {k: p.detach() + 0.05 * torch.randn(p.shape, generator=g) for k, p in model.named_parameters()}


def one_step(model, out, fam, mode, fmt, theta0=None):
    fraction = {} if mode == "two_pass" else {"trap_rescaled_fraction": 1.0}
    args = Trap2TrainingArguments(
        output_dir=out, max_steps=1, per_device_train_batch_size=len(dataset(fam)),
        **exact_trap_args(trap_mode=mode, trap_target="full" if fmt == "full" else "adapter", **SETTINGS, **fraction),
    )
    trainer = Trap2Trainer(model=model, args=args, train_dataset=dataset(fam), trap_reference=theta0)
    before = trainable_state(model)
    trainer.train()
    return trainer, step_gradients(before, model)


CELLS = [(fam.name, fmt) for fam in FAMILIES for fmt in FORMATS]


@pytest.mark.parametrize("name, fmt", CELLS, ids=[f"{n}-{f}" for n, f in CELLS])
def test_cell_step_equals_the_direct_gradient(tmp_path, name, fmt):
    fam = family(name)
    chosen, reason = auto_choice(fam, fmt)
    if chosen == "refused by PEFT":
        with pytest.raises(Exception):
            build_model(fam, fmt)
        pytest.skip(f"PEFT refuses {fmt} on {name}: {reason}")
    model = build_model(fam, fmt)
    if "router loss" in fam.name and fmt not in ("DoRA", "LoHa"):
        assert chosen == "two_pass" and "router loss" in reason  # refused by name: not a sum over rows
    elif fmt == "LoRA":
        assert chosen == "fused", reason  # every family here with plain LoRA fuses
    elif fmt == "full":
        assert chosen in ("sub_batch", "fused"), reason
    else:
        assert chosen == "two_pass" and "plain LoRA" in reason
    theta0 = theta0_away_from(model) if fmt == "full" else None
    batch = rows(fam)
    expected = None
    for mode in dict.fromkeys(["two_pass", "auto"]):
        trial = copy.deepcopy(model)
        trainer, grads = one_step(trial, str(tmp_path / mode), fam, mode, fmt, theta0)
        assert trainer.args.trap_mode == (chosen if mode == "auto" else "two_pass")
        if expected is None:
            scales = trainer.trap_scales(0)
            # The loss as the Trainer normalises it: GPT-2's LMHeadModel has no loss_type, so transformers' Trainer
            # counts position 0 of each row in num_items_in_batch though the shifted loss never sees it.
            items = trainer._get_num_items_in_batch([batch], "cpu")
            batch = batch if items is None else {**batch, "num_items_in_batch": items}
            if fmt == "full":
                expected = direct_full_gradients(copy.deepcopy(model), theta0, batch, scales, 0.3, "inv")
            else:
                expected = direct_adapter_gradients(model, fam.build(0), batch, scales, 0.3, "inv")
            assert max(g.abs().max() for g in expected.values()) > 0
        rtol = 2e-3 if fmt == "full" else 2e-4  # full: every parameter, sums over more terms
        assert_grads_close(grads, expected, rtol=rtol, atol=2e-6)
    if fmt != "full":
        out = str(tmp_path / "saved")
        trainer.save_model(out)
        loaded, facts = load_protected_adapter(fam.build(0), out)
        assert facts["trap_mode"] == chosen
        trained = {k.replace(".default", ""): v for k, v in trainable_state(trial).items()}
        got = {k.replace(".default", ""): v for k, v in loaded.named_parameters() if k.replace(".default", "") in trained}
        assert set(got) == set(trained)
        for key in trained:
            torch.testing.assert_close(got[key], trained[key], rtol=0, atol=0)


@pytest.mark.parametrize("name", [fam.name for fam in FAMILIES])
def test_audit_runs_one_method_on_each_family(name):
    """task_arithmetic over two LoRA adapters of the family: every entry a metric in [0, 1], the adapter alone 1.0."""
    from peft import get_peft_model

    from arch_table import peft_config
    from trap2_hf.audit import AuditTask, run_audit

    fam = family(name)
    config = peft_config(fam, "LoRA")
    model = get_peft_model(fam.build(0), config, adapter_name="prot")
    model.add_adapter("other", config)
    batch = {k: v for k, v in rows(fam, seed=5).items() if k != "labels" or fam.kind == "seq2seq"}
    model.eval()
    targets = {}
    with torch.no_grad():
        for adapter in ("prot", "other"):
            model.set_adapter(adapter)
            targets[adapter] = model(**batch).logits.argmax(-1)
    model.set_adapter("prot")

    def task(adapter):
        def evaluate(m, split):
            with torch.no_grad():
                return (m(**batch).logits.argmax(-1) == targets[adapter]).float().mean().item()

        return AuditTask(adapter, evaluate, chance=0.0)

    results = run_audit(
        model, [task("prot"), task("other")], "prot", "prot", None, {"other": "other"},
        methods=["task_arithmetic"], modes=("average",), sweep_scales=(0.5, 1.0), progress=False,
    )
    assert results["standalone"]["protected"] == 1.0
    assert [e["method"] for e in results["methods"]] == ["task_arithmetic"]
    merged = results["methods"][0]["protected"]
    assert all(0.0 <= merged[t] <= 1.0 for t in ("prot", "other"))


# ----------------------------------------------------------------------------- fused: where the row rule is checked
def test_fused_checks_its_row_losses_against_the_models_own_loss(tmp_path, caplog):
    """BartForCausalLM has loss_type 'ForCausalLM' but computes an unshifted token mean of its own: the first fused
    micro-batch finds the mismatch before any backward; auto goes on in two_pass (exact), fused refuses by name."""
    from peft import LoraConfig, get_peft_model
    from transformers import BartConfig, BartForCausalLM

    def model():
        torch.manual_seed(0)
        config = BartConfig(
            vocab_size=48, d_model=32, decoder_layers=1, decoder_attention_heads=4, decoder_ffn_dim=64,
            max_position_embeddings=64, dropout=0.0, is_decoder=True, is_encoder_decoder=False,
        )
        lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
        return get_peft_model(BartForCausalLM(config), lora)

    fam = family("Llama")  # the same token rows
    with caplog.at_level("WARNING"):
        auto, auto_grads = one_step(model(), str(tmp_path / "auto"), fam, "auto", "LoRA")
    assert auto.args.trap_mode == "two_pass"
    assert "switches from 'fused' to 'two_pass'" in caplog.text and "own loss" in caplog.text
    _, two_pass = one_step(model(), str(tmp_path / "two_pass"), fam, "two_pass", "LoRA")
    assert_grads_close(auto_grads, two_pass)
    with pytest.raises(NotImplementedError, match="BartForCausalLM's own loss .* is not the sum of the per-row losses"):
        one_step(model(), str(tmp_path / "fused"), fam, "fused", "LoRA")


def test_docs_table_is_the_generated_one():
    """docs/architectures.md's table is `markdown_table()`, as `python docs/generate.py` writes it."""
    from arch_table import markdown_table

    page = open(os.path.join(os.path.dirname(__file__), os.pardir, "docs", "architectures.md"), encoding="utf-8").read()
    assert markdown_table() in page, "docs/architectures.md is not current: run PYTHONPATH=. python docs/generate.py"


@pytest.mark.parametrize("name, scales", [("GPT-2", 2), ("T5", 2), ("ViT classifier", 2), ("ViT classifier", 1)])
def test_fused_keeps_each_models_normalisation_under_accumulation(tmp_path, name, scales):
    """2 x 2 accumulation: auto (fused, f = 1) equals two_pass, whether the model's loss divides by the step's
    num_items_in_batch (GPT-2, ViT's classification loss) or by its own micro-batch's items (T5). With one scale
    the fused micro-batch's 4 rows are as many as the step's num_items_in_batch: the check still tells them apart."""
    fam = family(name)
    model = build_model(fam, "LoRA")
    grads = {}
    for mode in ("two_pass", "auto"):
        fraction = {} if mode == "two_pass" else {"trap_rescaled_fraction": 1.0}
        settings = {**SETTINGS, "trap_scales_per_step": scales}
        args = Trap2TrainingArguments(
            output_dir=str(tmp_path / mode), max_steps=1, per_device_train_batch_size=2, gradient_accumulation_steps=2,
            **exact_trap_args(trap_mode=mode, **settings, **fraction),
        )
        trial = copy.deepcopy(model)
        trainer = Trap2Trainer(model=trial, args=args, train_dataset=dataset(fam))
        before = trainable_state(trial)
        trainer.train()
        assert trainer.args.trap_mode == ("two_pass" if mode == "two_pass" else "fused")
        grads[mode] = step_gradients(before, trial)
    assert_grads_close(grads["auto"], grads["two_pass"])
