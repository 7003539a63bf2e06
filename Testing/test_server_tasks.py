"""`lctfound serve` runs distilled students, diagnosis and CT-FM embeddings (issue 14): one real
server process on 127.0.0.1 with tiny models, driven by the command line's ``--server``.

Each remote result is compared with the local command run with the same settings and seed: the
student's prediction voxel for voxel, the classification's results table byte for byte, the
embedding value for value. Waiting is bounded by counts of polls, not by how fast this machine is.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from data_factory import fewshot_phantom
from server_helpers import ROOT, Server, base_env

SPACING = (0.8, 0.8, 2.5)
CTFM_SETTINGS = ["--window", "32,32,32", "--batch-size", "2", "--no-validate"]


def run_local(args, cache: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lctfound", *map(str, args)], env=base_env(cache),
                          capture_output=True, text=True)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A 8x64x64 phantom CT with its lesion painted on 2 slices, a tiny backbone, a few-shot teacher,
    a classifier trained for a few steps by `classify train`, a small CT-FM encoder and its index of a
    cohort of two volumes (the CT and another)."""
    from lctfound.cli import main
    from lctfound.io.volume import CTVolume, write_volume
    from lctfound.models import load_model, save_model
    from lctfound.pipelines.segmentation import UNLABELLED, FewShotConfig, FewShotSegmenter
    from model_factory import save_small_ctfm_encoder, tiny_model, train_tiny_classifier

    folder = tmp_path_factory.mktemp("serve-tasks")
    volume, lesion, _ = fewshot_phantom()
    ct = CTVolume(np.round(volume).astype(np.int16), SPACING)
    painted = np.zeros(lesion.shape, dtype=np.uint8)
    painted[[2, 5]] = lesion[[2, 5]]
    write_volume(ct, folder / "ct.nrrd")
    write_volume(ct.with_array(painted), folder / "label.nrrd")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LCTFOUND_CACHE_DIR", str(folder / "fixture-cache"))
        save_model(tiny_model(64, seed=1), folder / "tiny", extra_metadata={"name": "tiny"})
        labels = np.full(lesion.shape, UNLABELLED, dtype=np.int16)
        labels[[2, 5]] = lesion[[2, 5]]
        teacher = FewShotSegmenter(load_model(folder / "tiny"), {1: "Lesion"},
                                   FewShotConfig(timesteps=(0, 100), epochs=5))
        teacher.fit(ct.array, labels)
        teacher.save(folder / "teacher", extra={"name": "teacher"})
        train_tiny_classifier(folder, folder / "tiny", "dense-test")
        save_small_ctfm_encoder(folder / "ctfm")
        second, _, _ = fewshot_phantom(seed=3)
        write_volume(ct, folder / "cohort" / "case0.nrrd")
        write_volume(CTVolume(second[::-1].copy(), SPACING), folder / "cohort" / "case1.nrrd")
        code = main(["ctfm", "index", str(folder / "cohort"), "--model", str(folder / "ctfm"), *CTFM_SETTINGS,
                     "-o", str(folder / "cohort_index")])
        assert code == 0
    return folder


@pytest.fixture(scope="module")
def server(files):
    models = [f"{name}={files / folder}" for name, folder in
              (("tiny", "tiny"), ("teacher", "teacher"), ("classifier", "run/model"), ("ctfm", "ctfm"),
               ("cohort", "cohort_index"))]
    running = Server(files / "data", files / "server-cache", ["--models", *models])
    yield running
    running.stop()


def test_distilled_student_stays_on_the_server_and_predicts_as_the_local_one(server, files, token_env, run_cli):
    from lctfound.cli.segment import STUDENT_MISSED_DICE
    from lctfound.io.volume import read_volume
    from lctfound.remote import RemoteError

    cache = files / "local-cache"
    distill = ["--epochs", "2", "--resolution", "32", "--time-budget", "0"]
    local = run_local(["segment", "distill", files / "ct.nrrd", "--labels", files / "label.nrrd", "--teacher",
                       files / "teacher", *distill, "-o", files / "local_student"], cache)
    assert local.returncode == 0, local.stderr
    local = run_local(["segment", "predict", files / "ct.nrrd", "--model", files / "local_student",
                       "-o", files / "local_student.nrrd"], cache)
    assert local.returncode == 0, local.stderr

    code, out, err = run_cli(["segment", "distill", files / "ct.nrrd", "--labels", files / "label.nrrd",
                              "--teacher", "teacher", *distill, "-o", "student", "--server", server.url])
    assert code == 0, err
    assert "distilled on 8 slices of 1 volume(s) (2 annotated)" in out and "student 'student' (1=Lesion)" in out
    assert str(server.data) not in out + err  # the server's folders stay on the server
    agreement = float(out.split("Dice with the teacher: Lesion ")[1].split(";")[0])
    # The warning a local run prints reaches this client on stderr, exactly when it applies.
    assert ("warning: the student has not learnt Lesion" in err) == (agreement < STUDENT_MISSED_DICE), (out, err)
    assert server.client("cli").models()["yours"] == ["student"]
    assert server.client("someone-else").models()["yours"] == []  # listed for the client that made it

    code, out, err = run_cli(["segment", "predict", files / "ct.nrrd", "--model", "student",
                              "-o", files / "remote_student.nrrd", "--server", server.url])
    assert code == 0, err
    remote, here = (read_volume(files / name, labels=True) for name in ("remote_student.nrrd", "local_student.nrrd"))
    assert np.array_equal(remote.array, here.array) and remote.spacing == here.spacing
    assert f"Lesion {int((remote.array == 1).sum())} voxels" in out
    # Another client cannot predict with it; no one distils into a name this server offers to everyone.
    other = server.client("someone-else")
    upload = other.upload_volume(remote.array.astype(np.int16), remote.spacing, remote.origin, remote.direction)
    with pytest.raises(RemoteError, match=r"\(404\): no model 'student'"):
        other.submit("segment-predict", {"volume": upload}, {"model": "student"})
    code, _, err = run_cli(["segment", "distill", files / "ct.nrrd", "--teacher", "teacher", *distill,
                            "-o", "tiny", "--server", server.url])
    assert code == 2 and "(409)" in err and err.count("\n") == 1


def test_classification_on_the_server_writes_the_local_table(server, files, token_env, run_cli):
    local = run_local(["classify", "predict", files / "ct.nrrd", "--model", files / "run" / "model",
                       "-o", files / "local.csv"], files / "local-cache")
    assert local.returncode == 0, local.stderr
    # Into a table of the same model that already holds this scan (altered): its row is replaced. The
    # command line's --server path runs where torch and the other heavy packages are missing.
    table = (files / "local.csv").read_text()
    (files / "remote.csv").write_text(table.replace(",ok,", ",error: stale,"))
    assert (files / "remote.csv").read_text() != table
    script = ("import sys\nsys.path.insert(0, %r)\nfrom import_blocker import hidden_packages\n"
              "with hidden_packages('torch', 'diffusers', 'monai', 'transformers', 'scikit-image'):\n"
              "    from lctfound.cli import main\n    code = main(sys.argv[1:])\nsys.exit(code)" % str(ROOT / "Testing"))
    light = subprocess.run([sys.executable, "-c", script, "classify", "predict", str(files / "ct.nrrd"), "--model",
                            "classifier", "-o", str(files / "remote.csv"), "--server", server.url],
                           env=dict(base_env(files / "cli-cache"), LCTFOUND_SERVER_TOKEN=server.token,
                                    LCTFOUND_CLIENT_ID="cli"), capture_output=True, text=True)
    assert light.returncode == 0, light.stderr
    assert (files / "remote.csv").read_text() == table
    assert "p(clear)" in light.stdout and f"classified on {server.url}" in light.stdout
    assert str(server.data) not in light.stdout
    # A scan the server cannot classify (slices it does not have): one line that says why, nothing written.
    code, _, err = run_cli(["classify", "predict", files / "ct.nrrd", "--model", "classifier", "--slices", "50-60",
                            "-o", files / "failed.csv", "--server", server.url])
    assert code == 2 and err.count("\n") == 1 and "not classified" in err and "50" in err, err
    assert not (files / "failed.csv").exists()
    # A table of other classes is refused before anything is uploaded; --saliency is refused with --server.
    (files / "other.csv").write_text("not,a,results,table\n")
    code, _, err = run_cli(["classify", "predict", files / "ct.nrrd", "--model", "classifier",
                            "-o", files / "other.csv", "--server", server.url])
    assert code == 2 and "not a results table" in err and err.count("\n") == 1
    code, _, err = run_cli(["classify", "predict", files / "ct.nrrd", "--model", "classifier", "--saliency",
                            files / "saliency.nrrd", "-o", files / "saliency.csv", "--server", server.url])
    assert code == 2 and err == "error: --saliency is not available with --server yet; run without --server\n"
    assert not (files / "saliency.csv").exists()


def test_ctfm_embedding_and_search_on_the_server_equal_the_local_ones(server, files, token_env, run_cli):
    from safetensors import safe_open
    from safetensors.numpy import load_file

    settings = CTFM_SETTINGS
    local = run_local(["ctfm", "embed", files / "ct.nrrd", "--model", files / "ctfm", *settings,
                       "-o", files / "local.safetensors"], files / "local-cache")
    assert local.returncode == 0, local.stderr
    for suffix in ("json", "safetensors"):
        code, out, err = run_cli(["ctfm", "embed", files / "ct.nrrd", "--model", "ctfm", *settings,
                                  "-o", files / f"remote.{suffix}", "--server", server.url])
        assert code == 0, err
        assert f"on {server.url}" in out
    here, there = load_file(files / "local.safetensors"), load_file(files / "remote.safetensors")
    assert sorted(there) == sorted(here) == ["embedding", "window_centres_ras", "window_embeddings"]
    assert all(np.array_equal(there[key], here[key]) and there[key].dtype == here[key].dtype for key in here)
    with safe_open(str(files / "local.safetensors"), framework="numpy") as handle:
        record = json.loads(handle.metadata()["lctfound"])
    written = json.loads((files / "remote.json").read_text())  # the .json a local run writes, from the server
    assert written["embedding"] == [float(v) for v in here["embedding"]] and written["embedding_dim"] == 64
    assert written["model"] == "ctfm" and written["server"] == server.url and written["volume"] == record["volume"]
    same = ("weights_sha256", "aggregation", "windows", "preprocessing", "prepared_shape", "window_count")
    assert {key: written[key] for key in same} == {key: record[key] for key in same}

    # Search an index the server offers (named on its command line) with a query volume sent up.
    query = ["--query", files / "ct.nrrd", "--top", "2", "--no-validate", "--json"]
    local = run_local(["ctfm", "search", files / "cohort_index", "--model", files / "ctfm", *query],
                      files / "local-cache")
    assert local.returncode == 0, local.stderr
    code, out, err = run_cli(["ctfm", "search", "cohort", "--model", "ctfm", *query, "--server", server.url])
    assert code == 0, err
    here, there = json.loads(local.stdout), json.loads(out)
    for match in here["matches"]:
        assert str(files) in match.pop("path")  # the indexed volumes' paths stay on the server
    assert there == here and [match["name"] for match in there["matches"]] == ["case0", "case1"]
    code, _, err = run_cli(["ctfm", "search", "cohort", "--model", "ctfm", *query, "--heatmap", files / "h.nrrd",
                            "--server", server.url])
    assert code == 2 and err == "error: --heatmap is not available with --server yet; run without --server\n"


def test_bad_options_and_outputs_are_refused_before_anything_runs(server, files, run_cli, monkeypatch):
    from lctfound.io.volume import read_volume
    from lctfound.remote import RemoteError

    monkeypatch.setenv("LCTFOUND_SERVER_TOKEN", server.token)
    monkeypatch.setenv("LCTFOUND_CLIENT_ID", "careless")
    client = server.client("careless")
    # A value the server's task table refuses: one line (422), no job, nothing written here.
    code, _, err = run_cli(["ctfm", "embed", files / "ct.nrrd", "--model", "ctfm", "--window", "32,32",
                            "-o", files / "bad.json", "--server", server.url])
    assert code == 2 and err.count("\n") == 1 and "(422)" in err and "option 'window' of ctfm-embed" in err
    assert not (files / "bad.json").exists()
    ct = read_volume(files / "ct.nrrd")
    upload = client.upload_volume(ct.array, ct.spacing, ct.origin, ct.direction)
    for task, inputs, options, expected in (
            ("classify-predict", {"volume": upload}, {"model": "classifier", "batch_size": 0}, "batch_size"),
            ("segment-distill", {"volume": upload}, {"model": "s", "teacher": "teacher", "resolution": 40},
             "multiple of 16"),
            ("segment-distill", {"volume": upload, "labels2": upload}, {"model": "s", "teacher": "teacher"},
             "'labels2'"),
            ("segment-distill", {"volume": upload}, {"model": "s", "teacher": "../teacher"}, "not a valid name")):
        with pytest.raises(RemoteError, match=r"\(422\)") as refusal:
            client.submit(task, inputs, options)
        assert expected in str(refusal.value) and "\n" not in str(refusal.value)
    assert client._request("GET", "/jobs")["jobs"] == []
    # An output that is an input, or exists without --overwrite: refused before any upload.
    uploads = server.data / "clients" / "careless" / "uploads"
    before = sorted(uploads.iterdir())
    code, _, err = run_cli(["ctfm", "embed", files / "ct.nrrd", "--model", "ctfm", "-o", files / "ct.nrrd",
                            "--server", server.url])
    assert code == 2 and "is the input" in err and err.count("\n") == 1
    (files / "exists.json").write_text("{}")
    code, _, err = run_cli(["ctfm", "embed", files / "ct.nrrd", "--model", "ctfm", "-o", files / "exists.json",
                            "--server", server.url])
    assert code == 2 and "--overwrite" in err and (files / "exists.json").read_text() == "{}"
    code, _, err = run_cli(["classify", "predict", files / "ct.nrrd", "--model", "classifier",
                            "-o", files / "ct.nrrd", "--server", server.url])
    assert code == 2 and err.count("\n") == 1 and not (files / "ct.nrrd.csv").exists()
    code, _, err = run_cli(["segment", "distill", files / "ct.nrrd", "--teacher", files / "teacher",
                            "-o", "s", "--server", server.url])
    assert code == 2 and "--teacher" in err and "names a model on the server" in err
    assert sorted(uploads.iterdir()) == before


def test_a_distillation_of_several_volumes_builds_the_local_command(tmp_path):
    """Label maps go with their volumes, '-' for a volume without one (as `segment distill --labels`)."""
    from lctfound.server.tasks import JobPaths, check_request

    ids = {name: f"{number:032x}" for number, name in enumerate(("volume", "volume2", "volume3", "labels2"))}
    task, inputs, options = check_request("segment-distill", ids, {"model": "s", "teacher": "t", "epochs": 3})
    paths = JobPaths(options=options, inputs={name: tmp_path / f"{name}.nrrd" for name in inputs},
                     output=tmp_path / "out", model_folder=lambda name: f"/models/{name}",
                     new_model_folder=lambda name: tmp_path / "mine" / name)
    assert task.build(paths) == [
        str(tmp_path / "volume.nrrd"), str(tmp_path / "volume2.nrrd"), str(tmp_path / "volume3.nrrd"),
        "--teacher=/models/t", f"--output={tmp_path / 'mine' / 's'}",
        "--labels=-", f"--labels={tmp_path / 'labels2.nrrd'}", "--labels=-", "--epochs=3"]
    from lctfound.cli import build_parser

    parsed = build_parser().parse_args(["segment", "distill", *task.build(paths)])
    assert parsed.labels == ["-", str(tmp_path / "labels2.nrrd"), "-"] and len(parsed.volumes) == 3
