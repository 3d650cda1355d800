"""The Hub round trip of a protected update: pulling it back (`load.py`) and `trap2 card` (`cli.py`). What a release
records (the card, its `trap2` block, the upload policy, the trainers' saves and pushes) is in `trap2_hf/release/`,
the files and their checksums in `trap2_hf/files.py`; the names below are re-exported from there."""

from .._lazy import lazy_exports

_EXPORTS = {
    "BaseModelMismatchError": ".load",
    "ChecksumMismatchError": "..files",
    "HubPushError": "..release.upload",
    "ProtectionCardError": "..release.protection",
    "Trap2HubMixin": "..release.mixin",
    "load_protected_adapter": ".load",
    "read_protection": "..release.protection",
    "render_card": "..release.card",
    "upload_folder": "..release.upload",
    "uploadable_files": "..release.upload",
    "write_card": "..release.card",
}
__all__ = list(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)
