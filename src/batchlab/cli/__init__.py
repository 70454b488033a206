"""``batchlab <command>``: thin commands that parse arguments, call the public API and print.

Each command lives in its own module with ``add_parser(subparsers)`` and ``run(args) -> int``; this module
only dispatches and turns batchlab's own errors into one clear line and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from batchlab.cli import advise, fit, noise, plan, profile, report, sweep
from batchlab.cli.common import fail

COMMANDS = (fit, profile, noise, advise, plan, sweep, report)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="batchlab",
        description="Make the training batch size a measured decision.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for command in COMMANDS:
        command.add_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``batchlab`` console script and ``python -m batchlab``."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return args.run(args)
    except KeyboardInterrupt:
        return fail("interrupted")
    except (ValueError, TypeError, ImportError, OSError) as exc:
        return fail(str(exc))
    except Exception as exc:  # batchlab's own errors; anything from the user's model keeps its type name
        from batchlab.errors import BatchlabError

        if isinstance(exc, BatchlabError):
            return fail(str(exc))
        return fail(f"{type(exc).__name__}: {exc}")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
