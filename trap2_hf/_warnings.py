"""Warnings raised inside libraries we call that name nothing our users wrote."""

import contextlib
import warnings


@contextlib.contextmanager
def peft_deprecation_silenced():
    """PEFT 0.21 builds every PeftModel (get_peft_model, PeftModel.from_pretrained, TRL's SFTTrainer) by reading
    transformers' deprecated `is_gradient_checkpointing` (peft_model.py), which prints a FutureWarning about a
    name our code and our users' code never use."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        yield
