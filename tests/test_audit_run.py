"""The audit end to end on a tiny Llama: adapters and full fine-tunes, the JSON schema, the report, the CLI."""

import json
import math
import os

import pytest
import torch
from conftest import VOCAB, audit_cli_inputs, tiny_llama

from trap2_hf.audit import AuditTask, format_table, methods, run_audit, write_report


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny forward passes: extra threads only spin against other processes on a shared CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


SCALES = (0.0, 0.5, 1.0, 2.0)
IDS = {
    split: torch.randint(0, VOCAB, (4, 10), generator=torch.Generator().manual_seed(i))
    for i, split in enumerate(("validation", "test"))
}


def next_token_tasks(model, label_contexts: dict) -> list[AuditTask]:
    """Task t: next-token accuracy against what `label_contexts[t]()` makes the model predict on a
    fixed batch, so each task's own update scores 1.0 alone."""
    labels = {}
    with torch.no_grad():
        for name, context in label_contexts.items():
            with context():
                labels[name] = {split: model(input_ids=ids).logits.argmax(-1) for split, ids in IDS.items()}

    def make(name):
        def evaluate(m, split):
            return (m(input_ids=IDS[split]).logits.argmax(-1) == labels[name][split]).float().mean().item()

        return AuditTask(name, evaluate, chance=1 / VOCAB)

    return [make(name) for name in label_contexts]


def lora_setup():
    """Adapters prot (task t0), twin (an exact copy of prot), other1 (t1), other2 (t2)."""
    from contextlib import contextmanager

    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
    model = get_peft_model(tiny_llama(), config, adapter_name="prot")
    for name in ("twin", "other1", "other2"):
        model.add_adapter(name, config)
    with torch.no_grad():
        params = dict(model.named_parameters())
        for name, param in params.items():
            if ".twin." in name:
                param.copy_(params[name.replace(".twin.", ".prot.")])

    def active(adapter):
        @contextmanager
        def context():
            model.set_adapter(adapter)
            yield

        return context

    tasks = next_token_tasks(model, {"t0": active("prot"), "t1": active("other1"), "t2": active("other2")})
    model.set_adapter("prot")
    return model.eval(), tasks


@pytest.fixture(scope="module")
def adapter_audit():
    model, tasks = lora_setup()
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    results = run_audit(
        model, tasks, "t0", "prot", "twin", {"t1": "other1", "t2": "other2"},
        modes=("average", "best"), sweep_scales=SCALES, seed=0, progress=False,
    )
    return model, tasks, results, weights, flags


def test_adapter_audit_json_schema(adapter_audit):
    _, _, results, _, _ = adapter_audit
    tasks = ["t0", "t1", "t2"]
    assert results["protected_task"] == "t0"
    for key in ("base", "chance", "finetuned"):
        assert sorted(results[key]) == tasks, key
    assert set(results["standalone"]) == {"protected", "unprotected"}
    assert results["rescale_curve"]["scales"] == list(SCALES)
    assert len(results["rescale_curve"]["protected"]) == len(SCALES) == len(results["rescale_curve"]["unprotected"])
    assert results["skipped"] == []
    # Every method that applies to three adapters, mergekit's included: `best` where there is a grid to search.
    expected = {
        (name, mode) for name in methods.names("adapter") for mode in ("average", "best")
        if methods.get(name).accepts(3) and (mode == "average" or methods.get(name).searched)
    }
    assert {(e["method"], e["mode"]) for e in results["methods"]} == expected
    assert {"mergekit:ties", "mergekit:sce"} <= {e["method"] for e in results["methods"]}
    for entry in results["methods"]:
        assert {"method", "mode", "params", "protected", "unprotected"} <= set(entry)
        for variant in ("protected", "unprotected"):
            assert set(entry[variant]) == set(tasks) | {"average"}
            values = [entry[variant][t] for t in tasks]
            assert all(0.0 <= v <= 1.0 for v in values)
            assert math.isclose(entry[variant]["average"], sum(values) / 3)
    json.dumps(results)


def test_adapter_audit_numbers(adapter_audit):
    _, _, results, _, _ = adapter_audit
    curve = results["rescale_curve"]
    assert results["standalone"] == {"protected": 1.0, "unprotected": 1.0}
    assert results["finetuned"] == {"t0": 1.0, "t1": 1.0, "t2": 1.0}
    assert curve["protected"][SCALES.index(1.0)] == 1.0
    assert curve["protected"][SCALES.index(0.0)] == results["base"]["t0"] < 0.5
    entries = {(e["method"], e["mode"]): e for e in results["methods"]}
    for (name, mode), entry in entries.items():
        # The twin is an exact copy and merges are seeded, so both variants must agree.
        assert entry["protected"] == entry["unprotected"], (name, mode)
        assert entry["params"] == entry["unprotected_params"], (name, mode)
        if mode == "average":
            assert entry["params"].get("weight", 1 / 3) == pytest.approx(1 / 3)  # sce & co. take no weights
            assert entry["params"].get("density", methods.DEFAULT_DENSITY) == methods.DEFAULT_DENSITY
    # peft's `cat` is exactly the weight-space weighted sum: same predictions up to float noise.
    for mode in ("average", "best"):
        ta, cat = entries[("task_arithmetic", mode)]["protected"], entries[("peft_cat", mode)]["protected"]
        assert all(abs(ta[t] - cat[t]) <= 1 / 40 for t in ("t0", "t1", "t2")), mode


def test_merged_scores_match_a_merge_done_by_hand(adapter_audit):
    from trap2_hf.audit import adapter_task_vector, applied, merge_task_vectors

    model, tasks, results, _, _ = adapter_audit
    vectors = [adapter_task_vector(model, name) for name in ("prot", "other1", "other2")]
    for entry in results["methods"]:
        if entry["method"] not in ("task_arithmetic", "dare_ties", "tsv"):
            continue
        delta = merge_task_vectors(methods.get(entry["method"]), vectors, entry["params"], seed=0)
        with torch.no_grad(), model.disable_adapter(), applied(model, delta):
            scores = {task.name: task.evaluate(model, "test") for task in tasks}
        for name, value in scores.items():
            assert abs(entry["protected"][name] - value) <= 1 / 40, (entry["method"], entry["mode"], name)


def test_best_mode_searches_the_whole_grid_on_validation_and_keeps_its_maximum(adapter_audit):
    _, _, results, _, _ = adapter_audit
    for entry in results["methods"]:
        if entry["mode"] != "best":
            continue
        grid = methods.get(entry["method"]).grid(3)
        search = entry["search"]["protected"]
        assert [row["params"] for row in search] == grid
        # the shared coefficient reaches 1: the weight, or mergekit's lambda where the weights are normalised
        assert any(max(row["params"]["weight"], row["params"].get("lambda", 0)) >= 1.0 for row in search)
        best = max(row["validation"]["average"] for row in search)
        chosen = next(row for row in search if row["params"] == entry["params"])
        assert chosen["validation"]["average"] == best


def test_adapter_audit_leaves_the_model_as_it_found_it(adapter_audit):
    model, _, _, weights, flags = adapter_audit
    assert set(model.peft_config) == {"prot", "twin", "other1", "other2"}
    assert model.active_adapter == "prot"
    for name, param in model.named_parameters():
        assert torch.equal(param.detach(), weights[name]), name
        assert param.requires_grad == flags[name], name


def test_report_files_and_table(adapter_audit, tmp_path):
    _, _, results, _, _ = adapter_audit
    paths = write_report(results, str(tmp_path / "report"))
    assert sorted(os.path.basename(p) for p in paths.values()) == ["audit.json", "audit.md", "audit.png"]
    with open(paths["json"]) as f:
        assert json.load(f) == results
    with open(paths["png"], "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    table = format_table(results)
    with open(paths["md"]) as f:
        assert table in f.read()
    rows = [line for line in table.splitlines() if line.startswith("| ")]
    benign = 1 + len(results["benign"]["perturbations"])  # the guard's table: header and one row per perturbation
    # the transforms' tables: a header per parameter (density, spread), a row per sparsifier, the worst and the mean
    # per-tensor draw
    transforms = 2 + sum(k in results["transforms"]["curves"] for k in ("trim", "dare", "della")) + 2
    assert len(rows) == 1 + 2 + len(results["methods"]) + benign + transforms
    ta = next(e for e in results["methods"] if e["method"] == "task_arithmetic" and e["mode"] == "average")
    assert f"| task_arithmetic | average | w=0.333 | {ta['protected']['t0']:.3f} |" in table


def test_full_finetune_audit_restores_frozen_base_weights():
    model = tiny_llama().eval()
    for param in model.parameters():
        param.requires_grad_(False)
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    generator = torch.Generator().manual_seed(1)
    states = {}
    for task in ("t0", "t1"):
        states[task] = {n: p + 0.3 * torch.randn(p.shape, generator=generator) for n, p in base.items() if "proj" in n}

    from contextlib import contextmanager

    from trap2_hf.audit import applied, full_task_vector

    def loaded(task):
        @contextmanager
        def context():
            with applied(model, full_task_vector(model, states[task])):
                yield

        return context

    tasks = next_token_tasks(model, {"t0": loaded("t0"), "t1": loaded("t1")})
    results = run_audit(
        model, tasks, "t0", states["t0"], None, {"t1": states["t1"]}, target="full",
        methods=["task_arithmetic", "dare_ties"], modes=("average", "best"), sweep_scales=SCALES, progress=False,
    )
    assert results["standalone"] == {"protected": 1.0, "unprotected": None}
    assert results["finetuned"] == {"t0": None, "t1": 1.0}
    assert results["rescale_curve"]["unprotected"] is None
    assert results["rescale_curve"]["protected"][SCALES.index(1.0)] == 1.0
    assert results["rescale_curve"]["protected"][SCALES.index(0.0)] == results["base"]["t0"]
    assert [(e["method"], e["mode"], e["unprotected"]) for e in results["methods"]] == [
        ("task_arithmetic", "average", None), ("task_arithmetic", "best", None),
        ("dare_ties", "average", None), ("dare_ties", "best", None),
    ]
    for name, param in model.named_parameters():
        assert torch.equal(param.detach(), base[name]) and not param.requires_grad, name
    assert "unprotected" in format_table(results)


def test_a_grid_override_replaces_the_named_parameter_of_every_method_for_one_run():
    """`grids` (the paper's shared-weight search) replaces the weight grid of each method that has one, keeps
    the densities, is recorded under config.declared, and leaves the registry as it was."""
    model, tasks = lora_setup()
    weights = (0.1, 0.2, 0.3)
    results = run_audit(
        model, tasks, "t0", "prot", None, {"t1": "other1"}, methods=["task_arithmetic", "ties"], modes=("best",),
        sweep_scales=(1.0,), seed=0, progress=False, grids={"weight": weights}, benign=(),
    )
    for entry in results["methods"]:
        searched = [row["params"] for row in entry["search"]["protected"]]
        densities = [{}] if entry["method"] == "task_arithmetic" else [{"density": d} for d in methods.DENSITIES]
        assert searched == [{"weight": w, **d} for d in densities for w in weights], entry["method"]
        assert entry["params"]["weight"] in weights
        assert results["config"]["declared"][entry["method"]]["params"][0]["grid"] == list(weights)
    assert methods.get("ties").params[0].grid == methods.SPARSE_WEIGHTS
    for bad in ({"weigth": weights}, {"weight": ()}):
        with pytest.raises(ValueError, match="grids"):
            run_audit(model, tasks, "t0", "prot", None, {"t1": "other1"}, methods=["task_arithmetic"],
                      modes=("best",), progress=False, grids=bad)


def test_best_methods_limit_the_best_mode_and_the_report_says_what_was_left_out():
    """`best_methods` (the demo's time budget) searches the best shared weight of those methods only; the others
    still run their other modes, and the report lists the searches left out."""
    from trap2_hf.report.verdict import not_measured

    model, tasks = lora_setup()
    results = run_audit(
        model, tasks, "t0", "prot", None, {"t1": "other1"}, methods=["task_arithmetic", "ties"],
        modes=("average", "best"), sweep_scales=(1.0,), seed=0, progress=False, benign=(), trace=False,
        best_methods=("task_arithmetic",),
    )
    ran = sorted((entry["method"], entry["mode"]) for entry in results["methods"])
    assert ran == [("task_arithmetic", "average"), ("task_arithmetic", "best"), ("ties", "average")]
    assert results["config"]["best_methods"] == ["task_arithmetic"]
    assert results["config"]["not_audited"]["best"] == ["ties"]
    assert "the best shared weight of ties" in not_measured(results)
    with pytest.raises(ValueError, match=r"best_methods \['tsv'\] are not among the audited methods"):
        run_audit(model, tasks, "t0", "prot", None, {"t1": "other1"}, methods=["task_arithmetic"],
                  modes=("best",), progress=False, best_methods=("tsv",))


def test_bad_arguments_name_the_problem():
    model, tasks = lora_setup()
    with pytest.raises(ValueError, match="not one of the tasks"):
        run_audit(model, tasks, "nope", "prot", None, {"t1": "other1"})
    with pytest.raises(ValueError, match="not loaded"):
        run_audit(model, tasks, "t0", "missing", None, {"t1": "other1"})
    with pytest.raises(ValueError, match="peft_cat"):
        run_audit(tiny_llama(), tasks, "t0", {}, None, {"t1": {}}, target="full", methods=["peft_cat"])
    with pytest.raises(KeyError, match="known methods"):
        run_audit(model, tasks, "t0", "prot", None, {"t1": "other1"}, methods=["soup"])


TASKS_FILE = '''
import torch
from trap2_hf.audit import AuditTask, load_metric

def get_tasks(model, tokenizer):
    ids = torch.arange(24).view(2, 12) % 48
    metric = load_metric("accuracy")

    def make(name, shift):
        def evaluate(m, split):
            predictions = m(input_ids=ids).logits.argmax(-1).flatten().tolist()
            references = ((ids + shift) % 48).flatten().tolist()
            return metric.compute(predictions=predictions, references=references)["accuracy"]
        return AuditTask(name, evaluate, chance=1 / 48)

    return [make("t0", 1), make("t1", 2)]
'''


def test_cli_audits_adapters_from_folders(tmp_path, capsys):
    from trap2_hf.cli import main

    base_dir, folders, tasks = audit_cli_inputs(tmp_path, TASKS_FILE)
    out_dir = str(tmp_path / "audit")
    code = main([
        "audit", "--base_model", base_dir, "--tasks", tasks, "--protected_task", "t0",
        "--protected", folders["prot"], "--other", f"t1={folders['t1']}", "--methods", "task_arithmetic", "peft_cat",
        "--modes", "average", "--sweep_scales", "0", "1", "--device", "cpu", "--output_dir", out_dir, "--no_progress",
    ])
    assert code == 0
    printed = capsys.readouterr().out
    assert "| task_arithmetic | average | w=0.5 |" in printed and "| peft_cat | average | w=0.5 |" in printed
    with open(os.path.join(out_dir, "audit.json")) as f:
        results = json.load(f)
    assert results["config"]["updates"] == {"protected": "protected", "unprotected": None, "others": {"t1": "other_t1"}}
    assert results["standalone"]["unprotected"] is None and len(results["methods"]) == 2
    assert sorted(os.listdir(out_dir)) == ["audit.json", "audit.md", "audit.png"]


def test_cli_lists_methods(capsys):
    from trap2_hf.audit.cli import main

    assert main(["--list_methods"]) == 0
    printed = capsys.readouterr().out
    assert all(f"\n{name} " in "\n" + printed for name in methods.names())
    assert "mergekit:slerp" in printed and "updates: exactly 2; base: first update; weights: t = w2 / (w1 + w2)" in printed


def test_an_untrained_adapter_gets_no_verdict_and_the_report_says_what_did_not_run():
    """A LoRA that learned nothing (B = 0: alone it computes the base) audited with two methods and no twin
    (issue 32): audit.json holds no verdict and why, the methods and modes not run, and the table says so."""
    from peft import LoraConfig

    model, tasks = lora_setup()
    model.add_adapter("blank", LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj", "down_proj"]))
    results = run_audit(
        model, tasks, "t0", "blank", None, {"t1": "other1"}, methods=["task_arithmetic", "ties"],
        modes=("average",), sweep_scales=(0.5, 1.0), progress=False, benign=(),
    )
    assert results["standalone"]["protected"] == results["base"]["t0"]
    verdict = results["verdict"]
    assert verdict["given"] is False and verdict["margin"] == 0.05
    assert verdict["needed"] == pytest.approx(max(results["base"]["t0"], 1 / VOCAB) + 0.05)
    assert "the update alone does not beat the base" in verdict["reason"]
    not_run = results["config"]["not_audited"]
    assert "task_arithmetic" not in not_run["methods"] and "ties" not in not_run["methods"]
    assert {"dare_ties", "tsv", "peft_cat"} <= set(not_run["methods"])
    assert not_run["modes"] == ["best", "public", "informed", "search"]
    table = format_table(results)
    assert table.startswith("**No verdict**") and "- Stops:" not in table
    assert "- No unprotected twin" in table and "- Not measured:" in table
