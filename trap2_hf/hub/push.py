"""The old home of the trainers' Hub code, kept so that `from trap2_hf.hub.push import Trap2HubMixin` still works:
the mixin is in mixin.py, the upload policy in upload.py."""

from .mixin import Trap2HubMixin  # noqa: F401
from .upload import HubPushError, create_repo, upload_folder, uploadable_files  # noqa: F401
