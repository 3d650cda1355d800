"""mergekit as a backend of the audit, and its file-based merge for users who want the merged model.

- `methods.py`: mergekit's methods as the audit's merge methods (`mergekit:ties`, ...), their parameters
  read from mergekit's own spec, merged in memory on the audit's task vectors (`merge_tensor`);
- `files.py` and `inputs.py`: a real merged model through mergekit's `run_merge` (`mergekit_merge`).

    pip install 'trap2_hf[mergekit]'
    from trap2_hf.audit.mergekit import mergekit_merge
"""

from ..._lazy import lazy_exports

_EXPORTS = {
    "BASE": ".methods",
    "FIRST_UPDATE": ".methods",
    "INSTALL_HINT": ".methods",
    "MERGEKIT_VERSION": ".methods",
    "METHODS": ".methods",
    "MergekitMethod": ".methods",
    "NO_BASE": ".methods",
    "WrittenInputs": ".inputs",
    "applicable": ".methods",
    "get": ".methods",
    "informed_weights": ".methods",
    "load_merged": ".files",
    "merge_config": ".files",
    "merge_tensor": ".methods",
    "merged_tensors": ".files",
    "mergekit_merge": ".files",
    "mergekit_sweep": ".files",
    "naive_weights": ".methods",
    "run_mergekit": ".files",
    "written_inputs": ".inputs",
}
__all__ = list(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)
