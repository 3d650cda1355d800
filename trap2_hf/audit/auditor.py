"""The model under audit and the contexts that put one configuration of it in place.

`Auditor` evaluates the audited model as it is asked: without any update (the base), with one update
alone, with one update re-scaled along its ray, or with a merge of several (a weight-space merge applied
to the weights in place and undone exactly, or a PEFT combination created as a temporary adapter and
deleted). It keeps each update's task vector, the base weights W0 the merges that need them are given,
and the merges that are re-used along a weight grid.
"""

import math
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from .kinds import audited_kind
from .merge_method import MergeUnsupported
from .merges import combine_adapters
from .settings import InformedSettings, PublicSettings
from .task_vectors import TaskVector, applied, base_weights, merge_task_vectors

SEARCH_SPLIT, REPORT_SPLIT = "validation", "test"
MERGED_ADAPTER = "trap2_audit_merge"


@dataclass
class AttackContext:
    """What every attack beyond the naive merge needs besides the method: the tasks, the update keys, the
    per-split base and own-update metrics that define each task's gain, the twin alone on the protected
    task (report split; None without a twin), the settings, and the `MergeTracer` that traces each reported merge
    (None: no traced column)."""

    protected_task: str
    other_keys: list[str]
    other_tasks: list[str]
    references: dict
    settings: InformedSettings
    public: PublicSettings
    twin_alone: float | None = None
    tracer: object | None = None


class Auditor:
    """The model under audit and the contexts that put one configuration of it in place."""

    def __init__(self, model, tasks, target, updates, seed):
        self.model, self.tasks, self.target, self.updates, self.seed = model, tasks, target, updates, seed
        self.kind = audited_kind(target)
        self._vectors: dict[str, TaskVector] = {}
        self._base: dict[str, torch.Tensor] = {}
        self._unit_merge: tuple = (None, None)
        self._shares: tuple = (None, None)
        self._bar = None

    @contextmanager
    def session(self, total: int, progress: bool) -> Iterator[None]:
        """Evaluation mode, no gradients, a progress bar; the model's mode, active adapter and
        requires_grad flags are restored on exit."""
        from tqdm.auto import tqdm

        training = self.model.training
        flags = {id(p): p.requires_grad for p in self.model.parameters()}
        active = self.kind.active(self.model)
        self._bar = tqdm(total=total, desc="trap2 audit", unit="eval", disable=not progress)
        try:
            self.model.eval()
            with torch.no_grad():
                yield
        finally:
            self._bar.close()
            if active is not None and active in self.model.peft_config:
                self.model.set_adapter(active)
            for p in self.model.parameters():
                p.requires_grad_(flags.get(id(p), p.requires_grad))
            self.model.train(training)

    def skip(self, steps: int) -> None:
        self._bar.total = max(self._bar.n, self._bar.total - steps)
        self._bar.refresh()

    def measure(self, context: Callable, split: str, only: list[str] | None = None) -> dict:
        """Every task (or those in `only`) on `split` inside `context()`, plus their `average`."""
        with context():
            scores = {}
            for task in self.tasks:
                if only is None or task.name in only:
                    value = float(task.evaluate(self.model, split))
                    if not math.isfinite(value):
                        raise ValueError(f"Task {task.name!r} returned a non-finite metric {value} on {split!r}.")
                    scores[task.name] = value
        self._bar.update(1)
        if only is None:
            scores["average"] = sum(scores.values()) / len(scores)
        return scores

    def score(self, context: Callable, task: str, split: str = REPORT_SPLIT) -> float:
        """One task's metric on `split` (default: the report split) inside `context()`."""
        return self.measure(context, split, [task])[task]

    def base(self):
        return self.kind.without_update(self.model)

    def alone(self, key: str):
        return self.kind.alone(self.model, self.updates[key], lambda: self.vector(key))

    def rescaled(self, key: str, scale: float):
        return self.kind.rescaled(self.model, self.updates[key], lambda: self.vector(key), scale)

    @contextmanager
    def merged(self, method, keys: list[str], params: dict) -> Iterator[None]:
        if method.on_task_vectors:
            delta, scale = self._merged_vector(method, keys, params)
            with self.base(), applied(self.model, delta, scale=scale):
                yield
            return
        with self._combined_adapter(method, [self.updates[k] for k in keys], params):
            yield

    @contextmanager
    def merged_config(self, method, config: dict, reuse: bool = False) -> Iterator[None]:
        """The merge of one configuration ({"weights": {key: w}, "density": ..., ...}, the informed and
        public modes' form); updates with weight 0 leave the merge. `reuse` keeps each update's share of a
        merge linear in its weights for the next configurations of the same structure."""
        keys, weights, params = self._per_update(config)
        if method.on_task_vectors:
            with self.base(), applied(self.model, self.config_vector(method, config, reuse)):
                yield
            return
        with self._combined_adapter(method, [self.updates[k] for k in keys], params, weights):
            yield

    def config_vector(self, method, config: dict, reuse: bool = False) -> TaskVector:
        """The merged task vector of a configuration, for a task-vector method."""
        keys, weights, params = self._per_update(config)
        if not (reuse and method.linear_in_weight):
            return self.merge_vector(method, keys, params, weights)
        cache_key = (method.name, tuple(keys), repr(sorted(params.items())))
        if self._shares[0] != cache_key:
            self._shares = (cache_key, None)
            shares = [
                self.merge_vector(method, keys, params, [float(i == j) for j in range(len(keys))])
                for i in range(len(keys))
            ]
            self._shares = (cache_key, shares)
        merged: TaskVector = {}
        for share, weight in zip(self._shares[1], weights):
            for name, tensor in share.items():
                merged[name] = merged[name] + weight * tensor if name in merged else weight * tensor
        return merged

    def merge_vector(self, method, keys: list[str], params: dict, weights=None) -> TaskVector:
        """The task-vector merge of the updates `keys`: `params` (a shared "weight", or `weights` one per
        update); the base weights W0 go to a method that needs them."""
        vectors = [self.vector(k) for k in keys]
        base = self.base_weights(set().union(*vectors)) if method.needs_base else None
        return merge_task_vectors(method, vectors, params, self.seed, weights, base=base)

    def base_weights(self, names) -> dict[str, torch.Tensor]:
        """W0 of the named weights, read once (while no merge is applied) and kept."""
        missing = sorted(set(names) - set(self._base))
        if missing:
            self._base.update(base_weights(self.model, missing))
        return {name: self._base[name] for name in names}

    @staticmethod
    def _per_update(config: dict) -> tuple[list[str], list[float], dict]:
        keys = [k for k, w in config["weights"].items() if w != 0]
        weights = [float(config["weights"][k]) for k in keys]
        params = {k: v for k, v in config.items() if k != "weights"}
        if isinstance(params.get("density"), dict):
            params["density"] = [float(params["density"][k]) for k in keys]
        return keys, weights, params

    def merged_delta(self, method, keys: list[str], params: dict) -> TaskVector:
        """The task vector of the merge `merged(method, keys, params)` holds (for a PEFT combination, the delta of the
        adapter PEFT builds): what `trap2 trace` reads from a merged model. The last weight-space merge is kept, so
        the merge just evaluated is not made again."""
        if not method.on_task_vectors:
            with self._combined_adapter(method, [self.updates[k] for k in keys], params):
                return self.kind.task_vector(self.model, MERGED_ADAPTER)
        delta, scale = self._merged_vector(method, keys, params)
        return delta if scale == 1.0 else {name: scale * tensor for name, tensor in delta.items()}

    def config_delta(self, method, config: dict) -> TaskVector:
        """The task vector of the merge `merged_config(method, config)` holds (see `merged_delta`)."""
        if method.on_task_vectors:
            return self.config_vector(method, config)
        with self.merged_config(method, config):
            return self.kind.task_vector(self.model, MERGED_ADAPTER)

    def _merged_vector(self, method, keys: list[str], params: dict) -> tuple[TaskVector, float]:
        """The merged task vector and the scale to apply it at; for a method linear in its shared
        weight, the merge at weight 1 is kept and re-used along the weight grid (another method's last merge is kept
        for the next call with the same parameters)."""
        linear = method.linear_in_weight
        rest = {k: v for k, v in params.items() if k != "weight" or not linear}
        cache_key = (method.name, tuple(keys), repr(sorted(rest.items())))
        if self._unit_merge[0] != cache_key:
            self._unit_merge = (cache_key, None)
            self._unit_merge = (cache_key, self.merge_vector(method, keys, {**rest, "weight": 1.0} if linear else rest))
        return self._unit_merge[1], float(params["weight"]) if linear else 1.0

    @contextmanager
    def _combined_adapter(self, method, adapters: list[str], params: dict, weights=None) -> Iterator[None]:
        try:
            with torch.random.fork_rng():
                torch.manual_seed(self.seed)
                combine_adapters(self.model, method, adapters, params, MERGED_ADAPTER, weights)
            self.model.set_adapter(MERGED_ADAPTER, inference_mode=True)
        except (ValueError, TypeError, RuntimeError, NotImplementedError) as error:
            self._drop_merged_adapter()
            raise MergeUnsupported(f"{type(error).__name__}: {error}") from error
        try:
            yield
        finally:
            self._drop_merged_adapter()

    def _drop_merged_adapter(self) -> None:
        if MERGED_ADAPTER in self.model.peft_config:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=f"Adapter {MERGED_ADAPTER} was active")
                self.model.delete_adapter(MERGED_ADAPTER)

    def vector(self, key: str) -> TaskVector:
        if key not in self._vectors:
            self._vectors[key] = self.kind.task_vector(self.model, self.updates[key])
        return self._vectors[key]
