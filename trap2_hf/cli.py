"""The `trap2` console command: one sub-command per job, each owned by its own module.

Every sub-command runs through `cli_errors.run_command`: the errors our checks raise print as one line with exit
code 2 (`--debug` or TRAP2_DEBUG=1 shows the traceback), and its parser answers a bad value or an unknown flag in
one line, with the closest flag.
"""

import importlib
import sys

from . import __version__
from .cli_errors import DEBUG_ENV, DEBUG_FLAG, closest, debug_requested, run_command

COMMANDS = {
    "audit": ("trap2_hf.audit.cli", "Merge-attack audit of a protected update (table, json, plot)."),
    "demo": ("trap2_hf.demo.run", "The embedded demo: train protected/unprotected/other updates, then audit."),
    "card": ("trap2_hf.hub.cli", "Write or refresh the protection model card of an adapter folder; optionally push."),
    "trace": ("trap2_hf.trace.cli", "Find a released update inside merged models: its weight and a p-value."),
}


def usage() -> str:
    lines = [f"  {name:<6} {help_text}" for name, (_, help_text) in COMMANDS.items()]
    return (
        "usage: trap2 [--version] {" + ",".join(COMMANDS) + "} [options] [" + DEBUG_FLAG + "]\n\n"
        + "\n".join(lines)
        + f"\n\n`trap2 COMMAND --help` lists a command's options. {DEBUG_FLAG} (or {DEBUG_ENV}=1) shows the "
        "traceback of an error instead of its one-line message."
    )


def main(argv: list[str] | None = None) -> int:
    argv, debug = debug_requested(sys.argv[1:] if argv is None else list(argv))
    if argv[:1] == ["--version"]:
        print(f"trap2_hf {__version__}")
        return 0
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    if argv[0] not in COMMANDS:
        guess = closest(argv[0], COMMANDS)
        hint = f" (did you mean {guess}?)" if guess else ""
        print(f"trap2: error: unknown command {argv[0]!r}{hint}; choose one of {', '.join(COMMANDS)} "
              "(`trap2 --help` lists them)", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[argv[0]][0])
    return run_command(module.main, argv[1:], prog=f"trap2 {argv[0]}", debug=debug)


if __name__ == "__main__":
    sys.exit(main())
