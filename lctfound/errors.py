"""User-facing errors.

Every problem a user can cause (bad path, wrong file, incompatible model) is raised as an
`LCTfoundError` whose message is one line that names the object and the problem. The CLI
prints it as ``error: <message>`` and exits with code 2; Slicer modules show it in a dialog.
Anything else escaping is a bug and keeps its traceback.
"""


class LCTfoundError(Exception):
    """A problem with the user's input, files or settings, explained in one line."""

    exit_code = 2

    def __init__(self, message: str):
        # Fold to one line so that every front end can show it as-is.
        super().__init__(" ".join(str(message).split()))


class InputError(LCTfoundError):
    """An input file or folder cannot be used (missing, unreadable, wrong kind of image)."""


class CheckpointError(LCTfoundError):
    """A model folder or weight file is missing, truncated, foreign or does not match its config."""


class Cancelled(LCTfoundError):
    """Long work was stopped on request; partial outputs were not published."""

    exit_code = 130
