"""Regenerate the generated parts of docs/ from the code, so they cannot drift from it.

    PYTHONPATH=. python docs/generate.py            # rewrite docs/settings.md and the table in docs/architectures.md
    PYTHONPATH=. python docs/generate.py --check    # exit 1, naming the stale files, where they are not current
    PYTHONPATH=. python docs/generate.py --only settings

- docs/settings.md is written from the `help` (and `choices`) metadata of `Trap2Settings`' fields, grouped by
  `GROUPS`. A new setting needs nothing here: it lands in the first group whose pattern matches its name, or in
  "Other settings". tests/test_docs.py fails when the file is not what this script writes.
- docs/architectures.md's table, between the two `ARCH_MARKERS`, is `tests/arch_table.markdown_table()` (it
  builds tiny models: about 20 s on one core). tests/test_architectures.py checks it.
"""

import argparse
import fnmatch
import os
import sys
import typing
import warnings
from dataclasses import MISSING, fields
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SETTINGS_PAGE = ROOT / "docs" / "settings.md"
ARCHITECTURES_PAGE = ROOT / "docs" / "architectures.md"
ARCH_MARKERS = ("<!-- generated: python docs/generate.py (tests/arch_table.py) -->", "<!-- end generated -->")

# (title, what the group is for, name patterns); a field goes to the first group one of whose patterns matches.
GROUPS = (
    (
        "The attacker's best response (experimental)",
        "Beyond the paper, off by default: where the step ascends, chosen from candidates scored without gradient, "
        "and a bounded ascent. Measured in [experimental.md](experimental.md).",
        ("trap_*candidate*", "trap_ascent*"),
    ),
    (
        "The objective",
        "What J = L(1) - lambda * E_s[w(s) L(s)] is: the weight, the scales drawn and their weighting "
        "([method.md](method.md)).",
        ("trap_lambda", "trap_scale_*", "trap_scales_*", "trap_margin", "trap_weighting"),
    ),
    (
        "What is protected",
        "The update that is re-scaled, and where a full fine-tune keeps theta0 "
        "([how_a_step_works.md](how_a_step_works.md#exact-re-scaling-per-update-kind)).",
        ("trap_target", "trap_reference_*"),
    ),
    (
        "How a step computes the re-scaled term",
        "The mode and the share of rows it re-scales; what each costs and protects: "
        "[how_a_step_works.md](how_a_step_works.md).",
        ("trap_mode", "trap_rescaled_*"),
    ),
    (
        "Off-ray terms (experimental)",
        "Beyond the paper, off by default: the loss is also maximised where merges other than a re-scaling put "
        "the update. Measured in [experimental.md](experimental.md).",
        ("trap_offray*", "trap_foreign*"),
    ),
    (
        "The rim of S (experimental)",
        "Beyond the paper, off by default: a share of the scales drawn near s = 1, where normalising merges and a "
        "tuned shared weight put the update. Measured in "
        "[experimental.md](experimental.md#the-rim-and-the-off-ray-parts-for-normalising-merges).",
        ("trap_rim_*",),
    ),
    (
        "The guard term (experimental)",
        "A minimised term that keeps the update robust to small perturbations; off by default.",
        ("trap_guard*",),
    ),
)
OTHER = ("Other settings", "Settings no group above claims yet.", ())


def _type_name(annotation) -> str:
    name = annotation.__name__ if isinstance(annotation, type) else str(annotation)
    return name.replace("typing.", "").replace("NoneType", "None").replace(" | ", " or ")  # no '|' in a table


def _default(f):
    if f.default is not MISSING:
        return f.default
    if f.default_factory is not MISSING:
        return f.default_factory()
    return MISSING


def _show(value) -> str:
    if value is None:
        return "unset"
    if isinstance(value, str):
        return f"`{value!r}`" if value else '`""` (off)'
    if isinstance(value, list):
        return "`[]`" if not value else f"`{value!r}`"
    return f"`{value!r}`"


def _group_of(name: str):
    for group in GROUPS:
        if any(fnmatch.fnmatchcase(name, pattern) for pattern in group[2]):
            return group
    return OTHER


def render_settings() -> str:
    """The settings reference, docs/settings.md, as text."""
    from trap2_hf.config import Trap2SFTConfig, Trap2TrainingArguments
    from trap2_hf.settings import Trap2Settings

    hints = typing.get_type_hints(Trap2Settings)
    subclass_defaults = {
        cls.__name__: {f.name: _default(f) for f in fields(cls)} for cls in (Trap2TrainingArguments, Trap2SFTConfig)
    }
    grouped: dict[str, list] = {}  # in the order of each group's first field
    intros = {group[0]: group[1] for group in (*GROUPS, OTHER)}
    for f in fields(Trap2Settings):
        grouped.setdefault(_group_of(f.name)[0], []).append(f)

    def facts(f) -> str:
        default = _default(f)
        found = [f"`{_type_name(hints[f.name])}`", f"default {_show(default)}"]
        for cls_name, defaults in subclass_defaults.items():
            if defaults.get(f.name, default) != default:
                found.append(f"{_show(defaults[f.name])} in `{cls_name}`")
        if f.metadata.get("choices"):
            found.append("one of " + ", ".join(f"`{c}`" for c in f.metadata["choices"]))
        return ", ".join(found)

    lines = [
        "# Settings reference",
        "",
        "<!-- Generated by `PYTHONPATH=. python docs/generate.py` from the `help` metadata of `Trap2Settings`",
        "     (trap2_hf/settings.py). Do not edit by hand: edit the help there and regenerate. -->",
        "",
        "Every protection setting is a field of `Trap2Settings`, mixed into `Trap2TrainingArguments`",
        "(transformers' `TrainingArguments`) and `Trap2SFTConfig` (TRL's `SFTConfig`). So each one is a keyword",
        "argument in Python, a command-line flag (`--trap_lambda 0.1`) wherever the arguments are parsed with",
        "`HfArgumentParser` (the recipe `recipes/sft_protect.py`, `trap2 demo`, `trap2 card`), and a YAML key of",
        "the same name in a recipe. Bad values raise a `ValueError` that names the field, the value and what is",
        "allowed, when the arguments are built; so does a value of the wrong type (`trap_lambda=\"0.1\"`:",
        "`trap_lambda must be a number, got '0.1' (a str); ...`) and a run that would train nothing (`max_steps=0`,",
        "or `num_train_epochs=0` without `max_steps`), whose save would label an untrained update protected. The",
        "model card records every one of these values as they ran.",
        "",
        "Settings whose default depends on others (`trap_rescaled_fraction`, `trap_offray_lambda`) are shown as",
        "*unset*: they are derived when the arguments are built, as their help says, and recorded derived.",
        "",
        "| setting | type, default |",
        "|---|---|",
    ]
    for title, members in grouped.items():
        lines.append(f"| **{title}** | |")
        lines += [f"| [`{f.name}`](#{f.name}) | {facts(f).split(', one of')[0]} |" for f in members]
    lines.append("")
    for title, members in grouped.items():
        lines += [f"## {title}", "", intros[title], ""]
        for f in members:
            lines += [f"### `{f.name}`", "", facts(f) + ".", "", f.metadata.get("help", "(no help)"), ""]
    return "\n".join(lines).rstrip() + "\n"


def render_architectures(current: str) -> str:
    """docs/architectures.md with the generated table between the markers replaced by the current one."""
    sys.path.insert(0, str(ROOT / "tests"))
    from arch_table import markdown_table

    start, end = ARCH_MARKERS
    head, found, rest = current.partition(start)
    _, found_end, tail = rest.partition(end)
    if not (found and found_end):
        raise ValueError(f"{ARCHITECTURES_PAGE} lacks the markers {start!r} ... {end!r} around its table.")
    return f"{head}{start}\n{markdown_table()}\n{end}{tail}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="Write nothing; exit 1 where a page is not current.")
    parser.add_argument("--only", choices=("settings", "architectures"), help="Only this page.")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    warnings.filterwarnings("ignore")  # the tiny models' construction warnings, not the docs' business
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    pages = []
    if args.only in (None, "settings"):
        pages.append((SETTINGS_PAGE, lambda: render_settings()))
    if args.only in (None, "architectures"):
        pages.append((ARCHITECTURES_PAGE, lambda: render_architectures(ARCHITECTURES_PAGE.read_text(encoding="utf-8"))))
    stale = []
    for path, render in pages:
        text = render()
        current = path.read_text(encoding="utf-8") if path.exists() else ""
        if text == current:
            continue
        stale.append(path.relative_to(ROOT))
        if not args.check:
            path.write_text(text, encoding="utf-8")
    verb = "not current" if args.check else "rewritten"
    print("\n".join(f"{path}: {verb}" for path in stale) or "docs: current")
    return 1 if stale and args.check else 0


if __name__ == "__main__":
    sys.exit(main())
