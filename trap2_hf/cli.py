"""The `trap2` console command: one sub-command per job, each owned by its own module."""

import importlib
import sys

COMMANDS = {
    "audit": ("trap2_hf.audit.cli", "Merge-attack audit of a protected update (table, json, plot)."),
    "demo": ("trap2_hf.demo.run", "The embedded demo: train protected/unprotected/other updates, then audit."),
    "card": ("trap2_hf.hub.cli", "Write or refresh the protection model card of an adapter folder; optionally push."),
    "trace": ("trap2_hf.trace.cli", "Find a released update inside merged models: its weight and a p-value."),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        lines = [f"  {name:<6} {help_text}" for name, (_, help_text) in COMMANDS.items()]
        print("usage: trap2 {" + ",".join(COMMANDS) + "} [options]\n\n" + "\n".join(lines))
        if argv and argv[0] not in ("-h", "--help"):
            print(f"\ntrap2: unknown command {argv[0]!r}; choose one of {', '.join(COMMANDS)}.", file=sys.stderr)
            return 2
        return 0
    module = importlib.import_module(COMMANDS[argv[0]][0])
    return module.main(argv[1:]) or 0


if __name__ == "__main__":
    sys.exit(main())
