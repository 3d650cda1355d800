"""The "traced" column: each merge the audit reports, traced for the released update inside it (`trap2 trace`).

A merge the protection does not stop may still be traced: the audit reads "stopped" or "not stopped but traced at
p = ..." per attack. A `ReleaseTracer` is built once per variant from the update's own task vector: the merges with
the protected update are traced against the protected update, the merges with the twin in its place against the
twin. Traced are the merges the tables show, each (method, mode)'s reported merge per variant (for the informed
modes, both objectives' picks; for repair, each repaired merge); the merges searched on validation behind them are
not (a trace costs about a third of an evaluation of the demo's test split).

The false-positive check traces updates without the released one against the protected update: each other task's
update alone, each audited merge of the others alone at its naive weights and the repair references (the same
repair without the released update), before and after repair; `flagged` counts those below `alpha`. The twin alone
(the same task, without Trap²) is traced too and reported apart: a re-training of the same task is the hard case,
which `trap2 trace --reference` handles (docs/trace.md).
"""

import time

from ..trace.settings import DEFAULT_ALPHA, TraceSettings
from ..trace.tracer import ReleaseTracer
from .merge_method import MergeUnsupported


class MergeTracer:
    """One `ReleaseTracer` per variant; `trace(variant, vector)` gives the traced cell of a merge holding it."""

    def __init__(self, auditor, variants: list[str], settings: TraceSettings | None = None, alpha=DEFAULT_ALPHA):
        self.settings, self.alpha, self.variants = settings or TraceSettings(), alpha, list(variants)
        self.tracers, self.errors = {}, {}
        self.seconds, self.delta_seconds, self.count = 0.0, 0.0, 0
        start = time.perf_counter()
        for variant in variants:
            try:
                self.tracers[variant] = ReleaseTracer(auditor.vector(variant), settings=self.settings)
            except ValueError as error:  # nothing to trace: an all-zero update, or one of rank <= shared_directions
                self.errors[variant] = str(error)
        self.build_seconds = time.perf_counter() - start

    def trace(self, variant: str, vector, against: str | None = None) -> dict | None:
        """{"weight", "p_value", "contains", "matches", "blocks"} of `vector` (a task vector, or a function making
        it: its seconds are counted as `delta_seconds`) traced against `against` (default: `variant`, the update the
        merge holds); None without a vector or a tracer."""
        tracer = self.tracers.get(against or variant)
        if vector is None or tracer is None:
            return None
        start = time.perf_counter()
        if callable(vector):
            vector = vector()
            self.delta_seconds += time.perf_counter() - start
            start = time.perf_counter()
        result = tracer.trace(vector, alpha=self.alpha)
        self.seconds += time.perf_counter() - start
        self.count += 1
        return {"weight": result.weight, "p_value": result.p_value, "contains": result.contains,
                "matches": result.matches, "blocks": result.blocks}

    def trace_entry(self, auditor, method, entry: dict) -> None:
        """Fill `entry["traced"]` (per variant) for a public or informed entry from its configurations; for the
        informed modes each objective's pick gets its own `traced`, and the entry's is the `mean` pick's (its
        `params`)."""
        if "objectives" in entry:
            for picks in entry["objectives"].values():
                for variant, pick in picks.items():
                    if pick is not None:
                        pick["traced"] = self.trace(
                            variant, lambda c=pick["config"]: self._config_delta(auditor, method, c)
                        )
            mean = entry["objectives"]["mean"]
            entry["traced"] = {v: (mean.get(v) or {}).get("traced") for v in self.variants}
            return
        configs = {"protected": entry.get("params"), "unprotected": entry.get("unprotected_params")}
        entry["traced"] = {
            v: None if configs[v] is None else self.trace(v, lambda c=configs[v]: self._config_delta(auditor, method, c))
            for v in self.variants
        }

    def false_positives(self, auditor, entries: list[dict], others: list[str], repair: dict | None) -> dict:
        """Updates and merges without the released update, traced against the protected update."""
        from . import methods as registry

        suspects = [(f"{key.removeprefix('other:')} alone", auditor.vector(key)) for key in others]
        for name in dict.fromkeys(e["method"] for e in entries if e["mode"] == "average"):
            method = registry.get(name)
            if len(others) < 2 or not method.accepts(len(others)):
                continue
            start = time.perf_counter()
            try:
                vector = auditor.merged_delta(method, others, method.average_params(len(others)))
            except MergeUnsupported:
                continue
            finally:
                self.delta_seconds += time.perf_counter() - start
            suspects.append((f"{name} of the others alone (naive)", vector))
        if "protected" not in self.tracers:
            return {"against": "protected", "error": self.errors.get("protected")}
        rows = [{"suspect": name, **self.trace("protected", vector)} for name, vector in suspects]
        for row in (repair or {}).get("rows", []):
            traced = row.get("traced") or {}
            cells = [("before repair", traced.get("before", {}).get("reference"))]
            cells += [(f"after repair, k={k}", runs.get("reference")) for k, runs in traced.get("after", {}).items()]
            rows += [{"suspect": f"{row['method']} repair reference ({row['stage']} merge, {when})", **cell}
                     for when, cell in cells if cell is not None]
        same_task = None
        if auditor.updates.get("unprotected") is not None:
            twin = self.trace("unprotected", auditor.vector("unprotected"), against="protected")
            same_task = {"suspect": "the twin alone", **twin}
        return {
            "against": "protected",
            "alpha": self.alpha,
            "suspects": rows,
            "flagged": sum(row["p_value"] < self.alpha for row in rows),
            "smallest_p": min((row["p_value"] for row in rows), default=None),
            "twin_alone": same_task,
        }

    def describe(self) -> dict:
        return {
            "settings": {k: getattr(self.settings, k) for k in self.settings.__dataclass_fields__},
            "alpha": self.alpha,
            "tracers": {v: {"blocks": len(t.blocks)} for v, t in self.tracers.items()}
            | {v: {"error": e} for v, e in self.errors.items()},
            "traces": self.count,
            # building the tracers, the traces, and the merges' task vectors made again for them (PEFT's combined
            # adapters, public and informed picks; the naive merges of the others)
            "seconds": {"build": self.build_seconds, "traces": self.seconds, "deltas": self.delta_seconds},
            "seconds_per_trace": self.seconds / self.count if self.count else None,
        }

    def _config_delta(self, auditor, method, config: dict):
        try:
            return auditor.config_delta(method, config)
        except MergeUnsupported:
            return None
