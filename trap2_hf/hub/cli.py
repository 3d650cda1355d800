"""`trap2 card`: write or refresh the protection card of an existing update folder, and optionally push it.

For updates trained elsewhere (or whose card was lost), the protection settings come from `--trap_*`
flags, or from the folder's existing card; flags win. The card records the sha256 of the files as
they are now.

    trap2 card ./my-adapter --trap_lambda 0.005 --trap_weighting inv_sqrt --base_model meta-llama/Llama-3.1-8B
    trap2 card ./my-adapter --audit audit/audit.json --audit_plot audit/audit.png --push me/my-adapter

Pushing uses the token of `hf auth login` or HF_TOKEN (never a flag: it would land in shell history).
"""

import argparse
import dataclasses
import json
import os
import sys

from .._args import omit_unset
from ..files import checkpoint_folders, missing_folder_hint, update_files
from ..release.card import CARD_NAME, write_card
from ..release.protection import SETTING_NAMES, ProtectionCardError, read_protection
from ..settings import Trap2Settings


def make_parser() -> argparse.ArgumentParser:
    from transformers import HfArgumentParser

    # The `--trap_*` flags come from Trap2Settings through the parser the recipe uses (TRL's is a subclass), so
    # they parse as the training flags do (`float | None` as a number). A flag not given is left out of the
    # result, so that the existing card's value, or the derived default, is recorded instead.
    parser = HfArgumentParser(
        Trap2Settings, prog="trap2 card", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    omit_unset(parser, SETTING_NAMES)
    for action in parser._actions:
        if action.dest in SETTING_NAMES:
            action.help = f"{action.help or ''} (default: the existing card's value, else Trap2Settings' default)"
    parser.add_argument("folder", help="The update folder (adapter_config.json + adapter_model.safetensors).")
    parser.add_argument("--push", metavar="REPO_ID", help="Upload the folder (no pickles) to this Hub repo.")
    parser.add_argument("--base_model", help="Hub id of the base model the update was trained on.")
    parser.add_argument("--license", help="License identifier for the card metadata (e.g. apache-2.0).")
    parser.add_argument("--model_name", help="Title of the card (default: the repo or folder name).")
    parser.add_argument("--audit", help="audit.json written by `trap2 audit`: shown as a table and as model-index.")
    parser.add_argument("--audit_plot", help="The audit's plot (png); uploaded as audit.png and embedded.")
    parser.add_argument("--private", action="store_true", help="Create the Hub repo as private.")
    parser.add_argument("--revision", help="Branch to push to (default: main).")
    parser.add_argument("--commit_message", default="Upload protected update with its Trap2 card")
    parser.add_argument(
        "--force", action="store_true",
        help="Change a training setting the card already records (the card would otherwise no longer say what "
        "ran); the settings derived from it follow.",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Errors propagate: `trap2` (cli_errors.run_command) prints them as one line, exit code 2."""
    args = make_parser().parse_args(argv)
    write_folder_card(args)
    print(f"Wrote {os.path.join(args.folder, CARD_NAME)}")
    if args.push:
        repo_id = create_repo_and_push(args)
        print(f"Pushed {args.folder} to {repo_id}")
    return 0


def write_folder_card(args) -> str:
    folder = args.folder
    if not os.path.isdir(folder):
        missing = missing_folder_hint(folder) if not os.path.exists(folder) else f"{folder!r} is not a folder. "
        raise FileNotFoundError(f"{missing or f'There is no folder {folder!r}. '}Pass the folder that holds the saved update.")
    names = update_files(folder)
    weights = [n for n in names if n.endswith(".safetensors")]
    if not weights:
        pickles = [n for n in sorted(os.listdir(folder)) if n.endswith((".bin", ".pt", ".pth"))]
        fix = (
            f" It has {', '.join(pickles)} (pickle): load it with PEFT/transformers and save_pretrained(..., "
            "safe_serialization=True) first."
            if pickles
            else ""
        )
        checkpoints = checkpoint_folders(folder)
        if checkpoints and not fix:
            fix = (
                f" It holds only Trainer checkpoints ({', '.join(os.path.basename(c) for c in checkpoints)}): pass "
                f"the last one, `trap2 card {checkpoints[-1]}`."
            )
        raise ValueError(f"{folder!r} holds no update weights as safetensors.{fix}")
    previous = _previous_block(folder)
    given = {name: getattr(args, name) for name in SETTING_NAMES if hasattr(args, name)}
    if previous is None and "trap_lambda" not in given:
        raise ValueError(
            f"{folder!r} has no card with a trap2 block, so the protection settings must be given: pass at least "
            "--trap_lambda and every other --trap_* value that differs from its default (see `trap2 card --help`)."
        )
    recorded = {k: v for k, v in (previous or {}).items() if k in SETTING_NAMES}
    recorded = _with_changes(folder, recorded, given, force=args.force)
    # Built as the trainer builds them, so derived defaults (trap_offray_lambda = trap_lambda, the re-scaled
    # fraction of the mode) follow the values given.
    protection = Trap2Settings(**{**recorded, **given})
    protection.validate_trap_settings()
    settings = protection.trap_settings_dict()
    if previous is None:
        defaulted = [name for name in SETTING_NAMES if name not in given]
        print(f"Recording defaults for settings not given: {', '.join(f'{k}={settings[k]}' for k in defaulted)}")
    update = (previous or {}).get("update") or _update_kind(folder)
    return write_card(
        folder,
        settings,
        update=update,
        audit=args.audit,
        audit_plot=args.audit_plot,
        base_model_config=(previous or {}).get("base_model_config"),
        base_model=args.base_model or (previous or {}).get("base_model") or _adapter_base(folder),
        license=args.license,
        model_name=args.model_name,
        repo_id=args.push,
    )


def _with_changes(folder: str, recorded: dict, given: dict, force: bool) -> dict:
    """The recorded settings a card keeps when `given` changes some: a setting the card records is what the
    update was trained with, so changing it needs `--force`; then each setting the card holds at the value
    training derived (`Trap2Settings.derive_trap_defaults`: trap_offray_lambda from trap_lambda, the re-scaled
    fraction from the mode and the scales per step) is derived again from the new values."""
    changed = {name: value for name, value in given.items() if name in recorded and recorded[name] != value}
    if not changed:
        return recorded
    if not force:
        listed = ", ".join(f"--{name} {value} (the card records {recorded[name]!r})" for name, value in changed.items())
        raise ValueError(
            f"The card of {folder!r} records the settings the update was trained with, and {listed} would change "
            "what it says ran. Leave the flag out to keep the recorded value, or pass --force if the card is wrong (the "
            "settings derived from it are derived again)."
        )
    derived = [
        name for name, spec in Trap2Settings.__dataclass_fields__.items()
        if spec.default is None and name in recorded and name not in given
        and _derived_value(recorded, name) == recorded[name]
    ]
    return {name: value for name, value in recorded.items() if name not in derived}


def _derived_value(recorded: dict, name: str):
    """The value training would derive for `name` from the other recorded settings."""
    return getattr(Trap2Settings(**{**recorded, name: None}), name)


def create_repo_and_push(args) -> str:
    from huggingface_hub import HfApi

    from .. import __version__
    from ..release.upload import create_repo, upload_folder

    api = HfApi(library_name="trap2_hf", library_version=__version__)
    repo_id = create_repo(api, args.push, args.folder, token=None, private=args.private or None)
    if repo_id != args.push:  # the namespace was added: the card's usage snippet names the full id
        previous = _previous_block(args.folder)
        settings = {k: previous[k] for k in dataclasses.asdict(Trap2Settings()) if k in previous}
        write_card(
            args.folder,
            settings,
            update=previous["update"],
            sha256=previous["sha256"],
            base_model_config=previous.get("base_model_config"),
            base_model=previous.get("base_model"),
            repo_id=repo_id,
            model_name=args.model_name,
        )
    upload_folder(api, args.folder, repo_id, token=None, commit_message=args.commit_message, revision=args.revision)
    return repo_id


def _previous_block(folder: str) -> dict | None:
    path = os.path.join(folder, CARD_NAME)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        text = f.read()
    try:
        return read_protection(text, path)
    except ProtectionCardError:
        return None


def _update_kind(folder: str) -> str:
    path = os.path.join(folder, "adapter_config.json")
    if not os.path.isfile(path):
        return "full"
    with open(path, encoding="utf-8") as f:
        return str(json.load(f).get("peft_type", "lora")).lower()


def _adapter_base(folder: str) -> str | None:
    path = os.path.join(folder, "adapter_config.json")
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        name = json.load(f).get("base_model_name_or_path")
    return name if name and not os.path.isdir(name) else None


if __name__ == "__main__":
    from ..cli_errors import run_command

    sys.exit(run_command(main, sys.argv[1:], prog="trap2 card"))
