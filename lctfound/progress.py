"""Progress reporting and cancellation shared by the CLI (tqdm), Slicer (callbacks) and jobs.

Long-running engine functions accept ``progress: Progress | None``. They call
``progress.update(done, total, message)`` after each unit of work and
``progress.check_cancelled()`` between units; a cancelled run raises `Cancelled`
before it publishes any output.
"""

from __future__ import annotations

import threading
from typing import Callable, Optional

from .errors import Cancelled

ProgressCallback = Callable[[int, int, str], None]


class CancelToken:
    """A thread-safe flag that a front end sets to stop running work."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def cancel(self) -> None:
        self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()


class Progress:
    """Reports ``(done, total, message)`` to any number of callbacks and carries a cancel token."""

    def __init__(
        self,
        callback: Optional[ProgressCallback] = None,
        cancel_token: Optional[CancelToken] = None,
    ) -> None:
        self._callbacks: list[ProgressCallback] = [callback] if callback else []
        self.cancel_token = cancel_token or CancelToken()

    def add_callback(self, callback: ProgressCallback) -> None:
        self._callbacks.append(callback)

    def update(self, done: int, total: int, message: str = "") -> None:
        for callback in self._callbacks:
            callback(done, total, message)

    def check_cancelled(self) -> None:
        if self.cancel_token.cancelled:
            raise Cancelled("cancelled by the user")


def ensure_progress(progress: Optional[Progress]) -> Progress:
    return progress if progress is not None else Progress()


class TqdmProgress(Progress):
    """A `Progress` that drives one tqdm bar (used by the CLI); close it when done.

    The bar appears at the first update, so a command refused while checking its inputs prints
    only its one error line."""

    def __init__(self, description: str, unit: str = "it", cancel_token: Optional[CancelToken] = None):
        super().__init__(cancel_token=cancel_token)
        self._description, self._unit, self._bar = description, unit, None
        self.add_callback(self._update_bar)

    def _update_bar(self, done: int, total: int, message: str) -> None:
        if self._bar is None:
            from tqdm import tqdm

            # disable=None: a bar on an interactive terminal only; in a log or a pipe stderr keeps only
            # messages (an error stays one line).
            self._bar = tqdm(desc=self._description, unit=self._unit, total=0, dynamic_ncols=True, disable=None)
        if total and self._bar.total != total:
            self._bar.total = total
        self._bar.n = done
        if message:
            self._bar.set_postfix_str(message, refresh=False)
        self._bar.refresh()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()

    def __enter__(self) -> "TqdmProgress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class EventsProgress(Progress):
    """A `Progress` that prints one JSON line per update on stdout (``{"event": "progress",
    "done": .., "total": .., "message": ..}``): what `lctfound.jobs` reads from a command run
    with ``--events``."""

    def __init__(self, cancel_token: Optional[CancelToken] = None):
        super().__init__(cancel_token=cancel_token)
        self.add_callback(self._print)

    @staticmethod
    def _print(done: int, total: int, message: str) -> None:
        print_event({"event": "progress", "done": int(done), "total": int(total), "message": message})

    def close(self) -> None:
        pass

    def __enter__(self) -> "EventsProgress":
        return self

    def __exit__(self, *exc) -> None:
        pass


def print_event(event: dict) -> None:
    """One job event as a JSON line on stdout (flushed: the parent reads it while we run)."""
    import json

    print(json.dumps(event, default=str), flush=True)


def command_progress(events: bool, description: str, unit: str = "it") -> Progress:
    """The progress of a CLI command: JSON events for front ends (``--events``), else a tqdm bar.
    Use it as a context manager (``with command_progress(...) as progress:``)."""
    return EventsProgress() if events else TqdmProgress(description, unit=unit)
