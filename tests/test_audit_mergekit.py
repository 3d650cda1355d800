"""mergekit as a backend of the audit: its file-based merges of tiny models against the plain formula and the
audit's own, its in-memory merges (what the audit runs) against the file-based ones, and its methods audited
through `run_audit` like every other method."""

import json
import os
import sys

import pytest
import torch
import yaml
from conftest import audit_cli_inputs, tiny_llama

from trap2_hf.audit import methods
from trap2_hf.audit import mergekit as mk
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
        assert set(method.naive()) <= declared, name
    assert mk.get("slerp").update_range() == (2, 2) and mk.get("slerp").base_role == mk.FIRST_UPDATE
    assert mk.get("nuslerp").update_range() == (2, 2) and mk.get("nuslerp").base_role == mk.BASE
    assert mk.get("model_stock").update_range() == (2, None) and not mk.get("model_stock").weighted
    assert mk.get("linear").base_role == mk.NO_BASE and mk.get("karcher").base_role == mk.NO_BASE
    assert mk.get("ties").naive() == {"density": methods.DEFAULT_DENSITY}
    assert mk.applicable(3) == [n for n in mk.METHODS if n not in ("slerp", "nuslerp")]
    assert mk.naive_weights("ties", 4) == [0.25] * 4 and mk.naive_weights("sce", 4) is None
    assert mk.informed_weights(3, others=0.6, protected_index=1) == [0.6, 1.0, 0.6]
    assert mk.get("mergekit:ties") is mk.get("ties")


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


# ---- mergekit in the one engine: its methods in the registry, merged in memory, audited like the others ------

def test_the_registry_lists_mergekits_methods_with_the_parameters_mergekit_declares():
    from mergekit.merge_methods import registry

    assert methods.names(backend="mergekit") == [f"mergekit:{name}" for name in mk.METHODS]
    for name in mk.METHODS:
        method = methods.get(f"mergekit:{name}")
        spec = {p.name: p for p in registry.get(name).spec.parameters}
        assert method.backend == "mergekit" and method.needs_base and method.targets == ("adapter", "full")
        assert {p.name for p in method.params} <= set(spec) | {"weight"}, name
        for key, value in method.backend_defaults.items():  # read from mergekit's spec, not copied
            assert value == (None if spec[key].required else spec[key].default), (name, key)
        assert "int8_mask" not in method.backend_defaults
    ties = methods.get("mergekit:ties")
    assert [p.name for p in ties.params] == ["weight", "density", "lambda"]
    assert ties.params[2].default == registry.get("ties").spec.parameters[3].default == 1.0
    assert ties.params[0].grid == () and ties.searched  # normalised: the shared coefficient is lambda
    assert ties.backend_defaults == {"normalize": True, "rescale": False}
    assert methods.get("mergekit:della").backend_defaults["epsilon"] == 0.15
    assert methods.get("mergekit:della").params[1].grid == (0.3, 0.6, 0.8)  # density + epsilon < 1
    assert methods.get("mergekit:dare_ties").params[0].grid == methods.SPARSE_WEIGHTS
    sce = methods.get("mergekit:sce")
    assert sce.params == () and sce.backend_defaults == {"select_topk": 1.0} and not sce.per_update_weights
    assert methods.get("mergekit:slerp").updates == (2, 2) and not methods.get("mergekit:slerp").per_update_weights
    assert methods.get("mergekit:model_stock").updates == (2, None)
    assert [n for n in methods.names() if methods.get(n).combines_linearly][-2:] == [
        "mergekit:linear", "mergekit:task_arithmetic"
    ]
    with pytest.raises(KeyError, match="Unknown merge method 'mergekit:tiez'; known methods: .*mergekit:ties"):
        methods.get("mergekit:tiez")


def test_the_registry_says_how_to_install_mergekit_when_it_is_missing():
    code = (
        "import sys\nsys.modules['mergekit'] = None\n"
        "from trap2_hf.audit import methods\nfrom trap2_hf.audit.cli import list_methods\n"
        "assert methods.names(backend='mergekit') == [] and 'task_arithmetic' in methods.names()\n"
        "try:\n    methods.get('mergekit:ties')\nexcept KeyError as error:\n    print(error)\n"
        "print(list_methods().splitlines()[-1])\n"
    )
    import subprocess

    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "Unknown merge method 'mergekit:ties' (The mergekit backend needs mergekit==0.1.5" in out
    assert "mergekit's methods are not listed: The mergekit backend needs mergekit==0.1.5: pip install " \
           "'trap2_hf[mergekit]'" in out


IN_MEMORY_CASES = [
    ("ties", {"density": 0.5}, [0.5, 1.2, 0.7], 0),
    ("della", {"density": 0.5}, [1 / 3] * 3, 3),
    ("della_linear", {"density": 0.4, "epsilon": 0.1}, [1.0, 0.5, 0.5], 7),
    ("dare_ties", {"density": 0.3}, [1 / 3] * 3, 1),
    ("breadcrumbs_ties", {"density": 0.6}, [1.0, 1.0, 1.0], 0),
    ("sce", {"select_topk": 0.5}, None, 0),
    ("karcher", {}, None, 0),
    ("model_stock", {}, None, 0),
    ("linear", {}, [1.0, 2.0, 1.0], 0),
    ("slerp", {}, [0.3, 0.7], 0),
    ("nuslerp", {}, [0.6, 0.4], 0),
]


@pytest.mark.parametrize("name, params, weights, seed", IN_MEMORY_CASES, ids=[c[0] for c in IN_MEMORY_CASES])
def test_in_memory_merges_equal_mergekits_file_based_run_merge(three_updates, name, params, weights, seed):
    """The audit's in-memory merge of task vectors (mergekit's merge_tensors on W0 and W0 + tau_i) and
    mergekit's file-based `run_merge` give the same weights; randomised methods draw the same masks for the
    same seed (both merge the tensors in sorted order of their names from one seeded generator)."""
    base, updates = three_updates
    count = 2 if name in ("slerp", "nuslerp") else 3
    states = [params_of(u) for u in updates[:count]]
    by_file = params_of(mk.mergekit_merge(base, updates[:count], name, weights=weights, params=params, seed=seed))
    theta0 = params_of(base)
    vectors = [full_task_vector(base, s) for s in states]
    in_memory = merge_task_vectors(methods.get(f"mergekit:{name}"), vectors, params, seed, weights, base=theta0)
    assert set(in_memory) == set(theta0)
    for key, delta in in_memory.items():
        torch.testing.assert_close(theta0[key] + delta, by_file[key], atol=1e-6, rtol=0, msg=f"{name} {key}")
    if methods.get(f"mergekit:{name}").randomized:
        other = merge_task_vectors(methods.get(f"mergekit:{name}"), vectors, params, seed + 1, weights, base=theta0)
        assert any(not torch.equal(other[k], in_memory[k]) for k in other)


def test_in_memory_merges_need_the_base_weights_and_name_mergekits_parameters(three_updates):
    base, updates = three_updates
    vectors = [full_task_vector(base, params_of(u)) for u in updates]
    with pytest.raises(ValueError, match="'mergekit:ties' merges from the base weights W0: pass base="):
        merge_task_vectors(methods.get("mergekit:ties"), vectors, {"weight": 0.5})
    with pytest.raises(ValueError, match=r"\['densty'\] are not parameters of mergekit's 'ties'.*'density'"):
        merge_task_vectors(methods.get("mergekit:ties"), vectors, {"weight": 0.5, "densty": 0.5}, base=params_of(base))


def adapter_model():
    """Adapters prot, twin (its exact copy), other1, other2 on the tiny Llama, with next-token tasks."""
    from test_audit_run import lora_setup

    return lora_setup()


def test_a_mergekit_method_runs_in_every_mode_through_run_audit_into_the_common_schema(tmp_path):
    from trap2_hf.audit import PublicSettings, format_table, run_audit, write_report
    from trap2_hf.audit.informed import InformedSettings

    model, tasks = adapter_model()
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    others = {"t1": "other1", "t2": "other2"}
    settings = InformedSettings(protected_weights=(1.0,), other_weights=(0.5,), budget=2)
    results = run_audit(
        model, tasks, "t0", "prot", "twin", others, methods=["task_arithmetic", "mergekit:task_arithmetic",
        "mergekit:ties", "mergekit:sce"], sweep_scales=(1.0,), progress=False, informed=settings,
        public=PublicSettings(twin_gain_kept=0.0), benign=(),
    )
    assert "mergekit" not in results and results["skipped"] == []
    entries = {(e["method"], e["mode"]): e for e in results["methods"]}
    modes = ("average", "best", "public", "informed", "search")
    assert {mode for method, mode in entries if method == "mergekit:ties"} == set(modes)
    # sce takes no weights and has no grid: the naive merge and its public points only
    assert {mode for method, mode in entries if method == "mergekit:sce"} == {"average", "public"}
    for entry in entries.values():
        assert entry["protected"] == entry["unprotected"]  # the twin is an exact copy, merges are seeded
    ties = entries[("mergekit:ties", "average")]
    assert ties["params"] == {"weight": pytest.approx(1 / 3), "density": 0.2, "lambda": 1.0}
    assert [row["params"] for row in entries[("mergekit:ties", "best")]["search"]["protected"]] == \
        methods.get("mergekit:ties").grid(3)
    assert entries[("mergekit:ties", "public")]["evaluations"] == 6
    assert entries[("mergekit:ties", "informed")]["params"]["normalize"] is False
    # mergekit's task arithmetic is the audit's own, in every mode that searches the same configurations
    for mode in ("average", "best", "public", "informed"):
        assert entries[("mergekit:task_arithmetic", mode)]["protected"] == pytest.approx(
            entries[("task_arithmetic", mode)]["protected"], abs=1e-9), mode
    # the naive TIES merge measured is the in-memory merge applied by hand
    from trap2_hf.audit import adapter_task_vector, applied, merge_task_vectors

    vectors = [adapter_task_vector(model, a) for a in ("prot", "other1", "other2")]
    base = {k: weights[k] for k in vectors[0]}
    delta = merge_task_vectors(methods.get("mergekit:ties"), vectors, ties["params"], base=base)
    with torch.no_grad(), model.disable_adapter(), applied(model, delta):
        assert tasks[0].evaluate(model, "test") == ties["protected"]["t0"]
    rows = {(r["method"], r["attack"]) for r in results["attacks"]}
    assert {("mergekit:ties", a) for a in ("average", "best", "public", "informed:constrained")} <= rows
    table = format_table(results)
    assert "| mergekit:ties | average | w=0.333 d=0.2 lambda=1 |" in table
    for name, run in (("mergekit:ties", 6), ("mergekit:sce", 2)):
        public = entries[(name, "public")]
        assert public["counted"] + public["twin_fails"] == run == len(public["points"])
        assert f"| {name} | {public['counted']} / {run} | {public['twin_fails']} |" in table
    assert "public merge configs" in table
    paths = write_report(results, str(tmp_path))
    assert os.path.getsize(paths["png"]) > 0
    assert results["config"]["declared"]["mergekit:ties"]["backend"] == "mergekit"
    for name, param in model.named_parameters():
        assert torch.equal(param.detach(), weights[name]), name


def test_informed_grid_on_mergekit_equals_the_audits_own_on_full_fine_tunes(three_updates):
    """mergekit's task_arithmetic at per-update weights is the audit's own merge to 1e-6, and the informed
    grid on it scores every configuration as the audit's own `informed` mode does."""
    from trap2_hf.audit import run_audit
    from trap2_hf.audit.informed import InformedSettings

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
    audit = run_audit(base, tasks, "t0", states[0], None, others, target="full",
                      methods=["task_arithmetic", "mergekit:task_arithmetic"], modes=("informed",),
                      sweep_scales=(1.0,), progress=False, informed=settings, benign=())
    own, theirs = audit["methods"]
    searched = theirs["search"]["protected"]
    assert [row["config"]["weights"] for row in searched] == [
        {"protected": p, "other:t1": o, "other:t2": o} for p in (1.0, 1.2) for o in (0.5, 1.0)
    ]
    assert all(row["config"]["normalize"] is False for row in searched)
    for mine, reference in zip(searched, own["search"]["protected"], strict=True):
        assert mine["validation"] == pytest.approx(reference["validation"], abs=1e-9)
    for objective in ("mean", "constrained"):
        assert theirs["objectives"][objective]["protected"]["test"] == pytest.approx(
            own["objectives"][objective]["protected"]["test"])
    assert all(torch.equal(p, theta0[n]) for n, p in params_of(base).items())  # undone exactly


def test_informed_mergekit_grid_keeps_the_released_update_whole_and_unnormalised():
    from trap2_hf.audit.informed import InformedSettings, grid_configs

    settings = InformedSettings(protected_weights=(0.9, 1.0), other_weights=(0.5,))
    ties = grid_configs(methods.get("mergekit:ties"), "protected", ["a", "b"], settings)
    assert len(ties) == len(methods.DENSITIES) * 2
    assert ties[0] == {"weights": {"protected": 0.9, "a": 0.5, "b": 0.5},
                       "density": {"protected": 1.0, "a": methods.DENSITIES[0], "b": methods.DENSITIES[0]},
                       "normalize": False}
    plain = grid_configs(methods.get("mergekit:task_arithmetic"), "protected", ["a"], settings)
    assert plain == [{"weights": {"protected": w, "a": 0.5}, "normalize": False} for w in (0.9, 1.0)]
    assert "normalize" not in grid_configs(methods.get("mergekit:linear"), "protected", ["a"], settings)[0]


def test_methods_without_per_update_weights_are_refused_by_the_informed_modes_and_skipped_by_default():
    from trap2_hf.audit import run_audit
    from trap2_hf.audit.informed import InformedSettings

    model, tasks = adapter_model()
    others = {"t1": "other1", "t2": "other2"}
    with pytest.raises(ValueError, match=r"\['mergekit:model_stock'\] take no per-update weights.*mergekit:ties"):
        run_audit(model, tasks, "t0", "prot", None, others, methods=["mergekit:ties", "mergekit:model_stock"],
                  modes=("informed",), informed=InformedSettings(methods=("mergekit:model_stock",)), progress=False)
    results = run_audit(model, tasks, "t0", "prot", None, others, methods=["mergekit:slerp", "mergekit:karcher"],
                        modes=("average", "best"), sweep_scales=(1.0,), progress=False, benign=())
    assert [(e["method"], e["mode"]) for e in results["methods"]] == [("mergekit:karcher", "average")]
    assert results["skipped"] == [{"method": "mergekit:slerp", "reason": "merges exactly 2 updates, got 3 (it runs "
                                   "pairwise in the public mode)"}]


def _loaded(model, state):
    from trap2_hf.audit.task_vectors import applied

    return applied(model, full_task_vector(model, state))


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


def test_cli_audits_mergekit_methods_like_the_others(tmp_path, capsys):
    from trap2_hf.cli import main

    base_dir, folders, tasks = audit_cli_inputs(tmp_path, TASKS_FILE)
    out_dir = str(tmp_path / "audit")
    code = main([
        "audit", "--base_model", base_dir, "--tasks", tasks, "--protected_task", "t0",
        "--protected", folders["prot"], "--other", f"t1={folders['t1']}",
        "--methods", "task_arithmetic", "mergekit:task_arithmetic", "mergekit:ties",
        "--modes", "average", "informed", "--sweep_scales", "1", "--device", "cpu", "--output_dir", out_dir,
        "--no_progress", "--protected_weights", "1", "--other_weights", "0.5", "1", "--benign",
    ])
    assert code == 0
    printed = capsys.readouterr().out
    assert "| mergekit:ties | average | w=0.5 d=0.2 lambda=1 |" in printed
    with open(os.path.join(out_dir, "audit.json")) as f:
        results = json.load(f)
    entries = {(e["method"], e["mode"]): e for e in results["methods"]}
    assert entries[("mergekit:task_arithmetic", "average")]["protected"] == pytest.approx(
        entries[("task_arithmetic", "average")]["protected"], abs=1e-9)
    searched = entries[("mergekit:task_arithmetic", "informed")]["search"]["protected"]
    assert [row["config"]["weights"] for row in searched] == [{"protected": 1.0, "other:t1": w} for w in (0.5, 1.0)]
    attacks = {(row["method"], row["attack"]) for row in results["attacks"]}
    assert {("mergekit:ties", "average"), ("mergekit:task_arithmetic", "informed:constrained")} <= attacks
    assert "benign" not in results


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
