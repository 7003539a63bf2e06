"""CT-FM on the real sample CTs (lung1, lung2), from the command line and from the module logic.

The encoder is a small randomly initialised SegResEncoder saved in the published layout (the real
weights cannot be downloaded here), so only the plumbing is checked, not what the features mean:
CT-FM preprocessing of real 512×512 CTs with 5 mm slices, embeddings, an index and a point query
with its heat map on the input grid, a probe and a decoder trained and applied through the CLI and
evaluated with `lctfound evaluate`, and the same tasks through `CTFMLogic` on loaded nodes.
"""

from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest
from model_factory import SMALL_CTFM, save_small_ctfm_encoder

from lctfound.io.volume import read_volume

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]

WINDOW = ["--window", "32,128,128"]  # the published window: 48 windows per sample CT
GROUPS = ["ctfm", "evaluate"]




@pytest.fixture(scope="module")
def encoder_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ctfm-sample") / "encoder"
    return save_small_ctfm_encoder(folder)


@pytest.fixture
def samples(sample_data, tmp_path):
    """The two sample CTs in a folder of their own (the index reads a folder), with their lesion masks."""
    folder = tmp_path / "scans"
    folder.mkdir()
    for name in ("lung1", "lung2"):
        shutil.copy(sample_data.folder / f"{name}_image.nrrd", folder / f"{name}.nrrd")
    return folder, {name: sample_data.folder / f"{name}_label.nrrd" for name in ("lung1", "lung2")}


def lesion_centre_ras(label_path) -> list[float]:
    labels = read_volume(label_path, labels=True)
    k, j, i = (float(np.mean(axis)) for axis in np.nonzero(labels.array))
    return [float(x) for x in (labels.ijk_to_ras() @ np.array([i, j, k, 1.0]))[:3]]


def nearest_window_centre(centres_ras, point) -> list[float]:
    centres = np.asarray(centres_ras, dtype=np.float64)
    return [float(v) for v in centres[np.argmin(np.linalg.norm(centres - np.asarray(point), axis=1))]]


def test_cli_on_the_sample_cts(encoder_folder, samples, tmp_path, run_cli, monkeypatch):
    monkeypatch.setenv("LCTFOUND_CACHE_DIR", str(tmp_path / "cache"))
    scans, labels = samples
    model = ["--model", str(encoder_folder), "--device", "cpu"]

    code, out, err = run_cli(["ctfm", "embed", scans / "lung1.nrrd", *model, *WINDOW, "-o",
                              tmp_path / "lung1.safetensors"], groups=GROUPS)
    assert code == 0, err
    from safetensors.numpy import load_file

    stored = load_file(str(tmp_path / "lung1.safetensors"))
    channels = SMALL_CTFM["init_filters"] * 2 ** 4  # the deepest stage's width (512 for the published model)
    assert stored["embedding"].shape == (channels,) and np.isfinite(stored["embedding"]).all()
    assert stored["window_embeddings"].shape[1] == channels and len(stored["window_centres_ras"]) > 1

    code, out, err = run_cli(["ctfm", "index", scans, *model, *WINDOW, "-o", tmp_path / "index"], groups=GROUPS)
    assert code == 0, err
    # query at the indexed window nearest the lesion: that window of lung1 must come back first, score 1
    point = nearest_window_centre(stored["window_centres_ras"], lesion_centre_ras(labels["lung1"]))
    heatmap = tmp_path / "heat.nii.gz"
    code, out, err = run_cli(["ctfm", "search", tmp_path / "index", "--query", scans / "lung1.nrrd", "--model",
                              str(encoder_folder), "--device", "cpu", "--point=" + ",".join(f"{x:.3f}" for x in point),
                              "--heatmap", heatmap, "--json"], groups=GROUPS)
    assert code == 0, err
    ranked = json.loads(out)
    assert ranked["level"] == "window" and ranked["matches"][0]["name"] == "lung1"
    assert ranked["matches"][0]["score"] == pytest.approx(1.0, abs=1e-4)  # the query's own window
    heat = read_volume(heatmap, validate=False)  # similarities, not HU
    assert heat.same_grid(read_volume(scans / "lung1.nrrd"))  # the overlay lies on the input grid

    table = tmp_path / "cases.csv"
    with open(table, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", "label"])
        writer.writerow([scans / "lung1.nrrd", "small-lesion"])
        writer.writerow([scans / "lung2.nrrd", "large-lesion"])
    code, out, err = run_cli(["ctfm", "probe-train", "--table", table, *model, *WINDOW, "--max-steps", "3",
                              "-o", tmp_path / "probe"], groups=GROUPS)
    assert code == 0, err
    code, out, err = run_cli(["ctfm", "probe-predict", table, "--probe", tmp_path / "probe" / "model", "--device",
                              "cpu", "-o", tmp_path / "predictions.csv"], groups=GROUPS)
    assert code == 0, err
    code, out, err = run_cli(["evaluate", "classification", "--predictions", tmp_path / "predictions.csv",
                              "--truth", table, "--bootstrap", "100"], groups=GROUPS)
    assert code == 0, err

    code, out, err = run_cli(["ctfm", "seg-train", "--image", scans / "lung2.nrrd", "--labels", labels["lung2"],
                              "--names", "1=Lesion", *model, "--patch", "32,64,64", "--max-steps", "2",
                              "-o", tmp_path / "decoder"], groups=GROUPS)
    assert code == 0, err
    prediction = tmp_path / "lung1_seg.nii.gz"
    code, out, err = run_cli(["ctfm", "seg-predict", scans / "lung1.nrrd", "--decoder", tmp_path / "decoder" / "model",
                              "--device", "cpu", "-o", prediction], groups=GROUPS)
    assert code == 0, err
    predicted = read_volume(prediction, labels=True)
    assert predicted.same_grid(read_volume(scans / "lung1.nrrd"))
    code, out, err = run_cli(["evaluate", "segmentation", "-p", prediction, "-r", labels["lung1"], "--model",
                              tmp_path / "decoder" / "model"], groups=GROUPS)
    assert code == 0, err
    assert "Lesion" in out


def test_logic_on_a_loaded_sample_ct(encoder_folder, samples, tmp_path, empty_cache):
    pytest.importorskip("slicer", reason="needs the slicer-core wheel (pip install 'lctfound[mrml]')")
    from lctfound import mrml
    from lctfound.ctfm.decoder import train_decoder
    from lctfound.ctfm.features import WindowSettings
    from lctfound.logic.ctfm import CTFMLogic
    from lctfound.training.loop import LoopConfig

    scans, labels = samples
    logic = CTFMLogic(ctfm_folders=[encoder_folder], available_devices=lambda: ["cpu"])
    scene = mrml.new_headless_scene()
    node = mrml.load_volume(scene, scans / "lung1.nrrd", "lung1")
    from lctfound.ctfm.features import embed_volume
    from lctfound.ctfm.preprocess import prepare_volume

    settings = WindowSettings((32, 128, 128), 0.5, 4)
    prepared = prepare_volume(logic.volume_of(node))
    _, windows = embed_volume(logic.load_backbone("encoder"), prepared, "mean", settings)
    point = nearest_window_centre(windows.centres_ras, lesion_centre_ras(labels["lung1"]))
    query = logic.query(node, "encoder", point_ras=point, settings=settings)
    heat_node = logic.create_heatmap_node(node, query, "encoder", settings=settings)
    assert heat_node is not node and heat_node.GetImageData().GetDimensions() == node.GetImageData().GetDimensions()
    # the heat map peaks at the queried window (similarity 1 there): within half a window of its centre
    peak = np.asarray(logic.peak_ras(heat_node))
    assert np.all(np.abs(peak - np.asarray(point)) <= np.array([64.0, 64.0, 48.0]))  # R, A, S in mm

    encoder = logic.load_backbone("encoder")
    image = read_volume(scans / "lung2.nrrd")
    lesion = read_volume(labels["lung2"], labels=True)
    decoder = train_decoder(encoder, [("lung2", image, lesion)],
                            LoopConfig(str(tmp_path / "seg"), batch_size=1, max_steps=2, device="cpu"),
                            {1: "Lesion"}, "frozen", (32, 64, 64), patches_per_case=2).model_folder
    segmentation = logic.segment_volume_node(node, decoder)
    assert segmentation.GetName() == "lung1 CT-FM segmentation"
    labelmap, _ = mrml.labels_from_segmentation(segmentation, node)
    assert labelmap.shape == read_volume(scans / "lung1.nrrd").shape
