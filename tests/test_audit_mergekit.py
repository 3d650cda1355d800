"""mergekit as a merge backend: its merges of tiny models against the audit's own and the plain formula."""

import json
import os
import sys

import pytest
import torch
import yaml
from conftest import audit_cli_inputs, tiny_llama

from trap2_hf.audit import methods
from trap2_hf.audit import mergekit_backend as mk
from trap2_hf.audit.task_vectors import adapter_task_vector, full_task_vector, merge_task_vectors

ISSUE_METHODS = (
    "linear", "task_arithmetic", "ties", "dare_ties", "dare_linear", "breadcrumbs", "breadcrumbs_ties",
    "della", "della_linear", "sce", "model_stock", "karcher", "slerp", "nuslerp",
)


def finetuned(seed: int, scale: float = 0.02):
    """The tiny base (seed 0) with every parameter moved by a random step drawn from `seed`."""
    model = tiny_llama()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(scale * torch.randn(param.shape, generator=generator))
    return model


def params_of(model) -> dict:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def assert_params_close(model, expected: dict, atol: float = 1e-6):
    got = params_of(model)
    assert set(got) == set(expected)
    for name, tensor in expected.items():
        torch.testing.assert_close(got[name], tensor, atol=atol, rtol=0, msg=name)


@pytest.fixture(scope="module")
def three_updates():
    return tiny_llama(), [finetuned(seed) for seed in (1, 2, 3)]


def test_task_arithmetic_equals_the_plain_formula_and_the_audits_merge(three_updates):
    base, updates = three_updates
    weights = [0.5, 1.2, -0.3]
    merged = mk.mergekit_merge(base, updates, "task_arithmetic", weights=weights)
    theta0, thetas = params_of(base), [params_of(u) for u in updates]
    expected = {n: theta0[n] + sum(w * (t[n] - theta0[n]) for w, t in zip(weights, thetas)) for n in theta0}
    assert_params_close(merged, expected)

    shared = mk.mergekit_merge(base, updates, "task_arithmetic", weights=[0.7] * 3)
    vectors = [full_task_vector(base, params_of(u)) for u in updates]
    ours = merge_task_vectors(methods.get("task_arithmetic"), vectors, {"weight": 0.7})
    assert_params_close(shared, {n: theta0[n] + ours[n] for n in theta0})


def test_linear_equals_the_normalised_weighted_mean_and_at_one_over_n_the_audits_average(three_updates):
    base, updates = three_updates
    thetas = [params_of(u) for u in updates]
    weights = [1.0, 2.0, 1.0]
    merged = mk.mergekit_merge(base, updates, "linear", weights=weights)
    assert_params_close(merged, {n: sum(w * t[n] for w, t in zip(weights, thetas)) / 4.0 for n in thetas[0]})

    naive = mk.mergekit_merge(base, updates, "linear")
    vectors = [full_task_vector(base, t) for t in thetas]
    ours = merge_task_vectors(methods.get("task_arithmetic"), vectors, methods.get("task_arithmetic").average_params(3))
    theta0 = params_of(base)
    assert_params_close(naive, {n: theta0[n] + ours[n] for n in theta0})
    assert all(p is not q for p, q in zip(naive.parameters(), base.parameters()))


def test_every_method_in_the_table_runs_and_gives_finite_weights_of_the_right_shapes(three_updates):
    base, updates = three_updates
    assert set(ISSUE_METHODS) <= set(mk.METHODS)
    shapes = {n: p.shape for n, p in base.named_parameters()}
    theta0 = params_of(base)
    checked = {}

    def evaluate(model):
        got = params_of(model)
        assert {n: t.shape for n, t in got.items()} == shapes
        assert all(torch.isfinite(t).all() for t in got.values())
        return max((got[n] - theta0[n]).abs().max().item() for n in got)

    for count in (2, 3):
        for row in mk.mergekit_sweep(base, updates[:count], evaluate):
            assert row["layout"] == "mergekit"
            assert row["result"] > 1e-3, f"{row['method']} left the base unchanged"
            checked.setdefault(row["method"], []).append(count)
    assert set(checked) == set(mk.METHODS)
    assert checked["slerp"] == [2] and checked["nuslerp"] == [2]
    assert checked["ties"] == [2, 3] and checked["model_stock"] == [2, 3]


def test_slerp_half_way_between_two_updates_is_symmetric_and_t_comes_from_the_weights(three_updates):
    base, updates = three_updates
    forward = params_of(mk.mergekit_merge(base, updates[:2], "slerp"))
    backward = params_of(mk.mergekit_merge(base, updates[1::-1], "slerp"))
    for name in forward:
        torch.testing.assert_close(forward[name], backward[name], atol=1e-6, rtol=0)
    at_end = mk.mergekit_merge(base, updates[:2], "slerp", weights=[0.0, 1.0])
    assert_params_close(at_end, params_of(updates[1]))


def test_the_table_matches_mergekits_registry():
    from mergekit.merge_methods import registry

    for name, method in mk.METHODS.items():
        declared = {p.name for p in registry.get(name).spec.parameters}
        assert set(method.naive) <= declared, name
    assert mk.get("slerp").update_range() == (2, 2) and mk.get("slerp").base_role == mk.FIRST_UPDATE
    assert mk.get("nuslerp").update_range() == (2, 2) and mk.get("nuslerp").base_role == mk.BASE
    assert mk.get("model_stock").update_range() == (2, None) and not mk.get("model_stock").weighted
    assert mk.get("linear").base_role == mk.NO_BASE and mk.get("karcher").base_role == mk.NO_BASE
    assert mk.get("ties").naive == {"density": methods.DEFAULT_DENSITY}
    assert mk.applicable(3) == [n for n in mk.METHODS if n not in ("slerp", "nuslerp")]
    assert mk.naive_weights("ties", 4) == [0.25] * 4 and mk.naive_weights("sce", 4) is None
    assert mk.informed_weights(3, others=0.6, protected_index=1) == [0.6, 1.0, 0.6]
    table = mk.method_table()
    assert all(f"| {name} |" in table for name in ISSUE_METHODS)


def test_yaml_is_written_with_per_model_weights_and_densities(three_updates, tmp_path):
    base, updates = three_updates
    out = tmp_path / "merged"
    params = {"density": [0.5, 0.3], "normalize": False}
    mk.mergekit_merge(base, updates[:2], "ties", weights=[1.0, 0.4], params=params, out_dir=str(out))
    config = yaml.safe_load((out / "mergekit_config.yml").read_text())
    assert config["merge_method"] == "ties" and config["dtype"] == "float32"
    assert config["parameters"] == {"normalize": False}
    per_model = [m["parameters"] for m in config["models"]]
    assert per_model == [{"density": 0.5, "weight": 1.0}, {"density": 0.3, "weight": 0.4}]
    assert "base_model" in config
    # mergekit's output survives, the written inputs it referenced do not
    assert not os.path.exists(config["base_model"]) and (out / "model.safetensors").exists()


def test_written_inputs_are_removed_with_mergekits_cached_readers(three_updates, tmp_path):
    from mergekit.io.tasks import LoaderCache

    base, updates = three_updates
    with mk.written_inputs(base, updates[:2], workdir=str(tmp_path)) as inputs:
        folder = mk.run_mergekit(inputs, "task_arithmetic")
        assert os.path.isdir(folder) and len(os.listdir(tmp_path)) == 1
    assert os.listdir(tmp_path) == []
    assert not any(str(tmp_path) in str(ref.model.path) for ref in LoaderCache().loaders)


def test_lora_adapters_are_folded_into_the_base(tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model

    config = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
    folders = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        folders.append(str(tmp_path / f"adapter{seed}"))
        get_peft_model(tiny_llama(), config).save_pretrained(folders[-1])
    peft_model = PeftModel.from_pretrained(tiny_llama(), folders[0], adapter_name="one")
    peft_model.load_adapter(folders[1], adapter_name="two")

    weights = [1.0, 0.6]
    from_folders = mk.mergekit_merge(tiny_llama(), folders, "task_arithmetic", weights=weights)
    pairs = [(peft_model, "one"), (peft_model, "two")]
    from_pairs = mk.mergekit_merge(peft_model, pairs, "task_arithmetic", weights=weights)

    base = params_of(tiny_llama())
    expected = dict(base)
    for w, name in zip(weights, ("one", "two")):
        for key, delta in adapter_task_vector(peft_model, name).items():
            plain = key.removeprefix("base_model.model.").replace(".base_layer", "")
            expected[plain] = expected[plain] + w * delta
    assert sum(not torch.equal(expected[n], base[n]) for n in base) == 2 * 3  # 2 layers x 3 targets
    assert_params_close(from_folders, expected)
    assert_params_close(from_pairs, expected)
    assert "lora_A" not in str(list(from_pairs.state_dict()))
    assert set(peft_model.peft_config) == {"one", "two"}  # the caller's PEFT model is untouched


def test_a_method_mergekit_refuses_is_reported_and_the_sweep_goes_on():
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"], init_lora_weights=False)
    model = get_peft_model(tiny_llama(), config, adapter_name="a")
    for name in ("b", "c"):
        model.add_adapter(name, config)
    # multislerp raises on a tensor none of three updates changes (every tensor but q_proj here)
    rows = mk.mergekit_sweep(model, [(model, n) for n in "abc"], lambda m: 1.0, methods=["multislerp", "ties"])
    assert rows[0]["method"] == "multislerp" and "result" not in rows[0]
    assert rows[0]["skipped"].startswith("mergekit raised ValueError: The weighted sum of the input tensors is zero")
    assert rows[1]["method"] == "ties" and rows[1]["result"] == 1.0


def test_fine_tuned_states_and_tied_embeddings(tmp_path):
    base = _tied_llama()
    update = _tied_llama()
    with torch.no_grad():
        update.model.embed_tokens.weight.add_(0.1)
        update.model.layers[0].mlp.up_proj.weight.mul_(1.5)
    state = {n: p.detach().clone() for n, p in update.named_parameters()}
    merged = mk.mergekit_merge(base, [update, state], "task_arithmetic", weights=[0.5, 0.5])
    assert merged.lm_head.weight is merged.model.embed_tokens.weight
    torch.testing.assert_close(merged.model.embed_tokens.weight, update.model.embed_tokens.weight, atol=1e-6, rtol=0)
    torch.testing.assert_close(
        merged.model.layers[0].mlp.up_proj.weight, update.model.layers[0].mlp.up_proj.weight, atol=1e-6, rtol=0
    )


def _tied_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=48, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config)


def _tiny_bert(seed: int):
    """A BertModel without its pooler, like the demo's MiniLM encoder."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32)
    model = BertModel(config, add_pooling_layer=False)
    if seed:
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for param in model.parameters():
                param.add_(0.02 * torch.randn(param.shape, generator=generator))
    return model


def test_bert_without_pooler_merges_through_the_inferred_layout_and_leaves_user_folders_alone(tmp_path):
    base, one, two = _tiny_bert(0), _tiny_bert(1), _tiny_bert(2)
    folder = str(tmp_path / "two")
    two.save_pretrained(folder)
    config_before = (tmp_path / "two" / "config.json").read_text()
    with mk.written_inputs(base, [one, folder]) as inputs:
        assert inputs.layout == "inferred"
        # mergekit picks the reference model of an inferred layout from a set unless base_model names it
        assert mk.merge_config(inputs, "linear")["base_model"] == inputs.update_dirs[0]
        merged = mk.load_merged(inputs, mk.run_mergekit(inputs, "task_arithmetic", weights=[0.3, 0.9]))
    assert (tmp_path / "two" / "config.json").read_text() == config_before
    assert json.loads(config_before)["architectures"] == ["BertModel"]
    theta0, t1, t2 = params_of(base), params_of(one), params_of(two)
    assert_params_close(merged, {n: theta0[n] + 0.3 * (t1[n] - theta0[n]) + 0.9 * (t2[n] - theta0[n]) for n in theta0})

    # every method, including those that ignore the base (mergekit's reference model is then the first update)
    rows = mk.mergekit_sweep(base, [one, two], lambda m: params_of(m))
    assert [r["method"] for r in rows if "result" not in r] == []
    linear = next(r["result"] for r in rows if r["method"] == "linear")
    for name in theta0:
        torch.testing.assert_close(linear[name], (t1[name] + t2[name]) / 2, atol=1e-6, rtol=0)
    assert all(torch.isfinite(t).all() for r in rows for t in r["result"].values())


def test_randomised_methods_follow_the_seed_and_leave_the_callers_rng_alone(three_updates):
    base, updates = three_updates
    torch.manual_seed(123)
    state = torch.random.get_rng_state()
    first = params_of(mk.mergekit_merge(base, updates[:2], "dare_ties", seed=1))
    assert torch.equal(torch.random.get_rng_state(), state)
    again = params_of(mk.mergekit_merge(base, updates[:2], "dare_ties", seed=1))
    other = params_of(mk.mergekit_merge(base, updates[:2], "dare_ties", seed=2))
    assert all(torch.equal(first[n], again[n]) for n in first)
    assert any(not torch.equal(first[n], other[n]) for n in first)


def test_errors_name_the_value_and_the_fix(three_updates, monkeypatch):
    base, updates = three_updates
    with pytest.raises(KeyError, match="Unknown mergekit method 'tiez'.*task_arithmetic.*nuslerp"):
        mk.mergekit_merge(base, updates, "tiez")
    with pytest.raises(ValueError, match=r"'slerp' merges exactly 2 updates; got 3"):
        mk.mergekit_merge(base, updates, "slerp")
    with pytest.raises(ValueError, match=r"'model_stock' merges at least 2 updates; got 1"):
        mk.mergekit_merge(base, updates[:1], "model_stock")
    with pytest.raises(ValueError, match=r"\['densty'\] are not parameters of mergekit's 'ties'.*'density'"):
        mk.mergekit_merge(base, updates, "ties", params={"densty": 0.5})
    with pytest.raises(ValueError, match="'sce' takes no per-update weights"):
        mk.mergekit_merge(base, updates, "sce", weights=[1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="got 2 weights for 3 updates"):
        mk.mergekit_merge(base, updates, "task_arithmetic", weights=[1.0, 1.0])
    with pytest.raises(ValueError, match="'density' has 2 values for 3 updates"):
        mk.mergekit_merge(base, updates, "ties", params={"density": [0.5, 0.5]})
    with pytest.raises(ValueError, match="neither adapter_config.json"):
        mk.mergekit_merge(base, ["/nonexistent/folder"], "task_arithmetic")
    monkeypatch.setitem(sys.modules, "mergekit", None)
    with pytest.raises(ImportError, match=r"mergekit==0\.1\.5: pip install 'trap2_hf\[mergekit\]'"):
        mk.mergekit_merge(base, updates, "task_arithmetic")


# ---- the audit's section: mergekit merges measured by the audit's tasks -------------------------

IDS = torch.randint(0, 48, (4, 10), generator=torch.Generator().manual_seed(0))


def agreement_tasks(model, contexts: dict) -> list:
    """Task t: next-token agreement with what the model predicts inside `contexts[t]()`."""
    from trap2_hf.audit import AuditTask

    with torch.no_grad():
        labels = {}
        for name, context in contexts.items():
            with context:
                labels[name] = model(input_ids=IDS).logits.argmax(-1)

    def make(name):
        def evaluate(m, split):
            return (m(input_ids=IDS).logits.argmax(-1) == labels[name]).float().mean().item()

        return AuditTask(name, evaluate, 1 / 48)

    return [make(name) for name in contexts]


def test_audit_section_merges_adapters_like_the_audits_own_task_arithmetic():
    from contextlib import contextmanager

    from peft import LoraConfig, get_peft_model

    from trap2_hf.audit import run_audit
    from trap2_hf.audit.mergekit_audit import audit_mergekit, format_mergekit_table, merged_task_vector

    config = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    torch.manual_seed(0)
    model = get_peft_model(tiny_llama(), config, adapter_name="prot")
    for name in ("twin", "other"):
        model.add_adapter(name, config)
    model.eval()

    @contextmanager
    def only(adapter):
        model.set_adapter(adapter)
        yield

    tasks = agreement_tasks(model, {"t0": only("prot"), "t1": only("other")})
    with only("prot"):
        assert tasks[0].evaluate(model, "test") == 1.0 and tasks[1].evaluate(model, "test") < 1.0
    chosen = ["task_arithmetic", "linear", "slerp"]
    section = audit_mergekit(model, tasks, "prot", "twin", {"t1": "other"}, methods=chosen)
    ours = run_audit(model, tasks, "t0", "prot", "twin", {"t1": "other"}, methods=["task_arithmetic"],
                     modes=("average",), sweep_scales=(1.0,), progress=False)["methods"][0]
    rows = {row["method"]: row for row in section["methods"]}
    assert section["layout"] == "mergekit" and section["skipped"] == []
    for method in ("task_arithmetic", "linear"):
        assert rows[method]["weights"] == [0.5, 0.5]
        assert rows[method]["protected"] == pytest.approx(ours["protected"], abs=1e-9)
        assert rows[method]["unprotected"] == pytest.approx(ours["unprotected"], abs=1e-9)
    # the delta applied is the audit's own merged vector
    merged = mk.mergekit_merge(model, [(model, "prot"), (model, "other")], "task_arithmetic")
    vectors = [adapter_task_vector(model, a) for a in ("prot", "other")]
    expected = merge_task_vectors(methods.get("task_arithmetic"), vectors, {"weight": 0.5})
    got = merged_task_vector(model, merged, "adapter")
    assert set(got) == set(expected)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=1e-6, rtol=0)
    assert set(model.peft_config) == {"prot", "twin", "other"}
    table = format_mergekit_table(section, "t0")
    assert "| slerp | 0.5, 0.5 | - |" in table and "| task_arithmetic | 0.5, 0.5 | - |" in table


def test_audit_section_on_full_fine_tunes_skips_methods_outside_their_contract(three_updates):
    from trap2_hf.audit.mergekit_audit import audit_mergekit

    base, updates = three_updates
    states = [params_of(u) for u in updates]
    contexts = {"t0": _loaded(base, states[0]), "t1": _loaded(base, states[1]), "t2": _loaded(base, states[2])}
    tasks = agreement_tasks(base, contexts)
    before = params_of(base)
    section = audit_mergekit(base, tasks, states[0], None, {"t1": states[1], "t2": states[2]}, target="full",
                             methods=["task_arithmetic", "nuslerp"])
    assert [row["method"] for row in section["methods"]] == ["task_arithmetic"]
    assert section["skipped"][0]["method"] == "nuslerp" and "exactly 2" in section["skipped"][0]["reason"]
    row = section["methods"][0]
    assert row["unprotected"] is None and set(row["protected"]) == {"t0", "t1", "t2", "average"}
    assert all(torch.equal(p, before[n]) for n, p in params_of(base).items())  # undone exactly


def _loaded(model, state):
    from trap2_hf.audit.task_vectors import applied

    return applied(model, full_task_vector(model, state))


def test_cli_adds_mergekit_merges_to_the_audit(tmp_path, capsys):
    from trap2_hf.cli import main

    base_dir, folders, tasks = audit_cli_inputs(tmp_path, TASKS_FILE)
    out_dir = str(tmp_path / "audit")
    code = main([
        "audit", "--base_model", base_dir, "--tasks", tasks, "--protected_task", "t0",
        "--protected", folders["prot"], "--other", f"t1={folders['t1']}", "--methods", "task_arithmetic",
        "--modes", "average", "--sweep_scales", "1", "--device", "cpu", "--output_dir", out_dir, "--no_progress",
        "--mergekit_methods", "task_arithmetic", "ties",
        "--mergekit_informed", "task_arithmetic", "--protected_weights", "1", "--other_weights", "0.5", "1",
    ])
    assert code == 0
    printed = capsys.readouterr().out
    assert "| mergekit method |" in printed and "| ties | 0.5, 0.5 | density=0.2 |" in printed
    assert "mergekit task_arithmetic, informed grid (2 merges per update)" in printed
    with open(os.path.join(out_dir, "audit.json")) as f:
        results = json.load(f)
    section = results["mergekit"]
    assert [row["method"] for row in section["methods"]] == ["task_arithmetic", "ties"]
    assert section["methods"][0]["protected"] == pytest.approx(results["methods"][0]["protected"], abs=1e-9)
    searched = section["informed"][0]["searched"]["protected"]
    assert [row["config"]["weights"] for row in searched] == [{"protected": 1.0, "t1": w} for w in (0.5, 1.0)]
    attacks = {(row["method"], row["attack"]) for row in results["attacks"]}
    assert {("mergekit:ties", "average"), ("mergekit:task_arithmetic", "informed:constrained")} <= attacks


TASKS_FILE = '''
import torch
from trap2_hf.audit import AuditTask

def get_tasks(model, tokenizer):
    ids = torch.arange(24).view(2, 12) % 48

    def make(name, shift):
        def evaluate(m, split):
            return (m(input_ids=ids).logits.argmax(-1) == (ids + shift) % 48).float().mean().item()
        return AuditTask(name, evaluate, chance=1 / 48)

    return [make("t0", 1), make("t1", 2)]
'''


def test_cli_lists_mergekits_methods_or_how_to_install_them(capsys, monkeypatch):
    from trap2_hf.audit.cli import main

    assert main(["--list_methods"]) == 0
    printed = capsys.readouterr().out
    assert "| slerp | first update | exactly 2 | t = w2 / (w1 + w2) |" in printed
    assert all(f"| {name} |" in printed for name in ISSUE_METHODS)
    monkeypatch.setitem(sys.modules, "mergekit", None)
    assert main(["--list_methods"]) == 0
    assert "pip install 'trap2_hf[mergekit]'" in capsys.readouterr().out


def test_informed_grid_on_mergekit_equals_the_audits_own_on_full_fine_tunes(three_updates):
    """mergekit's task_arithmetic at per-update weights is the audit's own merge to 1e-6, and the
    informed grid run through mergekit scores every configuration as the audit's `informed` mode does."""
    from trap2_hf.audit import run_audit
    from trap2_hf.audit.informed import InformedSettings
    from trap2_hf.audit.mergekit_audit import audit_mergekit

    base, updates = three_updates
    states = [params_of(u) for u in updates]
    weights = [1.2, 0.5, 0.5]
    merged = mk.mergekit_merge(base, updates, "task_arithmetic", weights=weights)
    vectors = [full_task_vector(base, s) for s in states]
    ours = merge_task_vectors(methods.get("task_arithmetic"), vectors, {}, 0, weights)
    theta0 = params_of(base)
    assert_params_close(merged, {n: theta0[n] + ours.get(n, 0.0) for n in theta0})

    contexts = {"t0": _loaded(base, states[0]), "t1": _loaded(base, states[1]), "t2": _loaded(base, states[2])}
    tasks = agreement_tasks(base, contexts)
    settings = InformedSettings(protected_weights=(1.0, 1.2), other_weights=(0.5, 1.0), min_gain_kept=0.0)
    others = {"t1": states[1], "t2": states[2]}
    section = audit_mergekit(base, tasks, states[0], None, others, target="full", methods=[], protected_task="t0",
                             informed_methods=["task_arithmetic"], informed=settings)
    audit = run_audit(base, tasks, "t0", states[0], None, others, target="full", methods=["task_arithmetic"],
                      modes=("informed",), sweep_scales=(1.0,), progress=False, informed=settings)
    (attack,) = section["informed"]
    searched = attack["searched"]["protected"]
    assert [row["config"]["weights"] for row in searched] == [
        {"protected": p, "t1": o, "t2": o} for p in (1.0, 1.2) for o in (0.5, 1.0)
    ]
    theirs = audit["methods"][0]["search"]["protected"]
    for mine, own in zip(searched, theirs, strict=True):
        assert mine["validation"] == pytest.approx(own["validation"], abs=1e-9)
    for objective in ("mean", "constrained"):
        pick = attack["objectives"][objective]["protected"]
        assert pick["test"] == pytest.approx(audit["methods"][0]["objectives"][objective]["protected"]["test"])
    assert all(torch.equal(p, theta0[n]) for n, p in params_of(base).items())  # undone exactly


def test_informed_mergekit_grid_keeps_the_released_update_whole_and_unnormalised():
    from trap2_hf.audit.informed import InformedSettings
    from trap2_hf.audit.mergekit_audit import audit_mergekit, mergekit_grid

    settings = InformedSettings(protected_weights=(0.9, 1.0), other_weights=(0.5,))
    ties = mergekit_grid("ties", "protected", ["a", "b"], settings)
    assert len(ties) == len(methods.DENSITIES) * 2
    assert ties[0] == {"weights": {"protected": 0.9, "a": 0.5, "b": 0.5},
                       "density": {"protected": 1.0, "a": methods.DENSITIES[0], "b": methods.DENSITIES[0]},
                       "normalize": False}
    plain = mergekit_grid("task_arithmetic", "protected", ["a"], settings)
    assert plain == [{"weights": {"protected": w, "a": 0.5}, "normalize": False} for w in (0.9, 1.0)]
    assert "normalize" not in mergekit_grid("linear", "protected", ["a"], settings)[0]  # full weights: keep it
    with pytest.raises(ValueError, match="per-update weights"):
        audit_mergekit(torch.nn.Linear(1, 1), [], None, None, {}, target="full", informed_methods=["model_stock"])
