"""`trap2 trace` on trained tiny updates: every merge the audit has traces the release; updates without it do not.

The updates are LoRA adapters trained for real (tests/trace_updates.py): the release, four re-trainings of its task
on the same data with other seeds (two serve as references), and two seeds of each of three other tasks.
"""

import pytest
import torch
from trace_updates import lora_config, trace_base, train_adapter

from trap2_hf.audit import methods as registry
from trap2_hf.audit.kinds import audited_kind
from trap2_hf.audit.task_vectors import adapter_task_vector, merge_task_vectors
from trap2_hf.trace import ReleaseTracer

pytestmark = pytest.mark.slow  # one module fixture trains 11 adapters (~15 s on one core)

RELEASE, REFERENCES, RETRAININGS = "release", ("same1", "same2"), ("same3", "same4")
OTHERS = ("other1_0", "other1_1", "other2_0", "other2_1", "other3_0", "other3_1")
PARTNERS = ("other1_0", "other2_1")
LOW, PARTNER_WEIGHT = 0.1, 0.5  # the release at 0.1, each partner at 0.5: the weakest merge the issue asks about
TRACED, FLAGGED = 1e-6, 1e-3


@pytest.fixture(scope="module")
def trained():
    """(PEFT model holding every adapter, {name: task vector keyed by the base's parameter names}, base weights)."""
    from peft import get_peft_model

    base = trace_base()
    weights = {name: p.detach().clone() for name, p in base.named_parameters()}
    with torch.random.fork_rng():
        torch.manual_seed(12345)
        model = get_peft_model(base, lora_config(), adapter_name="unused")
    plan = {RELEASE: (0, 1), **{f"same{s}": (0, 1 + s) for s in range(1, 5)}}
    plan.update({name: (int(name[5]), 10 * int(name[5]) + int(name[-1])) for name in OTHERS})
    for name, (task, seed) in plan.items():
        train_adapter(model, name, task, seed)
    plain = audited_kind("adapter").plain_name
    vectors = {name: {plain(k): v for k, v in adapter_task_vector(model, name).items()} for name in plan}
    return model, vectors, weights


@pytest.fixture(scope="module")
def tracer(trained):
    return ReleaseTracer(trained[1][RELEASE])


def combined(vectors: dict, weights: dict) -> dict:
    return {k: sum(w * vectors[n][k] for n, w in weights.items() if k in vectors[n]) for k in vectors[RELEASE]}


def ours(vectors, name):
    method = registry.get(name)
    params = {"density": registry.DEFAULT_DENSITY} if any(p.name == "density" for p in method.params) else {}
    updates = [vectors[n] for n in (RELEASE, *PARTNERS)]
    return merge_task_vectors(method, updates, params, weights=[LOW, PARTNER_WEIGHT, PARTNER_WEIGHT])


def peft_combination(model, name):
    """PEFT's combination at the naive weights (1/3 each): its truncating and factor-wise merges drop most of a
    release given 0.1 beside partners at 0.5 (the estimated weight left is 0.03-0.04; docs/trace.md). DARE on the
    factors keeps half of their entries here: at 0.2 its noise hides the release (docs/trace.md)."""
    method = registry.get(name)
    density = 0.5 if "dare" in name else registry.DEFAULT_DENSITY
    params = {"density": density} if any(p.name == "density" for p in method.params) else {}
    registry.combine_adapters(model, method, [RELEASE, *PARTNERS], params, "combined", weights=[1 / 3] * 3)
    try:
        vector = adapter_task_vector(model, "combined")
    finally:
        model.delete_adapter("combined")
    plain = audited_kind("adapter").plain_name
    return {plain(k): v for k, v in vector.items()}


# mergekit's methods, merged by mergekit's in-memory API on the full weights of every matrix the release changes:
# (method, parameters, how the inputs enter). The release enters at LOW wherever the method takes weights (slerp's
# t and nuslerp's weights put it at LOW between two models); sce, model_stock and karcher take none.
SPARSE = {"density": registry.DEFAULT_DENSITY}
MERGEKIT = [
    ("task_arithmetic", {}, "base"), ("ties", SPARSE, "base"), ("dare_ties", SPARSE, "base"),
    ("dare_linear", SPARSE, "base"), ("breadcrumbs", SPARSE, "base"), ("breadcrumbs_ties", SPARSE, "base"),
    ("della", SPARSE, "base"), ("della_linear", SPARSE, "base"), ("sce", {}, "base, no weights"),
    ("linear", {}, "no base"), ("model_stock", {}, "base, no weights"), ("karcher", {}, "no base, no weights"),
    ("multislerp", {}, "base"), ("nuslerp", {}, "base, two"), ("slerp", {"t": 1 - LOW}, "two"),
]


def mergekit_merged(vectors, base_weights, method, params, inputs):
    from mergekit.merge_methods.api import merge_tensors

    names = (RELEASE, PARTNERS[0]) if "two" in inputs else (RELEASE, *PARTNERS)
    weights = [LOW, 1 - LOW] if "two" in inputs else [LOW, PARTNER_WEIGHT, PARTNER_WEIGHT]
    ids = list(names)
    merged = {}
    torch.manual_seed(0)  # DARE and DELLA draw their masks from the global generator
    for key in vectors[RELEASE]:
        w0 = base_weights[key]
        tensors = [w0 + vectors[n][key] for n in names]
        parameters = dict(params)
        if "no weights" not in inputs and method != "slerp":
            parameters["weight"] = dict(zip(ids, weights))
        if inputs.startswith("base"):
            result = merge_tensors([w0, *tensors], method, parameters=parameters, ids=["base", *ids], base_index=0)
        elif method == "slerp":
            result = merge_tensors(tensors, method, parameters=parameters, ids=ids, base_index=0)
        else:
            result = merge_tensors(tensors, method, parameters=parameters, ids=ids)
        merged[key] = result - w0
    return merged


def test_every_merge_method_traces_the_release(trained, tracer):
    """Weight-space merges (ours and mergekit's) with the release at 0.1 beside two partners at 0.5; PEFT's
    combinations at 1/3 each."""
    model, vectors, base_weights = trained
    results = {f"ours:{n}": tracer.trace(ours(vectors, n)) for n in registry.names("adapter")
               if registry.get(n).backend == registry.WEIGHTS}
    results.update({n: tracer.trace(peft_combination(model, n)) for n in registry.names("adapter")
                    if registry.get(n).backend == registry.PEFT})
    pytest.importorskip("mergekit")
    for method, params, inputs in MERGEKIT:
        results[f"mergekit:{method}"] = tracer.trace(mergekit_merged(vectors, base_weights, method, params, inputs))
    assert len(results) == 6 + 7 + 15
    missed = {name: f"p = {r.p_value:.1e}, weight {r.weight:.2f}" for name, r in results.items() if r.p_value >= TRACED}
    assert missed == {}
    assert all(r.contains for r in results.values())


def test_updates_without_the_release_are_not_flagged(trained, tracer):
    """Other tasks alone and merged, without references; re-trainings of the release's task, alone and merged with
    another task, given two references."""
    _, vectors, _ = trained
    suspects = {name: vectors[name] for name in OTHERS}
    pairs = [(a, b) for i, a in enumerate(OTHERS) for b in OTHERS[i + 1:]]
    suspects.update({f"{a}+{b}": combined(vectors, {a: 1.0, b: 1.0}) for a, b in pairs})
    results = {name: tracer.trace(vector, name) for name, vector in suspects.items()}
    with_references = ReleaseTracer(vectors[RELEASE], [vectors[r] for r in REFERENCES])
    for name in RETRAININGS:
        results[f"{name} (references)"] = with_references.trace(vectors[name])
        results[f"{name}+other3_0 (references)"] = with_references.trace(
            combined(vectors, {name: 1.0, "other3_0": 1.0})
        )
    assert len(results) >= 20
    flagged = {name: f"p = {r.p_value:.1e}" for name, r in results.items() if r.p_value < FLAGGED}
    assert flagged == {}
    assert all(r.null == "references" for name, r in results.items() if "references" in name)


def test_references_still_trace_a_copy_merged_with_a_retraining_of_its_task(trained):
    _, vectors, _ = trained
    with_references = ReleaseTracer(vectors[RELEASE], [vectors[r] for r in REFERENCES])
    merged = combined(vectors, {RELEASE: 0.5, RETRAININGS[0]: 0.5, PARTNERS[0]: 0.5})
    result = with_references.trace(merged)
    assert result.null == "references" and result.p_value < TRACED and result.contains
    assert result.wins >= result.blocks - 2


@pytest.mark.parametrize("weight", [0.1, 0.3, 0.5, 1.0])
def test_task_arithmetic_weight_is_estimated_within_five_hundredths(trained, tracer, weight):
    _, vectors, _ = trained
    for partner_weight in (PARTNER_WEIGHT, 1.0):
        merged = combined(vectors, {RELEASE: weight, PARTNERS[0]: partner_weight, PARTNERS[1]: partner_weight})
        result = tracer.trace(merged)
        assert abs(result.weight - weight) <= 0.05, (partner_weight, result.weight)
        assert len(result.layers) == 3 and all(abs(w - weight) <= 0.1 for w in result.layers.values())
