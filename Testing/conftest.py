"""Shared pytest fixtures for the engine tests (Testing/).

Keep fixtures here small and documented; test-image helpers live in ``data_factory.py``, broken and
misleading inputs (lying headers, NaN volumes, two-series DICOM, bad configs...) in ``bad_files.py``.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

# Never reach the Hugging Face Hub from tests.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

TESTING_DIR = Path(__file__).resolve().parent
if str(TESTING_DIR) not in sys.path:
    sys.path.insert(0, str(TESTING_DIR))

import data_factory  # noqa: E402

# --------------------------------------------------------------------------------------------
# Real sample CTs (pyradiomics 3.0.1 lung1 / lung2)
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def sample_data():
    """The real sample CTs as a `SampleData`, fetched once into the LCTfound cache.

    The cache is the user's (``$LCTFOUND_CACHE_DIR`` or ``~/.cache/lctfound``), so later runs
    reuse it without network. Set ``LCTFOUND_SKIP_SAMPLE_DATA=1`` to skip these tests on a
    machine with no package index.
    """
    if os.environ.get("LCTFOUND_SKIP_SAMPLE_DATA") == "1":
        pytest.skip("LCTFOUND_SKIP_SAMPLE_DATA=1")
    from lctfound.io.sample_data import fetch_sample

    return fetch_sample()


@pytest.fixture
def sample_cache(sample_data, tmp_path, monkeypatch):
    """A private cache root (``$LCTFOUND_CACHE_DIR``) holding a copy of the sample files.

    For tests that damage, delete or re-fetch sample files without touching the shared cache.
    """
    root = tmp_path / "cache"
    shutil.copytree(sample_data.folder, root / "sample-data")
    monkeypatch.setenv("LCTFOUND_CACHE_DIR", str(root))
    return root


@pytest.fixture
def empty_cache(tmp_path, monkeypatch):
    """An empty private cache root (``$LCTFOUND_CACHE_DIR``)."""
    root = tmp_path / "empty-cache"
    monkeypatch.setenv("LCTFOUND_CACHE_DIR", str(root))
    return root


# --------------------------------------------------------------------------------------------
# Synthetic volumes
# --------------------------------------------------------------------------------------------


@pytest.fixture
def synthetic_ct():
    """A small axial chest-like CT (`CTVolume`, int16 HU, 48×40×12 voxels)."""
    return data_factory.synthetic_ct()


@pytest.fixture
def oblique_ct():
    """`synthetic_ct` with an oblique direction matrix and a non-zero origin."""
    return data_factory.oblique_ct()


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _no_command_options():
    """Each test starts outside any command (`lctfound.errors.set_command_options`: a CLI call in a test
    sets the options its errors may name, as it does in its own process)."""
    from lctfound.errors import set_command_options

    set_command_options(())
    yield
    set_command_options(())


@pytest.fixture
def run_cli(capsys):
    """Run ``lctfound <args>`` in-process; returns ``(exit_code, stdout, stderr)``.

    ``groups`` limits which command groups are imported (default: all registered ones), so a
    group can be tested while others are still being written.
    """
    import lctfound.cli as cli

    def run(args, groups=None):
        saved = cli.COMMAND_MODULES
        if groups is not None:
            cli.COMMAND_MODULES = tuple(groups)
        try:
            try:
                code = cli.main([str(a) for a in args])
            except SystemExit as exit_:  # argparse errors and --help
                code = exit_.code if isinstance(exit_.code, int) else 1
        finally:
            cli.COMMAND_MODULES = saved
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return run


@pytest.fixture
def one_torch_thread():
    """Torch on one thread for the test (3D CT-FM tests: other work shares this CPU)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --------------------------------------------------------------------------------------------
# Ending the test process
# --------------------------------------------------------------------------------------------

_exit_status: list = []


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session, exitstatus):
    _exit_status.append(int(exitstatus))


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
    """End the process once pytest is done, after the atexit handlers (they stop job processes), without the
    interpreter's module teardown: this one process has hosted MRML scenes, torch, gloo and hundreds of
    job-following threads, and a whole-suite run once crashed (SIGSEGV) in that teardown after every test
    had passed, with no Python frame involved (faulthandler was silent). The exit status is pytest's."""
    if not _exit_status or os.environ.get("LCTFOUND_TEST_FULL_TEARDOWN") == "1":
        return
    import atexit

    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(_exit_status[0])


@pytest.fixture
def token_env(server, monkeypatch):
    """A command-line client of the test module's ``server`` fixture (a `server_helpers.Server`): its
    token in the environment, under the client id ``cli``."""
    monkeypatch.setenv("LCTFOUND_SERVER_TOKEN", server.token)
    monkeypatch.setenv("LCTFOUND_CLIENT_ID", "cli")
