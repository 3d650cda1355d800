"""Tracing a released update inside a merged model (`trap2 trace`): its estimated weight and a p-value.

    from trap2_hf.trace import trace_release, ReleaseTracer
    for result in trace_release("base-model", "./my-adapter", ["./merged-model"]):
        print(result.verdict())

- stats.py: the test as plain functions of tensors (scored directions, decoys, references, p-values);
- tracer.py: `ReleaseTracer`, the release prepared once and suspects traced in memory (task vectors);
- deltas.py: each update's delta read from a folder or Hub repo id; run.py: `trace_release`; cli.py: `trap2 trace`.
"""

from .._lazy import lazy_exports

_EXPORTS = {
    "ReleaseTracer": ".tracer",
    "TraceResult": ".tracer",
    "TraceSettings": ".settings",
    "trace_release": ".run",
}
__all__ = list(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)
