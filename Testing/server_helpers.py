"""A real `lctfound serve` process on 127.0.0.1 for the tests (test_server.py, the module logics'
server tests). Waiting is bounded by counts of polls, not by how fast this machine is."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SERVER_STARTUP_POLLS = 600  # x 0.25 s: a loaded 2-core machine imports torch slowly


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def base_env(cache: Path) -> dict:
    return dict(os.environ, PYTHONPATH=str(ROOT), LCTFOUND_CACHE_DIR=str(cache), HF_HUB_OFFLINE="1",
                OMP_NUM_THREADS="1")


class Server:
    """A `lctfound serve` child process (own session, so its whole tree can be ended)."""

    def __init__(self, data: Path, cache: Path, extra=(), env=None):
        self.data, self.port = data, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(data.parent / f"{data.name}-server-{self.port}.log", "w")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "lctfound", "serve", "--data", str(data), "--port", str(self.port), *extra],
            env={**base_env(cache), **(env or {})}, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        import httpx

        for _ in range(SERVER_STARTUP_POLLS):
            assert self.process.poll() is None, Path(self.log.name).read_text()
            try:
                if httpx.get(self.url + "/health", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.25)
        else:
            raise AssertionError("the server did not start")
        self.token = (data / "token").read_text().strip()
        #: A copy of the token for clients that read it from a file (the panels' Token file).
        self.token_file = data.parent / f"{data.name}-token"
        self.token_file.write_text(self.token + "\n")

    def client(self, client_id: str = "tester"):
        from lctfound.remote import RemoteClient

        return RemoteClient(self.url, self.token, client_id=client_id)

    def kill(self) -> None:
        """SIGKILL: no shutdown code runs (its job children are left behind, as after a crash)."""
        self.process.kill()
        self.process.wait(30)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(30)
        self.log.close()


def interruptible() -> None:
    """``preexec_fn`` of a child a test will Ctrl-C: SIGINT back to its default, so the child's Python
    installs its KeyboardInterrupt handler even when the suite itself runs with SIGINT ignored (as a
    background job of a shell without job control: `cmd &` in a script)."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)


def backbone_server(folder: Path, sample_size: int = 32, seed: int = 1) -> Server:
    """A server offering one tiny backbone, ``tiny`` (saved in ``folder``)."""
    from model_factory import tiny_model

    from lctfound.models import save_model

    save_model(tiny_model(sample_size, seed=seed), folder / "tiny")
    return Server(folder / "data", folder / "server-cache", ["--models", f"tiny={folder / 'tiny'}"])


def wait_for(condition, polls: int = 2400, every: float = 0.25):
    for _ in range(polls):
        value = condition()
        if value:
            return value
        time.sleep(every)
    raise AssertionError("condition not reached")
