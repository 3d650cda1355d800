"""How well `trap2 trace` finds a release in merges of the demo's MiniLM LoRA updates, and what evades it.

Trains the demo's updates (the Trap²-protected `topic` update is the release; plain re-trainings of `topic` with
other seeds on the same data; two seeds of each other task), then measures, each as a table:

- floor: per merge method (ours, PEFT's, mergekit's), the smallest weight of the release still traced (p < 1e-6)
  beside two other tasks' updates at 0.5;
- robustness: naive merges (1/3 each) and merges with the release at 0.1, cast to bfloat16 / float16, rounded to
  8 bits (per-row absmax), repaired (a fresh LoRA, 256 examples, 40 steps), fine-tuned further (a LoRA on another
  task, 600 steps; the weight matrices themselves on another task, 150 steps), and with the feed-forward hidden
  units permuted;
- separation: p-values of copies and of re-trainings of the release's task, without and with two references;
- false positives: every update and pair of updates without the release.

    python benchmarks/trace_bench.py --threads 1 --output_json runs/trace_bench.json
    python benchmarks/trace_bench.py --threads 1 --save_vectors runs/trace_vectors.pt   # keep the task vectors
"""

import argparse
import contextlib
import itertools
import json
import os
import sys
import time

import torch

TRACED = 1e-6
FLOOR_WEIGHTS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.5)
PARTNER_WEIGHT = 0.5
SEEDS = {"topic": (1, 2, 3, 4, 5, 6, 7, 8), "object": (1, 2), "region": (1, 2)}
REFERENCES = ("topic_s1", "topic_s2")


def train_updates(threads_note: str, seed: int = 0) -> tuple:
    """The demo's setup and {name: task vector}: the protected release, its twin, re-trainings, other tasks."""
    from trap2_hf.audit.task_vectors import adapter_task_vector
    from trap2_hf.demo import model as demo_model
    from trap2_hf.demo import pipeline
    from trap2_hf.settings import Trap2Settings

    setup = pipeline.build("demo", seed=seed)
    config = demo_model.lora_config(8)
    start = time.perf_counter()
    pipeline.train_update(setup, setup.protected, "topic", 200, Trap2Settings(), seed=seed)
    pipeline.train_update(setup, setup.unprotected, "topic", 60, seed=seed)
    for task, seeds in SEEDS.items():
        for s in seeds:
            name = f"{task}_s{s}"
            torch.manual_seed(7000 + 100 * s + len(task))  # another initialisation per update
            setup.model.add_adapter(name, config)
            pipeline.train_update(setup, name, task, 60, seed=s)
    print(f"[trace_bench] trained {2 + sum(map(len, SEEDS.values()))} updates in "
          f"{time.perf_counter() - start:.0f}s ({threads_note})", flush=True)
    names = [setup.protected, setup.unprotected] + [f"{t}_s{s}" for t, seeds in SEEDS.items() for s in seeds]
    return setup, {n: {k: v.clone() for k, v in adapter_task_vector(setup.model, n).items()} for n in names}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default).")
    parser.add_argument("--save_vectors", default=None, help="Save the trained task vectors here (torch.save).")
    parser.add_argument("--output_json", default=None, help="Write every table here.")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from trap2_hf.trace import ReleaseTracer

    start = time.perf_counter()
    setup, vectors = train_updates(f"{torch.get_num_threads()} threads")
    if args.save_vectors:
        torch.save(vectors, args.save_vectors)
    release = vectors[setup.protected]
    base = {n: p.detach().clone() for n, p in setup.model.named_parameters() if n in release}
    tracer = ReleaseTracer(release)
    with_references = ReleaseTracer(release, [vectors[r] for r in REFERENCES])
    partners = ("object_s1", "region_s1")
    results = {
        "floor": floors(setup, vectors, base, tracer, partners),
        "robustness": robustness(setup, vectors, base, tracer, partners),
        "separation": separation(setup, vectors, tracer, with_references, partners),
        "false_positives": false_positives(setup, vectors, tracer),
        "seconds": time.perf_counter() - start,
    }
    print_tables(results)
    if args.output_json:
        os.makedirs(os.path.dirname(args.output_json) or ".", exist_ok=True)
        with open(args.output_json, "w") as handle:
            json.dump(results, handle, indent=2)
    return 0


def summary(result) -> dict:
    return {"p": result.p_value, "weight": result.weight, "matches": result.matches, "blocks": result.blocks}


def floors(setup, vectors, base, tracer, partners) -> dict:
    """Per method, (p, estimated weight) at each weight of the release, partners at 0.5."""
    rows = {}
    for weight in FLOOR_WEIGHTS:
        for name, merged in merges(setup, vectors, base, weight, partners).items():
            rows.setdefault(name, {})[str(weight)] = summary(tracer.trace(merged))
    return rows


def merges(setup, vectors, base, weight, partners) -> dict:
    """{method: merged task vector} with the release at `weight` and `partners` at PARTNER_WEIGHT."""
    from trap2_hf.audit import methods as registry
    from trap2_hf.audit.task_vectors import adapter_task_vector, merge_task_vectors

    names = [setup.protected, *partners]
    weights = [weight] + [PARTNER_WEIGHT] * len(partners)
    out = {}
    # mergekit's methods are merged below on the full weights (mergekit_merges), as a merged checkpoint holds them
    for name in registry.names("adapter", backend=registry.WEIGHTS) + registry.names("adapter", backend=registry.PEFT):
        method = registry.get(name)
        params = {"density": registry.DEFAULT_DENSITY} if any(p.name == "density" for p in method.params) else {}
        if method.backend == registry.WEIGHTS:
            out[f"ours:{name}"] = merge_task_vectors(method, [vectors[n] for n in names], params, weights=weights)
        else:
            registry.combine_adapters(setup.model, method, names, params, "trace_bench", weights=weights)
            out[name] = {k: v.clone() for k, v in adapter_task_vector(setup.model, "trace_bench").items()}
            setup.model.delete_adapter("trace_bench")
    out.update(mergekit_merges(vectors, base, names, weights))
    return out


def mergekit_merges(vectors, base, names, weights) -> dict:
    """mergekit's methods by its in-memory API on the full weights (W0 + delta) of every matrix the release
    changes; slerp and nuslerp merge the release with the first partner (t = 1 - weight)."""
    from mergekit.merge_methods.api import merge_tensors

    sparse = {"density": 0.2}
    table = [
        ("task_arithmetic", {}, "base"), ("ties", sparse, "base"), ("dare_ties", sparse, "base"),
        ("dare_linear", sparse, "base"), ("breadcrumbs", sparse, "base"), ("breadcrumbs_ties", sparse, "base"),
        ("della", sparse, "base"), ("della_linear", sparse, "base"), ("sce", {}, "base, no weights"),
        ("linear", {}, "no base"), ("model_stock", {}, "base, no weights"), ("karcher", {}, "no base, no weights"),
        ("multislerp", {}, "base"), ("nuslerp", {}, "base, two"), ("slerp", {"t": 1 - weights[0]}, "two"),
    ]
    out = {}
    for method, params, inputs in table:
        chosen = names[:2] if "two" in inputs else names
        chosen_weights = [weights[0], 1 - weights[0]] if "two" in inputs else weights
        torch.manual_seed(0)
        merged = {}
        for key, w0 in base.items():
            tensors = [w0 + vectors[n][key] for n in chosen]
            parameters = dict(params)
            if "no weights" not in inputs and method != "slerp":
                parameters["weight"] = dict(zip(chosen, chosen_weights))
            if inputs.startswith("base"):
                result = merge_tensors([w0, *tensors], method, parameters=parameters, ids=["base", *chosen],
                                       base_index=0)
            elif method == "slerp":
                result = merge_tensors(tensors, method, parameters=parameters, ids=list(chosen), base_index=0)
            else:
                result = merge_tensors(tensors, method, parameters=parameters, ids=list(chosen))
            merged[key] = result - w0
        out[f"mergekit:{method}"] = merged
    return out


def robustness(setup, vectors, base, tracer, partners) -> dict:
    """What happens to a merge after it is made, for a naive merge (1/3 each) and the release at 0.1."""
    from trap2_hf.audit import methods as registry
    from trap2_hf.audit.task_vectors import merge_task_vectors

    rows = {}
    for label, weight, partner_weight in (("naive 1/3", 1 / 3, 1 / 3), ("release at 0.1", 0.1, PARTNER_WEIGHT)):
        merged = merge_task_vectors(
            registry.get("task_arithmetic"), [vectors[n] for n in (setup.protected, *partners)], {},
            weights=[weight, partner_weight, partner_weight],
        )
        variants = {
            "as merged": merged,
            "bfloat16": cast(base, merged, torch.bfloat16),
            "float16": cast(base, merged, torch.float16),
            "8-bit (per-row absmax)": int8_rounded(base, merged),
            "repair: LoRA, 256 examples, 40 steps": further_trained(setup, merged, "topic", 256, 40, "lora"),
            "LoRA on another task, 600 steps": further_trained(setup, merged, "object", 512, 600, "lora"),
            "its weight matrices on another task, 150 steps": further_trained(
                setup, merged, "object", 512, 150, "full"),
            "FFN hidden units permuted": permuted_units(setup, base, merged, everything=False),
            "every hidden unit permuted": permuted_units(setup, base, merged, everything=True),
        }
        rows[label] = {name: summary(tracer.trace(vector)) for name, vector in variants.items()}
    return rows


def cast(base, merged, dtype) -> dict:
    return {k: (base[k] + merged[k]).to(dtype).float() - base[k] for k in merged}


def int8_rounded(base, merged) -> dict:
    out = {}
    for key, delta in merged.items():
        weights = base[key] + delta
        scale = weights.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / 127
        out[key] = torch.round(weights / scale).clamp(-127, 127) * scale - base[key]
    return out


def permuted_units(setup, base, merged, everything: bool) -> dict:
    """The merged model with hidden units permuted, which leaves its function unchanged when the biases and norms
    move with them (they are not in the task vectors): each layer's feed-forward units (the rows of
    intermediate.dense and the columns of output.dense), and with `everything` also the residual stream (one
    permutation for the whole model) and each layer's attention heads."""
    config = setup.model.get_base_model().config
    heads, hidden = config.num_attention_heads, config.hidden_size
    size = hidden // heads
    generator = torch.Generator().manual_seed(0)
    stream = torch.randperm(hidden, generator=generator) if everything else torch.arange(hidden)
    full = {k: base[k] + merged[k] for k in merged}
    out = {}
    for key, weights in full.items():
        layer = key.split(".layer.")[1].split(".")[0]
        generator.manual_seed(1000 + int(layer))
        units = torch.randperm(config.intermediate_size, generator=generator)
        order = torch.randperm(heads, generator=generator) if everything else torch.arange(heads)
        head_rows = (order[:, None] * size + torch.arange(size)).reshape(-1)
        if ".attention.self." in key:
            weights = weights[head_rows][:, stream]
        elif ".attention.output.dense." in key:
            weights = weights[stream][:, head_rows]
        elif ".intermediate.dense." in key:
            weights = weights[units][:, stream]
        elif ".output.dense." in key:
            weights = weights[stream][:, units]
        out[key] = weights - base[key]
    return out


def further_trained(setup, merged, task, examples, steps, what) -> dict:
    """The merge trained further on `task` (its first `examples` training examples): a fresh rank-8 LoRA on the
    demo's targets, or the weight matrices themselves; returns merged + what the training added."""
    from trap2_hf.audit.task_vectors import adapter_task_vector, applied
    from trap2_hf.demo import model as demo_model

    model = setup.model
    data = {k: v[:examples] for k, v in setup.data[task]["train"].items()}
    generator = torch.Generator().manual_seed(0)
    with model.disable_adapter() if what == "full" else contextlib.nullcontext(), applied(model, merged):
        if what == "lora":
            with torch.random.fork_rng():
                torch.manual_seed(0)
                model.add_adapter("trace_repair", demo_model.lora_config(8))
            demo_model.train_only(model, "trace_repair")
            params = [p for p in model.parameters() if p.requires_grad]
            lr = 1e-3
        else:  # every weight matrix the release changes (what `applied` restores afterwards)
            named = dict(model.named_parameters())
            params = [named[k] for k in merged]
            before = {k: named[k].detach().clone() for k in merged}
            for p in params:
                p.requires_grad_(True)
            lr = 5e-5
        optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
        model.train()
        for _ in range(steps):
            rows = torch.randint(0, examples, (16,), generator=generator).tolist()
            batch = demo_model.trimmed_collate([{k: v[i] for k, v in data.items()} for i in rows])
            logits = demo_model.classify(model, setup.heads[task], batch["input_ids"], batch["attention_mask"])
            torch.nn.functional.cross_entropy(logits, batch["labels"]).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        model.eval()
        if what == "lora":
            added = adapter_task_vector(model, "trace_repair")
            result = {k: merged[k] + added.get(k, 0) for k in merged}
        else:
            result = {k: merged[k] + (p.detach() - before[k]) for k, p in model.named_parameters() if k in merged}
    if what == "lora":
        model.delete_adapter("trace_repair")
    demo_model.freeze_all_adapters(model)
    for p in model.parameters():
        p.requires_grad_(False)
    return result


def separation(setup, vectors, tracer, with_references, partners) -> dict:
    """p-values of copies (the release at 0.1 / 0.33 / 1 beside partners, alone or beside a re-training) and of
    re-trainings of its task (alone, beside another task), without and with references."""
    retrainings = [n for n in vectors if n.startswith("topic_s") and n not in REFERENCES]
    cases = {}
    for weight in (0.1, 1 / 3, 1.0):
        cases[f"copy at {weight:.2g} + 2 other tasks at 0.5"] = combined(
            vectors, {setup.protected: weight, partners[0]: 0.5, partners[1]: 0.5})
        cases[f"copy at {weight:.2g} + a re-training + another task"] = combined(
            vectors, {setup.protected: weight, retrainings[0]: 0.5, partners[0]: 0.5})
    for name in retrainings:
        cases[f"re-training {name}"] = vectors[name]
        cases[f"re-training {name} + another task"] = combined(vectors, {name: 1.0, partners[0]: 1.0})
    cases["the unprotected twin (same LoRA initialisation)"] = vectors[setup.unprotected]
    return {
        name: {"no references": summary(tracer.trace(v)), "2 references": summary(with_references.trace(v))}
        for name, v in cases.items()
    }


def false_positives(setup, vectors, tracer) -> dict:
    others = [n for n in vectors if not n.startswith("topic") and n not in (setup.protected, setup.unprotected)]
    cases = {n: vectors[n] for n in others}
    cases.update({f"{a}+{b}": combined(vectors, {a: 1.0, b: 1.0}) for a, b in itertools.combinations(others, 2)})
    cases["all other tasks"] = combined(vectors, {n: 1.0 for n in others})
    return {name: summary(tracer.trace(v)) for name, v in cases.items()}


def combined(vectors, weights) -> dict:
    keys = next(iter(vectors.values())).keys()
    return {k: sum(w * vectors[n][k] for n, w in weights.items()) for k in keys}


def print_tables(results) -> None:
    print("\n## Smallest weight traced (p < 1e-6), partners at 0.5\n")
    print("| method | floor | p at 0.1 | weight est. at 0.1 |")
    print("|---|---|---|---|")
    for name, row in results["floor"].items():
        traced = [float(w) for w, r in row.items() if r["p"] < TRACED]
        floor = f"{min(traced):g}" if traced else f"> {max(FLOOR_WEIGHTS):g}"
        print(f"| {name} | {floor} | {row['0.1']['p']:.1e} | {row['0.1']['weight']:.3f} |")
    for label, rows in results["robustness"].items():
        print(f"\n## After the merge ({label})\n\n| suspect | p | weight est. | matches |\n|---|---|---|---|")
        for name, r in rows.items():
            print(f"| {name} | {r['p']:.1e} | {r['weight']:.3f} | {r['matches']}/{r['blocks']} |")
    print("\n## Copies and re-trainings\n\n| suspect | p, no references | p, 2 references |\n|---|---|---|")
    for name, r in results["separation"].items():
        print(f"| {name} | {r['no references']['p']:.1e} | {r['2 references']['p']:.1e} |")
    fp = results["false_positives"]
    below = sum(r["p"] < 1e-3 for r in fp.values())
    print(f"\n## Without the release: {below} of {len(fp)} below p = 1e-3; smallest p "
          f"{min(r['p'] for r in fp.values()):.1e}")
    print(f"\n[trace_bench] {results['seconds']:.0f}s")


if __name__ == "__main__":
    sys.exit(main())
