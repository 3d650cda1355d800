"""The Hub round trip of a protected update: its model card (card.py), pushing it from the trainers
(push.py), pulling and checking it (load.py), and `trap2 card` for updates trained elsewhere (cli.py)."""

from .card import ChecksumMismatchError, ProtectionCardError, read_protection, render_card, write_card
from .load import BaseModelMismatchError, load_protected_adapter
from .push import HubPushError, Trap2HubMixin, upload_folder, uploadable_files

__all__ = [
    "BaseModelMismatchError",
    "ChecksumMismatchError",
    "HubPushError",
    "ProtectionCardError",
    "Trap2HubMixin",
    "load_protected_adapter",
    "read_protection",
    "render_card",
    "upload_folder",
    "uploadable_files",
    "write_card",
]
