"""The CT-FM panel's logic with "Run on" a department server (issue 14), against a real `lctfound serve`
on 127.0.0.1 offering a small CT-FM encoder (``ct-fm``), an index of a cohort of two volumes built with it
(``cohort``) and a tiny LCTfound backbone (``tiny``).

Test connection lists the server's CT-FM encoders and indexes in their own selectors (GET /models tells
them apart from backbones); Search through the panel runs on the server and gives the same ranking, in
the same results table, as the local search job on the same index; the heat map is off on a server and
says so in one sentence, the ranked scans stay there (Load match says so), and Build index says that
indexing runs on this computer.
"""

from __future__ import annotations

import time

import numpy as np
import pytest

from data_factory import fewshot_phantom

slicer = pytest.importorskip("slicer", reason="needs the slicer-core wheel (pip install 'lctfound[mrml]')")
pytest.importorskip("httpx")

from lctfound import mrml  # noqa: E402
from lctfound.ctfm.tasks import inventory  # noqa: E402
from lctfound.errors import LCTfoundError  # noqa: E402
from lctfound.io.volume import CTVolume, write_volume  # noqa: E402
from lctfound.logic.base import ButtonState, RunState  # noqa: E402
from lctfound.logic.ctfm import (  # noqa: E402
    ACTIONS, HEATMAP_NOT_ON_SERVER, INDEX_NOT_ON_SERVER, MATCH_ON_SERVER, CTFMLogic, CTFMParameters,
)

SPACING = (0.8, 0.8, 2.5)
#: Small windows, so that the 8x64x64 phantoms give a few of them (as Testing/test_server_tasks.py).
INDEX_SETTINGS = ["--window", "32,32,32", "--batch-size", "2", "--no-validate"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A query CT, a small CT-FM encoder, its index of a cohort of two volumes (the CT and another), a
    tiny LCTfound backbone, and a server offering the three by name."""
    from model_factory import save_small_ctfm_encoder, tiny_model
    from server_helpers import Server

    from lctfound.cli import main
    from lctfound.models import save_model

    folder = tmp_path_factory.mktemp("ctfm-server")
    volume, _, _ = fewshot_phantom()
    ct = CTVolume(np.round(volume).astype(np.int16), SPACING)
    second, _, _ = fewshot_phantom(seed=3)
    write_volume(ct, folder / "ct.nrrd")
    write_volume(ct, folder / "cohort" / "case0.nrrd")
    write_volume(CTVolume(second[::-1].copy(), SPACING), folder / "cohort" / "case1.nrrd")
    save_small_ctfm_encoder(folder / "encoder")
    save_model(tiny_model(32, seed=1), folder / "tiny")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LCTFOUND_CACHE_DIR", str(folder / "fixture-cache"))
        assert main(["ctfm", "index", str(folder / "cohort"), "--model", str(folder / "encoder"), *INDEX_SETTINGS,
                     "-o", str(folder / "index")]) == 0
    models = [f"ct-fm={folder / 'encoder'}", f"cohort={folder / 'index'}", f"tiny={folder / 'tiny'}"]
    server = Server(folder / "data", folder / "server-cache", ["--models", *models])
    (folder / "token").write_text(server.token + "\n")
    server.token_file = folder / "token"
    yield folder, server
    server.stop()


@pytest.fixture
def logic(world, tmp_path, monkeypatch):
    folder, _ = world
    monkeypatch.delenv("LCTFOUND_SERVER_TOKEN", raising=False)  # the token travels in its file
    monkeypatch.setenv("LCTFOUND_CLIENT_ID", "ctfm-desk")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return CTFMLogic(ctfm_folders=[folder / "encoder"], inventory=inventory, available_devices=lambda: ["cpu"],
                     runs_root=tmp_path / "runs")


def on_server(server, **values) -> CTFMParameters:
    return CTFMParameters(server_url=server.url, server_token_file=str(server.token_file), **values)


def wait(logic, polls: int = 3000) -> None:
    """Poll the job until it has ended (a count of polls: a hang guard, not a speed limit)."""
    for _ in range(polls):
        logic.poll()
        if not logic.state.busy:
            return
        time.sleep(0.2)
    raise AssertionError(f"the job did not end: {logic.status_summary()}")


def node_ras(node, ijk) -> list[float]:
    """RAS of a (fractional) voxel position through the node's IJK→RAS matrix."""
    from lctfound.mrml._compat import vtk

    matrix = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(matrix)
    return list(matrix.MultiplyPoint([float(v) for v in ijk] + [1.0])[:3])


def table_rows(table_node) -> list[dict]:
    table = table_node.GetTable()
    names = [table.GetColumnName(i) for i in range(table.GetNumberOfColumns())]
    return [{name: table.GetValueByName(row, name).ToString() for name in names}
            for row in range(table.GetNumberOfRows())]


def test_test_connection_lists_the_servers_encoders_and_indexes(world, logic):
    _, server = world
    p = on_server(server)
    # Before the test: Search waits for it; Build index and the other actions say why they never run there.
    assert logic.action_state("search", p).tooltip == f"Press Test connection to use the server at {server.url}."
    assert logic.action_problems("index", p)[0] == INDEX_NOT_ON_SERVER
    for action in set(ACTIONS) - {"index", "search"}:
        assert logic.action_problems(action, p)[0].startswith("CT-FM classification, segmentation and training run "
                                                              "on this computer only")

    line = logic.test_connection(p)
    assert line.startswith(f"connected to {server.url}") and "ctfm-search" in line
    # GET /models tells a CT-FM encoder and a CT-FM index from an LCTfound backbone ...
    assert logic.server.kinds == {"ct-fm": "ctfm", "cohort": "ctfm-index", "tiny": "backbone"}
    backbones = logic.server.backbones()  # ... so that LCTfound's panels do not offer CT-FM's models
    assert "tiny" in backbones and not {"ct-fm", "cohort"} & set(backbones)
    # ... and each selector lists the server's models of its kind, as the server names them.
    assert [(c.value, c.label) for c in logic.choices("modelName", parameters=p)] == [("ct-fm", "ct-fm (on the server)")]
    assert [c.value for c in logic.choices("serverIndex", parameters=p)] == ["cohort"]
    assert logic.choices("serverIndex", parameters=CTFMParameters()) == []  # here, indexes are folders
    assert logic.fill_defaults(p) == {"model_name": "ct-fm", "server_index": "cohort"}
    shown = logic.visible_fields(p)
    assert "server_index" in shown and not {"index_folder", "encoder_folder", "device"} & shown
    assert "server_index" not in logic.visible_fields(CTFMParameters()) and "index_folder" in logic.visible_fields(
        CTFMParameters())
    assert logic.heatmap_state(p) == ButtonState(False, HEATMAP_NOT_ON_SERVER)
    assert logic.heatmap_state(CTFMParameters()).enabled
    assert logic.selection_summary(p) == f"CT-FM encoder ct-fm on the server {server.url}."
    assert logic.action_problems("search", p) == ["Select an input volume."]
    assert logic.action_problems("index", p)[0] == INDEX_NOT_ON_SERVER  # the server has no per-client indexes

    p.model_name, p.server_index = "tiny", "nowhere"  # not a CT-FM encoder; not an index the server offers
    p.input_volume = mrml.volume_node_from_ctvolume(mrml.new_headless_scene(), CTVolume(np.zeros((4, 8, 8)), SPACING))
    assert logic.action_problems("search", p) == ["Select a CT-FM encoder the server offers (Test connection lists "
                                                  "them).", "Select a CT-FM index the server offers (Test connection "
                                                  "lists them)."]


def test_search_on_the_server_ranks_as_the_local_search_job(world, logic):
    folder, server = world
    scene = mrml.new_headless_scene()
    node = mrml.load_volume(scene, folder / "ct.nrrd", "query")

    local = CTFMParameters(input_volume=node, model_name="encoder", device="cpu", index_folder=str(folder / "index"),
                           top_k=2, show_heatmap=False)
    assert logic.action_problems("search", local) == []
    logic.start_search(local)
    wait(logic)
    assert logic.state is RunState.FINISHED, logic.status_summary() + " " + logic.job.stderr_tail
    here = table_rows(logic.results_table)
    assert [row["case"] for row in here] == ["case0", "case1"] and all(row["path"] for row in here)

    remote = on_server(server, input_volume=node, top_k=2)  # the heat map option left on: not sent
    logic.test_connection(remote)
    logic.fill_defaults(remote)
    assert logic.action_problems("search", remote) == []
    job = logic.start_search(remote)
    assert job.command[3:6] == ["ctfm", "search", "cohort"] and job.command[job.command.index("--model") + 1] == "ct-fm"
    assert job.command[job.command.index("--server") + 1] == server.url and "--heatmap" not in job.command
    assert "--device" not in job.command and server.token not in " ".join(job.command)
    wait(logic)
    assert logic.state is RunState.FINISHED, logic.status_summary() + " " + logic.job.stderr_tail
    there = table_rows(logic.results_table)
    # The same ranking in the same table; the indexed scans' paths stay on the server.
    assert there == [{**row, "path": ""} for row in here]
    assert logic.heatmap_node is None and logic.status().message.endswith(HEATMAP_NOT_ON_SERVER)
    assert logic.status().message.startswith(f"2 result(s) from {server.url}, best 'case0'")
    assert logic.apply_finished_job(remote) == {"results_table": logic.results_table}
    assert logic.load_match_state(logic.results_table) == ButtonState(False, MATCH_ON_SERVER)
    with pytest.raises(LCTfoundError, match="stay on the server"):
        logic.load_match(logic.results_table, 0)

    # By a point placed in the viewer (RAS with all its digits, negative ones too): the same matches and
    # best windows as the same search in this process.
    point = node_ras(node, (30.3, 25.7, 3.3))
    fiducial = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode")
    fiducial.AddControlPointWorld(point)
    remote.query_kind, remote.query_point = "point", fiducial
    job = logic.start_search(remote)
    assert job.command[job.command.index("--top") + 2] == "--point=" + ",".join(repr(v) for v in point)
    wait(logic)
    assert logic.state is RunState.FINISHED, logic.status_summary() + " " + logic.job.stderr_tail
    expected = logic.search(folder / "index", node, "encoder", point_ras=point, top_k=2).rows
    there = table_rows(logic.results_table)
    assert [row["case"] for row in there] == [row["case"] for row in expected]
    for row, match in zip(there, expected):
        assert float(row["score"]) == pytest.approx(match["score"], abs=1e-6)
        assert [float(row[f"centre_{axis}"]) for axis in "RAS"] == pytest.approx(match["centre_ras"], abs=1e-6)
