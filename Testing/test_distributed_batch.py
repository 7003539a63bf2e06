"""Batch prediction across processes (issue 13): ``segment predict``, ``classify predict`` and ``features``
over a folder, run by ``torchrun`` with 2 CPU processes (gloo), give the same summary table and outputs as
one process, leave no part tables, and a re-run with another number of processes resumes.

The folder holds the sample CTs lung1 and lung2 shrunk, generated volumes and a broken file (a
failed case on one rank must fail the launch and be retried by the next run).
"""

from __future__ import annotations

import csv
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lctfound.batch import BatchRun, Ranks, launcher_ranks, leftover_parts, part_path, read_table, write_table
from lctfound.errors import LCTfoundError
from lctfound.io.volume import CTVolume, read_volume, write_volume
from lctfound.models import save_model

from data_factory import fewshot_phantom
from model_factory import tiny_model

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def launch(args, processes: int = 2) -> subprocess.CompletedProcess:
    """``torchrun --nproc_per_node N -m lctfound ARGS`` (what ``accelerate launch`` starts too), gloo on CPU."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
               "--master_port", str(free_port()), "-m", "lctfound", *[str(a) for a in args]]
    return subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=1200,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
                               "PYTHONPATH": str(REPO)})


def table(path: Path, output: Path, drop=("seconds",)) -> list:
    """A summary table's rows without the timing column, output paths relative to ``output``."""
    rows = read_table(path)
    return [{key: value.replace(str(output), "OUT") for key, value in row.items() if key not in drop} for row in rows]


def shrink(volume: CTVolume, slices: int = 3, size: int = 48) -> CTVolume:
    """A small copy of a sample CT: its middle slices, every n-th voxel in plane (the whole chest, air
    included, on a coarser grid)."""
    step = max(1, volume.shape[1] // size)
    k = max(0, (volume.shape[0] - slices) // 2)
    array = np.ascontiguousarray(volume.array[k:k + slices, ::step, ::step][:, :size, :size])
    spacing = (volume.spacing[0] * step, volume.spacing[1] * step, volume.spacing[2])
    return CTVolume(array, spacing, volume.origin, volume.direction.copy())


@pytest.fixture(scope="module")
def cases(tmp_path_factory, sample_data):
    """A folder of 5 small volumes (lung1, lung2 shrunk; 3 generated) and one broken file."""
    from lctfound.io.sample_data import load_sample

    folder = tmp_path_factory.mktemp("cases") / "scans"
    for name in ("lung1", "lung2"):
        write_volume(shrink(load_sample(name)[0]), folder / f"{name}.nrrd")
    for seed in range(3):
        volume = fewshot_phantom(3, 48, seed)[0].astype(np.int16)
        write_volume(CTVolume(volume, spacing=(0.7, 0.7, 5.0)), folder / f"generated{seed}.nii.gz")
    (folder / "broken.nrrd").write_bytes(b"NRRD0004\nnot really")
    return folder


@pytest.fixture(scope="module")
def backbone(tmp_path_factory):
    return save_model(tiny_model(32, seed=1), tmp_path_factory.mktemp("backbone") / "tiny")


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LCTFOUND_CACHE_DIR", str(tmp_path / "cache"))


@pytest.mark.slow
def test_segment_predict_two_processes_match_one_and_resume_across_ranks(cases, backbone, cache, tmp_path,
                                                                        run_cli):
    volume, lesion, _ = fewshot_phantom(3, 48, 7)
    ct = CTVolume(volume.astype(np.int16), spacing=(0.7, 0.7, 5.0))
    write_volume(ct, tmp_path / "train.nrrd")
    write_volume(ct.with_array(lesion.astype(np.uint8)), tmp_path / "label.nrrd")
    code, _, err = run_cli(["segment", "train", tmp_path / "train.nrrd", "--labels", tmp_path / "label.nrrd",
                            "--names", "1=Lesion", "--backbone", backbone, "--epochs", "3", "-o", tmp_path / "model"])
    assert code == 0, err
    predict = ["segment", "predict", cases, "--model", tmp_path / "model", "--device", "cpu", "--threads", "1"]

    code, out, err = run_cli([*predict, "-o", tmp_path / "one"])
    assert code == 1 and "5 of 6 volume(s) segmented" in out, err

    result = launch([*predict, "-o", tmp_path / "two"])
    assert result.returncode == 1, result.stderr[-3000:]  # the broken file failed (on one of the ranks)
    assert "5 of 6 volume(s) segmented" in result.stdout
    assert "rank 1 of 2: 3 volume(s) segmented, 0 failed" in result.stdout  # 6 cases dealt round robin
    expected = table(tmp_path / "one" / "summary.csv", tmp_path / "one")
    assert table(tmp_path / "two" / "summary.csv", tmp_path / "two") == expected
    assert [row["status"] == "ok" for row in expected] == [False, True, True, True, True, True]  # broken.nrrd sorts first
    assert not leftover_parts(tmp_path / "two" / "summary.csv")
    outputs = sorted(p.name for p in (tmp_path / "one").glob("*_seg.nii.gz"))
    assert outputs == sorted(p.name for p in (tmp_path / "two").glob("*_seg.nii.gz")) and len(outputs) == 5
    for name in outputs:
        np.testing.assert_array_equal(read_volume(tmp_path / "one" / name, labels=True).array,
                                      read_volume(tmp_path / "two" / name, labels=True).array)

    # 2 processes after 1: only the deleted output (and the failed case) are redone.
    (tmp_path / "one" / "lung2_seg.nii.gz").unlink()
    before = {name: (tmp_path / "one" / name).stat().st_mtime_ns for name in outputs if name != "lung2_seg.nii.gz"}
    result = launch([*predict, "-o", tmp_path / "one"])
    assert result.returncode == 1, result.stderr[-3000:]
    assert "rank 1 of 2: 1 volume(s) segmented, 0 failed" in result.stdout  # 2 pending cases, one each
    assert {name: (tmp_path / "one" / name).stat().st_mtime_ns for name in before} == before
    assert (tmp_path / "one" / "lung2_seg.nii.gz").is_file()
    assert table(tmp_path / "one" / "summary.csv", tmp_path / "one") == expected

    # 1 process after 2, after an interrupted 4-process run: its part table (rank 3 had finished lung1) is
    # folded in, so lung1 is not redone; the deleted generated0 output is.
    summary = tmp_path / "two" / "summary.csv"
    rows = read_table(summary)
    columns = list(rows[0])
    lung1 = [row for row in rows if row["input"].endswith("lung1.nrrd")]
    write_table([row for row in rows if row not in lung1], summary, columns)
    write_table(lung1, part_path(summary, 3), columns)
    (tmp_path / "two" / "generated0_seg.nii.gz").unlink()
    kept = (tmp_path / "two" / "lung1_seg.nii.gz").stat().st_mtime_ns
    (cases / "broken.nrrd").rename(tmp_path / "broken.nrrd")  # fixed by the user: now every case is done
    try:
        code, out, err = run_cli([*predict, "-o", tmp_path / "two"])
    finally:
        (tmp_path / "broken.nrrd").rename(cases / "broken.nrrd")
    assert code == 0 and "5 of 5 volume(s) segmented" in out, err
    assert (tmp_path / "two" / "lung1_seg.nii.gz").stat().st_mtime_ns == kept
    assert (tmp_path / "two" / "generated0_seg.nii.gz").is_file() and not leftover_parts(summary)
    # The broken file's old row stays, after the listed inputs (as one process always kept earlier rows).
    resumed = table(summary, tmp_path / "two")
    assert resumed == [row for row in expected if "broken" not in row["input"]] + [expected[0]]


@pytest.fixture(scope="module")
def classifier(tmp_path_factory, backbone):
    """A classification model trained by ``lctfound classify train`` for 2 steps (its answers only need
    to be deterministic here)."""
    from test_diagnosis import synthetic_scan

    from lctfound.cli import main

    root = tmp_path_factory.mktemp("classifier")
    rows = ["image,label"]
    for index in range(4):
        write_volume(synthetic_scan(bool(index % 2), seed=index), root / "train" / f"scan{index}.nrrd")
        rows.append(f"train/scan{index}.nrrd,{'opacity' if index % 2 else 'clear'}")
    (root / "cases.csv").write_text("\n".join(rows) + "\n")
    assert main(["classify", "train", "--backbone", str(backbone), "--table", str(root / "cases.csv"),
                 "--slices-per-scan", "2", "--timesteps", "0", "-o", str(root / "run"), "--max-steps", "2",
                 "--batch-size", "2", "--checkpoint-every", "2", "--seed", "1", "--device", "cpu"]) == 0
    return root / "run" / "model"


@pytest.mark.slow
def test_classify_predict_two_processes_match_one_and_resume(cases, classifier, cache, tmp_path, run_cli):
    predict = ["classify", "predict", cases, "--model", classifier, "--device", "cpu", "--threads", "1"]
    code, out, err = run_cli([*predict, "-o", tmp_path / "one.csv"])
    assert code == 1 and "5 scan(s) classified, 0 already" in out, err
    result = launch([*predict, "-o", tmp_path / "two.csv"])
    assert result.returncode == 1, result.stderr[-3000:]
    assert "5 scan(s) classified, 0 already" in result.stdout and "rank 1 of 2:" in result.stdout
    assert (tmp_path / "two.csv").read_bytes() == (tmp_path / "one.csv").read_bytes()
    assert not leftover_parts(tmp_path / "two.csv")
    # 1 process after 2, one row lost: only that scan (and the broken file) are tried again.
    rows = read_table(tmp_path / "two.csv")
    write_table(rows[:2] + rows[3:], tmp_path / "two.csv", list(rows[0]))
    code, out, err = run_cli([*predict, "-o", tmp_path / "two.csv"])
    assert code == 1 and "1 scan(s) classified, 4 already" in out, err
    assert (tmp_path / "two.csv").read_bytes() == (tmp_path / "one.csv").read_bytes()


@pytest.mark.slow
def test_features_over_a_folder_two_processes_match_one_and_resume(cases, backbone, cache, tmp_path, run_cli):
    from lctfound.features import load_volume_features

    extract = ["features", cases, "--model", backbone, "--timesteps", "0", "--blocks", "1,2", "--resolution", "8",
               "--device", "cpu", "--threads", "1"]
    code, out, err = run_cli([*extract, "-o", tmp_path / "one"])
    assert code == 1 and "5 of 6 volume(s) done" in out, err
    result = launch([*extract, "-o", tmp_path / "two"])
    assert result.returncode == 1, result.stderr[-3000:]
    expected = table(tmp_path / "one" / "summary.csv", tmp_path / "one")
    assert table(tmp_path / "two" / "summary.csv", tmp_path / "two") == expected
    assert [row["slices"] for row in expected] == ["", "3", "3", "3", "3", "3"]
    assert not leftover_parts(tmp_path / "two" / "summary.csv")
    for case in ("lung1", "lung2", "generated0", "generated1", "generated2"):
        one, meta_one = load_volume_features(tmp_path / "one" / case)
        two, meta_two = load_volume_features(tmp_path / "two" / case)
        np.testing.assert_array_equal(one, two)
        assert one.shape[0] == 3 and one.shape[2:] == (8, 8) and meta_two["volume"] == meta_one["volume"]

    # 1 process after 2: a deleted case folder and one whose array a killed run truncated are redone.
    import shutil

    shutil.rmtree(tmp_path / "two" / "lung2")
    truncated = tmp_path / "two" / "generated1" / "features.npy"
    truncated.write_bytes(truncated.read_bytes()[:200])
    kept = (tmp_path / "two" / "lung1" / "features.npy").stat().st_mtime_ns
    code, out, err = run_cli([*extract, "-o", tmp_path / "two"])
    assert code == 1 and "5 of 6 volume(s) done" in out, err
    assert out.count("storing 3 slices") == 2  # lung2 and generated1 only
    assert (tmp_path / "two" / "lung1" / "features.npy").stat().st_mtime_ns == kept
    np.testing.assert_array_equal(load_volume_features(tmp_path / "two" / "generated1")[0],
                                  load_volume_features(tmp_path / "one" / "generated1")[0])
    assert table(tmp_path / "two" / "summary.csv", tmp_path / "two") == expected
    # A case folder the summary does not list is never replaced.
    shutil.copytree(tmp_path / "two" / "lung1", tmp_path / "three" / "lung1")
    code, out, err = run_cli([*extract, "-o", tmp_path / "three"])
    assert code == 1 and "4 of 6 volume(s) done" in out
    assert "already exists and is not listed in summary.csv" in read_table(tmp_path / "three" / "summary.csv")[4]["status"]


# Without a launcher ---------------------------------------------------------------------------


def test_ranks_come_from_the_launcher_environment():
    assert launcher_ranks({}) == Ranks(0, 1, 0) and not launcher_ranks({}).distributed
    assert launcher_ranks({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}) == Ranks(3, 4, 1)
    for bad in ({"RANK": "4", "WORLD_SIZE": "4"}, {"WORLD_SIZE": "two"}):
        with pytest.raises(LCTfoundError, match="torchrun or accelerate launch"):
            launcher_ranks(bad)


RANK_THAT_DIES = """
import sys
from pathlib import Path
from lctfound.batch import BatchRun, read_table, write_table
from lctfound.errors import LCTfoundError

try:
    with BatchRun(Path(sys.argv[1]), ["a", "b", "c"], read_table,
                  lambda rows, path: write_table(rows, path, ["input", "status"])) as run:
        mine = run.plan(lambda i: False)
        if run.ranks.rank == 1:
            sys.exit(3)  # dies after joining, before its rows reach rank 0
        for i in mine:
            run.record(run.inputs[i], {"input": run.inputs[i], "status": "ok"})
        run.finish(failed=0)
except LCTfoundError as error:
    print(f"error: {error}", file=sys.stderr)
    sys.exit(2)
"""


def test_a_rank_that_dies_stops_the_others_with_one_line(tmp_path):
    # Started by hand (as on several nodes, without torchrun's agent to stop the survivors): the rank left
    # waiting learns from gloo that its peer is gone; the timeout (60 min) is never reached.
    port = free_port()
    processes = [subprocess.Popen([sys.executable, "-c", RANK_THAT_DIES, str(tmp_path / "summary.csv")], cwd=REPO,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                  env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "RANK": str(r),
                                       "LOCAL_RANK": str(r), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
                                       "MASTER_PORT": str(port)})
                 for r in (0, 1)]
    (out0, err0), (_, err1) = (p.communicate(timeout=1200) for p in processes)
    assert processes[1].returncode == 3, err1
    assert processes[0].returncode == 2, err0
    (line,) = err0.strip().splitlines()
    assert line.startswith("error: rank 0: waiting for the other processes to finish their cases: another process "
                           "of this batch stopped") and "run the same command again to resume" in line
    # What rank 0 did is on disk for the re-run, which folds it in.
    assert [row["input"] for row in read_table(part_path(tmp_path / "summary.csv", 0))] == ["a", "c"]


def test_one_process_folds_parts_of_an_interrupted_launch_and_keeps_input_order(tmp_path):
    summary = tmp_path / "summary.csv"
    columns = ["input", "status"]
    write = lambda rows, path: write_table(rows, path, columns)  # noqa: E731
    write([{"input": "c", "status": "ok"}, {"input": "old", "status": "ok"}, {"input": "a", "status": "error: x"}],
          summary)
    write([{"input": "a", "status": "ok"}], part_path(summary, 0))
    write([{"input": "b", "status": "ok"}], part_path(summary, 5))
    (tmp_path / "summary.rank-x.csv").write_text("not a part\n")
    assert [p.name for p in leftover_parts(summary)] == ["summary.rank-0.csv", "summary.rank-5.csv"]
    with BatchRun(summary, ["a", "b", "c", "d"], read_table, write, ranks=Ranks()) as run:
        assert {key: row["status"] for key, row in run.previous.items()} == {"a": "ok", "b": "ok", "c": "ok",
                                                                           "old": "ok"}
        assert not leftover_parts(summary)
        assert run.plan(lambda i: i != 3) == [3] and run.skipped == 3
        run.record("d", {"input": "d", "status": "ok"})
        assert run.finish(failed=0) == {"failed": 0} and run.exit_code(0) == 0
    assert [row["input"] for row in read_table(summary)] == ["a", "b", "c", "d", "old"]
    assert [row["input"] for row in run.merged] == ["a", "b", "c", "d", "old"]
