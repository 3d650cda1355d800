"""Merge-attack audit: how a protected update fares, alone and merged, against its unprotected twin.

    from trap2_hf.audit import AuditTask, run_audit, write_report
    results = run_audit(peft_model, tasks, "topic", "protected", "unprotected", {"city": "city"})
    write_report(results, "audit/")          # audit.json, audit.md, audit.png

Merge methods live in a registry (`methods.get(name)`, `methods.names(target)`); task vectors in
`task_vectors`; the informed attacker in `informed` (`InformedSettings`); post-merge repair in
`repair` (`RepairSettings`); the console command is `trap2 audit --help`.
"""

from . import methods
from .informed import InformedSettings
from .methods import MergeMethod, Param
from .metrics import load_metric
from .repair import RepairSettings
from .report import format_table, write_report
from .run import AuditTask, run_audit
from .task_vectors import adapter_task_vector, applied, full_task_vector, merge_task_vectors

__all__ = [
    "AuditTask",
    "InformedSettings",
    "MergeMethod",
    "Param",
    "RepairSettings",
    "adapter_task_vector",
    "applied",
    "format_table",
    "full_task_vector",
    "load_metric",
    "merge_task_vectors",
    "methods",
    "run_audit",
    "write_report",
]
