"""``--threads`` on every compute command and the compute line of a run's provenance (issue 15, item 7)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from lctfound.cli import _command_parsers, build_parser

ROOT = Path(__file__).resolve().parents[1]


def test_every_compute_command_takes_threads():
    parsers = {parser.prog: {action.dest for action in parser._actions} for parser in _command_parsers(build_parser())}
    compute = [prog for prog, dests in parsers.items() if "device" in dests]
    assert len(compute) > 15
    for prog in compute + ["lctfound enhance simulate-low-dose"]:
        assert "threads" in parsers[prog], prog
    for light in ("lctfound data info", "lctfound model list", "lctfound doctor"):
        assert "threads" not in parsers[light]


def test_threads_sets_torch_environment_and_provenance(tmp_path):
    # A real run in a fresh process: simulate-low-dose on a tiny volume with --threads 1; the
    # provenance must name the device and the thread count, and child jobs get OMP_NUM_THREADS.
    import numpy as np

    from lctfound.io.volume import CTVolume, write_volume

    volume = CTVolume(np.full((2, 24, 24), -1000.0, np.float32), spacing=(1.0, 1.0, 1.0))
    volume.array[:, 8:16, 8:16] = 40.0
    source = tmp_path / "ct.nrrd"
    write_volume(volume, source)
    out = tmp_path / "low.nrrd"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("OMP_NUM_THREADS", None)
    subprocess.run([sys.executable, "-m", "lctfound", "enhance", "simulate-low-dose", str(source), "--dose", "0.5",
                    "--views", "16", "--no-validate", "--threads", "1", "-o", str(out)],
                   env=env, cwd=tmp_path, check=True, capture_output=True, text=True)
    record = json.loads(out.with_suffix(".json").read_text())
    assert record["compute"] == {"device": "cpu", "threads": 1}


def test_set_threads_reaches_torch_and_children(monkeypatch):
    import torch

    from lctfound.devices import THREAD_VARIABLES, compute_settings, set_threads

    before = torch.get_num_threads()
    for name in THREAD_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    try:
        assert set_threads(1) == 1
        assert torch.get_num_threads() == 1
        assert all(os.environ[name] == "1" for name in THREAD_VARIABLES)
        assert compute_settings()["threads"] == 1
    finally:
        torch.set_num_threads(before)
