"""Jobs (`lctfound.jobs`): child processes with JSON events on stdout, one-line errors and a real
Cancel that ends the whole process tree. Real children only: tiny scripts and a tiny pretraining."""

from __future__ import annotations

import json
import os
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

import data_factory
from lctfound.io.volume import write_volume
from lctfound.jobs import Job, JobState, child_environment, parse_event_line

REPO = Path(__file__).resolve().parents[1]
# One thread per child: the test machine is small and shared.
LIGHT_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
TINY = ["--resolution", "32", "--batch-size", "2", "--num-samples", "0", "--log-every", "1", "--events"]


@pytest.fixture(scope="module")
def ct_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("job-cts")
    write_volume(data_factory.synthetic_ct(seed=1), folder / "a.nrrd")
    return folder


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LCTFOUND_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def collect(job: Job, until=None, timeout: float = 120.0) -> list[dict]:
    """Poll like a front end does until the job has ended (or ``until(event)`` is true)."""
    events, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        for event in job.poll():
            events.append(event)
            if until is not None and until(event):
                return events
            if event["event"] == "exit":
                return events
        time.sleep(0.05)
    job.cancel(timeout=1)
    pytest.fail(f"job did not end within {timeout} s; events so far: {[e['event'] for e in events]}")


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def script_job(tmp_path: Path, source: str, env=None) -> Job:
    script = tmp_path / "child.py"
    script.write_text(textwrap.dedent(source))
    return Job.start_command([sys.executable, str(script)], cwd=tmp_path, env=env)


# ---------------------------------------------------------------------------------------------
# Protocol details
# ---------------------------------------------------------------------------------------------


def test_parse_event_line():
    assert parse_event_line('{"event": "metrics", "step": 3}\n') == {"event": "metrics", "step": 3}
    assert parse_event_line("trained 6 steps\n") == {"event": "log", "text": "trained 6 steps"}
    assert parse_event_line('{"step": 3}') == {"event": "log", "text": '{"step": 3}'}  # JSON, but no event
    assert parse_event_line("[1, 2]") == {"event": "log", "text": "[1, 2]"}
    assert parse_event_line("   \n") is None


def test_child_environment_adds_variables_and_finds_the_package(monkeypatch):
    monkeypatch.setenv("PYTHONPATH", "/elsewhere")
    env = child_environment({"CUDA_VISIBLE_DEVICES": "-1"})
    assert env["CUDA_VISIBLE_DEVICES"] == "-1" and env["PYTHONUNBUFFERED"] == "1"
    assert env["PYTHONPATH"].split(os.pathsep) == [str(REPO), "/elsewhere"]
    assert env["PATH"] == os.environ["PATH"]


def test_events_logs_environment_and_exit(tmp_path):
    job = script_job(tmp_path, """
        import json, os, sys
        print(json.dumps({"event": "start", "device": os.environ["CUDA_VISIBLE_DEVICES"]}))
        print("a plain log line")
        print("warning: something odd", file=sys.stderr)
        print(json.dumps({"event": "finished", "step": 2}))
    """, env={"CUDA_VISIBLE_DEVICES": "-1"})
    events = collect(job)
    assert [e["event"] for e in events] == ["start", "log", "finished", "exit"]
    assert events[0]["device"] == "-1" and events[1]["text"] == "a plain log line"
    assert all(isinstance(e["received_at"], float) for e in events)
    assert events[-1] == {"event": "exit", "state": "finished", "returncode": 0, "error": "",
                          "received_at": events[-1]["received_at"]}
    assert job.state is JobState.FINISHED and job.returncode == 0 and job.error == ""
    assert job.stderr_tail == "warning: something odd"
    assert job.poll() == []  # the exit event comes once
    assert job.cancel() is False  # nothing left to cancel


def test_poll_never_blocks_and_wait_times_out(tmp_path):
    job = script_job(tmp_path, "import time; time.sleep(30)\n")
    try:
        began = time.monotonic()
        assert job.poll() == []
        assert time.monotonic() - began < 0.5
        assert job.wait(0.2) is JobState.RUNNING and job.running and job.returncode is None
    finally:
        job.cancel(timeout=1)
    assert job.state is JobState.CANCELLED


def test_failure_without_error_line_reports_the_last_stderr_line(tmp_path):
    job = script_job(tmp_path, "raise ValueError('broken input')\n")
    events = collect(job)
    assert job.state is JobState.FAILED and job.returncode == 1
    assert job.error == "ValueError: broken input"
    assert "Traceback" in job.stderr_tail
    assert events[-1]["state"] == "failed" and events[-1]["error"] == "ValueError: broken input"


def test_cancel_ends_the_whole_tree(tmp_path):
    """The grandchild lives in another session and ignores SIGTERM: psutil finds it, SIGKILL ends it."""
    job = script_job(tmp_path, """
        import json, subprocess, sys, time
        grandchild = subprocess.Popen(
            [sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"],
            start_new_session=True)
        print(json.dumps({"event": "start", "grandchild": grandchild.pid}), flush=True)
        time.sleep(600)
    """)
    events = collect(job, until=lambda e: e["event"] == "start", timeout=30)
    grandchild = events[-1]["grandchild"]
    assert not gone(grandchild) and not gone(job.pid)
    began = time.monotonic()
    assert job.cancel(timeout=1) is True
    assert time.monotonic() - began < 10
    assert job.state is JobState.CANCELLED and job.error == ""
    assert job.returncode is not None and job.returncode < 0
    assert gone(job.pid) and gone(grandchild)
    last = collect(job, timeout=10)[-1]
    assert (last["event"], last["state"], last["returncode"], last["error"]) == ("exit", "cancelled", job.returncode, "")


# ---------------------------------------------------------------------------------------------
# The real command: lctfound train pretrain --events
# ---------------------------------------------------------------------------------------------


def test_pretraining_job_streams_events(ct_folder, tmp_path, cache):
    job = Job.start(["train", "pretrain", ct_folder, "-o", tmp_path / "run", "--max-steps", "3",
                     "--checkpoint-every", "2", *TINY], cwd=tmp_path, env=LIGHT_ENV)
    events = collect(job)
    kinds = [e["event"] for e in events]
    assert job.state is JobState.FINISHED, job.stderr_tail
    assert kinds[0] == "start" and kinds[-2:] == ["finished", "exit"]
    assert [e["step"] for e in events if e["event"] == "metrics"] == [1, 2, 3]
    assert [e["step"] for e in events if e["event"] == "checkpoint"] == [2, 3]
    assert events[0]["total_steps"] == 3
    assert (tmp_path / "run" / "model").is_dir() and (tmp_path / "run" / "metrics.csv").is_file()


def test_bad_argument_fails_with_the_one_line_error(tmp_path, cache):
    job = Job.start(["train", "pretrain", tmp_path, "-o", tmp_path / "run", "--resolution", "30", "--events"],
                    env=LIGHT_ENV)
    events = collect(job)
    assert job.state is JobState.FAILED and job.returncode == 2
    assert "--resolution" in job.error and "a multiple of 16" in job.error and "'30'" in job.error  # argparse
    assert events[-1]["error"] == job.error and events[-1]["state"] == "failed"


def complete_checkpoints(run: Path) -> list[tuple[int, Path]]:
    """Checkpoint folders whose trainer state was written (they are published atomically)."""
    folder = run / "checkpoints"
    found = [(int(path.name.split("-")[1]), path) for path in folder.glob("step-*")
             if (path / "training" / "trainer_state.json").is_file()] if folder.is_dir() else []
    return sorted(found)


def test_cancelled_pretraining_keeps_its_checkpoint(ct_folder, tmp_path, cache):
    run = tmp_path / "run"
    job = Job.start(["train", "pretrain", ct_folder, "-o", run, "--max-steps", "2000", "--checkpoint-every", "2",
                     *TINY], env=LIGHT_ENV)
    events = collect(job, until=lambda e: e["event"] == "checkpoint")
    assert events[-1]["event"] == "checkpoint", job.stderr_tail
    assert job.cancel(timeout=5) is True
    assert job.state is JobState.CANCELLED and gone(job.pid)
    checkpoints = complete_checkpoints(run)
    assert checkpoints and checkpoints[0][0] >= 2
    newest = checkpoints[-1][1]
    state = json.loads((newest / "training" / "trainer_state.json").read_text())
    assert state["step"] == checkpoints[-1][0]
    assert (newest / "model" / "unet").is_dir()


# ---------------------------------------------------------------------------------------------
# A fresh Slicer: no psutil; Windows: no console window, UTF-8 pipes
# ---------------------------------------------------------------------------------------------

def test_cancel_without_psutil_ends_child_and_grandchild(tmp_path):
    """Slicer does not ship psutil: Cancel still ends the tree (``ps`` lists it, the group is
    signalled), from the engine's cancel thread and from the widget's cleanup, and nothing raises."""
    import threading

    from import_blocker import hidden_packages
    from lctfound.logic import ModuleLogicBase

    # The first grandchild stays in the child's session and ignores SIGTERM; the second also leaves
    # the session (only the process listing finds it).
    job = script_job(tmp_path, """
        import json, subprocess, sys, time
        code = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"
        stays = subprocess.Popen([sys.executable, "-c", code])
        leaves = subprocess.Popen([sys.executable, "-c", code], start_new_session=True)
        print(json.dumps({"event": "start", "grandchildren": [stays.pid, leaves.pid]}), flush=True)
        time.sleep(600)
    """)
    grandchildren = collect(job, until=lambda e: e["event"] == "start", timeout=30)[-1]["grandchildren"]
    assert not any(gone(pid) for pid in [job.pid, *grandchildren])
    thread_errors = []
    previous_hook = threading.excepthook
    threading.excepthook = lambda args: thread_errors.append(args.exc_value)
    try:
        with hidden_packages("psutil"):
            with pytest.raises(ModuleNotFoundError):
                import psutil as _  # noqa: F401
            engine = ModuleLogicBase()
            engine.job = job
            engine.begin("running")
            assert engine.cancel() is True
            engine._cancel_thread.join(60)
            assert not engine._cancel_thread.is_alive()
            assert job.state is JobState.CANCELLED
            assert job.cancel(timeout=1) is False  # what the widget's cleanup calls: no error
    finally:
        threading.excepthook = previous_hook
    assert thread_errors == []
    assert gone(job.pid) and all(gone(pid) for pid in grandchildren)


def test_windows_jobs_start_hidden_in_their_own_group(monkeypatch):
    """What `Job.start_command` passes to Popen on Windows (built here with a stand-in STARTUPINFO)."""
    import subprocess

    from lctfound import jobs

    class StartupInfo:
        def __init__(self):
            self.dwFlags, self.wShowWindow = 0, 1

    monkeypatch.setattr(subprocess, "STARTUPINFO", StartupInfo, raising=False)
    options = jobs.popen_options("nt")
    assert set(options) == {"creationflags", "startupinfo"}
    assert options["creationflags"] == 0x00000200  # CREATE_NEW_PROCESS_GROUP (a hidden console, not none)
    assert options["startupinfo"].dwFlags & 1 and options["startupinfo"].wShowWindow == 0  # SW_HIDE
    assert jobs.popen_options("posix") == {"start_new_session": True}
    for name in ("CREATE_NEW_PROCESS_GROUP", "CREATE_NO_WINDOW", "STARTF_USESHOWWINDOW", "SW_HIDE"):
        if hasattr(subprocess, name):  # on Windows: the constants are Python's own
            assert getattr(subprocess, name) == getattr(jobs, name)


def test_non_ascii_log_text_round_trips(tmp_path, monkeypatch):
    """The child writes UTF-8 whatever the parent's settings (an ASCII or cp1252 console on Windows)."""
    monkeypatch.setenv("PYTHONIOENCODING", "ascii")
    monkeypatch.setenv("PYTHONUTF8", "0")
    text = "Lungenrundherd \u00e4\u00f6\u00fc \u2013 \u80ba\u7ed3\u8282 \u2713 \u00b5Sv"
    job = script_job(tmp_path, f"""
        import json, sys
        text = {text!r}
        print(text, flush=True)
        print(json.dumps({{"event": "progress", "message": text}}, ensure_ascii=False), flush=True)
        print("error: " + text, file=sys.stderr, flush=True)
        sys.exit(3)
    """)
    events = collect(job, timeout=60)
    assert events[0] == {"event": "log", "text": text, "received_at": events[0]["received_at"]}
    assert events[1]["message"] == text
    assert job.state is JobState.FAILED and job.error == text
    assert child_environment()["PYTHONIOENCODING"] == "utf-8" and child_environment()["PYTHONUTF8"] == "1"
