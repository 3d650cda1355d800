"""The files of a release, and how they are written: which files make up an update, their sha256, and
writes that a crash cannot leave half done (a temporary file in the same folder, then a rename), with the
permissions a plain open() would give.

Generic file handling: nothing here knows about trainers, cards or audits.
"""

import contextlib
import hashlib
import os
import re
import shutil
import tempfile

ADAPTER_WEIGHTS = re.compile(r"adapter_model(-\d+-of-\d+)?\.safetensors$")
CHECKPOINT_FOLDER = re.compile(r"checkpoint-(\d+)")
FULL_WEIGHTS = re.compile(r"model(-\d+-of-\d+)?\.safetensors$")
UPDATE_CONFIGS = ("adapter_config.json", "config.json", "generation_config.json", "model.safetensors.index.json")


class ChecksumMismatchError(ValueError):
    """An update file differs from the sha256 recorded in the model card."""


# ----------------------------------------------------------------------------- the file set of an update
def update_files(folder: str) -> list[str]:
    """The files that make up the update (weights as safetensors plus their configs), sorted."""
    names = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
    adapter = [n for n in names if ADAPTER_WEIGHTS.fullmatch(n)]
    if adapter or "adapter_config.json" in names:
        return [n for n in names if n == "adapter_config.json" or ADAPTER_WEIGHTS.fullmatch(n)]
    return [n for n in names if n in UPDATE_CONFIGS or FULL_WEIGHTS.fullmatch(n)]


def checkpoint_folders(folder: str) -> list[str]:
    """The Trainer's `checkpoint-<step>` folders inside `folder`, as paths, the last step last."""
    names = os.listdir(folder) if os.path.isdir(folder) else []
    steps = {int(m.group(1)): n for n in names if (m := CHECKPOINT_FOLDER.fullmatch(n))}
    return [os.path.join(folder, steps[step]) for step in sorted(steps) if os.path.isdir(os.path.join(folder, steps[step]))]


def is_model_folder(folder: str) -> bool:
    """A full model (transformers' config.json and weights), not an adapter."""
    names = os.listdir(folder) if os.path.isdir(folder) else []
    weights = any(FULL_WEIGHTS.fullmatch(n) or n in ("pytorch_model.bin", "model.safetensors.index.json") for n in names)
    return "config.json" in names and weights and "adapter_config.json" not in names


def missing_folder_hint(path: str, files: bool = False) -> str:
    """A sentence for a path that looks like a mistyped local folder (its parent exists; `files`: or file), with
    the closest existing one, else ''."""
    parent, name = os.path.split(os.path.normpath(path))
    if not os.path.isdir(parent or "."):
        return ""
    import difflib

    entries = [n for n in os.listdir(parent or ".") if files or os.path.isdir(os.path.join(parent or ".", n))]
    close = difflib.get_close_matches(name, entries, n=1)
    if not parent and not close:
        return ""  # a bare name ("gpt2") is most likely a Hub id
    hint = f" (did you mean {os.path.join(parent, close[0])!r}?)" if close else ""
    return f"There is no local {'file or folder' if files else 'folder'} {path!r}{hint}. "


# ----------------------------------------------------------------------------- checksums
def sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_files(folder: str, names: list[str] | None = None) -> dict[str, str]:
    names = update_files(folder) if names is None else names
    return {name: sha256_file(os.path.join(folder, name)) for name in names}


def verify_checksums(folder: str, recorded: dict[str, str], source: str) -> None:
    """Raise `ChecksumMismatchError` naming the first file that is missing or differs."""
    for name, expected in recorded.items():
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            raise ChecksumMismatchError(
                f"{name} of {source} is missing, but the model card records it (sha256 {expected[:12]}...). The "
                "upload or download was incomplete: re-run the push, or download again with force_download=True."
            )
        found = sha256_file(path)
        if found != expected:
            raise ChecksumMismatchError(
                f"{name} of {source} does not match the sha256 recorded in its model card (recorded "
                f"{expected[:12]}..., found {found[:12]}...): the file was changed or corrupted after the card was "
                "written. Download it again with force_download=True; if you changed it on purpose, record the new "
                f"file with `trap2 card <folder>`."
            )


# ----------------------------------------------------------------------------- writes a crash cannot half-do
def ordinary_permissions(path: str) -> None:
    """Give `path` the mode a plain open() would have: `mkstemp` (and safetensors, which writes through a
    temporary file too) make files owner-only, and a release others on the machine cannot read is broken."""
    os.chmod(path, 0o666 & ~_umask())


def _umask() -> int:
    # /proc gives the umask without setting it: os.umask() would change it for every thread for a moment.
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str, data: bytes) -> None:
    """Write to a temporary file in the same folder, then rename: readers see the old or the new file."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".trap2-", suffix=".tmp")
    try:
        ordinary_permissions(tmp)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def atomic_write_text(path: str, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_copy(source: str, target: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(target)), prefix=".trap2-", suffix=".tmp")
    os.close(fd)
    try:
        shutil.copyfile(source, tmp)
        ordinary_permissions(tmp)
        os.replace(tmp, target)
    finally:
        remove(tmp)


def move_into(staging: str, output_dir: str, first_removed: str) -> None:
    """Rename the staged files into `output_dir`, after removing `first_removed` (the stale card: until the
    new one is written last, the folder does not claim to be complete)."""
    remove(os.path.join(output_dir, first_removed))
    for root, _, files in os.walk(staging):
        for name in files:
            source = os.path.join(root, name)
            target = os.path.join(output_dir, os.path.relpath(source, staging))
            os.makedirs(os.path.dirname(target), exist_ok=True)
            ordinary_permissions(source)
            os.replace(source, target)


@contextlib.contextmanager
def removed_if_left_empty(path: str | None, only_on_error: bool = False, make: bool = False):
    """The folders of `path` that are missing now (it and any missing parent; `make`: made now) are removed on exit
    (`only_on_error`: on an error only) if nothing was written into them. A folder that existed before, or that
    holds anything, is never removed."""
    missing = []
    folder = os.path.abspath(path) if path else None
    while folder and not os.path.exists(folder):
        missing.append(folder)
        folder = os.path.dirname(folder) if os.path.dirname(folder) != folder else None
    if make and path:
        os.makedirs(path, exist_ok=True)
    try:
        yield
    except BaseException:
        _remove_empty(missing)
        raise
    if not only_on_error:
        _remove_empty(missing)


def _remove_empty(folders: list[str]) -> None:
    for folder in folders:  # innermost first
        with contextlib.suppress(OSError):  # not empty, or gone: leave it
            os.rmdir(folder)


def read_text(path: str) -> str | None:
    """The file's text, or None when there is no such file."""
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return f.read()


def remove(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.remove(path)
