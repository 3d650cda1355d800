"""The embedded demo: its task generators, its model, its criteria, and protection with the library's
default settings on the task set nobody tuned them on."""

import json

import pytest
import torch

from trap2_hf import Trap2Settings
from trap2_hf.demo import tasks as demo_tasks
from trap2_hf.demo.tasks import SPLITS, TASK_SETS, make_task, make_task_set

SIZES = {"train": 64, "validation": 16, "test": 32}
LINEAR = ("task_arithmetic", "peft_cat", "peft_linear", "peft_svd")


# ----------------------------------------------------------------------------- tasks
@pytest.mark.parametrize("task_set", list(TASK_SETS))
def test_tasks_are_a_function_of_the_seed(task_set):
    first, again, other = (make_task_set(task_set, seed, SIZES) for seed in (0, 0, 1))
    assert [t.splits for t in first] == [t.splits for t in again]
    assert [t.splits["train"][0] for t in first] != [t.splits["train"][0] for t in other]


@pytest.mark.parametrize("task_set", list(TASK_SETS))
def test_labels_balanced_and_splits_disjoint(task_set):
    for task in make_task_set(task_set, 0, SIZES):
        assert task.num_labels == 4 and task.chance == 0.25
        seen = set()
        for split in SPLITS:
            texts, labels = task.splits[split]
            assert len(texts) == SIZES[split]
            assert sorted(labels.count(k) for k in range(4)) == [SIZES[split] // 4] * 4
            assert len(set(texts)) == len(texts)
            assert not seen & set(texts), f"{task.name}: {split} overlaps an earlier split"
            seen |= set(texts)


def test_every_sentence_carries_its_class_cues_only():
    classes = TASK_SETS["demo"]["object"]
    task = make_task("object", classes, seed=3, sizes=SIZES)
    for text, label in zip(*task.splits["train"]):
        words = set(text.split())
        assert len(words & set(classes[task.labels[label]])) == 2
        for other in task.labels:
            if other != task.labels[label]:
                assert not words & set(classes[other])


def test_the_two_task_sets_share_no_cue_word():
    def cues(task_set):
        return {w for task in TASK_SETS[task_set].values() for words in task.values() for w in words}

    assert not cues("demo") & cues("heldout")
    lexicon = demo_tasks.lexicon_words()
    assert len(set(lexicon)) == demo_tasks.LEXICON_SIZE and lexicon == demo_tasks.lexicon_words()
    templates = " ".join(demo_tasks.TEMPLATES + demo_tasks.LEXICON_TEMPLATES)
    template_words = set(templates.replace("{", " ").replace("}", " ").replace(",", " ").replace(":", " ").split())
    for task_set in TASK_SETS:
        assert not cues(task_set) & (set(demo_tasks.FILLERS) | template_words | set(lexicon))


def test_the_eight_set_is_demos_three_tasks_and_five_with_words_of_their_own():
    """`eight` reuses `demo`'s tasks (same sentences for the same seed) and adds five whose words are new: none of
    `demo`'s, `heldout`'s or the lexicon's, none shared between classes, and each one wordpiece of MiniLM."""
    from trap2_hf.demo import model as demo_model

    eight, demo = make_task_set("eight", 0, SIZES), make_task_set("demo", 0, SIZES)
    assert len(eight) == 8 and [t.name for t in eight[:3]] == [t.name for t in demo] == ["topic", "object", "region"]
    assert [t.splits for t in eight[:3]] == [t.splits for t in demo]
    assert tuple(t.name for t in eight[3:]) == demo_tasks.EIGHT_OWN_TASKS
    new = [w for task in demo_tasks.EIGHT_OWN_TASKS for ws in TASK_SETS["eight"][task].values() for w in ws]
    assert len(new) == len(set(new)) == 5 * 4 * 12
    old = {w for name in ("demo", "heldout") for c in TASK_SETS[name].values() for ws in c.values() for w in ws}
    assert not set(new) & (old | set(demo_tasks.lexicon_words()))
    _, tokenizer = demo_model.load_encoder()
    assert [w for w in new if len(tokenizer.tokenize(w)) != 1] == []


def test_lexicon_task_is_an_arbitrary_balanced_word_to_class_map_tested_on_trained_words():
    labels = demo_tasks.LEXICON[1]
    sizes = {"train": 512, "validation": 32, "test": 120}
    tasks = make_task_set("lexicon", 0, sizes)
    assert [t.name for t in tasks] == ["lexicon", "topic", "object"]
    task = tasks[0]
    assert task.labels == labels
    classes = demo_tasks.lexicon_classes(demo_tasks.lexicon_words(), labels, seed=0)
    assert [len(words) for words in classes.values()] == [demo_tasks.LEXICON_SIZE // 4] * 4
    assert classes != demo_tasks.lexicon_classes(demo_tasks.lexicon_words(), labels, seed=1)
    label_of = {w: labels.index(label) for label, words in classes.items() for w in words}
    keys = {}
    for split in SPLITS:
        texts, split_labels = task.splits[split]
        keys[split] = set()
        for text, label in zip(texts, split_labels):
            found = [w for w in text.replace(",", " ").replace(":", " ").split() if w in label_of]
            assert len(set(found)) == 1 and len(found) == 2, text  # one key word, said twice
            assert label_of[found[0]] == label
            keys[split].add(found[0])
    assert keys["train"] == set(label_of)  # 512 training sentences cycle through all 240 key words
    assert keys["validation"] <= keys["train"] and keys["test"] <= keys["train"]
    small = make_task_set("lexicon", 0, {"train": 8, "validation": 8, "test": 8})[0]

    def key_words(split):
        return {w for text in small.splits[split][0] for w in text.replace(",", " ").split() if w in label_of}

    assert len(key_words("train")) == 8 and key_words("validation") | key_words("test") <= key_words("train")


def test_lexicon_key_words_are_single_tokens_and_their_classes_are_independent_of_the_word():
    """Each key word is one wordpiece of the encoder's vocabulary (so the LoRA maps one embedding), and
    the class a seed gives a word does not predict the class another seed gives it (arbitrary)."""
    from trap2_hf.demo import model as demo_model

    _, tokenizer = demo_model.load_encoder()
    words = demo_tasks.lexicon_words()
    assert all(len(tokenizer.tokenize(w)) == 1 for w in words), [w for w in words if len(tokenizer.tokenize(w)) != 1]
    labels = demo_tasks.LEXICON[1]
    maps = [
        {w: label for label, ws in demo_tasks.lexicon_classes(words, labels, seed).items() for w in ws}
        for seed in range(4)
    ]
    for first, second in zip(maps, maps[1:]):
        agree = sum(first[w] == second[w] for w in words) / len(words)
        assert 0.1 < agree < 0.4, agree  # about 1/4 of the words keep their class, as by chance
    with pytest.raises(ValueError, match="vocabulary offers"):
        demo_tasks.lexicon_words(10**6)


def test_bad_requests_are_refused():
    with pytest.raises(ValueError, match="multiple of the 4 classes"):
        make_task_set("demo", 0, {"train": 10})
    with pytest.raises(ValueError, match="heldout"):
        make_task_set("nope")


# ----------------------------------------------------------------------------- model
def test_minilm_classifier_trains_one_adapter_only():
    from trap2_hf.demo import model as demo_model

    encoder, tokenizer = demo_model.load_encoder()
    seeds = {"a": 1, "b": 2, "a_twin": 1}
    peft_model = demo_model.add_adapters(encoder, list(seeds), demo_model.lora_config(4), seeds)
    demo_model.train_only(peft_model, "b")
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all(".b." in n for n in trainable)
    modules = {n.split(".lora_")[0] for n in trainable}
    assert any(n.endswith("attention.self.query") for n in modules)
    assert any(n.endswith("intermediate.dense") for n in modules)
    state = peft_model.state_dict()
    twins = [k for k in state if ".a." in k and "lora_A" in k]
    assert all(torch.equal(state[k], state[k.replace(".a.", ".a_twin.")]) for k in twins)

    head = demo_model.random_head(encoder.config.hidden_size, 4, seed=0)
    assert torch.equal(head.weight, demo_model.random_head(encoder.config.hidden_size, 4, seed=0).weight)
    task = make_task_set("demo", 0, SIZES)[0]
    batch = demo_model.encode(tokenizer, *task.splits["validation"])
    out = demo_model.TaskClassifier(peft_model, head)(**batch)
    out["loss"].backward()
    assert all(p.grad is not None for n, p in peft_model.named_parameters() if p.requires_grad)
    assert head.weight.grad is None
    assert 0.0 <= demo_model.accuracy(peft_model, head, batch) <= 1.0


# ----------------------------------------------------------------------------- criteria
def audit_result(protected_cat=0.27, unprotected_best=1.0, standalone=1.0):
    tasks = {"topic": 0.23, "object": 0.24, "region": 0.26}

    def entry(method, mode, protected_topic, unprotected):
        return {
            "method": method, "mode": mode, "params": {},
            "protected": {"topic": protected_topic, "object": 1.0, "region": 1.0},
            "unprotected": {t: unprotected for t in tasks},
        }

    return {
        "protected_task": "topic",
        "base": tasks,
        "chance": {t: 0.25 for t in tasks},
        "finetuned": {t: 1.0 for t in tasks},
        "standalone": {"protected": standalone, "unprotected": 1.0},
        "methods": [entry(m, "average", protected_cat, 1.0) for m in LINEAR]
        + [entry("ties", "average", 0.9, 1.0), entry("peft_cat", "best", 0.9, unprotected_best)],
    }


def test_criteria_pass_and_fail_for_the_right_reasons():
    from trap2_hf.demo.pipeline import check_criteria

    assert all(ok for _, ok, _ in check_criteria(audit_result()))
    results = [ok for _, ok, _ in check_criteria(audit_result(protected_cat=0.4))]
    assert results == [True, True, False]
    results = [ok for _, ok, _ in check_criteria(audit_result(unprotected_best=0.5))]
    assert results == [False, True, True]
    results = [ok for _, ok, _ in check_criteria(audit_result(standalone=0.98))]
    assert results == [True, False, True]


def test_the_linear_criterion_covers_the_merges_the_registry_declares_linear():
    """Which merges combine updates linearly is a fact the registry declares; the criterion reads it."""
    from trap2_hf.audit import methods
    from trap2_hf.demo.pipeline import check_criteria

    assert [n for n in methods.names() if methods.get(n).combines_linearly] == [
        "task_arithmetic", "peft_linear", "peft_cat", "peft_svd", "mergekit:linear", "mergekit:task_arithmetic"
    ]
    assert methods.get("task_arithmetic").describe()["combines_linearly"] and not methods.get("tsv").combines_linearly
    name, ok, detail = check_criteria(audit_result())[2]  # ties (average) at 0.9 is not a linear merge
    assert ok and "linear merges" in name
    assert all(f"{m}: 0.27" in detail for m in LINEAR) and "ties" not in detail


# ----------------------------------------------------------------------------- end to end
@pytest.mark.slow
def test_demo_command_writes_the_report(tmp_path, capsys):
    from trap2_hf.cli import main

    out = tmp_path / "demo"
    code = main([
        "demo", "--output_dir", str(out), "--steps", "1", "--protected_max_steps", "2", "--curve_every", "1",
        "--train_size", "16", "--validation_size", "8", "--test_size", "8",
        "--methods", "task_arithmetic", "mergekit:ties", "--public_methods", "mergekit:ties",
    ])
    assert code == 0
    assert {"audit.json", "audit.md", "audit.png", "demo.json"} <= {p.name for p in out.iterdir()}
    printed = capsys.readouterr().out
    assert "| task_arithmetic | average |" in printed and "| mergekit:ties | average |" in printed
    audit = json.loads((out / "audit.json").read_text())
    assert "mergekit" not in audit
    assert {(e["method"], e["mode"]) for e in audit["methods"] if e["method"] == "mergekit:ties"} == {
        ("mergekit:ties", mode) for mode in ("average", "best", "public")
    }
    assert ("mergekit:ties", "average") in {(row["method"], row["attack"]) for row in audit["attacks"]}
    assert "mergekit:ties" in (out / "audit.md").read_text()
    assert "[demo] public merge configs: 6 points over 1 methods" in printed
    assert "[demo] audit per mode (merges evaluated per variant, seconds): average 2 over 2 methods" in printed
    assert "[PASS]" in printed or "[FAIL]" in printed
    summary = json.loads((out / "demo.json").read_text())
    assert summary["protection"] == Trap2Settings().trap_settings_dict()
    assert [run["adapter"] for run in summary["training"]["runs"]] == [
        "topic_unprotected", "object", "region", "topic_protected"
    ]
    assert summary["training"]["runs"][-1]["trap_mode"] == "fused"  # the default "auto", recorded as it ran


def test_the_demo_searches_the_best_weight_of_its_trimmed_share_unless_told():
    from trap2_hf.demo.pipeline import DemoArguments, demo_best_methods

    audited = ["task_arithmetic", "peft_cat", "mergekit:ties"]
    assert demo_best_methods(DemoArguments(), audited) == ("task_arithmetic", "peft_cat")
    assert demo_best_methods(DemoArguments(methods=audited), audited) is None  # --methods: every one searched
    assert demo_best_methods(DemoArguments(best_methods=["mergekit:ties", "tsv"]), audited) == ("mergekit:ties",)


@pytest.mark.slow
def test_default_settings_protect_on_the_task_set_nobody_tuned_them_on(tmp_path):
    """The library defaults, on the `heldout` task set (never used to choose them): protected alone
    as good as its twin, and naive 3-way linear merges leave its task at the base model's level."""
    from trap2_hf.audit.run import run_audit
    from trap2_hf.demo.pipeline import DemoArguments, audit_tasks, build, train_all

    sizes = {"train": 256, "validation": 32, "test": 200}
    demo = DemoArguments(output_dir=str(tmp_path), task_set="heldout", steps=60, protected_max_steps=300)
    setup = build("heldout", None, seed=0, sizes=sizes)
    training = train_all(setup, demo, Trap2Settings())
    results = run_audit(
        setup.model, audit_tasks(setup), setup.protected_task, setup.protected, setup.unprotected, setup.others,
        methods=["task_arithmetic", "peft_linear", "peft_cat"], modes=("average",), sweep_scales=(1.0,),
        progress=False,
    )
    task = setup.protected_task
    standalone = results["standalone"]
    assert standalone["protected"] >= standalone["unprotected"] - 0.03, training
    ceiling = max(results["base"][task], results["chance"][task]) + 0.05
    merged = {m["method"]: m["protected"][task] for m in results["methods"]}
    assert all(value <= ceiling for value in merged.values()), (merged, ceiling, training["runs"][-1]["curve"])
    twin_merged = {m["method"]: m["unprotected"][task] for m in results["methods"]}
    assert min(twin_merged.values()) > ceiling + 0.2, twin_merged  # merging works when nothing is protected


def test_mergekit_methods_are_chosen_through_methods_and_the_old_flags_name_the_replacement(capsys):
    from trap2_hf.demo.run import DemoArguments, main, make_parser

    demo, _ = make_parser().parse_args_into_dataclasses(args=["--methods", "ties", "mergekit:sce"])
    assert demo.methods == ["ties", "mergekit:sce"]
    assert DemoArguments().methods is None and "public" in DemoArguments().modes
    for flag, replacement in (("--mergekit_methods", "--methods task_arithmetic mergekit:ties"),
                              ("--mergekit_informed", "--informed_methods mergekit:ties")):
        with pytest.raises(SystemExit) as exit:
            main([flag, "ties"])
        assert exit.value.code == 2
        err = capsys.readouterr().err
        assert f"{flag} was removed" in err and replacement in err
