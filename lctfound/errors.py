"""User-facing errors.

Every problem a user can cause (bad path, wrong file, incompatible model) is raised as an
`LCTfoundError` whose message is one line that names the object and the problem. The CLI
prints it as ``error: <message>`` and exits with code 2; Slicer modules show it in a dialog.
Anything else escaping is a bug and keeps its traceback.
"""


from typing import Iterable, Mapping, Optional

# Option names (argparse destinations, e.g. "no_validate") of the command-line command running in
# this process; empty in Slicer, the web front end and the jobs they start. An error's hint about
# an option is shown only where that option exists, so no message sends a user to a missing option.
_command_options: frozenset = frozenset()


def set_command_options(names: Iterable[str]) -> None:
    """Record the options of the command-line command now running (the CLI calls this after parsing)."""
    global _command_options
    _command_options = frozenset(names)


class LCTfoundError(Exception):
    """A problem with the user's input, files or settings, explained in one line.

    ``option_hints`` maps an option's argparse destination to a sentence about it
    (``{"series_uid": "or choose one with --series-uid UID"}``); it is appended only when the
    command running in this process has that option (see `set_command_options`).
    """

    exit_code = 2

    def __init__(self, message: str, option_hints: Optional[Mapping[str, str]] = None):
        text = str(message)
        for option, hint in (option_hints or {}).items():
            if option in _command_options:
                text = f"{text}; {hint}"
        # Fold to one line so that every front end can show it as-is.
        super().__init__(" ".join(text.split()))


class InputError(LCTfoundError):
    """An input file or folder cannot be used (missing, unreadable, wrong kind of image)."""


class CheckpointError(LCTfoundError):
    """A model folder or weight file is missing, truncated, foreign or does not match its config."""


class Cancelled(LCTfoundError):
    """Long work was stopped on request; partial outputs were not published."""

    exit_code = 130
