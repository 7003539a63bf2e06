"""The ``lctfound`` command line: a thin front end over the engine.

Each command group lives in its own module with a ``register(subparsers)`` function that adds
its parser and sets ``func`` to a handler ``handler(args) -> int``. Handlers raise
`LCTfoundError` for user mistakes; `main` prints them as one line and exits with code 2.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from typing import Optional, Sequence

from .. import __version__
from ..errors import LCTfoundError, set_command_options

# Command-group modules, in the order `--help` lists them.
COMMAND_MODULES = ("demo", "doctor", "data", "model", "features", "train", "generate", "segment", "classify", "ctfm",
                   "evaluate", "enhance", "web")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lctfound",
        description="LCTfound lung-CT foundation model: data, models, features and tasks.",
    )
    parser.add_argument("--version", action="version", version=f"lctfound {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debugging details")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    for name in COMMAND_MODULES:
        importlib.import_module(f"{__name__}.{name}").register(subparsers)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # Errors may then name this command's options; not under --events, whose messages a front end shows.
    set_command_options(() if getattr(args, "events", False) else vars(args))
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.func(args) or 0)
    except LCTfoundError as error:
        print(f"error: {error}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover - `python -m lctfound.cli`
    sys.exit(main())
