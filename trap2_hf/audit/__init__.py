"""Merge-attack audit: how a protected update fares, alone and merged, against its unprotected twin.

    from trap2_hf.audit import AuditTask, run_audit, write_report
    results = run_audit(peft_model, tasks, "topic", "protected", "unprotected", {"city": "city"})
    write_report(results, "audit/")          # audit.json, audit.md, audit.png

Merge methods live in one registry (`methods.get(name)`, `methods.names(target)`): the audit's own
weight-space merges, PEFT's combination types and mergekit's methods (`mergekit:NAME`, run in memory;
`audit.mergekit.mergekit_merge` writes a real merged model). Task vectors are in `task_vectors`; the
informed attacker in `informed` (`InformedSettings`); the public grid in `public` (`PublicSettings`);
post-merge repair in `repair` (`RepairSettings`); the console command is `trap2 audit --help`.
"""

from .._lazy import lazy_exports

_EXPORTS = {
    "AuditTask": ".run",
    "InformedSettings": ".settings",
    "MergeMethod": ".merge_method",
    "Param": ".merge_method",
    "PublicGrid": ".merge_method",
    "PublicSettings": ".settings",
    "RepairSettings": ".settings",
    "adapter_task_vector": ".task_vectors",
    "applied": ".task_vectors",
    "format_table": "..report.tables",
    "full_task_vector": ".task_vectors",
    "load_metric": ".metrics",
    "merge_task_vectors": ".task_vectors",
    "methods": ".methods",
    "run_audit": ".run",
    "write_report": "..report.tables",
}
__all__ = list(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)
