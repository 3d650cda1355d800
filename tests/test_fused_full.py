"""The fused step on a full fine-tune (rescale/full_per_row.py): each copied row computes with theta0 + s*(theta - theta0),
so with every row copied (f = 1) its gradient is two_pass's, and below 1 it is sub_batch's on the same rows."""

import contextlib
import copy

import pytest
import torch
from datasets import Dataset
import torch.nn.functional as F
from torch import nn

from conftest import VOCAB, text_dataset, tiny_llama, tiny_tokenizer, token_dataset
from test_modes import TWO_SCALES, auto_trainer, train
from trap_checks import assert_grads_close
from trap2_hf import Trap2SFTConfig, Trap2SFTTrainer, Trap2Trainer, Trap2TrainingArguments, rescaled_parameters
from trap2_hf.rescale import RowGroups, full_row_targets, rescaled_parameters_per_row
from trap2_hf import updates
from trap2_hf.rescale import split_in_place, swapped_parameters


def tiny_gpt2():
    """GPT-2: Conv1D layers, learned positions shared by all rows (ids of shape (1, T)), lm_head tied to wte."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, resid_pdrop=0.0,
                        embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=1, eos_token_id=2)
    model = GPT2LMHeadModel(config)
    model.loss_type = "ForCausalLM"  # what transformers falls back to for GPT-2 (its class name does not say)
    return model


def minilm_classifier():
    """The MiniLM (BERT) encoder the demo ships, with a 3-way classification head; dropout off."""
    from transformers import BertForSequenceClassification

    from trap2_hf.demo.model import minilm_path

    torch.manual_seed(0)
    return BertForSequenceClassification.from_pretrained(
        minilm_path(), num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0
    )


def classification_dataset(num: int = 8) -> Dataset:
    ids = torch.randint(1000, 2000, (num, 10), generator=torch.Generator().manual_seed(0))
    return Dataset.from_dict(
        {"input_ids": ids.tolist(), "attention_mask": [[1] * 10] * num, "labels": (ids[:, 0] % 3).tolist()}
    )


MODELS = {
    "llama": (tiny_llama, lambda: token_dataset(8, ragged=True)),
    "gpt2": (tiny_gpt2, lambda: token_dataset(8, ragged=True)),
    "minilm_classifier": (minilm_classifier, classification_dataset),
}


def away_from(model, seed: int = 3, size: float = 0.05) -> dict[str, torch.Tensor]:
    """A theta0 away from the current weights, so theta0 + s*(theta - theta0) is not theta."""
    generator = torch.Generator().manual_seed(seed)
    return {
        name: p.detach() + size * torch.randn(p.shape, generator=generator)
        for name, p in model.named_parameters()
        if p.requires_grad
    }


def full_step(model, out, dataset, theta0, **settings):
    """One SGD step of a full fine-tune from the given theta0: (trainer, gradients)."""
    original = Trap2Trainer.__init__

    def with_theta0(self, *args, **kwargs):
        original(self, *args, trap_reference=theta0, **kwargs)

    Trap2Trainer.__init__ = with_theta0
    try:
        trainer, grads, _ = train(model, out, dataset, 8, trap_target="full", trap_lambda=0.3, **settings)
    finally:
        Trap2Trainer.__init__ = original
    return trainer, grads


def assert_relative_error(got, expected, limit):
    """||got - expected|| / ||expected|| over all parameters at most `limit`, and each tensor close: the gradients
    are read back as the change of fp32 weights under SGD with lr 1, exact to ~1e-7 of each weight, which
    dominates where a tensor's gradient is far smaller than its weights (norms' gains)."""
    difference = torch.cat([(got[key] - expected[key]).flatten() for key in expected])
    assert difference.norm() <= limit * torch.cat([g.flatten() for g in expected.values()]).norm()
    assert_grads_close(got, expected)


@pytest.mark.parametrize("name", list(MODELS))
def test_every_row_copied_equals_two_pass(tmp_out, name):
    make_model, make_dataset = MODELS[name]
    model, dataset = make_model(), make_dataset()
    theta0 = away_from(model)
    twin = copy.deepcopy(model)
    fused, fused_grads = full_step(
        model, tmp_out + "a", dataset, theta0, trap_mode="fused", trap_rescaled_fraction=1.0, **TWO_SCALES
    )
    two_pass, two_pass_grads = full_step(twin, tmp_out + "b", dataset, theta0, **TWO_SCALES)
    assert fused.args.trap_mode == "fused" and two_pass.args.trap_mode == "two_pass"
    assert_relative_error(fused_grads, two_pass_grads, 1e-5)
    for key in ("loss", "trap/nominal_loss", "trap/rescaled_loss"):
        assert fused.state.log_history[0][key] == pytest.approx(two_pass.state.log_history[0][key], rel=1e-5)


def test_part_of_the_rows_with_accumulation_equals_sub_batch_on_the_same_rows(tmp_out):
    model, dataset = tiny_llama(), token_dataset(8, ragged=True)
    theta0 = away_from(model)
    twin = copy.deepcopy(model)
    settings = dict(trap_rescaled_fraction=0.5, **TWO_SCALES)
    original = Trap2Trainer.__init__

    def with_theta0(self, *args, **kwargs):
        original(self, *args, trap_reference=theta0, **kwargs)

    grads = {}
    Trap2Trainer.__init__ = with_theta0
    try:
        for mode, net in (("fused", model), ("sub_batch", twin)):
            trainer, grads[mode], _ = train(
                net, f"{tmp_out}/{mode}", dataset, 4, accumulation=2, trap_target="full", trap_lambda=0.3,
                trap_mode=mode, **settings,
            )
            assert trainer.args.trap_mode == mode
    finally:
        Trap2Trainer.__init__ = original
    rows = [trainer.trap_rows(4, step=0, micro_batch=m) for m in range(2)]
    assert 0 < sum(len(r) for batch in rows for r in batch) < 16  # some rows re-scaled, not all
    assert_relative_error(grads["fused"], grads["sub_batch"], 1e-5)


@pytest.mark.parametrize("scale", [0.4, 1.5])
def test_swapped_parameters_give_the_in_place_gradient_and_leave_theta_untouched(scale):
    model, batch = tiny_llama(), {k: torch.tensor(v) for k, v in token_dataset(4).to_dict().items()}
    theta0 = away_from(model)
    before = {n: (p.detach().clone(), p.data_ptr()) for n, p in model.named_parameters()}
    grads = {}
    for name, context in (("in_place", rescaled_parameters), ("swapped", swapped_parameters)):
        model.zero_grad(set_to_none=True)
        with context(model, scale, theta0):
            model(**batch).loss.backward()
        grads[name] = {n: p.grad.clone() for n, p in model.named_parameters()}
        for n, p in model.named_parameters():  # theta bit for bit, in its own storage, no hook left
            assert torch.equal(p.detach(), before[n][0]) and p.data_ptr() == before[n][1], n
            assert not p._backward_hooks, n
    assert_grads_close(grads["swapped"], grads["in_place"])
    # theta0 kept in bfloat16 (trap_reference_dtype) is up-cast per parameter
    model.zero_grad(set_to_none=True)
    with swapped_parameters(model, scale, {n: t.bfloat16() for n, t in theta0.items()}):
        model(**batch).loss.backward()
    difference = torch.cat([(p.grad - grads["in_place"][n]).flatten() for n, p in model.named_parameters()])
    assert 0 < difference.norm() <= 0.02 * torch.cat([g.flatten() for g in grads["in_place"].values()]).norm()


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "activation_checkpointing"])
def test_sub_batch_copies_the_weights_only_for_passes_over_a_quarter_of_the_rows(tmp_out, monkeypatch, checkpointing):
    """auto's passes over a quarter of the rows or fewer form theta_s in a swapped-in copy (fastest); larger passes,
    and every pass under activation checkpointing (there to save memory), form it module by module. The gradient
    is the same either way: fused's on the same rows."""
    model, dataset = tiny_llama(), token_dataset(8, ragged=True)
    theta0 = away_from(model)
    twin = copy.deepcopy(model)
    swapped_rows, original = [], updates.swapped_parameters

    def counting(model, scale, reference):
        swapped_rows.append(scale)
        return original(model, scale, reference)

    monkeypatch.setattr(updates, "swapped_parameters", counting)
    settings = dict(trap_rescaled_fraction=0.25, activation_checkpointing=checkpointing, **TWO_SCALES)
    sub_batch, grads = full_step(model, tmp_out + "a", dataset, theta0, trap_mode="sub_batch", **settings)
    fused, fused_grads = full_step(twin, tmp_out + "b", dataset, theta0, trap_mode="fused", **settings)
    sizes = [len(r) for r in sub_batch.trap_rows(8, step=0, micro_batch=0)]
    assert sum(sizes) == 4  # 2 scales x 8 rows x 0.25
    quarter = [s for s, n in zip(sub_batch.trap_scales(0), sizes) if 0 < n <= 2]
    assert sorted(sizes) == [1, 3]  # this seed's draw: one pass copies the weights, the other does not
    assert swapped_rows == ([] if checkpointing else quarter)
    assert_relative_error(grads, fused_grads, 1e-5)


@pytest.mark.parametrize("name", list(MODELS))
def test_each_row_computes_at_its_own_scale(name):
    make_model, make_dataset = MODELS[name]
    model = make_model().eval()
    theta0 = away_from(model, size=0.2)
    batch = {k: torch.tensor(v) for k, v in make_dataset()[:3].items() if k != "labels"}
    copies = torch.tensor([0, 2, 1])  # rows 0-2 at theta; row 0 and row 2 at 0.3, row 1 at 1.7
    scales = [0.3, 0.3, 1.7]
    groups = RowGroups.of_copies(3, torch.tensor([0, 0, 1]), [0.3, 1.7])
    assert groups.sizes == (3, 2, 1)
    fused = {k: torch.cat([v, v[copies]]) for k, v in batch.items()}
    with torch.no_grad(), rescaled_parameters_per_row(model, groups, theta0):
        got = model(**fused).logits
    with torch.no_grad():
        expected = [model(**batch).logits]
        for scale in (0.3, 1.7):
            with rescaled_parameters(model, scale, theta0):
                expected.append(model(**batch).logits)
    torch.testing.assert_close(got[:3], expected[0], rtol=1e-5, atol=1e-5)
    for j, (row, scale) in enumerate(zip(copies.tolist(), scales)):
        at_scale = expected[1 if scale == pytest.approx(0.3) else 2]
        torch.testing.assert_close(got[3 + j], at_scale[row], rtol=1e-4, atol=1e-5)
    assert not any("forward" in vars(m) for m in model.modules())  # every patched forward restored


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16_autocast"])
@pytest.mark.parametrize("sizes", [(3, 2, 1), (0, 2, 3)], ids=["with_nominal_rows", "copies_only"])
def test_grouped_linear_matches_a_linear_per_group(sizes, autocast):
    """Output and gradients (input, weight, bias) of the grouped Linear: those of F.linear at each group's
    theta_s = lerp(theta0, theta, s), concatenated, with the parameters' gradient through lerp (s per group)."""
    torch.manual_seed(0)
    layer = nn.Linear(5, 4)
    theta0 = away_from(layer, size=0.3)
    scales = [0.4, 1.6]
    groups = RowGroups.of_copies(sizes[0], torch.tensor([0] * sizes[1] + [1] * sizes[2]), scales)
    x = torch.randn(sum(sizes), 3, 5, requires_grad=True)
    grad_out = torch.randn(sum(sizes), 3, 4)
    context = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if autocast else contextlib.nullcontext
    with context(), rescaled_parameters_per_row(layer, groups, theta0):
        got = layer(x)
    got_grads = torch.autograd.grad(got, [x, layer.weight, layer.bias], grad_out.to(got.dtype))
    parts, start = [], 0
    for g, size in enumerate(sizes):
        scale = 1.0 if g == 0 else scales[g - 1]
        weight = torch.lerp(theta0["weight"], layer.weight, scale)
        bias = torch.lerp(theta0["bias"], layer.bias, scale)
        with context():
            parts.append(F.linear(x[start:start + size], weight, bias))
        start += size
    expected = torch.cat(parts)
    expected_grads = torch.autograd.grad(expected, [x, layer.weight, layer.bias], grad_out.to(expected.dtype))
    assert got.dtype == expected.dtype == (torch.bfloat16 if autocast else torch.float32)
    tolerance = dict(rtol=2e-2, atol=2e-2) if autocast else dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got, expected, **tolerance)
    for mine, reference in zip(got_grads, expected_grads):
        assert mine.dtype == reference.dtype
        torch.testing.assert_close(mine, reference, **tolerance)


class ExpGain(nn.Module):
    """A trainable layer that is not affine in its parameter: x * exp(g)."""

    def __init__(self, size: int):
        super().__init__()
        self.gain = nn.Parameter(torch.zeros(size))

    def forward(self, x):
        return x * self.gain.exp()


def llama_with_exp_gain():
    model = tiny_llama()
    model.model.norm = nn.Sequential(model.model.norm, ExpGain(32))
    return model


def llama_with_weight_norm():
    model = tiny_llama()
    model.lm_head = torch.nn.utils.parametrizations.weight_norm(model.lm_head)
    return model


@pytest.mark.parametrize(
    "make_model, settings, on_the_fly",
    [
        (tiny_llama, {}, True),
        (tiny_gpt2, {}, True),
        (llama_with_exp_gain, {}, False),  # a module not known to be affine in its parameters
        (llama_with_weight_norm, {}, False),  # a parametrization
        (tiny_llama, {"trap_reference_device": "cpu"}, False),  # theta0 offloaded
    ],
    ids=["llama", "gpt2", "non_affine_module", "weight_norm", "theta0_offloaded"],
)
def test_re_scaled_passes_form_theta_s_on_the_fly_only_where_exact(tmp_out, make_model, settings, on_the_fly):
    """auto (sub_batch) and two_pass form theta_s module by module (RowGroups.at_scale) where every trainable
    parameter sits in a known module; elsewhere they write it into the weights (rescale.rescaled_parameters)."""
    _, trainer = auto_trainer(tmp_out, make_model(), trap_target="full", **settings)
    assert (trainer.args.trap_mode, trainer.args.trap_rescaled_fraction) == ("sub_batch", 0.25)
    assert (trainer.trap_step.pass_row_targets is not None) == on_the_fly


def test_fused_full_refuses_what_it_cannot_run_exactly(tmp_out):
    with pytest.raises(NotImplementedError, match=r"model\.norm\.1 \(ExpGain\).*trap_mode='sub_batch'"):
        full_row_targets(llama_with_exp_gain())
    args = Trap2TrainingArguments(output_dir=tmp_out, report_to="none", use_cpu=True, trap_mode="fused",
                                  trap_target="full")
    with pytest.raises(NotImplementedError, match="ExpGain"):
        Trap2Trainer(model=llama_with_exp_gain(), args=args, train_dataset=token_dataset(4))
    with pytest.raises(ValueError, match="trap_reference_device='cpu'.*'sub_batch'"):
        Trap2TrainingArguments(output_dir=tmp_out, report_to="none", trap_mode="fused", trap_target="full",
                               trap_reference_device="cpu")
    sft_args = Trap2SFTConfig(output_dir=tmp_out, report_to="none", use_cpu=True, bf16=False, trap_mode="fused",
                              trap_target="full")
    with pytest.raises(ValueError, match="TRL's fused LM head reads lm_head.weight.*'sub_batch'"):
        Trap2SFTTrainer(model=tiny_llama(), args=sft_args, train_dataset=text_dataset(4),
                        processing_class=tiny_tokenizer())


class ReadsAnotherLayersWeight(nn.Module):
    """The final norm plus a term that reads `side.weight` directly: `side` holds trainable parameters but never
    runs as a module, so theta_s formed module by module would miss them."""

    def __init__(self, norm: nn.Module, side: nn.Linear):
        super().__init__()
        self.norm, self.side = norm, side

    def forward(self, hidden_states):
        return self.norm(hidden_states) + 0.5 * torch.nn.functional.linear(hidden_states, self.side.weight)


def llama_reading_a_weight_directly():
    model = tiny_llama()
    torch.manual_seed(1)
    model.model.norm = ReadsAnotherLayersWeight(model.model.norm, nn.Linear(32, 32, bias=False))
    return model


def test_split_in_place_takes_modules_tied_to_an_in_place_parameter():
    """A module sharing a parameter with one read outside its forward cannot form theta_s from that parameter,
    which then holds theta_s already: it runs in place too, with its other parameters."""
    model = tiny_gpt2()  # lm_head.weight is wte.weight
    targets = full_row_targets(model)
    kept, in_place = split_in_place(model, targets, ["lm_head"])
    assert {name for name, _, _ in targets} - {name for name, _, _ in kept} == {"lm_head", "transformer.wte"}
    assert in_place == ("transformer.wte.weight",)  # named once, as named_parameters names tied weights


def test_parameters_read_outside_their_module_alone_are_re_scaled_in_place(tmp_out, caplog):
    from trap_checks import direct_full_gradients

    model, dataset = llama_reading_a_weight_directly(), token_dataset(8, ragged=True)
    theta0 = away_from(model)
    reference = copy.deepcopy(model)
    with caplog.at_level("INFO"):
        trainer, grads = full_step(model, tmp_out, dataset, theta0, **TWO_SCALES)
    assert "model.norm.side holds trainable parameters but did not run as a module" in caplog.text
    # two_pass's re-scaled passes wrote theta_s into that layer's weight only; every other module formed it as it ran
    assert trainer.trap_step.in_place == ("model.norm.side.weight",)
    assert {name for name, _, _ in trainer.trap_step.pass_row_targets} == {
        name for name, _, _ in full_row_targets(reference)} - {"model.norm.side"}
    batch = {k: torch.tensor(dataset[k]) for k in ("input_ids", "attention_mask", "labels")}
    expected = direct_full_gradients(reference, theta0, batch, trainer.trap_scales(0), 0.3, "inv")
    assert_grads_close(grads, expected, rtol=5e-4, atol=2e-6)
    with pytest.raises(RuntimeError, match=r"model\.norm\.side holds trainable parameters.*trap_mode='two_pass'"):
        full_step(llama_reading_a_weight_directly(), tmp_out + "f", dataset, theta0, trap_mode="fused",
                  trap_rescaled_fraction=1.0)


def test_sft_fused_lm_head_re_scales_only_lm_head_in_place(tmp_out, monkeypatch):
    """TRL's fused LM head reads lm_head.weight outside lm_head's forward: only that weight is written in place
    (what costs an in-place enter), the rest formed module by module; the step's gradient is the all-in-place one."""
    import trap2_hf.modes.step as step_module
    from trap_checks import exact_trap_args, step_gradients, trainable_state

    def sft_full_step(out):
        args = Trap2SFTConfig(output_dir=out, **exact_trap_args(
            bf16=False, max_length=16, per_device_train_batch_size=8, max_steps=1, trap_lambda=0.4,
            trap_scales_per_step=2, trap_target="full"))
        torch.manual_seed(0)
        trainer = Trap2SFTTrainer(model=tiny_llama(), args=args, train_dataset=text_dataset(8),
                                  processing_class=tiny_tokenizer(), trap_reference=away_from(tiny_llama()))
        before = trainable_state(trainer.model)
        trainer.train()
        return trainer, step_gradients(before, trainer.model)

    trainer, grads = sft_full_step(f"{tmp_out}/mixed")
    assert trainer.trap_step.in_place == ("lm_head.weight",)
    assert "lm_head" not in {name for name, _, _ in trainer.trap_step.pass_row_targets} and len(trainer.trap_step.pass_row_targets) > 1
    every_weight = lambda model, targets, skipped: ([], tuple(n for n, p in model.named_parameters() if p.requires_grad))
    monkeypatch.setattr(step_module, "split_in_place", every_weight)
    trainer, in_place_grads = sft_full_step(f"{tmp_out}/in_place")
    assert len(trainer.trap_step.in_place) == len(grads)
    assert_grads_close(grads, in_place_grads, rtol=1e-5, atol=1e-7)


def test_sft_swapped_copy_reaches_the_fused_lm_head(tmp_out, monkeypatch):
    """TRL's fused LM head reads lm_head.weight outside lm_head's forward; a swapped-in copy is what that read sees
    too, so sub_batch's small passes give the all-in-place gradient under Trap2SFTTrainer."""
    from trap_checks import exact_trap_args, step_gradients, trainable_state

    calls = []
    original = updates.swapped_parameters

    def counting(model, scale, reference):
        calls.append(scale)
        return original(model, scale, reference)

    def sft_full_step(out):
        args = Trap2SFTConfig(output_dir=out, **exact_trap_args(
            bf16=False, max_length=16, per_device_train_batch_size=8, max_steps=1, trap_lambda=0.4,
            trap_scales_per_step=2, trap_target="full", trap_mode="sub_batch", trap_rescaled_fraction=0.25,
            activation_checkpointing=False))  # TRL turns it on by default, and with it the copy is never taken
        torch.manual_seed(0)
        trainer = Trap2SFTTrainer(model=tiny_llama(), args=args, train_dataset=text_dataset(8),
                                  processing_class=tiny_tokenizer(), trap_reference=away_from(tiny_llama()))
        before = trainable_state(trainer.model)
        trainer.train()
        return step_gradients(before, trainer.model)

    monkeypatch.setattr(updates, "swapped_parameters", counting)
    grads = sft_full_step(f"{tmp_out}/swapped")
    assert calls  # at least one pass over a quarter of the rows took the copy
    monkeypatch.setattr(updates, "swapped_parameters", lambda model, scale, reference: rescaled_parameters(
        model, scale, reference))
    assert_grads_close(grads, sft_full_step(f"{tmp_out}/in_place"), rtol=1e-5, atol=1e-7)


class RowZeroRMSNorm(nn.Module):
    """An RMSNorm whose forward mis-reads per-row vectors (every row would take the first row's)."""

    def __init__(self, features):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(features))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.weight.flatten()[: x.shape[-1]]


@pytest.mark.parametrize("kind", ["llama_rmsnorm", "torch_layernorm", "misreading_rmsnorm"])
def test_norms_take_per_row_vectors_only_where_their_forward_broadcasts_them(kind):
    """One run with per-row vectors where the module broadcasts them (checked once, at its first call), else one run
    per scale: either way each row's output and the vectors' gradient are those of the module at its row's scale."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from trap2_hf.rescale import full_per_row as fused_full

    torch.manual_seed(0)
    module = {"llama_rmsnorm": lambda: LlamaRMSNorm(6), "torch_layernorm": lambda: nn.LayerNorm(6),
              "misreading_rmsnorm": lambda: RowZeroRMSNorm(6)}[kind]()
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.1 * torch.randn(p.shape))
    theta0 = away_from(module, size=0.3)
    with torch.no_grad(), rescaled_parameters_per_row(module, RowGroups.of_copies(0, torch.tensor([0, 0]), [0.4]), theta0):
        module(torch.randn(2, 3, 6))  # all rows at one scale: no verdict (a misreading forward would pass)
    assert module not in fused_full._ROWS_BROADCAST
    groups = RowGroups.of_copies(2, torch.tensor([0, 0, 1]), [0.4, 1.6])
    row_scales = [1.0, 1.0, 0.4, 0.4, 1.6]
    x = torch.randn(5, 3, 6)
    with rescaled_parameters_per_row(module, groups, theta0):
        got = module(x)
    got_grads = torch.autograd.grad(got.square().sum(), list(module.parameters()))
    assert fused_full._ROWS_BROADCAST[module] == (kind == "llama_rmsnorm")
    from torch.func import functional_call

    expected = torch.cat([
        functional_call(module, {n: torch.lerp(theta0[n], p, scale) for n, p in module.named_parameters()}, x[row:row + 1])
        for row, scale in enumerate(row_scales)
    ])
    expected_grads = torch.autograd.grad(expected.square().sum(), list(module.parameters()))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    for mine, reference in zip(got_grads, expected_grads):
        torch.testing.assert_close(mine, reference, rtol=1e-5, atol=1e-5)
