"""Command-line errors: one line that says what is wrong and how to fix it, and exit code 2.

`run_command(main, argv, prog)` runs a command's `main(argv)` so that
- an error a user can fix (a bad value, a missing file, model or adapter folder, an unsupported combination:
  ValueError, OSError, NotImplementedError, ImportError, or any error with a `cli_message`) is printed as ONE
  line, `<prog>: error: <message>`, on stderr, with exit code 2. An error that carries `cli_message` (the fix in
  command-line words: flags, environment variables, commands) is printed with that. A path the user gave that
  does not exist, and that the error names, is reported with the closest existing folder. `--debug` anywhere on
  the command line, or TRAP2_DEBUG=1, re-raises instead, with the traceback;
- every argparse parser used meanwhile (transformers' `HfArgumentParser` and TRL's `TrlParser` included)
  answers a value that does not parse with one line and a pointer to `--help`, not its whole usage, and an
  unknown flag with the closest known one ("did you mean").

A sub-command of the `trap2` dispatcher gets all of this without code of its own: build the parser as usual
(argparse or `HfArgumentParser`), parse inside `main(argv)`, and let the errors of our checks propagate.
"""

import argparse
import ast
import contextlib
import difflib
import os
import re
import sys

from .files import missing_folder_hint

DEBUG_FLAG = "--debug"
DEBUG_ENV = "TRAP2_DEBUG"
USER_ERRORS = (ValueError, OSError, NotImplementedError, ImportError)
# transformers' HfArgumentParser refuses leftover flags with this ValueError, not with parser.error.
HF_UNUSED = "Some specified arguments are not used by the HfArgumentParser: "


def debug_requested(argv: list[str]) -> tuple[list[str], bool]:
    """`argv` without `--debug`, and whether it (or TRAP2_DEBUG=1) asks for tracebacks."""
    rest = [arg for arg in argv if arg != DEBUG_FLAG]
    return rest, len(rest) != len(argv) or os.environ.get(DEBUG_ENV, "") not in ("", "0")


def run_command(main, argv: list[str], prog: str, debug: bool | None = None) -> int:
    """`main(argv)` with command-line errors as one line and exit code 2 (see the module docstring)."""
    argv, asked = debug_requested(list(argv))
    debug = asked if debug is None else debug or asked
    with friendly_parsers() as parsers:
        try:
            return main(argv) or 0
        except Exception as err:  # noqa: BLE001 -- filtered just below; everything else re-raised
            if debug or not (isinstance(err, USER_ERRORS) or getattr(err, "cli_message", None)):
                raise
            message = error_message(err, argv, parsers[-1] if parsers else None, command_file=_file_of(main))
            print(f"{prog}: error: {message}", file=sys.stderr)
            return 2


def error_message(
    err: BaseException, argv: list[str], parser: argparse.ArgumentParser | None = None, command_file: str | None = None
) -> str:
    """The one line for `err`: a leftover flag with its closest field, the command-line wording of the error, or
    its own message. An error raised outside trap2_hf and the command's own file (`command_file`) that names a path
    the user gave and that does not exist is that path, its flag and the closest folder; any other names the
    library that raised it."""
    text = str(err)
    if parser is not None and isinstance(err, ValueError) and text.startswith(HF_UNUSED):
        with contextlib.suppress(ValueError, SyntaxError):  # the list as transformers prints it
            return f"{unknown_flags_message(parser, ast.literal_eval(text[len(HF_UNUSED):]))} {_help_pointer(parser)}"
    message = getattr(err, "cli_message", None) or text or type(err).__name__
    module, filename = _raised_in(err)
    if not (module.startswith("trap2_hf") or (command_file and filename == command_file)):
        missing = _missing_path(err, argv)
        if missing:
            return missing
        message = f"{message.rstrip()} ({type(err).__name__} from {module.split('.')[0]}; {DEBUG_FLAG} shows where)"
    return " ".join(message.split())


def closest(name: str, known) -> str | None:
    """The known name `name` most likely misspells, or None."""
    matches = difflib.get_close_matches(name, sorted(known), n=1)
    return matches[0] if matches else None


def unknown_names_message(names, known, what: str) -> str:
    """'unknown <what> X (did you mean Y?)' for each of `names`."""
    parts = []
    for name in names:
        guess = closest(name, known)
        parts.append(f"unknown {what} {name}" + (f" (did you mean {guess}?)" if guess else ""))
    return "; ".join(parts)


def unknown_flags_message(parser: argparse.ArgumentParser, leftover: list[str]) -> str:
    flags = [arg.split("=", 1)[0] for arg in leftover if arg.startswith("--")]
    if not flags:
        return f"unexpected argument(s) {' '.join(leftover)}"
    return unknown_names_message(flags, _long_options(parser, flags), "flag")


def _long_options(parser: argparse.ArgumentParser, flags: list[str]) -> set[str]:
    # HfArgumentParser adds a dashed alias of every underscored flag: suggest in the spelling the user used.
    options = {o for o in parser._option_string_actions if o.startswith("--")}
    dashed = any("-" in flag[2:] for flag in flags)
    same = {o for o in options if ("-" in o[2:]) == dashed}
    return same or options


# ----------------------------------------------------------------------------- argparse, while a command runs
@contextlib.contextmanager
def friendly_parsers():
    """While inside, argparse parsers report errors in one line (`one_line_error`); yields the list of parsers
    that parsed, so a leftover-flag error raised after parsing can name the closest flag."""
    parsers = []
    original_error = argparse.ArgumentParser.error
    original_parse = argparse.ArgumentParser.parse_known_args

    def parse_known_args(self, *args, **kwargs):
        parsers.append(self)
        return original_parse(self, *args, **kwargs)

    argparse.ArgumentParser.error = one_line_error
    argparse.ArgumentParser.parse_known_args = parse_known_args
    try:
        yield parsers
    finally:
        argparse.ArgumentParser.error = original_error
        argparse.ArgumentParser.parse_known_args = original_parse


def one_line_error(parser: argparse.ArgumentParser, message: str):
    """`parser.error`, in one line: the message (unknown flags with the closest known one) and where the options
    are listed. A parser may set `help_command` (default: `<prog> --help`)."""
    if message.startswith("unrecognized arguments: "):
        message = unknown_flags_message(parser, message.split(": ", 1)[1].split())
    # "argument --trap_lambda/--trap-lambda: ..." names the flag twice (HfArgumentParser's dashed alias).
    message = re.sub(r"argument (--?[\w.]+)(/--?[\w.-]+)+:", r"argument \1:", message)
    parser.exit(2, f"{parser.prog}: error: {message} {_help_pointer(parser)}\n")


def _help_pointer(parser: argparse.ArgumentParser) -> str:
    return f"(`{getattr(parser, 'help_command', f'{parser.prog} --help')}` lists the options)"


# ----------------------------------------------------------------------------- paths and origins
def _missing_path(err: BaseException, argv: list[str]) -> str | None:
    """For an error that names a path that does not exist (a mistyped model or adapter folder): that path, the
    flag it was given with, and the closest existing folder. Only paths with a folder part count (`out/tinyy`):
    a bare word is as likely a Hub id or any other value."""
    texts = " ".join(str(e) for e in _chain(err))
    quoted = re.findall(r"'([^'\s]+)'", texts)
    flags = {value: flag for flag, value in zip(argv, argv[1:]) if flag.startswith("--")}
    flags.update({a.split("=", 1)[1]: a.split("=", 1)[0] for a in argv if a.startswith("--") and "=" in a})
    values = [a.split("=", 1)[-1] for a in argv if not a.startswith("--") or "=" in a]
    for path in dict.fromkeys([*quoted, *values]):
        named = re.search(rf"(?<![\w./-]){re.escape(path)}(?![\w./-])", texts)
        if named and os.path.dirname(os.path.normpath(path)) and not os.path.exists(path):
            hint = missing_folder_hint(path, files=True)
            if hint:
                flag = flags.get(path)
                check = "" if "did you mean" in hint else " Check the path."
                return f"{f'{flag}: ' if flag else ''}{hint.strip()}{check}"
    return None


def _chain(err: BaseException):
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        yield err
        err = err.__cause__ or err.__context__


def _raised_in(err: BaseException) -> tuple[str, str]:
    """The module and file whose code raised `err` (its innermost frame)."""
    tb = err.__traceback__
    if tb is None:
        return "", ""
    while tb.tb_next is not None:
        tb = tb.tb_next
    return str(tb.tb_frame.f_globals.get("__name__", "")), tb.tb_frame.f_code.co_filename


def _file_of(function) -> str | None:
    code = getattr(function, "__code__", None)
    return code.co_filename if code is not None else None
