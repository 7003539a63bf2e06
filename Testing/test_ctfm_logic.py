"""The CT-FM module logic, headless on slicer-core: backbones and capabilities, retrieval by scan,
point (markups) and region (ROI), the similarity heat map as a new node that peaks on the queried
voxel of an oblique, anisotropic (and transformed) volume, the exact node → CT-FM space → node
round trip, the probe and decoder on loaded volumes, and the panel's jobs: classify and segment run
as child processes whose results become new nodes, and the panel's own process never imports PyTorch."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
from model_factory import save_small_ctfm_encoder

slicer = pytest.importorskip("slicer", reason="needs the slicer-core wheel (pip install 'lctfound[mrml]')")

import data_factory  # noqa: E402

from lctfound import mrml  # noqa: E402
from lctfound.ctfm.decoder import DecoderSegmenter, train_decoder  # noqa: E402
from lctfound.ctfm.features import WindowSettings  # noqa: E402
from lctfound.ctfm.model import load_model  # noqa: E402
from lctfound.ctfm.preprocess import prepare_volume  # noqa: E402
from lctfound.ctfm.retrieval import build_index  # noqa: E402
from lctfound.ctfm.tasks import inventory  # noqa: E402
from lctfound.errors import LCTfoundError  # noqa: E402
from lctfound.io.volume import CTVolume, write_volume  # noqa: E402
from lctfound.logic.base import RunState  # noqa: E402
from lctfound.logic.ctfm import ACTIONS, HEATMAP_ATTRIBUTE, CTFMLogic, CTFMParameters, Query, SearchResult  # noqa: E402
from lctfound.training.loop import LoopConfig  # noqa: E402

WINDOWS = WindowSettings((32, 32, 32), 0.5, 4)




pytestmark = pytest.mark.usefixtures("one_torch_thread")

@pytest.fixture(scope="module")
def encoder_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ctfm") / "encoder"
    return save_small_ctfm_encoder(folder)


@pytest.fixture
def logic(encoder_folder, tmp_path):
    # The inventory in this process; the panel's default (a child process) is checked in
    # test_the_panel_process_never_imports_torch and test_index_job_and_decoder_training_from_the_panel.
    return CTFMLogic(ctfm_folders=[encoder_folder, tmp_path], inventory=inventory, available_devices=lambda: ["cpu"],
                     runs_root=tmp_path / "runs")


def oblique_volume(seed: int = 0, feature_ijk=None) -> CTVolume:
    """128³ voxels of 0.5 × 0.5 × 1.5 mm, obliquely rotated: CT-FM's 1 × 1 × 3 mm grid then has a
    node on every second source voxel, so window centres fall exactly on source voxel centres.
    ``feature_ijk`` puts a unique bright sphere there."""
    rng = np.random.default_rng(seed)
    array = (40.0 + 15.0 * rng.standard_normal((128, 128, 128))).astype(np.float32)
    volume = CTVolume(array, (0.5, 0.5, 1.5), (12.3, -40.7, 88.1), data_factory.rotation_matrix())
    if feature_ijk is not None:
        k, j, i = np.meshgrid(*[np.arange(128)] * 3, indexing="ij")
        mm = np.stack([i - feature_ijk[0], j - feature_ijk[1], k - feature_ijk[2]], -1) * np.array([0.5, 0.5, 1.5])
        volume.array[(mm ** 2).sum(-1) <= 4.0 ** 2] = 1200.0
    return volume


def node_ras(node, ijk) -> list[float]:
    """RAS of a voxel through the node's own IJK→RAS matrix and parent transform (Slicer's path)."""
    from lctfound.mrml._compat import vtk

    matrix = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(matrix)
    ras = list(matrix.MultiplyPoint([float(v) for v in ijk] + [1.0])[:3])
    transform = node.GetParentTransformNode()
    if transform is not None:
        to_world = vtk.vtkMatrix4x4()
        transform.GetMatrixTransformToWorld(to_world)
        ras = list(to_world.MultiplyPoint(ras + [1.0])[:3])
    return ras


# --------------------------------------------------------------------------- backbones

def test_backbones_capabilities_and_models(logic, encoder_folder):
    names = [choice.value for choice in logic.backbone_choices()]
    assert names == ["lctfound", "ctfm"]
    states = logic.task_states("ctfm")
    for task in ("embedding", "retrieval", "classification-probe", "segmentation-decoder"):
        assert states[task].enabled
    for task in ("generation", "enhancement", "virtual-cta", "sparse-view-reconstruction"):
        assert not states[task].enabled and "no image decoder" in states[task].tooltip
        assert task not in logic.offered_tasks("ctfm") and task in logic.offered_tasks("lctfound")
    assert all(state.enabled for state in logic.task_states("lctfound").values() if state.tooltip.startswith(
        ("image enhancement", "sampling")))
    models = logic.models()
    assert [m.name for m in models] == ["encoder"] and models[0].preset == "ctfm"  # tmp_path is not a model
    assert logic.check_model("encoder") == "" and "not installed" in logic.check_model("other")
    assert logic.load_backbone("encoder") is logic.load_backbone(encoder_folder)  # loaded once
    with pytest.raises(LCTfoundError, match="not found"):
        logic.model_path("nowhere")


def test_run_on_a_server_says_what_each_action_needs(logic):
    """Search is the server task ctfm-search (sent by the panel once Test connection has reached the
    server: Testing/test_ctfm_server.py); building an index runs on this computer (a server searches only
    the indexes its administrator offers); classification, segmentation and training are no server
    tasks. Each button says which, in one sentence, before any connection is tried; on this computer
    nothing changes."""
    from lctfound.logic.ctfm import INDEX_NOT_ON_SERVER, SERVER_TASKS

    local = CTFMParameters(model_name="encoder")
    assert logic.server_problem(local) == "" and logic.first_problem(local) == ""
    p = CTFMParameters(model_name="encoder", server_url="http://gpu-host:8765")
    assert SERVER_TASKS == {"search": "ctfm-search"} and logic.server_jobs == {"ctfm-search"}
    assert logic.server_tasks(p, "search") == ("ctfm-search",) and logic.server_tasks(p, "index") == ()
    test_first = "Press Test connection to use the server at http://gpu-host:8765."
    for action in ACTIONS:
        state = logic.action_state(action, p)
        reason = logic.server_problem(p, action)
        assert not state.enabled and state.tooltip == reason and "\n" not in reason
        if action == "search":
            assert reason == test_first
        elif action == "index":
            assert reason == INDEX_NOT_ON_SERVER
        else:
            assert reason.startswith("CT-FM classification, segmentation and training run on this computer only")
    assert logic.first_problem(p) == test_first


# --------------------------------------------------------------------------- geometry

@pytest.mark.parametrize("transformed", [False, True])
def test_point_query_heat_map_peaks_on_the_queried_voxel(logic, transformed):
    """A fiducial at a known voxel's RAS centre of an oblique, anisotropic volume node (optionally
    under a linear transform): the heat map (a new node on the volume's grid) peaks on that voxel."""
    scene = mrml.new_headless_scene()
    node = mrml.volume_node_from_ctvolume(scene, oblique_volume(), "oblique")
    if transformed:
        transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
        matrix = mrml.volumes.vtk_matrix_from_array(np.array([[0.0, -1, 0, 20], [1, 0, 0, -5], [0, 0, 1, 7],
                                                              [0, 0, 0, 1]]))
        transform.SetMatrixTransformToParent(matrix)
        node.SetAndObserveTransformNodeID(transform.GetID())
    # The known voxel: the one at the centre of the window starting at (16, 16, 16) of CT-FM's grid
    # (neighbour windows on every side), where the window scores are exact.
    prepared = prepare_volume(mrml.ctvolume_from_volume_node(node))
    voxel = prepared.index_to_source_ijk(np.array([31.5, 31.5, 31.5]))
    assert np.allclose(voxel, np.round(voxel), atol=1e-9)
    voxel = np.round(voxel).astype(int)  # (i, j, k)
    mrml.update_volume_node_from_array(node, oblique_volume(feature_ijk=voxel).array)  # the unique feature
    fiducial = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode")
    fiducial.AddControlPointWorld(node_ras(node, voxel))
    point = logic.point_from_markup(fiducial)
    query = logic.query(node, "encoder", point_ras=point, settings=WINDOWS)
    assert query.kind == "point" and np.allclose(query.centre_ras, point, atol=1e-6)
    before = mrml.ctvolume_from_volume_node(node).array.copy()
    heat = logic.create_heatmap_node(node, query, "encoder", WINDOWS)
    assert heat.GetID() != node.GetID() and scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode") == 2
    assert np.array_equal(mrml.ctvolume_from_volume_node(node).array, before)  # the input is never overwritten
    assert np.allclose(mrml.volumes.ijk_to_ras_of(heat), mrml.volumes.ijk_to_ras_of(node))
    assert heat.GetTransformNodeID() == node.GetTransformNodeID()
    values = mrml.ctvolume_from_volume_node(heat, apply_transforms=False).array
    peak = np.unravel_index(int(np.argmax(values)), values.shape)
    assert peak == (voxel[2], voxel[1], voxel[0])
    assert values.max() == pytest.approx(1.0, abs=1e-5)
    assert np.sort(values, axis=None)[-2] < values.max()  # one voxel, not a plateau
    assert np.allclose(logic.peak_ras(heat), point, atol=1e-6)
    assert heat.GetDisplayNode().GetWindowLevelMin() == 0.0 and heat.GetDisplayNode().GetWindowLevelMax() == 1.0


def test_node_to_ctfm_space_and_back_is_exact():
    scene = mrml.new_headless_scene()
    node = mrml.volume_node_from_ctvolume(scene, oblique_volume(), "oblique")
    prepared = prepare_volume(mrml.ctvolume_from_volume_node(node))
    index = np.array([16.0, 20.0, 24.0])
    voxel = prepared.index_to_source_ijk(index)
    assert np.allclose(voxel, np.round(voxel), atol=1e-9)
    voxel = np.round(voxel).astype(int)
    assert np.allclose(node_ras(node, voxel), prepared.index_to_ras(index), atol=1e-9)
    assert np.allclose(prepared.source_ijk_to_index(voxel), index, atol=1e-9)
    # a one-voxel impulse in CT-FM space comes back on exactly that voxel of the node's grid …
    impulse = np.zeros(prepared.shape, np.float32)
    impulse[tuple(index.astype(int))] = 1.0
    back = prepared.to_source_grid(impulse, order=1)
    assert np.unravel_index(int(np.argmax(back)), back.shape) == (voxel[2], voxel[1], voxel[0])
    assert back.max() == pytest.approx(1.0, abs=1e-9)
    # … and a one-voxel label on the node's grid lands on that CT-FM voxel
    labels = np.zeros(node_shape := mrml.volume_shape(node), np.uint8)
    labels[voxel[2], voxel[1], voxel[0]] = 1
    assert node_shape == (128, 128, 128)
    assert np.argwhere(prepared.from_source_grid(labels)).tolist() == [index.astype(int).tolist()]


# --------------------------------------------------------------------------- retrieval

def test_search_by_scan_point_and_region(logic, encoder_folder, tmp_path):
    folder = tmp_path / "cohort"
    folder.mkdir()
    volumes = [oblique_volume(seed, feature_ijk=(40 + 8 * seed, 50, 30 + 10 * seed)) for seed in range(3)]
    for number, volume in enumerate(volumes):
        write_volume(volume, folder / f"case{number}.nrrd")  # NRRD keeps the geometry in double precision
    index = build_index(load_model(encoder_folder), sorted(folder.iterdir()), tmp_path / "index", WINDOWS,
                        validate=False)
    scene = mrml.new_headless_scene()
    node = mrml.load_volume(scene, folder / "case1.nrrd", "query")  # a scan of the cohort, loaded in Slicer
    result = logic.search(index, node, "encoder", top_k=2)
    assert [row["rank"] for row in result.rows] == [1, 2]
    assert result.rows[0]["case"] == "case1" and result.rows[0]["score"] == pytest.approx(1.0, abs=1e-4)
    assert set(result.rows[0]) == {"rank", "case", "score", "path"} and result.query.level == "volume"

    fiducial = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode")
    # at the centre of one of the indexed windows of this scan: that window must come first, score 1
    point = list(prepare_volume(mrml.ctvolume_from_volume_node(node)).index_to_ras(np.array([31.5, 31.5, 31.5])))
    fiducial.AddControlPointWorld(point)
    result = logic.search(index, node, "encoder", point_ras=logic.point_from_markup(fiducial), top_k=3)
    assert result.rows[0]["case"] == "case1" and result.rows[0]["score"] == pytest.approx(1.0, abs=1e-4)
    assert np.allclose(result.rows[0]["centre_ras"], point, atol=1e-2)  # where the viewer jumps

    roi = scene.AddNewNodeByClass("vtkMRMLMarkupsROINode")
    roi.SetCenter(*point)
    roi.SetSize(12.0, 12.0, 12.0)
    corners = logic.region_from_roi(roi)
    assert np.allclose(np.mean(corners, axis=0), point)
    result = logic.search(index, node, "encoder", region=corners, top_k=3)
    assert result.query.kind == "region" and len(result.rows) == 3
    assert np.linalg.norm(np.asarray(result.query.centre_ras) - point) < 2.0
    with pytest.raises(LCTfoundError, match="no control point"):
        logic.point_from_markup(scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode"))
    with pytest.raises(LCTfoundError, match="not both"):
        logic.query(node, "encoder", point_ras=point, region=corners)


# --------------------------------------------------------------------------- task models on nodes

def test_probe_and_decoder_on_loaded_volumes(logic, encoder_folder, tmp_path, empty_cache):
    import csv

    from lctfound.ctfm.probe import EmbeddingRecipe, train_probe

    encoder = logic.load_backbone("encoder")
    small = [data_factory_scan(seed) for seed in range(4)]
    folder = tmp_path / "cases"
    folder.mkdir()
    with open(folder / "cases.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", "label"])
        for seed, (image, _) in enumerate(small):
            write_volume(image, folder / f"s{seed}.nii.gz")
            writer.writerow([f"s{seed}.nii.gz", "lesion" if seed % 2 else "clear"])
    probe = train_probe(encoder, folder / "cases.csv", LoopConfig(str(tmp_path / "probe"), batch_size=4, max_steps=3,
                                                                  device="cpu"),
                        EmbeddingRecipe(WINDOWS), validate=False).model_folder
    scene = mrml.new_headless_scene()
    node = mrml.volume_node_from_ctvolume(scene, small[1][0], "loaded")
    row = logic.classify_volume_node(node, probe)
    assert row["case"] == "loaded" and row["predicted"] in ("clear", "lesion") and "research use" in row["note"]
    assert float(row["probability_clear"]) + float(row["probability_lesion"]) == pytest.approx(1.0, abs=1e-5)

    decoder = train_decoder(encoder, [("c0", *small[1])], LoopConfig(str(tmp_path / "seg"), batch_size=1, max_steps=2,
                                                                        device="cpu"),
                            {1: "Lesion"}, "frozen", (32, 32, 32), patches_per_case=2).model_folder
    segmentation = logic.segment_volume_node(node, decoder)
    expected = DecoderSegmenter.load(decoder, encoder).predict(small[1][0]).array
    assert expected.any()
    labels, names = mrml.labels_from_segmentation(segmentation, node)
    assert names == {1: "Lesion"} or set(names.values()) == {"Lesion"}
    assert np.array_equal(labels > 0, expected > 0)
    assert segmentation.GetName() == "loaded CT-FM segmentation"


def data_factory_scan(seed: int):
    """A small soft-tissue scan with air in front; odd seeds hold a bright sphere (image, labels)."""
    rng = np.random.default_rng(seed)
    shape = (32, 64, 64)
    array = 40.0 + 15.0 * rng.standard_normal(shape)
    array[:, :4] = -1000.0
    labels = np.zeros(shape, np.uint8)
    if seed % 2:
        k, j, i = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
        inside = ((k - 16) * 3) ** 2 + (j - 32) ** 2 + (i - 30) ** 2 <= 9 ** 2
        array[inside], labels[inside] = 900.0, 1
    image = CTVolume(array.astype(np.float32), (1.0, 1.0, 3.0))
    return image, image.with_array(labels)


@pytest.mark.slow
def test_training_jobs(logic, encoder_folder, tmp_path, empty_cache):
    """Probe and decoder training as jobs (child processes, run side by side), with progress from their events."""
    import csv

    folder = tmp_path / "cases"
    folder.mkdir()
    with open(folder / "cases.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", "label"])
        for seed in range(4):
            image, labels = data_factory_scan(seed)
            write_volume(image, folder / f"s{seed}.nii.gz")
            write_volume(labels, folder / f"s{seed}_label.nii.gz")
            writer.writerow([f"s{seed}.nii.gz", "lesion" if seed % 2 else "clear"])
    decoder_logic = CTFMLogic(ctfm_folders=[encoder_folder], available_devices=lambda: ["cpu"])
    logic.start_probe_training(folder / "cases.csv", tmp_path / "run" / "probe", "encoder", max_steps=3,
                               window=(32, 32, 32), register_as="my-probe", device="cpu")
    decoder_logic.start_decoder_training([(folder / "s1.nii.gz", folder / "s1_label.nii.gz")], tmp_path / "run" / "seg",
                                         "encoder", names={1: "Lesion"}, patch=(32, 32, 32), max_steps=2,
                                         batch_size=1, register_as="my-decoder", device="cpu")
    deadline = time.monotonic() + 300
    while (logic.status().busy or decoder_logic.status().busy) and time.monotonic() < deadline:
        logic.poll()
        decoder_logic.poll()
        time.sleep(0.2)
    for each in (logic, decoder_logic):
        each.poll()
        status = each.status()
        assert status.state is RunState.FINISHED, status.summary() + " " + each.job.stderr_tail()
    assert logic.loss_history and logic.loss_history[-1][0] == 3
    assert decoder_logic.loss_history and decoder_logic.loss_history[-1][0] == 2
    assert [c.label for c in logic.task_model_choices("ctfm-probe")] == ["my-probe"]
    assert [c.label for c in logic.task_model_choices("ctfm-segmentation")] == ["my-decoder"]
    segmenter = DecoderSegmenter.load("my-decoder")  # found by its registered name; backbone by its reference
    assert segmenter.label_names == {1: "Lesion"}
    with pytest.raises(LCTfoundError, match="already holds a run"):
        logic.start_probe_training(folder / "cases.csv", tmp_path / "run" / "probe", "encoder", device="cpu")


# --------------------------------------------------------------------------- the panel (LCTfoundCTFM)

def test_panel_choices_fields_and_problems(logic, tmp_path, empty_cache):
    """What the panel offers and why a button is disabled: one parameters object, most important problem first."""
    p = CTFMParameters(device="cpu")
    assert [c.value for c in logic.choices("queryKind")] == ["scan", "point", "region"]
    assert [c.value for c in logic.choices("trainingKind")] == ["probe", "decoder"]
    assert [c.value for c in logic.choices("decoderMode")] == ["frozen", "full"]
    assert logic.choices("probeModel") == [] and logic.choices("decoderModel") == []  # an empty model folder
    assert logic.fill_defaults(p) == {"model_name": "encoder"} and p.model_name == "encoder"
    panel_only = {"query_point", "query_region", "decoder_mode", "training_segmentation"}
    assert not panel_only & logic.visible_fields(p)
    p.query_kind, p.training_kind = "region", "decoder"
    assert panel_only & logic.visible_fields(p) == {"query_region", "decoder_mode", "training_segmentation"}

    assert logic.action_problems("index", p) == ["Choose the folder of volumes to index."]
    p.cohort_folder = str(tmp_path / "nowhere")
    assert logic.action_problems("index", p) == [f"Folder not found: {tmp_path / 'nowhere'}"]
    p.cohort_folder = str(tmp_path)
    assert logic.action_state("index", p).enabled and logic.action_state("index", p).tooltip == ACTIONS["index"]

    assert logic.action_problems("search", p) == ["Select an input volume.",
                                                  "Choose an index folder (or build one from a folder of volumes).",
                                                  "Choose the region (markups ROI) to query by."]
    p.index_folder, p.top_k = str(tmp_path), 0
    assert logic.action_problems("search", p)[1:] == [f"{tmp_path} is not a CT-FM index (no index.json).",
                                                      "Choose the region (markups ROI) to query by.",
                                                      "The number of results must be at least 1."]
    assert logic.action_problems("classify", p) == ["Select an input volume.",
                                                    "Select a ctfm-probe model (train one below)."]
    p.decoder_model = str(tmp_path)
    assert logic.action_problems("segment", p)[1] == f"'{tmp_path}' is not an installed ctfm-segmentation model."

    assert logic.action_problems("train", p) == [
        "Choose a CSV table with the columns image,labels, or a segmentation of the input volume.",
        "Name the new model (it is registered under that name)."]
    p.training_table, p.new_model_name, p.decoder_mode = str(tmp_path / "cases.csv"), "bad name!", "half"
    problems = logic.action_problems("train", p)
    assert problems[0] == f"Table not found: {tmp_path / 'cases.csv'}" and "frozen or full" in problems[1]
    assert problems[2].startswith("model name 'bad name!': use 1-64 letters")
    with pytest.raises(LCTfoundError, match="Table not found"):
        logic.start_training(p)  # the button's first problem, not a failed job

    p.encoder_folder = str(tmp_path)
    assert logic.selection_summary(p).startswith("The encoder folder is not a CT-FM encoder:")
    none_here = CTFMLogic(list_models=lambda extra_folders=(): [], available_devices=lambda: ["cpu"])
    assert none_here.check_model("").startswith("No CT-FM encoder is available")


def test_the_panel_process_never_imports_torch(encoder_folder, tmp_path, empty_cache):
    """Everything the panel does while it is open (list and check encoders, task models and devices,
    fill its selectors, check every button, say what is missing) leaves PyTorch and MONAI unimported:
    the listing runs in a child (`lctfound ctfm list --json`)."""
    import json
    import subprocess
    import sys

    script = """
import json, sys
from lctfound.logic import CTFMLogic, CTFMParameters
from lctfound.logic.ctfm import ACTIONS

folder, cohort, other = sys.argv[1:4]
logic = CTFMLogic(ctfm_folders=[other])
p = CTFMParameters(encoder_folder=folder, cohort_folder=cohort, device="cpu", new_model_name="panel-model",
                   training_table=cohort + "/cases.csv")
name = logic.use_encoder_folder(folder)
logic.fill_defaults(p)
choices = {name: [c.value for c in logic.choices(name, parameters=p)]
           for name in ("modelName", "device", "queryKind", "trainingKind", "decoderMode", "probeModel", "decoderModel")}
states = {action: logic.action_state(action, p).tooltip for action in ACTIONS}
p.encoder_folder = other
print(json.dumps({"name": name, "choices": choices, "states": states, "visible": sorted(logic.visible_fields(p)),
                  "summary": logic.selection_summary(p), "bad_name": logic.action_problems("train", CTFMParameters(
                      new_model_name="bad name!"))[-1],
                  "loaded": sorted(m for m in ("torch", "monai", "safetensors.torch") if m in sys.modules)}))
"""
    cohort = tmp_path / "cohort"
    cohort.mkdir()
    broken = tmp_path / "broken"  # weights that are not CT-FM's: refused by the child's strict check
    broken.mkdir()
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    done = subprocess.run([sys.executable, "-c", script, str(encoder_folder), str(cohort), str(broken)],
                          capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    panel = json.loads(done.stdout.splitlines()[-1])
    assert panel["loaded"] == []  # no PyTorch in the panel's process …
    assert panel["name"] == "encoder" and panel["choices"]["modelName"] == ["encoder"]  # … yet the child listed it
    assert panel["choices"]["device"][:2] == ["auto", "cpu"] and panel["choices"]["probeModel"] == []
    assert panel["states"]["index"] == ACTIONS["index"]
    assert panel["states"]["search"] == "Select an input volume."
    assert panel["summary"].startswith(f"The encoder folder is not a CT-FM encoder: {broken / 'model.safetensors'}")
    assert panel["bad_name"].startswith("model name 'bad name!': use 1-64 letters")


def test_the_inventory_failing_is_one_line_on_the_panel(tmp_path):
    """A child that cannot list (here: an interpreter that is not Python) leaves the panel usable, saying why."""
    logic = CTFMLogic(python=str(tmp_path / "no-python"))
    assert logic.models() == [] and logic.inventory_error.startswith("cannot list the CT-FM models:")
    assert logic.check_model("").startswith("No model could be listed: cannot list the CT-FM models")
    assert logic.devices() == [] and logic.devices_error.startswith("PyTorch is not available (cannot list")


def test_classify_and_segment_jobs_add_new_results(logic, encoder_folder, tmp_path, empty_cache):
    """Classify and Segment from the panel run `ctfm probe-predict` / `ctfm seg-predict` as jobs on the
    exported input volume; the prediction row and a NEW segmentation node come when the job has finished,
    equal to the same work done in this process."""
    from lctfound.ctfm.probe import EmbeddingRecipe, train_probe
    from lctfound.models.registry import register_model

    encoder = logic.load_backbone("encoder")
    image, labels = data_factory_scan(1)
    probe_table = tmp_path / "cases.csv"
    probe_table.write_text("image,label\n" + "".join(
        f"{write_volume(data_factory_scan(seed)[0], tmp_path / f's{seed}.nii.gz').name},{'lesion' if seed % 2 else 'clear'}\n"
        for seed in range(2)))
    probe = train_probe(encoder, probe_table, LoopConfig(str(tmp_path / "probe"), batch_size=2, max_steps=2, device="cpu"),
                        EmbeddingRecipe(WINDOWS), validate=False).model_folder
    decoder = train_decoder(encoder, [("c1", image, labels)], LoopConfig(str(tmp_path / "seg"), batch_size=1, max_steps=2,
                                                                       device="cpu"),
                            {1: "Lesion"}, "frozen", (32, 32, 32), patches_per_case=2).model_folder
    register_model(probe, "panel-probe")
    register_model(decoder, "panel-decoder")
    logic.refresh()
    scene = mrml.new_headless_scene()
    node = mrml.volume_node_from_ctvolume(scene, image, "loaded")
    p = CTFMParameters(model_name="encoder", device="cpu", input_volume=node)
    logic.fill_defaults(p)
    assert [logic.task_model_choices(t)[0].label for t in ("ctfm-probe", "ctfm-segmentation")] == ["panel-probe",
                                                                                                   "panel-decoder"]
    before = scene.GetNumberOfNodes()

    job = logic.start_classify(p)
    assert job.command[3:5] == ["ctfm", "probe-predict"] and scene.GetNumberOfNodes() == before
    _wait(logic)
    assert logic.state is RunState.FINISHED, logic.status_summary() + " " + job.stderr_tail
    row = logic.classification_row
    expected = logic.classify_volume_node(node, p.probe_model, encoder)  # the same work in this process
    assert row["case"] == "loaded" and row["predicted"] == expected["predicted"]
    assert float(row["probability_lesion"]) == pytest.approx(float(expected["probability_lesion"]), abs=1e-4)
    assert logic.status_summary().split(": ", 1)[1].startswith(f"predicted '{row['predicted']}'")
    assert scene.GetNumberOfNodes() == before

    job = logic.start_segment(p)
    assert job.command[3:5] == ["ctfm", "seg-predict"]
    _wait(logic)
    assert logic.state is RunState.FINISHED, logic.status_summary() + " " + job.stderr_tail
    segmentation = logic.result_segmentation
    assert segmentation.GetName() == "loaded CT-FM segmentation" and scene.GetNumberOfNodes() > before
    labels_out, names = mrml.labels_from_segmentation(segmentation, node)
    expected = DecoderSegmenter.load(decoder, encoder).predict(image).array
    assert set(names.values()) == {"Lesion"} and np.array_equal(labels_out > 0, expected > 0)
    assert segmentation.GetAttribute("LCTfound.CTFMModel") == str(Path(p.decoder_model))

    # the input volume removed while the job runs: nothing is added, one line says why
    logic.start_segment(CTFMParameters(model_name="encoder", device="cpu", decoder_model=p.decoder_model,
                                       input_volume=mrml.volume_node_from_ctvolume(scene, image, "gone")))
    scene.RemoveNode(scene.GetFirstNodeByName("gone"))
    count = scene.GetNumberOfNodes()
    _wait(logic)
    assert logic.state is RunState.FAILED and "removed from the scene" in logic.status_summary()
    assert scene.GetNumberOfNodes() == count


def test_query_point_is_the_last_placed_point():
    scene = mrml.new_headless_scene()
    fiducial = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode")
    fiducial.AddControlPointWorld([1.0, 2.0, 3.0])
    fiducial.AddControlPointWorld([4.0, 5.0, 6.0])  # placed again
    assert CTFMLogic.point_from_markup(fiducial) == [4.0, 5.0, 6.0]
    assert CTFMLogic.keep_last_point(fiducial) == 1 and fiducial.GetNumberOfControlPoints() == 1
    assert CTFMLogic.point_from_markup(fiducial) == [4.0, 5.0, 6.0] and CTFMLogic.keep_last_point(fiducial) == 0


def test_results_table_and_loading_a_match(tmp_path):
    import json

    from lctfound.io.volume import read_volume

    scene = mrml.new_headless_scene()
    path = write_volume(data_factory_scan(1)[0], tmp_path / "match.nrrd")
    scan_result = SearchResult(Query(np.zeros(4), "volume", "scan"),
                               [{"rank": 1, "case": "match", "score": 0.93, "path": str(path)}])
    table = CTFMLogic.results_table_node(scene, scan_result, "search")
    # the view shows the column titles as its header, so its row 0 is the first result (table row 0)
    assert table.GetUseColumnTitleAsColumnHeader()
    assert [CTFMLogic.table_row(table, row) for row in (-1, 0)] == [-1, 0]
    table.SetUseColumnTitleAsColumnHeader(False)  # a table made elsewhere: the model's row 0 shows the titles
    assert [CTFMLogic.table_row(table, row) for row in (0, 1)] == [-1, 0]
    table.SetUseColumnTitleAsColumnHeader(True)
    columns = table.GetTable()
    assert [columns.GetColumnName(i) for i in range(columns.GetNumberOfColumns())] == ["rank", "case", "score", "path"]
    assert columns.GetValueByName(0, "score").ToDouble() == pytest.approx(0.93)
    node, centre = CTFMLogic.load_match(table, 0)
    assert centre is None and node.GetName() == "match" and node.GetScene() is scene
    assert np.array_equal(mrml.ctvolume_from_volume_node(node).array, read_volume(path).array)
    with pytest.raises(LCTfoundError, match="select a result row"):
        CTFMLogic.load_match(table, 1)

    point_result = SearchResult(Query(np.zeros(4), "window", "point", [1.0, 2.0, 3.0]),
                                [{"rank": 1, "case": "match", "score": 0.5, "path": str(path),
                                  "centre_ras": [1.5, -2.0, 30.0]}])
    first, table = table, CTFMLogic.results_table_node(scene, point_result, "search")
    assert table.GetName() != first.GetName()  # a new node every search
    assert json.loads(table.GetAttribute(HEATMAP_ATTRIBUTE)) == {"kind": "point", "level": "window",
                                                                  "centre_ras": [1.0, 2.0, 3.0]}
    assert CTFMLogic.load_match(table, 0)[1] == [1.5, -2.0, 30.0]
    with pytest.raises(LCTfoundError, match="not a CT-FM search result"):
        CTFMLogic.load_match(scene.AddNewNodeByClass("vtkMRMLTableNode"), 0)


def _wait(logic, seconds: float = 300.0) -> None:
    deadline = time.monotonic() + seconds
    while logic.status().busy and time.monotonic() < deadline:
        logic.poll()
        time.sleep(0.2)
    logic.poll()


def test_index_job_and_decoder_training_from_the_panel(encoder_folder, tmp_path, empty_cache):
    """Build index runs `ctfm index` as a job into a new folder that then becomes the index folder;
    training a decoder on a segmentation of the loaded volume exports the pair first, and Cancel ends it."""
    from lctfound.ctfm.retrieval import load_index
    from lctfound.io.volume import read_volume

    logic = CTFMLogic(ctfm_folders=[encoder_folder], available_devices=lambda: ["cpu"], runs_root=tmp_path / "runs")
    cohort = tmp_path / "cohort"
    cohort.mkdir()
    image, labels = data_factory_scan(1)
    write_volume(image, cohort / "s1.nii.gz")
    p = CTFMParameters(model_name="encoder", device="cpu", cohort_folder=str(cohort))
    job = logic.start_index(p)  # the encoder was listed by the default inventory, `lctfound ctfm list` in a child
    assert job.command[3:6] == ["ctfm", "index", str(cohort.resolve())]
    _wait(logic)
    assert logic.state is RunState.FINISHED, logic.status_summary() + " " + job.stderr_tail()
    assert logic.status().message == f"index in {logic.run_output}"
    assert "--events" in job.command and (logic.status().done, logic.status().total) == (1, 1)  # counts shown
    assert logic.apply_finished_job(p) == {"index_folder": logic.run_output} and p.index_folder == logic.run_output
    index = load_index(p.index_folder)
    assert [entry["name"] for entry in index.entries] == ["s1"] and index.settings.window == (32, 128, 128)
    assert logic.action_problems("search", p) == ["Select an input volume."]  # the new index is usable

    scene = mrml.new_headless_scene()
    node = mrml.volume_node_from_ctvolume(scene, image, "loaded")
    segmentation = mrml.segmentation_node_from_labels(scene, labels.array, node, {1: "Lesion"})
    p.input_volume, p.training_kind, p.training_segmentation = node, "decoder", segmentation
    p.new_model_name, p.max_steps = "panel-decoder", 2
    job = logic.start_training(p)
    data = logic.run_output.parent / "data"
    assert ["--image", str((data / "image.nrrd").resolve()), "--labels", str((data / "labels.nrrd").resolve())] == \
        job.command[job.command.index("--image"):job.command.index("--image") + 4]
    assert "--names" in job.command and "--max-steps" in job.command and "panel-decoder" in job.command
    exported = read_volume(data / "labels.nrrd", labels=True)
    assert np.array_equal(exported.array > 0, labels.array > 0) and exported.same_grid(image)
    assert logic.cancel()
    _wait(logic, 60)
    assert logic.state is RunState.CANCELLED
    assert logic.apply_finished_job(p) == {}  # nothing to point at
