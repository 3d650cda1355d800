"""The `trap2` block of a model card: the machine-readable record of a protection.

The block holds every protection setting the training used, the library version, the update kind, the
shape of the base model and the sha256 of the update's files; `load_protected_adapter` and `trap2 card`
read it back and refuse one that cannot be trusted. Its schema changes here and only here; the card's
text around it lives in card.py.
"""

import os
import re

from huggingface_hub import ModelCard

from ..settings import Trap2Settings

PAPER = "arXiv:2601.21898"
SETTING_NAMES = tuple(Trap2Settings.__dataclass_fields__)
# The keys a `trap2` block must have for a loader to trust it; the other settings are optional.
REQUIRED_KEYS = (
    "library_version",
    "update",
    "trap_lambda",
    "trap_scale_min",
    "trap_scale_max",
    "trap_margin",
    "trap_weighting",
    "trap_target",
    "sha256",
)
# Config fields that any compatible base model shares; recorded so a different base is refused.
BASE_CONFIG_KEYS = (
    "model_type",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "vocab_size",
)


class ProtectionCardError(ValueError):
    """The model card records no protection, or records it in a form that cannot be trusted."""


def protection_block(
    settings: dict, *, update: str, sha256: dict[str, str] | None, base_model_config: dict | None = None
) -> dict:
    """The `trap2` metadata mapping: the settings exactly as trained, plus what a loader checks."""
    from .. import __version__

    block = {"method": "trap2", "paper": PAPER, "library": "trap2_hf", "library_version": __version__, "update": update}
    block.update({name: settings[name] for name in SETTING_NAMES if name in settings})
    if base_model_config:
        block["base_model_config"] = dict(base_model_config)
    if sha256:
        block["sha256"] = dict(sha256)
    return block


def base_model_config(config) -> dict:
    """The shape facts of a base model's config (a `PretrainedConfig` or a dict)."""
    values = config if isinstance(config, dict) else config.to_dict()
    if "hidden_size" not in values and isinstance(values.get("text_config"), dict):
        values = values["text_config"]  # multimodal configs keep the language model's shape here
    return {key: values[key] for key in BASE_CONFIG_KEYS if values.get(key) is not None}


def read_protection(card: str, source: str) -> dict:
    """The `trap2` block of a card (its text), validated, plus the card's `base_model` and `license`.

    Raises `ProtectionCardError` that says what is missing or wrong and how to fix it.
    """
    try:
        metadata = ModelCard(card).data.to_dict()
    except Exception as err:  # noqa: BLE001 -- any YAML/metadata error means the same thing here
        raise ProtectionCardError(
            f"The model card of {source} has unreadable metadata ({err}). Re-write it with `trap2 card <folder>`."
        ) from err
    block = metadata.get("trap2")
    if block is None:
        raise ProtectionCardError(
            f"The model card of {source} has no `trap2` block in its metadata, so it records no Trap2 protection "
            "(the update was not saved by trap2_hf, or its card was overwritten). If you trust the files, load them "
            "with plain PeftModel.from_pretrained; if they were trained with Trap2 elsewhere, record the protection "
            "with `trap2 card <folder> --trap_lambda ...`."
        )
    problem = _block_problem(block)
    if problem:
        raise ProtectionCardError(
            f"The `trap2` block of the model card of {source} is malformed: {problem.rstrip('.')}. Re-write it with "
            "`trap2 card <folder>` (pass the --trap_* values the update was trained with)."
        )
    facts = dict(block)
    facts["base_model"] = metadata.get("base_model")
    facts["license"] = metadata.get("license")
    return facts


def _block_problem(block) -> str | None:
    if not isinstance(block, dict):
        return f"expected a mapping, got {type(block).__name__} {block!r}"
    missing = [key for key in REQUIRED_KEYS if key not in block]
    if missing:
        return f"missing {', '.join(missing)}"
    sha = block["sha256"]
    if not isinstance(sha, dict) or not sha or not all(
        isinstance(k, str) and isinstance(v, str) and re.fullmatch(r"[0-9a-f]{64}", v) for k, v in sha.items()
    ):
        return f"sha256 must map file names to 64-digit hex digests, got {sha!r}"
    unsafe = [name for name in sha if os.path.isabs(name) or ".." in name.replace("\\", "/").split("/")]
    if unsafe:
        return f"sha256 names files outside the folder: {unsafe}"
    settings = {name: block[name] for name in SETTING_NAMES if name in block}
    try:
        Trap2Settings(**settings).validate_trap_settings()
    except (TypeError, ValueError) as err:
        return str(err)
    return None
