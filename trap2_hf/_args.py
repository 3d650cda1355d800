"""Parsing settings dataclasses from text: always through transformers' `HfArgumentParser` (TRL's parser,
which the recipe uses, is a subclass), so a value parses the same as a flag, a recipe key or a variant."""

import argparse


def omit_unset(parser: argparse.ArgumentParser, names) -> None:
    """Leave the flags of `names` that are not given out of the parsed namespace, so that a value given can be
    told from a default (a card's recorded value, or a derived default, applies instead)."""
    for action in parser._actions:
        if action.dest in names:
            action.default = argparse.SUPPRESS


def parse_fields(dataclass_type, values: dict[str, str], context: str) -> dict:
    """`values` (field name -> text, or a list of texts for a flag of several values) parsed as the `--field=text`
    flags of `dataclass_type`; returns only those fields, typed. A value that does not parse raises `SystemExit`
    naming `context` and the flag."""
    from transformers import HfArgumentParser

    parser = HfArgumentParser(dataclass_type)
    omit_unset(parser, set(values))

    def error(message: str):
        raise SystemExit(f"{context}: {message.rstrip('.')}.")

    parser.error = error
    argv = []
    for name, text in values.items():  # a list: the flag's several values
        argv += [f"--{name}", *text] if isinstance(text, list) else [f"--{name}={text}"]
    namespace = parser.parse_args(argv)
    return {name: getattr(namespace, name) for name in values}


def refuse_removed_flags(parser: argparse.ArgumentParser, argv: list[str], removed: dict[str, str]) -> None:
    """Exit through `parser.error` naming the replacement when `argv` passes a flag of `removed` ({flag: what
    replaces it}), instead of the parser's generic complaint about an unknown argument."""
    for flag, replacement in removed.items():
        if any(arg == flag or arg.startswith(flag + "=") for arg in argv):
            parser.error(f"{flag} was removed: {replacement}.")
