"""The ``lctfound`` command line: a thin front end over the engine.

Each command group lives in its own module with a ``register(subparsers)`` function that adds
its parser and sets ``func`` to a handler ``handler(args) -> int``. Handlers raise
`LCTfoundError` for user mistakes; `main` prints them as one line and exits with code 2.

No traceback reaches a user: `main` turns every other exception into one ``error: ...`` line too
(exit 2; an interrupt exits 130). ``--debug`` (anywhere on the command line) or the environment
variable ``LCTFOUND_DEBUG=1`` re-raises instead, for a bug report. Each command runs inside
`lctfound.atomic.command_inputs`, so that no output is ever published onto a file it read.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import logging
import os
import sys
from typing import Optional, Sequence

from .. import __version__
from ..errors import LCTfoundError, set_command_options

# Command-group modules, in the order `--help` lists them.
COMMAND_MODULES = ("demo", "doctor", "data", "model", "features", "train", "generate", "segment", "classify", "ctfm",
                   "evaluate", "enhance", "web", "serve")


class OneLineParser(argparse.ArgumentParser):
    """An argument parser whose usage errors are one ``error: ...`` line (exit 2), like every other error."""

    def error(self, message: str):
        self.exit(2, f"error: {self.prog}: {' '.join(message.split())} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="lctfound",
        description="LCTfound lung-CT foundation model: data, models, features and tasks.",
    )
    parser.add_argument("--version", action="version", version=f"lctfound {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debugging details")
    parser.add_argument("--debug", action="store_true",
                        help="show the full traceback of an error, for a bug report (also LCTFOUND_DEBUG=1; "
                             "may be given after the subcommand too)")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    for name in COMMAND_MODULES:
        importlib.import_module(f"{__name__}.{name}").register(subparsers)
    add_threads_option(parser)
    return parser


def _command_parsers(parser: argparse.ArgumentParser):
    """``parser`` and every (sub)command parser below it."""
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in set(action.choices.values()):
                yield from _command_parsers(sub)


# Compute commands that run on the CPU only (no --device option) but still take --threads.
CPU_COMPUTE_COMMANDS = ("lctfound enhance simulate-low-dose",)


def add_threads_option(parser: argparse.ArgumentParser) -> None:
    """``--threads N`` on every compute command: each (sub)command with a ``--device`` option and those
    in `CPU_COMPUTE_COMMANDS` (`apply_threads` acts on it before the command runs)."""
    from ..validation import int_type

    for command in _command_parsers(parser):
        dests = {action.dest for action in command._actions}
        if ("device" in dests or command.prog in CPU_COMPUTE_COMMANDS) and "threads" not in dests:
            command.add_argument("--threads", type=int_type(1, 4096), default=None,
                                 help="CPU threads for the computation (default: OMP_NUM_THREADS if set, "
                                      "else every core); child jobs inherit it")


def apply_threads(args: argparse.Namespace) -> None:
    """Set the CPU threads of a compute command (`lctfound.devices.set_threads`); none for light ones."""
    if hasattr(args, "threads"):
        from ..devices import set_threads

        set_threads(args.threads)


DEBUG_FLAG = "--debug"


def given_paths(*values) -> list:
    """The command-line values (strings, paths or lists of them) that name existing files or folders:
    a command's inputs, for `lctfound.atomic.check_outputs`. Model names that are not paths are
    skipped (they resolve into the model cache, where no command writes)."""
    from pathlib import Path

    found = []
    for value in values:
        if isinstance(value, (list, tuple)):
            found.extend(given_paths(*value))
        elif value not in (None, "", "-"):
            path = Path(os.path.expanduser(os.fspath(value)))
            try:
                if path.exists():
                    found.append(path)
            except (OSError, ValueError):  # free text (a prompt) too long or odd for a path
                pass
    return found


def debug_requested(argv: Sequence[str]) -> bool:
    """``--debug`` anywhere before a ``--`` separator, or ``LCTFOUND_DEBUG`` set to a true value."""
    words = list(argv)
    if "--" in words:
        words = words[:words.index("--")]
    return DEBUG_FLAG in words or os.environ.get("LCTFOUND_DEBUG", "").strip().lower() in ("1", "true", "yes", "on")


def _without_debug(argv: Sequence[str]) -> list[str]:
    words = list(argv)
    end = words.index("--") if "--" in words else len(words)
    return [word for word in words[:end] if word != DEBUG_FLAG] + words[end:]


# Arguments that name what a command writes; every other argument that names an existing file or
# folder is one of its inputs.
OUTPUT_ARGUMENTS = ("output", "save_sinogram", "saliency")


#: Namespace attribute listing the arguments whose values are words, not paths (sub-command names and
#: options with fixed choices): `argument_inputs` skips them, so ``train pretrain`` run inside a run folder
#: holding ``pretrain/`` does not take the word for an input.
WORD_ARGUMENTS_ATTRIBUTE = "_word_arguments"


def word_arguments(parser: argparse.ArgumentParser) -> set:
    """The dests of every sub-command selector and every option with fixed choices, in all sub-parsers."""
    words, pending = set(), [parser]
    while pending:
        for action in pending.pop()._actions:
            if isinstance(action, argparse._SubParsersAction):
                words.add(action.dest)
                pending.extend(action.choices.values())
            elif action.choices is not None:
                words.add(action.dest)
    return words


def argument_inputs(args: argparse.Namespace) -> list:
    """Every existing file or folder named by an argument that is not an output: the command's inputs."""
    words = set(getattr(args, WORD_ARGUMENTS_ATTRIBUTE, ())) | {"command"}
    return given_paths(*(value for key, value in vars(args).items()
                         if key not in OUTPUT_ARGUMENTS and key not in words and not key.startswith("_")
                         and isinstance(value, (str, list, tuple))))


def refuse_outputs_onto_inputs(args: argparse.Namespace) -> None:
    """Rule 1 for every command, before it starts: no output argument may resolve to a path that
    another argument names (``-o ct.nrrd`` for input ``ct.nrrd``, through ``..``, links or case)."""
    from ..atomic import refuse_input_conflict

    values = vars(args)
    inputs = argument_inputs(args)
    for key in OUTPUT_ARGUMENTS:
        if values.get(key):
            refuse_input_conflict(values[key], inputs)


def describe_error(error: BaseException) -> str:
    """One line for an exception that is not an `LCTfoundError` (no traceback)."""
    from ..atomic import is_disk_full

    if isinstance(error, MemoryError) or "out of memory" in str(error).lower():
        return "out of memory; use smaller inputs (fewer slices, a smaller batch) or a machine with more memory"
    if isinstance(error, OSError):
        where = f"{error.filename}: " if getattr(error, "filename", None) else ""
        if is_disk_full(error):
            folder = os.path.dirname(os.path.abspath(error.filename)) if error.filename else "the output disk"
            return f"no space left on {folder} (free some space and try again)"
        if error.errno == errno.EACCES or error.errno == errno.EPERM:
            return f"{where}permission denied; choose a location you can read and write"
        if error.errno == errno.EROFS:
            return f"{where}read-only file system; choose another output location"
        return f"{where}{error.strerror or error}"
    text = " ".join(str(error).split()) or type(error).__name__
    return (f"internal error ({type(error).__name__}: {text}); please report it with the output of the same "
            f"command run with {DEBUG_FLAG}")


def _silence_stdout() -> None:
    # After a broken pipe, Python's final flush of stdout would raise again at exit.
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):
        pass


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = debug_requested(argv)
    try:
        return _run(_without_debug(argv), debug)
    except SystemExit:
        raise
    except KeyboardInterrupt:
        if debug:
            raise
        print("error: interrupted; outputs that were not complete were not written", file=sys.stderr)
        return 130
    except BrokenPipeError:
        if debug:
            raise
        _silence_stdout()
        print("error: the output pipe was closed (for example by head) before the command finished",
              file=sys.stderr)
        return 2
    except LCTfoundError as error:
        if debug:
            raise
        print(f"error: {error}", file=sys.stderr)
        return error.exit_code
    except Exception as error:  # noqa: BLE001 - the last line of defence: one line, not a traceback
        if debug:
            raise
        print(f"error: {describe_error(error)}", file=sys.stderr)
        return 2


def _run(argv: list, debug: bool) -> int:
    from ..atomic import command_inputs

    parser = build_parser()
    args = parser.parse_args(argv)
    setattr(args, WORD_ARGUMENTS_ATTRIBUTE, word_arguments(parser))
    # Errors may then name this command's options; not under --events, whose messages a front end shows.
    set_command_options(() if getattr(args, "events", False) else vars(args))
    logging.basicConfig(
        level=logging.DEBUG if (args.verbose or debug) else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    apply_threads(args)
    with command_inputs():
        refuse_outputs_onto_inputs(args)
        code = int(args.func(args) or 0)
    sys.stdout.flush()  # a closed pipe shows up here, inside main's handlers
    return code


if __name__ == "__main__":  # pragma: no cover - `python -m lctfound.cli`
    sys.exit(main())
