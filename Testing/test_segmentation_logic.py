"""The LCTfoundSegmentation module logic, headless on slicer-core, with real background jobs.

The annotator's full loop: label 2 slices in a segmentation node → Train → Predict into a new
node → erase a false positive on one slice and mark it reviewed → retrain (no new backbone
features) → Predict into the same node (undo state first) → the edited region is respected.
"""

from __future__ import annotations

import time
from types import SimpleNamespace

import numpy as np
import pytest

pytest.importorskip("slicer")

from lctfound.errors import LCTfoundError  # noqa: E402
from lctfound.io.volume import CTVolume, read_label_volume  # noqa: E402
from lctfound.logic import RunState  # noqa: E402
from lctfound.logic.segmentation import (  # noqa: E402
    DIAGNOSIS,
    FEWSHOT,
    REVIEWED_SLICES_ATTRIBUTE,
    SegmentationModuleLogic,
    SegmentationParameters,
    format_slices,
    mark_slice_reviewed,
    reviewed_slices,
    slice_index_at,
    training_labels,
)
from lctfound.models import save_model  # noqa: E402
from lctfound.mrml import (  # noqa: E402
    mask_from_segment,
    new_headless_scene,
    segmentation_node_from_labels,
    set_segment_from_mask,
    volume_node_from_ctvolume,
)

from data_factory import fewshot_phantom  # noqa: E402
from model_factory import tiny_model  # noqa: E402

pytestmark = pytest.mark.mrml

SPACING = (0.8, 0.8, 2.5)
ORIGIN = (-25.0, -30.0, 100.0)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2 * (a & b).sum() / max(a.sum() + b.sum(), 1)


@pytest.fixture
def world(empty_cache, tmp_path):
    backbone_folder = tmp_path / "tiny-backbone"
    save_model(tiny_model(64, seed=1), backbone_folder)
    entry = SimpleNamespace(name="tiny", path=backbone_folder, source="user", preset="tiny", description="test")
    logic = SegmentationModuleLogic(list_models=lambda extra_folders=(): [entry], available_devices=lambda: ["cpu"],
                                    runs_root=tmp_path / "runs")
    scene = new_headless_scene()
    volume, lesion, blob = fewshot_phantom()
    ct = CTVolume(np.round(volume).astype(np.int16), SPACING, ORIGIN, np.eye(3))
    node = volume_node_from_ctvolume(scene, ct, name="phantom")
    return SimpleNamespace(logic=logic, scene=scene, node=node, lesion=lesion, blob=blob, ct=ct)


def run_job(logic, timeout: float = 1800.0) -> list[dict]:  # a hang guard, not a speed requirement
    events = []
    deadline = time.monotonic() + timeout
    while logic.state.busy or logic.job is None:
        assert time.monotonic() < deadline, f"job did not end: {logic.status_summary()}"
        events.extend(logic.poll())
        time.sleep(0.1)
    events.extend(logic.poll())
    assert logic.state is RunState.FINISHED, logic.status_summary()
    return events


def labels_of(segmentation, volume) -> np.ndarray:
    return mask_from_segment(segmentation, "Lesion", volume).astype(bool)


@pytest.mark.slow
def test_annotator_loop_train_predict_correct_retrain(world):
    logic, node, lesion, blob = world.logic, world.node, world.lesion, world.blob
    painted = np.zeros(lesion.shape, dtype=np.uint8)
    painted[[1, 2]] = lesion[[1, 2]]
    annotation = segmentation_node_from_labels(world.scene, painted, node, {1: "Lesion"}, name="my labels")
    p = SegmentationParameters(task=FEWSHOT, input_volume=node, annotation_segmentation=annotation,
                               model_name="tiny", new_model_name="lesion-v1", epochs=15, device="cpu")
    assert logic.train_button_state(p).enabled, logic.train_problems(p)
    assert not logic.predict_button_state(p).enabled  # no few-shot model yet

    logic.start_train(p)
    events = run_job(logic)
    assert any(e["event"] == "progress" for e in events)
    assert logic._job_info["slices"] == [1, 2]
    assert [c.value for c in logic.task_model_choices(FEWSHOT)] == ["lesion-v1"]

    p.task_model = "lesion-v1"
    assert logic.predict_button_state(p).enabled, logic.predict_problems(p)
    # The raw prediction, so the annotator has a false positive to correct (by default the parts not
    # touching the painted slices, the blob among them, are dropped: test_fewshot_extent.py).
    p.keep_connected = False
    logic.start_predict(p)
    assert "--annotation" in logic.job.command and "15mm" in logic.job.command
    run_job(logic)
    p.keep_connected = True
    result = logic.result_segmentation
    assert result is not annotation and result.GetName().startswith("phantom")
    assert reviewed_slices(result) == [1, 2]
    first = labels_of(result, node)
    assert np.array_equal(first[[1, 2]], lesion[[1, 2]])  # the annotator's slices are kept exactly
    assert dice(first[:4], lesion[:4]) > 0.6
    assert (first & blob).sum() > 0.3 * blob.sum(), "the dense blob should first be taken for lesion"
    assert result.GetSegmentation().ContainsRepresentation("Closed surface")

    # The annotator erases the false positive on slice 5 of the result and marks the slice reviewed.
    corrected = first.copy()
    corrected[5] &= ~blob[5]
    set_segment_from_mask(result, "Lesion", corrected.astype(np.uint8), node)
    assert mark_slice_reviewed(result, 5) == [1, 2, 5]

    p.annotation_segmentation, p.new_model_name = result, "lesion-v2"
    logic.start_train(p)
    events = run_job(logic)
    assert logic._job_info["slices"] == [1, 2, 5]
    assert logic._job_info["init"] == "lesion-v1"  # continues from the model whose output was corrected
    messages = [e.get("message", "") for e in events if e["event"] == "progress"]
    # Prediction streams its features (none are kept), so only the newly reviewed slice is computed;
    # the painted slices' features come from the cache the first fit stored.
    assert messages and [m for m in messages if "features of slice" in m] == ["features of slice 5"], messages

    p.task_model, p.output_mode = "lesion-v2", "update"
    logic.start_predict(p)
    run_job(logic)
    assert logic.result_segmentation is result  # updated in place, on request
    model_output = read_label_volume(logic.run_folder / "prediction.nrrd").array == 14
    assert (model_output[5] & blob[5]).sum() < 0.05 * blob[5].sum()  # the model learned the edit
    assert (model_output & blob).sum() < 0.5 * (first & blob).sum()
    second = labels_of(result, node)
    assert not (second[5] & blob[5]).any()
    assert dice(second, lesion) > 0.6
    assert reviewed_slices(result) == [1, 2, 5]

    stack = logic.undo_stack(result)
    assert stack.can_undo and stack.undo()
    assert np.array_equal(labels_of(result, node), corrected)  # the state before the prediction


def test_training_slices_bad_inputs(world):
    logic, node, lesion = world.logic, world.node, world.lesion
    empty = segmentation_node_from_labels(world.scene, np.zeros(lesion.shape, np.uint8), node, {1: "Lesion"})
    p = SegmentationParameters(task=FEWSHOT, input_volume=node, annotation_segmentation=empty, model_name="tiny",
                               new_model_name="m", device="cpu")
    with pytest.raises(LCTfoundError, match="no labelled slice"):
        logic.start_train(p)

    painted = np.zeros(lesion.shape, dtype=np.uint8)
    painted[3] = lesion[3]
    annotation = segmentation_node_from_labels(world.scene, painted, node, {1: "Lesion"})
    annotation.SetAttribute(REVIEWED_SLICES_ATTRIBUTE, "")
    with pytest.raises(LCTfoundError, match="marked reviewed"):
        training_labels(annotation, node)
    mark_slice_reviewed(annotation, 6)
    with pytest.raises(LCTfoundError, match="only background"):
        training_labels(annotation, node)
    mark_slice_reviewed(annotation, 3)
    labels, slices, names = training_labels(annotation, node)
    assert slices == [3, 6] and list(names.values()) == ["Lesion"]

    # Labels painted on another grid (a volume with other spacing).
    other_ct = CTVolume(world.ct.array, (1.0, 1.0, 3.0), ORIGIN, np.eye(3))
    other = volume_node_from_ctvolume(world.scene, other_ct, name="other")
    elsewhere = segmentation_node_from_labels(world.scene, painted, other, {1: "Lesion"})
    p.annotation_segmentation = elsewhere
    with pytest.raises(LCTfoundError, match="does not lie on the voxel grid"):
        logic.start_train(p)
    assert not list((logic.runs_root()).glob("*")), "a refused start leaves no run folder"


def test_panels_refuse_models_of_other_tasks(world, tmp_path):
    entry = SimpleNamespace(name="clf", path=tmp_path, task="classification", backbone="tiny", description="")
    logic = SegmentationModuleLogic(list_models=lambda extra_folders=(): [],
                                    list_task_models=lambda extra_folders=(): [entry],
                                    available_devices=lambda: ["cpu"])
    p = SegmentationParameters(task=FEWSHOT, input_volume=world.node, task_model="clf")
    assert "is a classification model" in logic.predict_button_state(p).tooltip
    p.task = DIAGNOSIS
    assert logic.predict_button_state(p).enabled
    assert [c.value for c in logic.choices("taskModel", parameters=p)] == ["clf"]
    assert logic.choices("taskModel", parameters=SegmentationParameters(task=FEWSHOT)) == []


def test_slice_positions_and_slice_lists(world):
    node = world.node
    k = 5
    ras = np.array([-ORIGIN[0] - 3.0, -ORIGIN[1] - 2.0, ORIGIN[2] + k * SPACING[2] + 0.4])  # LPS origin → RAS
    assert slice_index_at(node, ras) == k
    with pytest.raises(LCTfoundError, match="outside volume"):
        slice_index_at(node, [0.0, 0.0, ORIGIN[2] - 50.0])
    assert format_slices([7, 1, 2, 3, 9, 10]) == "1-3,7,9-10"
    assert format_slices([]) == ""


@pytest.mark.slow
def test_diagnosis_panel_shows_table_and_saliency(world, tmp_path):
    """Classify the loaded volume with a registered classifier: a results table node (probabilities,
    provenance, research-use note) and a saliency overlay volume on the input's grid."""
    from lctfound.cli import main
    from lctfound.io.volume import write_volume
    from lctfound.models.registry import register_model

    rng = np.random.default_rng(0)
    rows = ["image,label"]
    for index in range(4):
        array = rng.normal(-850, 30, world.ct.shape).astype(np.float32)
        if index % 2:
            array[:, 10:20, 10:20] = 60.0
        write_volume(CTVolume(array, SPACING, ORIGIN), tmp_path / f"scan{index}.nrrd")
        rows.append(f"scan{index}.nrrd,{'opacity' if index % 2 else 'clear'}")
    (tmp_path / "cases.csv").write_text("\n".join(rows) + "\n")
    entry = world.logic.find_model("tiny")
    assert main(["classify", "train", "--backbone", str(entry.path), "--table", str(tmp_path / "cases.csv"),
                 "--slices-per-scan", "2", "--timesteps", "0", "-o", str(tmp_path / "run"), "--max-steps", "2",
                 "--batch-size", "2", "--checkpoint-every", "2", "--warmup-steps", "0"]) == 0
    register_model(tmp_path / "run" / "model", "opacity-clf")

    logic = world.logic
    logic.refresh()
    p = SegmentationParameters(task=DIAGNOSIS, input_volume=world.node, device="cpu")
    logic.fill_defaults(p)
    assert p.task_model == "opacity-clf"
    logic.start_predict(p)
    run_job(logic)
    row = logic.diagnosis_rows[0]
    assert row["predicted"] in ("clear", "opacity")
    assert abs(float(row["probability_clear"]) + float(row["probability_opacity"]) - 1) < 1e-4
    assert "not for diagnosis" in row["note"] and len(row["model_sha256"]) == 64
    table = logic.results_table.GetTable()
    assert table.GetNumberOfRows() == 1 and table.GetColumnByName("predicted") is not None
    from lctfound.mrml import ctvolume_from_volume_node

    saliency = ctvolume_from_volume_node(logic.saliency_volume)
    assert saliency.same_grid(world.ct)
    analysed = [k for k in range(saliency.shape[0]) if saliency.array[k].any()]
    assert len(analysed) == 2 and all(abs(saliency.array[k].max() - 1) < 1e-5 for k in analysed)
