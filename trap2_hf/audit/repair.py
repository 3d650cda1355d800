"""Post-merge repair: how cheaply an attacker rebuilds the protected skill after a broken merge.

After a merge (the naive one, `average` mode, and the informed attacker's pick), the attacker
fine-tunes a fresh LoRA on the merged weights with k labelled examples of the protected task, for a
fixed budget (steps, learning rate, batch size). The reference is the same fine-tune of the same
merge without the released update (the other updates at the same weights): what the attacker gets
without the released update at all. The protection is worth something only where the repaired merge
ends at or below that reference.

Every run of one k sees the same examples in the same order and starts from the same LoRA
initialisation (both are functions of `seed`), so the protected update, its twin and the reference are
paired. The k-example pools are nested (the 16 are among the 64).

A PEFT combination (`peft_cat`, `peft_svd`, ...) is repaired the same way: the combined adapter PEFT
builds is folded into the base weights as its task vector (its delta weight), and the fresh LoRA
trains on top, as an attacker who merged with `add_weighted_adapter` and `merge_and_unload` would.
"""

import time
from contextlib import contextmanager

import torch

from . import methods as registry
from .auditor import AttackContext, Auditor
from .settings import RepairSettings
from .task_vectors import adapter_task_vector, applied

REPAIR_ADAPTER = "trap2_audit_repair"
STAGES = ("average", "informed")


def run_repair(
    auditor: Auditor, settings: RepairSettings, entries: list[dict], variants: list[str], context: AttackContext,
    tracer=None,
) -> dict:
    """The `repair` section of audit.json: per method and stage, the protected-task metric on the
    test split before and after repair with each k, for each variant and for the reference. With a `tracer`
    (traced.py), each merge before and after repair is traced too: a variant's against itself, the reference (without
    the released update) against the protected update."""
    task = next(t for t in auditor.tasks if t.name == context.protected_task)
    rows = []
    for name in settings.methods:
        method = registry.get(name)
        if not any(e["method"] == name for e in entries):
            continue  # the audit skipped it (a PEFT combination refused these adapters)
        for stage in STAGES:
            configs = _stage_configs(method, stage, entries, variants, context)
            if configs is None:
                continue
            released = configs["protected"]
            reference = {**released, "weights": {k: w for k, w in released["weights"].items() if k != "protected"}}
            if isinstance(reference.get("density"), dict):
                reference["density"] = {k: d for k, d in reference["density"].items() if k != "protected"}
            runs = {**configs, "reference": reference}
            start = time.perf_counter()
            row = {"method": name, "stage": stage, "configs": runs, "before": {}, "after": {}, "training": {}}
            traced = {"before": {}, "after": {}}
            for run, config in runs.items():
                vector = auditor.config_delta(method, config)
                row["before"][run] = auditor.score(lambda v=vector: _holding(auditor, v), task.name)
                against = "protected" if run == "reference" else run
                if tracer is not None:
                    traced["before"][run] = tracer.trace(run, vector, against)
                for k in settings.ks:
                    score, log, repaired = fine_tune_and_score(auditor, task, vector, k, settings, tracer is not None)
                    row["after"].setdefault(str(k), {})[run] = score
                    row["training"].setdefault(str(k), {})[run] = log
                    if tracer is not None:
                        traced["after"].setdefault(str(k), {})[run] = tracer.trace(run, repaired, against)
            if tracer is not None:
                row["traced"] = traced
            row["seconds"] = time.perf_counter() - start
            rows.append(row)
    return {"settings": settings.describe(), "rows": rows}


def fine_tune_and_score(auditor: Auditor, task, vector: dict, k: int, settings: RepairSettings, delta: bool = False):
    """Fine-tune a fresh LoRA on base + `vector` with the first k examples of the seeded pool; return
    the task's test metric with it, the training log and (with `delta`) the repaired model's task vector, `vector`
    plus the fresh LoRA's delta (else None). The model is left as it was."""
    model = auditor.model
    names = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}
    repaired = None
    with applied(model, vector), _fresh_lora(auditor, settings) as trainable:
        log = _train(model, task, trainable, k, settings)
        model.eval()
        score = float(task.evaluate(model, "test"))
        if delta:
            repaired = _plus_repair(model, vector, names)
    return score, log, repaired


def _plus_repair(model, vector: dict, names: dict) -> dict:
    """`vector` plus the fresh LoRA's delta, keyed as `vector` is (the LoRA's layers renamed the base weights)."""
    params = dict(model.named_parameters(remove_duplicate=False))
    total = dict(vector)
    for name, delta in adapter_task_vector(model, REPAIR_ADAPTER).items():
        key = names.get(id(params[name]), name)
        total[key] = total[key] + delta if key in total else delta
    return total


@contextmanager
def _holding(auditor: Auditor, vector: dict):
    with auditor.base(), applied(auditor.model, vector):
        yield


def _stage_configs(method, stage: str, entries: list[dict], variants: list[str], context) -> dict | None:
    """Per variant, the merge configuration repaired at `stage`: the naive merge (weights 1/N, the
    method's default density), or the informed pick (the constrained objective's, else the mean's)."""
    if stage == "average":
        params = method.average_params(1 + len(context.other_keys))
        weight = params.pop("weight", 1.0)  # a method without weights: the updates merged, each at 1
        return {v: {"weights": {k: weight for k in [v, *context.other_keys]}, **params} for v in variants}
    entry = next((e for e in entries if e["method"] == method.name and e["mode"] == "informed"), None)
    if entry is None:
        return None
    picks = {}
    for variant in variants:
        pick = entry["objectives"]["constrained"][variant] or entry["objectives"]["mean"][variant]
        picks[variant] = pick["config"]
    return picks


@contextmanager
def _fresh_lora(auditor: Auditor, settings: RepairSettings):
    """A fresh LoRA (seeded initialisation) on the model's current weights, the only trainable
    parameters while inside; removed on exit."""
    from peft import LoraConfig

    model = auditor.model
    targets = settings.target_modules or auditor.kind.repair_targets(model, auditor.updates["protected"])
    config = LoraConfig(
        r=settings.rank, lora_alpha=2 * settings.rank, lora_dropout=0.0,
        target_modules=list(targets) if isinstance(targets, (set, tuple, list)) else targets,
    )
    for param in model.parameters():
        param.requires_grad_(False)
    try:
        with auditor.kind.fresh_lora(model, config, REPAIR_ADAPTER, settings.seed):
            marker = f".{REPAIR_ADAPTER}."
            trainable = []
            for name, param in model.named_parameters():
                param.requires_grad_(marker in name)
                if marker in name:
                    trainable.append(param)
            yield trainable
    finally:
        for param in model.parameters():
            param.requires_grad_(False)


def _train(model, task, trainable: list, k: int, settings: RepairSettings) -> dict:
    generator = torch.Generator().manual_seed(settings.seed)
    pool = torch.randperm(task.num_train, generator=generator)[:k]
    optimizer = torch.optim.AdamW(trainable, lr=settings.learning_rate, weight_decay=0.0)
    losses = []
    model.train()
    with torch.enable_grad(), torch.random.fork_rng():
        torch.manual_seed(settings.seed)  # dropout masks: the same for every paired run
        for _ in range(settings.steps):
            batch = pool[torch.randperm(k, generator=generator)[: settings.batch_size]]
            loss = task.train_loss(model, batch)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
    return {"trainable_parameters": sum(p.numel() for p in trainable), "loss_first": losses[0], "loss_last": losses[-1]}
