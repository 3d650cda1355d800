"""Merge methods against hand-computed results; task vectors applied and undone exactly."""

import pytest
import torch
from conftest import tiny_llama

from trap2_hf.audit import methods
from trap2_hf.audit.task_vectors import adapter_task_vector, applied, full_task_vector, merge_task_vectors


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny forward passes: extra threads only spin against other processes on a shared CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


WEIGHT_SPACE = ("task_arithmetic", "ties", "dare_linear", "dare_ties", "magnitude_prune", "tsv")


def t(rows):
    return torch.tensor(rows, dtype=torch.float32)


def w(*values):
    return torch.tensor(values, dtype=torch.float32)


def test_task_arithmetic_is_the_weighted_sum():
    tau1, tau2 = t([[1, 2, 3], [4, 5, 6]]), t([[-1, 0, 1], [2, -2, 0]])
    merged = methods.get("task_arithmetic").merge([tau1, tau2], w(0.5, 2.0))
    torch.testing.assert_close(merged, t([[-1.5, 1.0, 3.5], [6.0, -1.5, 3.0]]))


def test_ties_trims_elects_and_takes_the_disjoint_mean():
    tau1, tau2 = t([[1, -2, 3], [-4, 5, -6]]), t([[2, 1, -1], [3, -1, 2]])
    # density 0.5 keeps tau1's -4, 5, -6 and tau2's 2, 3, 2; elected signs [[+,+,+],[-,+,-]].
    merged = methods.get("ties").merge([tau1, tau2], w(1.0, 1.0), density=0.5)
    torch.testing.assert_close(merged, t([[2, 0, 0], [-4, 5, -6]]))
    halved = methods.get("ties").merge([tau1, tau2], w(0.5, 0.5), density=0.5)
    torch.testing.assert_close(halved, t([[1, 0, 0], [-2, 2.5, -3]]))


def test_ties_averages_only_the_entries_that_agree_with_the_elected_sign():
    taus = [t([[1, -2, 3], [-4, 5, -6]]), t([[3, 1, -1], [-2, -1, 2]]), t([[-1, 0, 2], [0, 4, 0]])]
    merged = methods.get("ties").merge(taus, w(1.0, 1.0, 1.0), density=1.0)
    torch.testing.assert_close(merged, t([[2, -2, 2.5], [-3, 4.5, -6]]))


def test_magnitude_prune_keeps_each_updates_largest_entries_then_sums():
    tau1, tau2 = t([[1, -5, 2], [0.5, 3, -4]]), t([[6, 1.5, 1], [0.5, 2.5, -2]])
    merged = methods.get("magnitude_prune").merge([tau1, tau2], w(1.0, 0.5), density=0.5)
    torch.testing.assert_close(merged, t([[3, -5, 0], [0, 4.25, -5]]))


def test_dare_linear_drops_at_random_and_rescales_the_survivors():
    tau1, tau2 = t([[1, 2, 3], [4, 5, 6]]), t([[10, 20, 30], [40, 50, 60]])
    dare = methods.get("dare_linear")
    torch.manual_seed(0)
    merged = dare.merge([tau1, tau2], w(0.5, 0.5), density=0.5)
    # Each entry is 0.5 * (m1 * tau1 + m2 * tau2) / 0.5 with masks m in {0, 1}.
    allowed = torch.stack([torch.zeros_like(tau1), tau1, tau2, tau1 + tau2])
    assert ((allowed - merged).abs() < 1e-5).any(dim=0).all()
    draws = torch.stack([dare.merge([tau1, tau2], w(0.5, 0.5), density=0.5) for _ in range(4000)])
    torch.testing.assert_close(draws.mean(0), 0.5 * (tau1 + tau2), rtol=0.1, atol=0.3)


def test_dare_ties_keeps_a_random_subset_and_averages_the_agreeing_survivors():
    tau1, tau2 = t([[1, 2, 3], [4, 5, 6]]), t([[3, 4, 5], [6, 7, 8]])
    torch.manual_seed(1)
    merged = methods.get("dare_ties").merge([tau1, tau2], w(1.0, 1.0), density=0.5)
    # All signs agree, so each entry is 0, 2*tau1, 2*tau2 or the mean of both, 2*(tau1+tau2)/2.
    allowed = torch.stack([torch.zeros_like(tau1), 2 * tau1, 2 * tau2, tau1 + tau2])
    assert ((allowed - merged).abs() < 1e-5).any(dim=0).all()
    assert (merged == 0).any() and (merged != 0).any()


def test_tsv_keeps_each_updates_top_singular_directions():
    # N=2 updates of 2x3 matrices keep k=1 singular triplet each; tau1's second direction (1) is dropped.
    tau1, tau2 = t([[3, 0, 0], [0, 1, 0]]), t([[0, 0, 0], [0, 0, 2]])
    tsv = methods.get("tsv").merge
    torch.testing.assert_close(tsv([tau1, tau2], w(1.0, 1.0)), t([[3, 0, 0], [0, 0, 2]]), atol=1e-5, rtol=0)
    torch.testing.assert_close(tsv([tau1, tau2], w(0.5, 2.0)), t([[1.5, 0, 0], [0, 0, 4]]), atol=1e-5, rtol=0)
    bias = tsv([torch.tensor([1.0, 2.0]), torch.tensor([3.0, -2.0])], w(0.5, 0.5))
    torch.testing.assert_close(bias, torch.tensor([2.0, 0.0]))


def test_tsv_orthogonalises_interfering_directions():
    # Both updates point along the same left singular vector: the polar factor spreads them apart,
    # so the merge stays rank 2 with unit-norm factors instead of adding up along e1.
    tau1, tau2 = t([[1, 0, 0], [0, 0, 0]]), t([[1, 0, 0], [0, 0, 0]]) @ torch.eye(3)[[1, 0, 2]]
    merged = methods.get("tsv").merge([tau1, tau2], w(1.0, 1.0))
    assert torch.linalg.matrix_rank(merged) == 2
    torch.testing.assert_close(torch.linalg.svdvals(merged), w(1.0, 1.0), atol=1e-5, rtol=0)


def test_unknown_method_name_lists_the_known_ones():
    with pytest.raises(KeyError) as error:
        methods.get("model_soup")
    message = str(error.value)
    assert "model_soup" in message
    for name in (*WEIGHT_SPACE, "peft_cat", "peft_svd"):
        assert name in message


def test_registry_covers_the_issue_and_every_best_grid_reaches_full_weight():
    assert set(methods.names("full", backend="weights")) == set(WEIGHT_SPACE)
    peft = {f"peft_{c}" for c in ("linear", "cat", "svd", "ties", "dare_linear", "dare_ties", "magnitude_prune")}
    assert set(methods.names("adapter", backend="peft")) == peft and methods.names("full", backend="peft") == []
    mergekit = methods.names(backend="mergekit")
    assert set(methods.names("adapter")) == set(methods.names("full")) | peft
    assert set(methods.names("full")) == set(WEIGHT_SPACE) | set(mergekit)
    for name in mergekit:  # mergekit's: the shared coefficient is the weight, or lambda where weights are normalised
        method = methods.get(name)
        if method.weighted:
            assert method.average_params(4)["weight"] == 0.25, name
        if method.searched:
            grid = method.grid(4)
            assert 1 <= len(grid) <= 9, name
            assert any(max(point["weight"], point.get("lambda", 0.0)) >= 1.0 for point in grid), name
            densities = {point.get("density", 0.0) for point in grid}
            assert "density" not in grid[0] or (min(densities) <= 0.3 and max(densities) >= 0.8), name
    for name in methods.names(backend="weights") + methods.names(backend="peft"):
        method = methods.get(name)
        grid = method.grid()
        assert 1 <= len(grid) <= 9, name
        assert any(point["weight"] >= 1.0 for point in grid), f"{name}: no full-weight merge in the best grid"
        assert method.average_params(4)["weight"] == 0.25
        if any(p.name == "density" for p in method.params):
            densities = {point["density"] for point in grid}
            assert min(densities) <= 0.3 and max(densities) >= 0.9, name
            assert any(point["weight"] >= 1.0 and point["density"] >= 0.9 for point in grid), name
    assert max(p["weight"] for p in methods.get("task_arithmetic").grid()) >= 1.5


def test_merged_task_vectors_are_seeded_and_leave_the_global_rng_alone():
    vectors = [{"x": torch.randn(4, 5), "y": torch.randn(3)}, {"x": torch.randn(4, 5)}]
    state = torch.get_rng_state()
    dare = methods.get("dare_ties")
    first = merge_task_vectors(dare, vectors, {"weight": 1.0, "density": 0.5}, seed=3)
    assert torch.equal(torch.get_rng_state(), state)
    again = merge_task_vectors(dare, vectors, {"weight": 1.0, "density": 0.5}, seed=3)
    other = merge_task_vectors(dare, vectors, {"weight": 1.0, "density": 0.5}, seed=4)
    assert torch.equal(first["x"], again["x"]) and not torch.equal(first["x"], other["x"])
    summed = merge_task_vectors(methods.get("task_arithmetic"), vectors, {"weight": 0.5})
    torch.testing.assert_close(summed["x"], 0.5 * (vectors[0]["x"] + vectors[1]["x"]))
    torch.testing.assert_close(summed["y"], 0.5 * vectors[0]["y"])  # missing from the second: zero


@pytest.mark.parametrize("name", WEIGHT_SPACE)
def test_weight_space_merges_are_linear_in_the_shared_weight(name):
    # The audit merges once at weight 1 and applies it at each weight of the grid; this is why it may.
    method = methods.get(name)
    assert method.linear_in_weight
    generator = torch.Generator().manual_seed(0)
    vectors = [{"m": torch.randn(6, 5, generator=generator), "b": torch.randn(5, generator=generator)}
               for _ in range(3)]
    params = method.average_params(3)
    unit = merge_task_vectors(method, vectors, {**params, "weight": 1.0}, seed=5)
    scaled = merge_task_vectors(method, vectors, {**params, "weight": 1.5}, seed=5)
    for key in unit:
        assert unit[key].abs().sum() > 0
        torch.testing.assert_close(scaled[key], 1.5 * unit[key], atol=1e-5, rtol=1e-5)


def test_applied_task_vector_is_undone_bit_exactly_even_on_error():
    model = tiny_llama()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    vector = {n: torch.randn_like(p) * 1e-3 for n, p in list(model.named_parameters())[:4]}
    with pytest.raises(RuntimeError):
        with applied(model, vector):
            name = next(iter(vector))
            torch.testing.assert_close(dict(model.named_parameters())[name].detach(), before[name] + vector[name])
            raise RuntimeError("evaluation failed")
    for name, param in model.named_parameters():
        assert torch.equal(param.detach(), before[name]), name


def test_full_task_vector_is_theta_minus_theta0_for_changed_parameters():
    model = tiny_llama()
    params = dict(model.named_parameters())
    finetuned = {n: p.detach().clone() for n, p in params.items()}
    finetuned["model.norm.weight"] += 0.5
    vector = full_task_vector(model, finetuned)
    assert list(vector) == ["model.norm.weight"]
    torch.testing.assert_close(vector["model.norm.weight"], torch.full_like(params["model.norm.weight"], 0.5))
    with pytest.raises(ValueError, match="does not have"):
        full_task_vector(model, {"not.a.weight": torch.zeros(1)})


@pytest.mark.parametrize("use_dora", [False, True])
def test_adapter_task_vector_reproduces_the_adapter_in_weight_space(use_dora):
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"], init_lora_weights=False, use_dora=use_dora
    )
    model = get_peft_model(tiny_llama(), config, adapter_name="upd").eval()
    ids = torch.arange(12).view(2, 6)
    base_weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        adapted = model(input_ids=ids).logits
        vector = adapter_task_vector(model, "upd")
        assert len(vector) == 4 and all(k.endswith("base_layer.weight") for k in vector)
        with model.disable_adapter(), applied(model, vector):
            merged = model(input_ids=ids).logits
        with model.disable_adapter():
            base = model(input_ids=ids).logits
    torch.testing.assert_close(merged, adapted, atol=1e-4, rtol=1e-4)
    assert (merged - base).abs().max() > 1e-2
    for name, param in model.named_parameters():
        assert torch.equal(param.detach(), base_weights[name]), name
    assert not any(layer.merged_adapters for layer in model.modules() if hasattr(layer, "merged_adapters"))


def test_peft_combination_types_create_a_finite_adapter_and_cat_is_the_exact_sum():
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    model = get_peft_model(tiny_llama(), config, adapter_name="u1")
    model.add_adapter("u2", config)
    for name in methods.names("adapter"):
        method = methods.get(name)
        if method.backend != methods.PEFT:
            continue
        params = method.average_params(2)
        methods.combine_adapters(model, method, ["u1", "u2"], params, "merged")
        merged = adapter_task_vector(model, "merged")
        assert len(merged) == 4 and all(torch.isfinite(v).all() and v.abs().sum() > 0 for v in merged.values()), name
        if name == "peft_cat":
            expected = merge_task_vectors(
                methods.get("task_arithmetic"),
                [adapter_task_vector(model, "u1"), adapter_task_vector(model, "u2")],
                params,
            )
            for key, value in expected.items():
                torch.testing.assert_close(merged[key], value, atol=1e-6, rtol=1e-5)
        model.delete_adapter("merged")
    assert set(model.peft_config) == {"u1", "u2"}
