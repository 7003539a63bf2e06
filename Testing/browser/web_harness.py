"""Helpers of the real-browser tests of ``lctfound web``: Debian chromium driven by Playwright, OSMesa rendering.

The browser is launched with ``executable_path`` (never ``playwright install``). When chromium,
Playwright, trame-slicer or OSMesa are missing these tests skip with the reason, except when
``LCTFOUND_REQUIRE_BROWSER=1`` (set by ``scripts/test.sh`` in CI after installing them): then
a missing piece is a failure, so CI cannot pass without running them.

`WebServer` starts ``lctfound web`` as a child process on a free port with a private cache
(``LCTFOUND_CACHE_DIR``) holding the sample CTs and a tiny backbone, and stops exactly that
process at the end.
"""

from __future__ import annotations

import ctypes.util
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import pytest

CHROMIUM_CANDIDATES = ("/usr/bin/chromium", "/usr/bin/chromium-browser", "/usr/lib/chromium/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage"]
READY_PREFIX = "LCTfound web: open "
REPO = Path(__file__).resolve().parents[2]


def chromium_path() -> Optional[str]:
    explicit = os.environ.get("LCTFOUND_CHROMIUM")
    if explicit:
        return explicit if Path(explicit).is_file() else None
    for candidate in CHROMIUM_CANDIDATES:
        if Path(candidate).is_file():
            return candidate
    return shutil.which("chromium")


def missing_browser_pieces() -> list[str]:
    missing = []
    if chromium_path() is None:
        missing.append("chromium (apt-get install chromium)")
    if importlib.util.find_spec("playwright") is None:
        missing.append("playwright (pip install 'lctfound[web]')")
    if importlib.util.find_spec("trame_slicer") is None:
        missing.append("trame-slicer (pip install 'lctfound[web]')")
    if ctypes.util.find_library("OSMesa") is None:
        missing.append("OSMesa (apt-get install libosmesa6-dev)")
    return missing


def require_browser() -> None:
    missing = missing_browser_pieces()
    if not missing:
        return
    reason = "browser test needs " + ", ".join(missing)
    if os.environ.get("LCTFOUND_REQUIRE_BROWSER") == "1":
        pytest.fail(reason + " (LCTFOUND_REQUIRE_BROWSER=1: CI must run the browser tests)")
    pytest.skip(reason)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class WebServer:
    """One ``lctfound web`` child process."""

    def __init__(self, args: list[str], cache: Path, log: Path, env: Optional[dict] = None):
        self.log_path = log
        self.cache = cache
        environment = {**os.environ, "LCTFOUND_CACHE_DIR": str(cache), "HF_HUB_OFFLINE": "1",
                       "VTK_DEFAULT_OPENGL_WINDOW": "vtkOSOpenGLRenderWindow", "PYTHONUNBUFFERED": "1",
                       **(env or {})}
        self.started_at = time.monotonic()
        self._log = open(log, "w")
        self.process = subprocess.Popen([sys.executable, "-m", "lctfound", "web", *args], stdout=self._log,
                                        stderr=subprocess.STDOUT, env=environment, cwd=str(REPO))
        self.url = ""
        self.ready_s = 0.0

    def wait_ready(self, timeout: float = 120.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"lctfound web exited with {self.process.returncode}:\n{self.log_tail()}")
            for line in self.log_path.read_text(errors="replace").splitlines():
                if line.startswith(READY_PREFIX):
                    self.url = line[len(READY_PREFIX):].strip()
                    self.ready_s = time.monotonic() - self.started_at
                    return self.url
            time.sleep(0.1)
        raise AssertionError(f"lctfound web did not print its URL within {timeout} s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 40) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join(line for line in text.splitlines()
                         if "WindowResizeEvent" not in line and "ConfigureEvent" not in line)[-6000:]

    def rss_mb(self) -> float:
        import psutil

        return psutil.Process(self.process.pid).memory_info().rss / 1e6

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=20)
        self._log.close()


def make_cache(root: Path, sample_folder: Optional[Path] = None, tiny_backbone: bool = True) -> Path:
    """A private LCTfound cache: the sample CTs (copied) and a tiny backbone named ``tiny-web``."""
    root.mkdir(parents=True, exist_ok=True)
    if sample_folder is not None:
        shutil.copytree(sample_folder, root / "sample-data", dirs_exist_ok=True)
    if tiny_backbone:
        sys.path.insert(0, str(REPO / "Testing"))
        from model_factory import tiny_model

        from lctfound.models import save_model

        save_model(tiny_model(64, seed=1), root / "models" / "tiny-web")
    return root


STATE_READY = "window.trame && window.trame.state && window.trame.state.get('lct_axial') !== undefined"


def state(page, key: str):
    return page.evaluate(f"window.trame.state.get({key!r})")


def wait_state(page, expression: str, timeout_s: float = 60.0) -> None:
    """Wait until a JS expression over ``s`` (the trame state getter) is true; on timeout the
    assertion shows the app's state."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    try:
        page.wait_for_function(f"(() => {{ const t = window.trame; if (!t || !t.state) return false; "
                               f"const s = (k) => t.state.get(k); return {expression}; }})()",
                               timeout=timeout_s * 1000)
    except PlaywrightTimeout:
        keys = ["lct_error", "lct_info", "lct_voxels", "lct_axial", "lct_seg_status", "lct_seg_reviewed",
                "lct_seg_busy", "lct_train_status", "SegmentEditorState__active_effect_name"]
        snapshot = {key: page.evaluate(f"window.trame && window.trame.state && window.trame.state.get({key!r})")
                    for key in keys}
        raise AssertionError(f"timed out after {timeout_s} s waiting for {expression}; state: {snapshot}") from None
