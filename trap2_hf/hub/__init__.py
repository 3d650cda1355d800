"""The Hub round trip of a protected update: its model card (card.py), pushing it from the trainers
(push.py), pulling and checking it (load.py), and `trap2 card` for updates trained elsewhere (cli.py)."""

from .._lazy import lazy_exports

_EXPORTS = {
    "BaseModelMismatchError": ".load",
    "ChecksumMismatchError": ".card",
    "HubPushError": ".push",
    "ProtectionCardError": ".card",
    "Trap2HubMixin": ".push",
    "load_protected_adapter": ".load",
    "read_protection": ".card",
    "render_card": ".card",
    "upload_folder": ".push",
    "uploadable_files": ".push",
    "write_card": ".card",
}
__all__ = list(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)
