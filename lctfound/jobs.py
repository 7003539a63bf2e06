"""Jobs: long work in a child process, with progress events and a real Cancel.

One protocol for every front end (Slicer, web, command line):

* the child is ``python -m lctfound <command> ... --events``; it prints one JSON object per line
  on stdout (``{"event": "metrics", "step": 3, ...}``) and, when it fails, one line
  ``error: <message>`` on stderr with a non-zero exit code;
* the parent starts it with `Job.start`, calls `Job.poll` from its own loop (Slicer: a
  ``qt.QTimer``; web: an async task; scripts: a ``while`` loop) and gets the new events without
  blocking; a reader thread per pipe does the reading, so the GUI thread never waits;
* `Job.cancel` ends the whole process tree: SIGTERM, then SIGKILL after a timeout. The child runs
  in its own session (POSIX) or process group (Windows); its descendants are found with psutil
  when it is installed, else with ``ps`` (POSIX), and the group is signalled as well; on Windows
  without psutil, ``taskkill /T /F`` ends the tree. A fresh Slicer has no psutil, so Cancel must
  not need it.

On Windows the child's console window is hidden (closing it would kill the job) and, everywhere, its
standard streams are UTF-8 (``PYTHONIOENCODING``/``PYTHONUTF8``), whatever the system code page.

After the child has ended and its output is drained, `Job.poll` returns one last event
``{"event": "exit", "state": ..., "returncode": ..., "error": ...}``, so a consumer that only
reads events sees the end too. Each event carries ``received_at`` (this process's
`time.monotonic`), which front ends use for rates and ETAs.

No Qt, Slicer or torch here. In Slicer, pass ``python=`` the path of ``PythonSlicer``.
"""

from __future__ import annotations

import collections
import enum
import json
import logging
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

logger = logging.getLogger(__name__)

#: Folder that holds the ``lctfound`` package; put on the child's PYTHONPATH so that an
#: interpreter without the package installed (``PythonSlicer``) still finds it.
PACKAGE_PARENT = Path(__file__).resolve().parent.parent

_STDERR_LINES_KEPT = 200
_ERROR_PREFIX = "error: "


class JobState(str, enum.Enum):
    RUNNING = "running"
    FINISHED = "finished"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def ended(self) -> bool:
        return self is not JobState.RUNNING


def parse_event_line(line: str) -> Optional[dict[str, Any]]:
    """One stdout line → an event dict; JSON objects with an ``event`` key are events, any other
    text becomes ``{"event": "log", "text": line}``; blank lines give None."""
    text = line.rstrip("\r\n")
    if not text.strip():
        return None
    try:
        value = json.loads(text)
    except ValueError:
        value = None
    if isinstance(value, dict) and isinstance(value.get("event"), str):
        return value
    return {"event": "log", "text": text}


def child_environment(extra: Optional[Mapping[str, str]] = None) -> dict[str, str]:
    """The current environment plus ``extra``, with the package importable and output unbuffered."""
    env = dict(os.environ)
    env.update({str(key): str(value) for key, value in (extra or {}).items()})
    paths = [str(PACKAGE_PARENT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    env["PYTHONUNBUFFERED"] = "1"
    # UTF-8 pipes whatever the locale or Windows code page: log text may hold any character.
    env["PYTHONIOENCODING"] = "utf-8"
    env["PYTHONUTF8"] = "1"
    return env


#: Windows process-creation flags (the values of Python's ``subprocess`` constants, which exist
#: only on Windows).
CREATE_NEW_PROCESS_GROUP = 0x00000200
CREATE_NO_WINDOW = 0x08000000
STARTF_USESHOWWINDOW = 0x00000001
SW_HIDE = 0


def popen_options(os_name: str = os.name) -> dict[str, Any]:
    """How to start a job's child: on Windows in its own process group with a hidden console window,
    exactly as ``slicer.util.launchConsoleProcess`` starts ``PythonSlicer`` (a visible console's close
    button would kill the job). Not CREATE_NO_WINDOW: PythonSlicer.exe is a launcher that starts the
    real interpreter, and a console program started from a process without a console gets a new,
    visible one; with a hidden console, the whole tree shares it. Elsewhere: its own session, so
    Cancel can signal its process group."""
    if os_name != "nt":
        return {"start_new_session": True}
    startupinfo = subprocess.STARTUPINFO()  # type: ignore[attr-defined]  # Windows only
    startupinfo.dwFlags |= STARTF_USESHOWWINDOW
    startupinfo.wShowWindow = SW_HIDE
    return {"creationflags": CREATE_NEW_PROCESS_GROUP, "startupinfo": startupinfo}


class Job:
    """A running (or ended) child process; see the module docstring. Create with `Job.start`."""

    def __init__(self, process: subprocess.Popen, command: Sequence[str]) -> None:
        self.command = list(command)
        self._process = process
        self._events: "queue.Queue[dict[str, Any]]" = queue.Queue()
        self._stderr: collections.deque[str] = collections.deque(maxlen=_STDERR_LINES_KEPT)
        self._error_line = ""
        self._lock = threading.Lock()
        self._cancel_requested = False
        self._state = JobState.RUNNING
        self._exit_reported = False
        self.started_at = time.monotonic()
        self.ended_at: Optional[float] = None
        self._readers = [
            threading.Thread(target=self._read_stdout, name=f"lctfound-job-{process.pid}-stdout", daemon=True),
            threading.Thread(target=self._read_stderr, name=f"lctfound-job-{process.pid}-stderr", daemon=True),
        ]
        for reader in self._readers:
            reader.start()

    # -- starting ---------------------------------------------------------------------------

    @classmethod
    def start(
        cls,
        args: Sequence[str],
        cwd: Optional[os.PathLike | str] = None,
        env: Optional[Mapping[str, str]] = None,
        python: Optional[os.PathLike | str] = None,
    ) -> "Job":
        """Run ``python -m lctfound <args>``. ``env`` holds variables added to the current
        environment (e.g. ``{"CUDA_VISIBLE_DEVICES": "-1"}``); ``python`` defaults to this
        interpreter (in Slicer: ``PythonSlicer``)."""
        interpreter = str(python or sys.executable)
        return cls.start_command([interpreter, "-m", "lctfound", *map(str, args)], cwd=cwd, env=env)

    @classmethod
    def start_command(
        cls,
        command: Sequence[str],
        cwd: Optional[os.PathLike | str] = None,
        env: Optional[Mapping[str, str]] = None,
    ) -> "Job":
        """Run any command under the job protocol (tests, helper scripts)."""
        command = [str(part) for part in command]
        options = popen_options()
        process = subprocess.Popen(
            command,
            cwd=str(cwd) if cwd is not None else None,
            env=child_environment(env),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            encoding="utf-8",
            errors="replace",
            bufsize=1,
            **options,
        )
        logger.info("job %d started: %s", process.pid, subprocess.list2cmdline(command))
        return cls(process, command)

    # -- reader threads ---------------------------------------------------------------------

    def _read_stdout(self) -> None:
        assert self._process.stdout is not None
        for line in self._process.stdout:
            event = parse_event_line(line)
            if event is not None:
                event["received_at"] = time.monotonic()
                self._events.put(event)
        self._process.stdout.close()

    def _read_stderr(self) -> None:
        assert self._process.stderr is not None
        for line in self._process.stderr:
            text = line.rstrip("\r\n")
            if not text.strip():
                continue
            with self._lock:
                self._stderr.append(text)
                if text.startswith(_ERROR_PREFIX):
                    self._error_line = text[len(_ERROR_PREFIX):].strip()
        self._process.stderr.close()

    # -- state ------------------------------------------------------------------------------

    @property
    def pid(self) -> int:
        return self._process.pid

    @property
    def returncode(self) -> Optional[int]:
        return self._process.returncode if self._update_state().ended else None

    @property
    def state(self) -> JobState:
        return self._update_state()

    @property
    def running(self) -> bool:
        return not self.state.ended

    @property
    def cancel_requested(self) -> bool:
        return self._cancel_requested

    @property
    def stderr_tail(self) -> str:
        """The last lines the child wrote on stderr (warnings, tracebacks)."""
        with self._lock:
            return "\n".join(self._stderr)

    @property
    def error(self) -> str:
        """Why the job failed, in one line: the child's ``error: ...`` message (without the
        prefix), else its last stderr line, else the exit code. Empty unless failed."""
        if self.state is not JobState.FAILED:
            return ""
        with self._lock:
            if self._error_line:
                return self._error_line
            if self._stderr:
                return self._stderr[-1].strip()
        code = self._process.returncode
        if code is not None and code < 0:
            try:
                return f"the process was killed by {signal.Signals(-code).name}"
            except ValueError:
                pass
        return f"the process ended with exit code {code}"

    def _update_state(self, reader_timeout: float = 1.0) -> JobState:
        """Final once the process has ended and its pipes are drained (so every event came)."""
        if self._state.ended:
            return self._state
        code = self._process.poll()
        if code is None:
            return self._state
        for reader in self._readers:
            # A descendant that inherited the pipes may keep them open; do not wait for it forever.
            reader.join(reader_timeout)
        with self._lock:
            if self._state.ended:
                return self._state
            if code == 0:
                self._state = JobState.FINISHED
            elif self._cancel_requested or code == 130:
                self._state = JobState.CANCELLED
            else:
                self._state = JobState.FAILED
            self.ended_at = time.monotonic()
        logger.info("job %d %s (exit code %s)", self.pid, self._state.value, code)
        return self._state

    # -- consuming --------------------------------------------------------------------------

    def poll(self) -> list[dict[str, Any]]:
        """Events that arrived since the last call (never blocks); the last one is ``exit``."""
        events = []
        while True:
            try:
                events.append(self._events.get_nowait())
            except queue.Empty:
                break
        if not self._exit_reported and self._update_state(reader_timeout=0.0).ended:
            drained = not any(reader.is_alive() for reader in self._readers)
            # A descendant that inherited the pipes can hold them open: do not wait for it forever.
            if drained or time.monotonic() - (self.ended_at or 0.0) > 5.0:
                while True:  # whatever the readers queued after the first drain
                    try:
                        events.append(self._events.get_nowait())
                    except queue.Empty:
                        break
                self._exit_reported = True
                events.append({"event": "exit", "state": self._state.value, "returncode": self._process.returncode,
                               "error": self.error, "received_at": time.monotonic()})
        return events

    def wait(self, timeout: Optional[float] = None) -> JobState:
        """Wait until the job ends (or ``timeout`` seconds pass); returns the state."""
        try:
            self._process.wait(timeout)
        except subprocess.TimeoutExpired:
            return self.state
        return self._update_state()

    # -- cancelling -------------------------------------------------------------------------

    def cancel(self, timeout: float = 5.0) -> bool:
        """End the child and all its descendants: SIGTERM, then SIGKILL after ``timeout`` s.
        Returns False when the job had already ended. Works without psutil (see the module docstring)."""
        if self._process.poll() is not None:
            _signal_group(self._process.pid, "SIGKILL")  # stragglers of an ended job
            return False
        self._cancel_requested = True
        logger.info("job %d: cancelling", self.pid)
        descendants = descendant_pids(self._process.pid)
        for send in ("SIGTERM", "SIGKILL"):
            # Descendants are listed again: the child may have started one since.
            descendants = list(dict.fromkeys(descendants + descendant_pids(self._process.pid)))
            _send(self._process, descendants, send)
            deadline = time.monotonic() + timeout
            try:
                self._process.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
            descendants = _wait_gone(descendants, max(deadline - time.monotonic(), 0.05))
            if self._process.poll() is not None and not descendants:
                break
            if send == "SIGTERM":
                logger.warning("job %d: still running %.0f s after SIGTERM; killing", self.pid, timeout)
        self._update_state()
        return True

    def __repr__(self) -> str:
        return f"<Job pid={self.pid} {self.state.value}: {subprocess.list2cmdline(self.command)}>"


def _psutil():
    """psutil, or None: a fresh Slicer does not have it (the installer adds it)."""
    try:
        import psutil
    except ImportError:
        return None
    return psutil


def descendant_pids(pid: int) -> list[int]:
    """The process ids of every descendant of ``pid`` (children first), found with psutil, else with
    ``ps`` on POSIX; empty on Windows without psutil (``taskkill /T`` walks the tree itself)."""
    psutil = _psutil()
    if psutil is not None:
        try:
            return [child.pid for child in psutil.Process(pid).children(recursive=True)]
        except psutil.Error:
            return []
    if os.name == "nt":
        return []
    try:
        listing = subprocess.run(["ps", "-A", "-o", "pid=", "-o", "ppid="], capture_output=True, text=True,
                                 timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        logger.warning("job %d: cannot list its descendants (no psutil, ps failed); signalling its group only", pid)
        return []
    children: dict[int, list[int]] = collections.defaultdict(list)
    for line in listing.splitlines():
        fields = line.split()
        if len(fields) == 2 and fields[0].isdigit() and fields[1].isdigit():
            children[int(fields[1])].append(int(fields[0]))
    found, pending = [], [pid]
    while pending:
        for child in children.get(pending.pop(0), []):
            if child not in found and child != pid:
                found.append(child)
                pending.append(child)
    return found


def process_alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie waiting to be reaped by its new parent counts as ended)."""
    psutil = _psutil()
    if psutil is not None:
        try:
            process = psutil.Process(pid)
            return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
        except psutil.Error:
            return False
    if os.name == "nt":
        try:
            listing = subprocess.run(["tasklist", "/FI", f"PID eq {pid}", "/NH", "/FO", "CSV"], capture_output=True,
                                     text=True, timeout=30, creationflags=CREATE_NO_WINDOW).stdout
        except (OSError, subprocess.SubprocessError):
            return False
        return f'"{pid}"' in listing
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    stat = Path(f"/proc/{pid}/stat")
    try:  # Linux: the state follows the parenthesised command name
        return stat.read_text().rpartition(")")[2].split()[0] != "Z"
    except (OSError, IndexError):
        pass
    try:  # macOS and other POSIX systems
        state = subprocess.run(["ps", "-o", "stat=", "-p", str(pid)], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return True
    return bool(state.strip()) and not state.strip().startswith("Z")


def _signal_group(pid: int, name: str) -> None:
    """Signal the process group the child leads (it may hold members no longer linked to it)."""
    if os.name == "nt":
        return
    try:
        os.killpg(pid, getattr(signal, name))
    except (ProcessLookupError, PermissionError):
        pass


def _kill_tree_windows(pid: int) -> None:
    """Windows without psutil: ``taskkill /T /F`` ends ``pid`` and every process it started."""
    try:
        subprocess.run(["taskkill", "/T", "/F", "/PID", str(pid)], capture_output=True, timeout=30,
                       creationflags=CREATE_NO_WINDOW)
    except (OSError, subprocess.SubprocessError):
        logger.warning("job %d: taskkill failed", pid, exc_info=True)


def _send(process: subprocess.Popen, descendants: list[int], name: str) -> None:
    if os.name == "nt" and _psutil() is None and process.poll() is None:
        _kill_tree_windows(process.pid)  # before the child ends: /T follows its children
    if process.poll() is None:
        if name == "SIGTERM":
            process.terminate()
        else:
            process.kill()
    for pid in descendants:
        try:
            os.kill(pid, getattr(signal, name, signal.SIGTERM))
        except (ProcessLookupError, PermissionError, OSError):
            pass
    _signal_group(process.pid, name)


def _wait_gone(pids: list[int], timeout: float) -> list[int]:
    """Wait until ``pids`` (not our children: they are polled) have ended or are zombies waiting for
    their new parent to reap them; returns those still alive."""
    deadline = time.monotonic() + timeout
    while True:
        alive = [pid for pid in pids if process_alive(pid)]
        if not alive or time.monotonic() >= deadline:
            return alive
        time.sleep(0.05)
