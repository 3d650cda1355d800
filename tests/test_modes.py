"""trap_mode: 'sub_batch' and 'fused' give exactly the gradient they claim, and refuse what they cannot do exactly.

What they claim (fused.py): the re-scaled loss of scale s_k on the drawn rows R_k of each micro-batch,
weighted 1/f and normalised like the nominal loss (num_items_in_batch), so with f = 1 they are two_pass.
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from peft import LoHaConfig, LoraConfig, get_peft_model
from torch import nn
from torch.func import functional_call

from conftest import VOCAB, text_dataset, tiny_llama, tiny_tokenizer, token_dataset
from trap_checks import (
    assert_grads_close,
    direct_lora_gradients,
    exact_trap_args,
    lora_effective_weights,
    sgd_args,
    trainable_state,
)
from trap2_hf import Trap2SFTConfig, Trap2SFTTrainer, Trap2Trainer, Trap2TrainingArguments, rescaled_adapter
from trap2_hf.modes.rows import rescaled_rows
from trap2_hf.objective import rescaled_loss_coefficient
from trap2_hf.rescale import rescaled_adapter_per_sample

LORA = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"], init_lora_weights=False)
TWO_SCALES = dict(trap_scales_per_step=2, trap_scale_sampling="stratified")
FUSED_ALL_ROWS = dict(trap_lambda=0.3, trap_mode="fused", trap_rescaled_fraction=1.0, **TWO_SCALES)


def lora_model(**overrides):
    return get_peft_model(tiny_llama(), LoraConfig(**{**LORA, **overrides}))


def batch_of(dataset):
    return {k: torch.tensor(dataset[k]) for k in ("input_ids", "attention_mask", "labels")}


def train(model, tmp_out, dataset, batch_size, accumulation=1, **overrides):
    """One SGD step; returns the trainer, the step's gradients and the micro-batches it saw, in order."""
    args = Trap2TrainingArguments(
        output_dir=tmp_out, max_steps=1, per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=accumulation, **exact_trap_args(**overrides),
    )
    trainer = Trap2Trainer(model=model, args=args, train_dataset=dataset)
    seen, training_step = [], trainer.training_step

    def recording_step(model, inputs, num_items_in_batch=None):
        seen.append({k: v.clone() for k, v in inputs.items()})
        return training_step(model, inputs, num_items_in_batch)

    trainer.training_step = recording_step
    before = trainable_state(model)
    trainer.train()
    after = trainable_state(model)
    return trainer, {k: before[k] - after[k] for k in before}, seen


def direct_row_gradients(peft_model, micro_batches, scales, fraction, rows, trap_lambda, weighting):
    """grad of sum_m [ sum_{i in m} l_i(1) + sum_k c_k/f * sum_{i in R_mk} l_i(s_k) ] / N, l_i a row's summed token
    loss and N the tokens of all micro-batches: what sub_batch and fused claim to compute."""
    base = tiny_llama()
    factors = {n: p.detach().clone().requires_grad_() for n, p in peft_model.named_parameters() if p.requires_grad}
    total_tokens = sum((b["labels"][:, 1:] != -100).sum() for b in micro_batches)

    def row_losses(batch, scale):
        weights = lora_effective_weights(peft_model, scale, factors)
        logits = functional_call(base, weights, kwargs={k: batch[k] for k in ("input_ids", "attention_mask")}).logits
        labels = batch["labels"][:, 1:]
        tokens = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), labels.reshape(-1), reduction="none")
        return tokens.view(labels.shape).sum(-1)

    joint = 0.0
    for batch, batch_rows in zip(micro_batches, rows):
        joint = joint + row_losses(batch, 1.0).sum()
        for k, scale in enumerate(scales):
            coefficient = rescaled_loss_coefficient(scale, trap_lambda, weighting, len(scales))
            joint = joint + coefficient / fraction * row_losses(batch, scale)[batch_rows[k]].sum()
    grads = torch.autograd.grad(joint / total_tokens, list(factors.values()))
    return dict(zip(factors, grads))


@pytest.mark.parametrize("mode", ["sub_batch", "fused"])
@pytest.mark.parametrize("scales", [{}, TWO_SCALES], ids=["one_scale", "two_scales"])
def test_fraction_one_equals_two_pass(tmp_out, mode, scales):
    dataset = token_dataset(8, ragged=True)
    model = lora_model()
    reference = copy.deepcopy(model)
    settings = dict(trap_lambda=0.3, trap_mode=mode, trap_rescaled_fraction=1.0, **scales)
    trainer, grads, _ = train(model, tmp_out, dataset, 8, **settings)
    expected = direct_lora_gradients(reference, tiny_llama(), batch_of(dataset), trainer.trap_scales(0), 0.3, "inv")
    assert_grads_close(grads, expected)
    # The logged losses are two_pass's: the nominal loss, and the re-scaled one averaged over the scales.
    two_pass, _, _ = train(copy.deepcopy(reference), tmp_out + "2", dataset, 8, trap_lambda=0.3, **scales)
    for key in ("loss", "trap/nominal_loss", "trap/rescaled_loss", "trap/scale"):
        assert trainer.state.log_history[0][key] == pytest.approx(two_pass.state.log_history[0][key], rel=1e-5)


def test_fused_bf16_mixed_precision_matches_direct_computation(tmp_out):
    """Under bf16 autocast fused is as close to the exact (fp32) gradient as the reference step is, and close to it."""
    dataset = token_dataset(8, ragged=True)
    model = lora_model()
    reference = copy.deepcopy(model)
    trainer, grads, _ = train(model, tmp_out, dataset, 8, bf16=True, **FUSED_ALL_ROWS)
    two_pass_settings = {k: v for k, v in FUSED_ALL_ROWS.items() if k not in ("trap_mode", "trap_rescaled_fraction")}
    _, two_pass, _ = train(copy.deepcopy(reference), tmp_out + "2", dataset, 8, bf16=True, **two_pass_settings)
    expected = direct_lora_gradients(reference, tiny_llama(), batch_of(dataset), trainer.trap_scales(0), 0.3, "inv")
    for key in expected:  # bf16 rounds each gradient by 1-3% of its largest entry, in either mode
        size = expected[key].abs().max()
        fused_error = (grads[key] - expected[key]).abs().max()
        two_pass_error = (two_pass[key] - expected[key]).abs().max()
        assert fused_error <= 1.5 * two_pass_error + 0.005 * size, key
        assert (grads[key] - two_pass[key]).abs().max() <= 0.02 * size, key


@pytest.mark.parametrize("mode", ["sub_batch", "fused"])
def test_fraction_below_one_equals_direct_computation_on_the_drawn_rows(tmp_out, mode):
    dataset = token_dataset(8, ragged=True)
    model = lora_model()
    reference = copy.deepcopy(model)
    settings = dict(trap_lambda=0.3, trap_mode=mode, trap_rescaled_fraction=0.25, **TWO_SCALES)
    trainer, grads, seen = train(model, tmp_out, dataset, 8, **settings)
    rows = trainer.trap_rows(8, step=0, micro_batch=0)
    assert sum(len(r) for r in rows) == 4  # 2 scales x 8 rows x 0.25 (a row may serve both scales)
    expected = direct_row_gradients(reference, seen, trainer.trap_scales(0), 0.25, [rows], 0.3, "inv")
    assert_grads_close(grads, expected)


@pytest.mark.parametrize("mode", ["sub_batch", "fused"])
def test_accumulation_keeps_the_step_normalisation(tmp_out, mode):
    """4 x 2 accumulation: each micro-batch draws its own rows; all are normalised by the step's 8 rows' tokens."""
    dataset = token_dataset(8, ragged=True)
    model = lora_model()
    reference = copy.deepcopy(model)
    settings = dict(trap_lambda=0.3, trap_mode=mode, trap_rescaled_fraction=0.5)
    trainer, grads, seen = train(model, tmp_out, dataset, 4, accumulation=2, **settings)
    rows = [trainer.trap_rows(4, step=0, micro_batch=m) for m in range(2)]
    assert len({tuple(trainer.trap_rows(4, step=0, micro_batch=m)[0].tolist()) for m in range(8)}) > 1
    expected = direct_row_gradients(reference, seen, trainer.trap_scales(0), 0.5, rows, 0.3, "inv")
    assert_grads_close(grads, expected)


def test_fused_sft_equals_two_pass_and_counts_metrics_once(tmp_out):
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "gate_proj"], init_lora_weights=False)
    results = {}
    for mode in ("two_pass", "fused"):
        args = Trap2SFTConfig(
            output_dir=f"{tmp_out}/{mode}", max_steps=1,
            **sgd_args(bf16=False, max_length=16, per_device_train_batch_size=8),
            trap_lambda=0.4, trap_mode=mode, trap_rescaled_fraction=1.0, **TWO_SCALES,
        )
        trainer = Trap2SFTTrainer(
            model=tiny_llama(), args=args, train_dataset=text_dataset(8), processing_class=tiny_tokenizer(),
            peft_config=lora,
        )
        before = trainable_state(trainer.model)
        trainer.train()
        after = trainable_state(trainer.model)
        results[mode] = ({k: before[k] - after[k] for k in before}, trainer.state.log_history[0])
    assert_grads_close(results["fused"][0], results["two_pass"][0], rtol=5e-4, atol=2e-6)
    fused_log, two_pass_log = results["fused"][1], results["two_pass"][1]
    assert fused_log["num_tokens"] == two_pass_log["num_tokens"] > 0
    for key in ("loss", "mean_token_accuracy", "entropy", "trap/rescaled_loss"):
        assert fused_log[key] == pytest.approx(two_pass_log[key], rel=1e-5), key


def test_fused_sequence_classification_equals_two_pass(tmp_out):
    from datasets import Dataset
    from transformers import LlamaConfig, LlamaForSequenceClassification

    def model():
        torch.manual_seed(0)
        config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, num_labels=3, pad_token_id=0)
        lora = LoraConfig(task_type="SEQ_CLS", **LORA)
        return get_peft_model(LlamaForSequenceClassification(config), lora)

    ids = torch.randint(1, VOCAB, (8, 10), generator=torch.Generator().manual_seed(0))
    dataset = Dataset.from_dict({"input_ids": ids.tolist(), "labels": (ids[:, 0] % 3).tolist()})
    _, expected, _ = train(model(), tmp_out + "a", dataset, 8, trap_lambda=0.3, **TWO_SCALES)
    _, fused, _ = train(model(), tmp_out + "b", dataset, 8, **FUSED_ALL_ROWS)
    assert any("modules_to_save" in k for k in fused)  # the classifier head is re-scaled per row too
    assert_grads_close(fused, expected)


class CustomClassifier(nn.Module):
    """A model outside transformers (like the demo's)."""

    def __init__(self):
        super().__init__()
        self.encoder = get_peft_model(tiny_llama(), LoraConfig(**LORA))
        self.head = nn.Linear(VOCAB, 3)

    def forward(self, input_ids, attention_mask, labels=None):
        logits = self.head(self.encoder(input_ids=input_ids, attention_mask=attention_mask).logits[:, -1])
        return {"loss": None if labels is None else F.cross_entropy(logits, labels), "logits": logits}


class TaskClassifier(CustomClassifier):
    """The same, declaring its per-row loss for the fused step."""

    def trap_sample_losses(self, outputs, labels):
        return F.cross_entropy(outputs["logits"], labels, reduction="none"), torch.ones_like(labels)


def test_fused_custom_model_with_declared_row_losses_equals_two_pass(tmp_out):
    from datasets import Dataset

    ids = torch.randint(0, VOCAB, (8, 10), generator=torch.Generator().manual_seed(0))
    labels = (ids[:, 0] % 3).tolist()
    dataset = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": [[1] * 10] * 8, "labels": labels})
    torch.manual_seed(0)
    model = TaskClassifier()
    model.head.requires_grad_(False)
    twin = copy.deepcopy(model)
    _, expected, _ = train(twin, tmp_out + "a", dataset, 8, trap_lambda=0.3, **TWO_SCALES)
    _, fused, _ = train(model, tmp_out + "b", dataset, 8, **FUSED_ALL_ROWS)
    assert_grads_close(fused, expected)


def test_per_sample_scales_equal_each_rows_own_scale():
    model = lora_model(use_rslora=True).eval()
    ids = torch.randint(0, VOCAB, (3, 10), generator=torch.Generator().manual_seed(1))
    scales = [0.3, 1.0, 1.7]
    with torch.no_grad(), rescaled_adapter_per_sample(model, torch.tensor(scales)):
        got = model(input_ids=ids).logits
    for i, scale in enumerate(scales):
        with torch.no_grad(), rescaled_adapter(model, scale):
            torch.testing.assert_close(got[i], model(input_ids=ids[i : i + 1]).logits[0], rtol=1e-4, atol=1e-5)
    assert not any(m._forward_hooks for m in model.modules())  # nothing left behind


def test_rows_are_drawn_with_probability_fraction():
    hits, counts, totals = torch.zeros(2, 6), [], set()
    for seed in range(4000):
        rows = rescaled_rows(6, 0.3, 2, torch.Generator().manual_seed(seed))
        counts.append(len(rows[0]))
        totals.add(sum(len(r) for r in rows))
        for k in range(2):
            assert len(set(rows[k].tolist())) == len(rows[k])  # a scale never takes a row twice
            hits[k, rows[k]] += 1
    # 2 scales x 6 rows x 0.3 = 3.6 copies: 3 or 4, never more, so fused's memory is bounded.
    assert totals == {3, 4} and sum(counts) / len(counts) == pytest.approx(1.8, abs=0.05)
    torch.testing.assert_close(hits / 4000, torch.full((2, 6), 0.3), atol=0.025, rtol=0)
    assert [r.tolist() for r in rescaled_rows(5, 1.0, 2, torch.Generator())] == [list(range(5))] * 2


@pytest.mark.parametrize("world_size, batch_size, fraction, num_scales", [(2, 4, 0.3, 2), (3, 1, 0.5, 2), (2, 8, 0.25, 1)])
def test_ranks_take_their_share_of_one_draw_for_the_global_micro_batch(world_size, batch_size, fraction, num_scales):
    """Rank r's rows are rows r*b..(r+1)*b-1 of what one process draws for the global micro-batch (W*b rows)."""
    hits = torch.zeros(num_scales, world_size * batch_size)
    bound = -(-num_scales * fraction * batch_size // 1)
    for seed in range(2000):
        one = rescaled_rows(world_size * batch_size, fraction, num_scales, torch.Generator().manual_seed(seed))
        shares = [
            rescaled_rows(batch_size, fraction, num_scales, torch.Generator().manual_seed(seed), rank, world_size)
            for rank in range(world_size)
        ]
        for k in range(num_scales):
            union = torch.cat([share[k] + rank * batch_size for rank, share in enumerate(shares)])
            assert union.tolist() == one[k].tolist()
            hits[k, union] += 1
        assert all(sum(len(rows) for rows in share) <= bound for share in shares)  # each rank's memory bound
    torch.testing.assert_close(hits / 2000, torch.full_like(hits, fraction), atol=0.035, rtol=0)


@pytest.mark.parametrize(
    "make_model, settings, error, match",
    [
        (lambda: lora_model(use_dora=True), {}, NotImplementedError, "plain LoRA and rsLoRA.*trap_mode='two_pass'"),
        (lambda: get_peft_model(tiny_llama(), LoHaConfig(r=4, alpha=8, target_modules=["q_proj"])), {},
         NotImplementedError, "trap_mode='two_pass'"),
        (lora_model, {"label_smoothing_factor": 0.1}, ValueError, "label smoothing.*'two_pass' or 'sub_batch'"),
    ],
    ids=["dora", "loha", "label_smoothing"],
)
def test_fused_refuses_what_it_cannot_do_exactly(tmp_out, make_model, settings, error, match):
    args = Trap2TrainingArguments(output_dir=tmp_out, report_to="none", use_cpu=True, trap_mode="fused", **settings)
    with pytest.raises(error, match=match):
        Trap2Trainer(model=make_model(), args=args, train_dataset=token_dataset(4))


def test_fused_refuses_models_without_a_known_row_loss(tmp_out):
    args = Trap2TrainingArguments(output_dir=tmp_out, report_to="none", use_cpu=True, trap_mode="fused")
    match = "causal LMs.*sequence classifiers.*trap_mode='two_pass'.*trap_sample_losses"
    with pytest.raises(NotImplementedError, match=match):
        Trap2Trainer(model=CustomClassifier(), args=args, train_dataset=token_dataset(4))


def test_fused_sft_refuses_other_losses(tmp_out):
    args = Trap2SFTConfig(
        output_dir=tmp_out, report_to="none", use_cpu=True, bf16=False, trap_mode="fused", loss_type="dft"
    )
    with pytest.raises(ValueError, match="loss_type='nll'.*'two_pass' or 'sub_batch'"):
        Trap2SFTTrainer(
            model=tiny_llama(), args=args, train_dataset=text_dataset(4), processing_class=tiny_tokenizer(),
            peft_config=LoraConfig(r=4, target_modules=["q_proj"]),
        )


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"trap_mode": "fast"}, "trap_mode"),
        ({"trap_mode": "fused", "trap_rescaled_fraction": 0.0}, "trap_rescaled_fraction"),
        ({"trap_mode": "sub_batch", "trap_rescaled_fraction": 1.5}, "trap_rescaled_fraction"),
        ({"trap_mode": "two_pass", "trap_rescaled_fraction": 0.5},
         "trap_rescaled_fraction=0.5 needs trap_mode='sub_batch', 'fused' or 'split'"),
        ({"trap_mode": "fused", "trap_target": "full", "trap_reference_device": "cpu"},
         "trap_mode='fused' on a full fine-tune.*'sub_batch' or 'two_pass'"),
    ],
)
def test_mode_settings_are_validated(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Trap2TrainingArguments(output_dir="unused", report_to="none", **kwargs)


def test_fraction_default_depends_on_the_mode():
    def fraction(**kwargs):
        return Trap2TrainingArguments(output_dir="unused", report_to="none", **kwargs).trap_rescaled_fraction

    assert fraction() is None  # 'auto', the default: the trainer decides, knowing the model
    assert fraction(trap_mode="two_pass") == 1.0
    # The scales of a step together re-scale a quarter of the rows: 2 scales (the default) an eighth each.
    assert fraction(trap_mode="fused") == 0.125 and fraction(trap_mode="sub_batch") == 0.125
    assert fraction(trap_mode="fused", trap_scales_per_step=1) == 0.25
    assert fraction(trap_mode="fused", trap_rescaled_fraction=0.5) == 0.5


def auto_trainer(tmp_out, model, dataset=None, **settings):
    args = Trap2TrainingArguments(
        output_dir=tmp_out, max_steps=1, per_device_train_batch_size=8, **sgd_args(trap_lambda=0.3, trap_mode="auto", **settings)
    )
    return args, Trap2Trainer(model=model, args=args, train_dataset=dataset if dataset is not None else token_dataset(8))


@pytest.mark.parametrize(
    "make_model, settings, chosen",
    [
        (lora_model, {}, "fused"),
        (TaskClassifier, {}, "fused"),  # a custom model that declares its per-row losses
        (lambda: lora_model(use_dora=True), {}, "two_pass"),
        (CustomClassifier, {}, "two_pass"),  # no known per-row loss
        (lora_model, {"label_smoothing_factor": 0.1}, "two_pass"),
        (tiny_llama, {"trap_target": "full"}, "sub_batch"),  # the scales share half the rows
        (lora_model, {"trap_offray": "dare"}, "fused"),  # off-ray terms are passes of their own after the fused one
    ],
    ids=["lora", "declared_row_losses", "dora", "unknown_loss", "label_smoothing", "full", "offray"],
)
def test_auto_mode_fuses_only_where_exact(tmp_out, make_model, settings, chosen):
    torch.manual_seed(0)
    args, trainer = auto_trainer(tmp_out, make_model(), **settings)
    assert trainer.args.trap_mode == chosen
    assert trainer.args.trap_rescaled_fraction == {"fused": 0.125, "sub_batch": 0.25}.get(chosen, 1.0)
    assert trainer.args.trap_settings_dict()["trap_mode"] == chosen  # what the model card records
    assert args.trap_mode == "auto"  # the caller's arguments are left as given, for reuse with another model


def test_auto_mode_trains_exactly_like_the_mode_it_chose(tmp_out):
    dataset = token_dataset(8, ragged=True)
    reference = lora_model()
    _, auto, _ = train(copy.deepcopy(reference), tmp_out + "a", dataset, 8, trap_lambda=0.3, trap_mode="auto")
    _, fused, _ = train(copy.deepcopy(reference), tmp_out + "b", dataset, 8, trap_lambda=0.3, trap_mode="fused")
    _, two_pass, _ = train(copy.deepcopy(reference), tmp_out + "c", dataset, 8, trap_lambda=0.3)
    for key in fused:
        torch.testing.assert_close(auto[key], fused[key], rtol=0, atol=0)
    assert any(not torch.allclose(fused[k], two_pass[k], rtol=1e-3, atol=1e-7) for k in fused)  # a real choice


def test_auto_mode_falls_back_to_two_pass_on_packed_batches(tmp_out, caplog):
    from transformers import DataCollatorWithFlattening

    dataset = token_dataset(8, ragged=True)
    reference = lora_model()
    results = {}
    for mode in ("auto", "two_pass"):
        args = Trap2TrainingArguments(
            output_dir=f"{tmp_out}/{mode}", max_steps=1, per_device_train_batch_size=8,
            **sgd_args(trap_lambda=0.3, trap_mode=mode, **TWO_SCALES),
        )
        model = copy.deepcopy(reference)
        trainer = Trap2Trainer(
            model=model, args=args, train_dataset=dataset,
            data_collator=DataCollatorWithFlattening(return_flash_attn_kwargs=True),
        )
        before = trainable_state(model)
        with caplog.at_level("WARNING"):
            trainer.train()
        results[mode] = ({k: before[k] - v for k, v in trainable_state(model).items()}, trainer.args.trap_mode)
    assert results["auto"][1] == "two_pass"
    assert "switches from 'fused' to 'two_pass'" in caplog.text and "packs several sequences" in caplog.text
    assert_grads_close(results["auto"][0], results["two_pass"][0])



@pytest.mark.parametrize(
    "settings, fraction", [({"trap_scales_per_step": 1}, 0.5), ({"trap_rescaled_fraction": 0.2}, 0.2)]
)
def test_auto_mode_full_fine_tuning_fraction(tmp_out, settings, fraction):
    """Half the rows whatever the number of scales; a fraction the user set is kept."""
    _, trainer = auto_trainer(tmp_out, tiny_llama(), trap_target="full", **settings)
    assert (trainer.args.trap_mode, trainer.args.trap_rescaled_fraction) == ("sub_batch", fraction)


class TokenMeanLM(nn.Module):
    """A causal LM whose loss is the mean over its own tokens and which takes no loss kwargs, so the Trainer passes
    no num_items_in_batch: a loss over some of the rows would be a ratio estimate."""

    def __init__(self):
        super().__init__()
        self.lm = tiny_llama()

    def forward(self, input_ids, attention_mask=None, labels=None):
        return self.lm(input_ids=input_ids, attention_mask=attention_mask, labels=labels)


def test_auto_mode_full_fine_tuning_falls_back_to_two_pass_without_token_counts(tmp_out, caplog):
    dataset = token_dataset(8, ragged=True)
    reference = TokenMeanLM()
    results = {}
    for mode in ("auto", "two_pass"):
        model = copy.deepcopy(reference)
        with caplog.at_level("WARNING"):
            trainer, grads, _ = train(
                model, f"{tmp_out}/{mode}", dataset, 8,
                trap_lambda=0.3, trap_mode=mode, trap_target="full", **TWO_SCALES,
            )
        results[mode] = (grads, trainer.args.trap_mode)
    assert results["auto"][1] == "two_pass"
    assert "switches from 'sub_batch' to 'two_pass'" in caplog.text
    assert_grads_close(results["auto"][0], results["two_pass"][0])
