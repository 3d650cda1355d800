"""The Hub round trip of a protected update, one module per reason to change:

- files.py: the files of an update, their sha256, atomic writes with ordinary permissions;
- protection.py: the `trap2` block of the card (the machine-readable record a loader trusts);
- card.py: the model card around it (metadata, the human section, the audit table);
- upload.py: what may leave the machine and how (save first, no pickles or secrets, clear errors);
- mixin.py: `Trap2HubMixin`, the trainers' saves and pushes;
- load.py: pulling an adapter back and checking it; cli.py: `trap2 card`."""

from .._lazy import lazy_exports

_EXPORTS = {
    "BaseModelMismatchError": ".load",
    "ChecksumMismatchError": ".files",
    "HubPushError": ".upload",
    "ProtectionCardError": ".protection",
    "Trap2HubMixin": ".mixin",
    "load_protected_adapter": ".load",
    "read_protection": ".protection",
    "render_card": ".card",
    "upload_folder": ".upload",
    "uploadable_files": ".upload",
    "write_card": ".card",
}
__all__ = list(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)
