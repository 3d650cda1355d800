"""Warnings raised inside libraries we call that name nothing our users wrote."""

import contextlib
import logging
import warnings


# PEFT 0.21 builds every PeftModel (get_peft_model, PeftModel.from_pretrained, TRL's SFTTrainer) by reading
# transformers' deprecated `is_gradient_checkpointing` (peft_model.py), which prints a FutureWarning about a name our
# code and our users' code never use, from transformers' own module.
PEFT_DEPRECATION = dict(
    message="`is_gradient_checkpointing` is deprecated", category=FutureWarning, module="transformers.modeling_utils"
)


def ignore_peft_deprecation() -> None:
    """Drop that one warning for the process (`import trap2_hf` does), so a user's own `get_peft_model(...)`, as
    in the README's examples, prints nothing they did not write; every other warning stays."""
    warnings.filterwarnings("ignore", **PEFT_DEPRECATION)


@contextlib.contextmanager
def peft_deprecation_silenced():
    """The same around the PeftModels our code builds, where a caller reset the warning filters."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", **PEFT_DEPRECATION)
        yield


XET_FALLBACK_NOTICE = "Uploading files as a binary IO buffer is not supported by Xet Storage"


class _DropXetFallbackNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(XET_FALLBACK_NOTICE)


@contextlib.contextmanager
def xet_fallback_notice_silenced():
    """Our pushes hand huggingface_hub open files on purpose (a save during an asynchronous push cannot mix
    versions), so with hf_xet installed it warns on every push that it uploads them over HTTP (LFS) instead:
    the upload is complete either way, and the user can do nothing about the notice."""
    hub_logger = logging.getLogger("huggingface_hub._commit_api")
    notice_filter = _DropXetFallbackNotice()
    hub_logger.addFilter(notice_filter)
    try:
        yield
    finally:
        hub_logger.removeFilter(notice_filter)
