"""MRML adapters on the slicer-core wheel (no Qt, no Slicer application).

Run: .venv/bin/pytest Testing/test_mrml_adapters.py -q
"""

from __future__ import annotations

import json

import numpy as np
import pytest

slicer = pytest.importorskip("slicer", reason="needs the slicer-core wheel (pip install 'lctfound[mrml]')")

from lctfound import mrml  # noqa: E402
from lctfound.errors import InputError, LCTfoundError  # noqa: E402
from lctfound.io.volume import CTVolume  # noqa: E402
from lctfound.mrml.structures import StructureTable, default_structure_table  # noqa: E402
from lctfound.mrml.terminology import TerminologyEntry  # noqa: E402

pytestmark = pytest.mark.mrml

SHAPE = (14, 22, 26)  # (k, j, i)


def rotation(ax: float, ay: float, az: float) -> np.ndarray:
    cx, sx, cy, sy, cz, sz = np.cos(ax), np.sin(ax), np.cos(ay), np.sin(ay), np.cos(az), np.sin(az)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


def make_ct(shape=SHAPE, seed=0) -> CTVolume:
    """A small CT: oblique axes, non-zero origin, anisotropic spacing, HU-like values."""
    rng = np.random.default_rng(seed)
    array = rng.integers(-1024, 1500, size=shape).astype(np.int16)
    return CTVolume(
        array,
        spacing=(0.68, 0.74, 2.5),
        origin=(-171.3, 12.25, -305.5),
        direction=rotation(0.1, -0.25, 0.4),
        metadata={"source": "synthetic", "series": {"kvp": 120}},
    )


def make_labels(shape=SHAPE) -> np.ndarray:
    """Lung (1) box with a lesion (14) blob inside it."""
    labels = np.zeros(shape, dtype=np.uint8)
    labels[2:12, 3:19, 4:22] = 1
    labels[5:8, 8:12, 9:14] = 14
    return labels


@pytest.fixture
def scene():
    return mrml.new_headless_scene()


@pytest.fixture
def ct():
    return make_ct()


@pytest.fixture
def volume(scene, ct):
    return mrml.volume_node_from_ctvolume(scene, ct, "CT")


@pytest.fixture
def seg(scene, volume):
    return mrml.segmentation_node_from_labels(scene, make_labels(), volume, name="AI lungs")


def matrix_of(node) -> np.ndarray:
    import vtk

    m = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(m)
    return np.array([[m.GetElement(r, c) for c in range(4)] for r in range(4)])


# --- scene ---------------------------------------------------------------------------------


def test_headless_scene_has_a_persistent_segmentations_logic(scene):
    logic = mrml.ensure_segmentations_logic(scene)
    assert isinstance(logic, slicer.vtkSlicerSegmentationsModuleLogic)
    assert mrml.ensure_segmentations_logic(scene) is logic
    assert logic.GetMRMLScene() is scene
    # converter rules are registered: an empty segment can be created
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    assert node.GetSegmentation().AddEmptySegment("x", "x") == "x"


# --- volumes -------------------------------------------------------------------------------


def test_volume_round_trip_is_exact(scene, ct):
    node = mrml.volume_node_from_ctvolume(scene, ct, "CT", provenance={"model": "LCTfound-test", "step": 3})
    assert isinstance(node, slicer.vtkMRMLScalarVolumeNode)
    np.testing.assert_allclose(matrix_of(node), ct.ijk_to_ras(), atol=1e-12)
    back = mrml.ctvolume_from_volume_node(node)
    assert back.array.dtype == ct.array.dtype and np.array_equal(back.array, ct.array)
    np.testing.assert_allclose(back.spacing, ct.spacing, atol=1e-9)
    np.testing.assert_allclose(back.origin, ct.origin, atol=1e-9)
    np.testing.assert_allclose(back.direction, ct.direction, atol=1e-9)
    assert back.same_grid(ct, tolerance=1e-9)
    # copies, not views: editing either side leaves the other alone
    back.array[0, 0, 0] += 1
    ct.array[1, 1, 1] += 1
    again = mrml.ctvolume_from_volume_node(node)
    assert again.array[0, 0, 0] == back.array[0, 0, 0] - 1 and again.array[1, 1, 1] == ct.array[1, 1, 1] - 1
    # provenance and metadata as LCTfound.* attributes
    assert node.GetAttribute("LCTfound.model") == "LCTfound-test"
    assert json.loads(node.GetAttribute("LCTfound.series")) == {"kvp": 120}
    assert back.metadata["step"] == 3 and back.metadata["source"] == "synthetic"


def test_volume_nodes_are_always_new_with_unique_names(scene, ct):
    a = mrml.volume_node_from_ctvolume(scene, ct, "CT")
    b = mrml.volume_node_from_ctvolume(scene, ct, "CT")
    assert a.GetID() != b.GetID() and a.GetName() != b.GetName()


def test_float_volume_and_update_from_array(scene, ct):
    node = mrml.volume_node_from_ctvolume(scene, ct, "CT")
    result = ct.array.astype(np.float32) * 0.5
    mrml.update_volume_node_from_array(node, result, provenance={"task": "enhance"})
    back = mrml.ctvolume_from_volume_node(node)
    assert back.array.dtype == np.float32 and np.array_equal(back.array, result)
    assert back.same_grid(ct, tolerance=1e-9)
    with pytest.raises(LCTfoundError, match="differs from volume"):
        mrml.update_volume_node_from_array(node, result[:-1])


def test_window_presets(volume):
    assert mrml.apply_window_preset(volume, "lung") == (1500.0, -500.0)
    display = volume.GetDisplayNode()
    assert (display.GetWindow(), display.GetLevel()) == (1500.0, -500.0) and not display.GetAutoWindowLevel()
    mrml.apply_window_preset(volume, "mediastinal")
    assert (display.GetWindow(), display.GetLevel()) == (400.0, 0.0)
    with pytest.raises(LCTfoundError, match="unknown window preset"):
        mrml.apply_window_preset(volume, "bone-ish")


def test_linear_transform_is_applied_when_reading_a_volume(scene, ct):
    node = mrml.volume_node_from_ctvolume(scene, ct, "CT")
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    import vtk

    shift = vtk.vtkMatrix4x4()
    shift.SetElement(0, 3, 10.0)
    transform.SetMatrixTransformToParent(shift)
    node.SetAndObserveTransformNodeID(transform.GetID())
    moved = mrml.ctvolume_from_volume_node(node)
    np.testing.assert_allclose(moved.ijk_to_ras()[0, 3], ct.ijk_to_ras()[0, 3] + 10.0, atol=1e-9)
    raw = mrml.ctvolume_from_volume_node(node, apply_transforms=False)
    assert raw.same_grid(ct, tolerance=1e-9)


@pytest.mark.parametrize("suffix", [".nrrd", ".nii.gz"])
def test_volume_files_through_storage_nodes(scene, volume, ct, tmp_path, suffix):
    path = mrml.save_volume(volume, tmp_path / f"ct{suffix}")
    assert path.is_file() and not list(tmp_path.glob(".*tmp*"))
    loaded = mrml.load_volume(scene, path)
    back = mrml.ctvolume_from_volume_node(loaded)
    assert np.array_equal(back.array, ct.array)
    # NIfTI stores the geometry in float32
    assert back.same_grid(ct, tolerance=1e-4)


# --- segmentations -------------------------------------------------------------------------


def test_segmentation_from_labels_has_named_coloured_terminology_tagged_segments(scene, volume, seg):
    infos = {i.name: i for i in mrml.list_segments(seg)}
    assert set(infos) == {"Lung", "Lesion"}
    table = default_structure_table()
    assert infos["Lung"].label == 1 and infos["Lesion"].label == 14
    np.testing.assert_allclose(infos["Lung"].color, table["Lung"].color)
    lung_terms = TerminologyEntry.parse(infos["Lung"].terminology)
    assert str(lung_terms.type) == "SCT^39607008^Lung"
    assert str(lung_terms.category) == "SCT^123037004^Anatomical Structure"
    lesion_terms = TerminologyEntry.parse(infos["Lesion"].terminology)
    assert str(lesion_terms.type) == "SCT^4147007^Mass" and str(lesion_terms.region) == "SCT^39607008^Lung"
    # Slicer can parse our terminology strings
    entry = slicer.vtkSlicerTerminologyEntry()
    assert slicer.vtkSlicerTerminologiesModuleLogic.DeserializeTerminologyEntry(infos["Lung"].terminology, entry)
    assert entry.GetTypeObject().GetCodeValue() == "39607008"
    # reference geometry + the node reference that DICOM SEG export needs
    role = seg.GetReferenceImageGeometryReferenceRole()
    assert seg.GetNodeReference(role) is volume
    geometry = seg.GetSegmentation().GetConversionParameter(
        slicer.vtkSegmentationConverter.GetReferenceImageGeometryParameterName()
    )
    assert geometry
    labels = make_labels()
    assert np.array_equal(mrml.mask_from_segment(seg, "Lung", volume), (labels == 1).astype(np.uint8))
    assert np.array_equal(mrml.mask_from_segment(seg, "Lesion"), (labels == 14).astype(np.uint8))
    out = mrml.mask_from_segment(seg, "Lung")
    assert out.dtype == np.uint8 and out.shape == SHAPE


def test_names_argument_and_unknown_labels(scene, volume):
    labels = np.zeros(SHAPE, np.uint8)
    labels[1:3, 1:5, 1:5] = 3
    labels[5:7, 1:5, 1:5] = 7
    labels[9:11, 1:5, 1:5] = 42
    seg = mrml.segmentation_node_from_labels(scene, labels, volume, names={3: "tumour"})
    infos = {i.name: i for i in mrml.list_segments(seg)}
    assert set(infos) == {"tumour", "Left upper lobe", "Label 42"}
    assert infos["tumour"].label == 14  # alias of Lesion
    assert "SCT^4147007^Mass" in infos["tumour"].terminology
    # unknown names keep Slicer's default terminology (generic "Tissue"), which maps to no structure
    assert infos["Label 42"].label is None
    assert default_structure_table().find(None, infos["Label 42"].terminology) is None


def test_annotator_edit_in_numpy_is_read_back_exactly(scene, volume, seg):
    labels = make_labels()
    lung = mrml.mask_from_segment(seg, "Lung")
    edited = lung.copy()
    edited[4, 5:9, 6:10] = 0  # erase a blob on slice 4
    yy, xx = np.mgrid[: SHAPE[1], : SHAPE[2]]
    disc = (yy - 18) ** 2 + (xx - 3) ** 2 <= 9
    edited[9][disc] = 1  # paint a disc on slice 9 (partly outside the AI mask)
    assert (edited != lung).sum() > 10
    stack = mrml.SegmentationUndoStack(seg)
    assert mrml.save_state_for_undo(seg, stack)
    mrml.set_segment_from_mask(seg, "Lung", edited, volume)
    assert np.array_equal(mrml.mask_from_segment(seg, "Lung", volume), edited)
    # the other segment is untouched
    assert np.array_equal(mrml.mask_from_segment(seg, "Lesion"), (labels == 14).astype(np.uint8))
    exported, names = mrml.labels_from_segmentation(seg, volume)
    expected = np.where(labels == 14, 14, edited).astype(np.uint8)
    assert names == {1: "Lung", 14: "Lesion"} and np.array_equal(exported, expected)
    # overlap: a lung mask that covers the lesion keeps the lesion intact
    mrml.set_segment_from_mask(seg, "Lung", labels > 0)
    assert np.array_equal(mrml.mask_from_segment(seg, "Lung"), (labels > 0).astype(np.uint8))
    assert np.array_equal(mrml.mask_from_segment(seg, "Lesion"), (labels == 14).astype(np.uint8))
    # an empty mask clears the segment
    mrml.set_segment_from_mask(seg, "Lesion", np.zeros(SHAPE, bool))
    assert mrml.mask_from_segment(seg, "Lesion").sum() == 0


def test_update_existing_segmentation_keeps_user_segments(scene, volume, seg):
    user = mrml.add_segment(seg, "My annotation", make_labels() == 14, volume)
    before_lung = mrml.mask_from_segment(seg, "Lung")
    new = np.zeros(SHAPE, np.uint8)
    new[1:4, 1:6, 1:6] = 1  # new lung prediction
    new[10:12, 1:6, 1:6] = 9  # trachea, not yet in the segmentation
    stack = mrml.SegmentationUndoStack(seg)
    written = mrml.update_segmentation_from_labels(seg, new, volume, undo_stack=stack, status="InProgress")
    assert mrml.resolve_segment_id(seg, "Lung") in written and mrml.resolve_segment_id(seg, "Trachea") in written
    assert np.array_equal(mrml.mask_from_segment(seg, "Lung"), (new == 1).astype(np.uint8))
    assert np.array_equal(mrml.mask_from_segment(seg, "Trachea"), (new == 9).astype(np.uint8))
    assert np.array_equal(mrml.mask_from_segment(seg, user), (make_labels() == 14).astype(np.uint8))
    assert mrml.get_segment_status(seg, "Trachea") == "InProgress"
    assert len(mrml.segment_ids(seg)) == 4
    assert stack.undo()
    assert np.array_equal(mrml.mask_from_segment(seg, "Lung"), before_lung)
    assert len(mrml.segment_ids(seg)) == 3


def test_export_values_are_fixed_by_name_not_by_order(scene, volume):
    labels = make_labels()
    lung, lesion = labels > 0, labels == 14
    first = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "lesion first")
    mrml.add_segment(first, "Lesion", lesion, volume)
    mrml.add_segment(first, "Lung", lung, volume)
    second = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "lung first")
    mrml.add_segment(second, "lung", lung, volume)  # other spelling, same structure
    mrml.add_segment(second, "TUMOUR", lesion, volume)
    a, names_a = mrml.labels_from_segmentation(first, volume)
    b, names_b = mrml.labels_from_segmentation(second, volume)
    assert names_a == names_b == {1: "Lung", 14: "Lesion"}
    assert np.array_equal(a, b)
    assert np.array_equal(a, np.where(lesion, 14, np.where(lung, 1, 0)))
    # unknown names get stable values after the fixed table, in sorted order
    mrml.add_segment(second, "Zeta structure", labels == 1, volume)
    mrml.add_segment(second, "alpha structure", lesion, volume)
    c, names_c = mrml.labels_from_segmentation(second, volume)
    start = default_structure_table().user_label_start
    assert names_c[start] == "alpha structure" and names_c[start + 1] == "Zeta structure"
    # a name unknown to the table but tagged with a known terminology maps by its codes
    third = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "by terminology")
    mrml.add_segment(third, "Segment_1", lung, volume, terminology=default_structure_table()["Right lung"].terminology)
    _, names_t = mrml.labels_from_segmentation(third, volume)
    assert names_t == {2: "Right lung"}


def test_export_matches_slicers_colour_table_exporter(scene, volume):
    labels = np.zeros(SHAPE, np.uint8)
    labels[1:6, 2:10, 2:12] = 2
    labels[7:12, 2:10, 2:12] = 3
    labels[3:5, 12:16, 14:20] = 15
    seg = mrml.segmentation_node_from_labels(scene, labels, volume)
    ours, _ = mrml.labels_from_segmentation(seg, volume)
    colors = mrml.color_table_node(scene)
    labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode")
    ok = slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(
        seg, mrml.segment_ids(seg), labelmap, volume, slicer.vtkSegmentation.EXTENT_REFERENCE_GEOMETRY, colors
    )
    assert ok
    theirs = mrml.ctvolume_from_volume_node(labelmap).array
    assert np.array_equal(ours, labels) and np.array_equal(theirs, labels)


def test_status_filter_and_review_helpers(seg, volume):
    assert mrml.get_segment_status(seg, "Lung") == "NotStarted"
    mrml.set_segment_status(seg, "Lung", "InProgress")
    mrml.mark_reviewed(seg, "Lesion")
    assert mrml.get_segment_status(seg, "Lesion") == "Completed"
    assert mrml.get_segment_status(seg, "Lung") == "InProgress"
    assert mrml.segments_with_status(seg, "Completed") == [mrml.resolve_segment_id(seg, "Lesion")]
    labels, names = mrml.labels_from_segmentation(seg, volume, statuses="Completed")
    assert names == {14: "Lesion"} and set(np.unique(labels)) == {0, 14}
    labels, names = mrml.labels_from_segmentation(seg, volume, statuses=["Completed", "InProgress"])
    assert names == {1: "Lung", 14: "Lesion"}
    mrml.mark_reviewed(seg, "Lesion", reviewed=False)
    assert mrml.labels_from_segmentation(seg, volume, statuses="Completed")[1] == {}
    with pytest.raises(LCTfoundError, match="unknown segment status"):
        mrml.set_segment_status(seg, "Lung", "Approved-ish")


def test_seg_nrrd_round_trip_keeps_names_colours_terminology_status(scene, volume, seg, tmp_path):
    mrml.mark_reviewed(seg, "Lesion")
    before = {i.name: i for i in mrml.list_segments(seg)}
    assert mrml.save_segmentation(seg, tmp_path / "case.seg.nrrd") is None
    loaded = mrml.load_segmentation(scene, tmp_path / "case.seg.nrrd", reference_volume_node=volume)
    after = {i.name: i for i in mrml.list_segments(loaded)}
    assert set(after) == set(before)
    for name in before:
        assert after[name].id == before[name].id
        np.testing.assert_allclose(after[name].color, before[name].color, atol=1e-5)
        assert after[name].terminology == before[name].terminology
        assert after[name].status == before[name].status
        assert np.array_equal(mrml.mask_from_segment(loaded, name), mrml.mask_from_segment(seg, name))
    assert loaded.GetNodeReference(loaded.GetReferenceImageGeometryReferenceRole()) is volume


def test_labelmap_nifti_round_trip(scene, volume, seg, tmp_path):
    names = mrml.save_segmentation(seg, tmp_path / "case.nii.gz")
    assert names == {1: "Lung", 14: "Lesion"}
    import SimpleITK as sitk

    image = sitk.ReadImage(str(tmp_path / "case.nii.gz"))
    assert np.array_equal(sitk.GetArrayFromImage(image), make_labels())
    loaded = mrml.load_segmentation(scene, tmp_path / "case.nii.gz", reference_volume_node=volume)
    assert sorted(i.name for i in mrml.list_segments(loaded)) == ["Lesion", "Lung"]
    assert np.array_equal(mrml.labels_from_segmentation(loaded)[0], make_labels())
    # without a reference volume the label map's own grid is the reference geometry
    alone = mrml.load_segmentation(scene, tmp_path / "case.nii.gz")
    assert alone.GetNodeReference(alone.GetReferenceImageGeometryReferenceRole()) is None
    assert np.array_equal(mrml.labels_from_segmentation(alone, volume)[0], make_labels())
    # temporary nodes are gone
    names_in_scene = [scene.GetNthNode(n).GetName() for n in range(scene.GetNumberOfNodes())]
    assert not [n for n in names_in_scene if n.startswith("__lctfound")]


def test_undo_snapshot_and_stack_restore(seg, volume):
    lung = mrml.mask_from_segment(seg, "Lung")
    saved = mrml.snapshot(seg)
    mrml.set_segment_from_mask(seg, "Lung", np.zeros(SHAPE, np.uint8))
    mrml.set_segment_status(seg, "Lung", "Flagged")
    assert mrml.mask_from_segment(seg, "Lung").sum() == 0
    mrml.restore(seg, saved)
    assert np.array_equal(mrml.mask_from_segment(seg, "Lung"), lung)
    assert mrml.get_segment_status(seg, "Lung") == "NotStarted"

    stack = mrml.SegmentationUndoStack(seg)
    assert not stack.can_undo
    stack.save_state()
    grown = lung.copy()
    grown[0] = 1
    mrml.set_segment_from_mask(seg, "Lung", grown)
    assert stack.undo()
    assert np.array_equal(mrml.mask_from_segment(seg, "Lung"), lung)
    assert stack.redo()
    assert np.array_equal(mrml.mask_from_segment(seg, "Lung"), grown)
    # headless and without a stack there is no editor to save into
    assert mrml.save_state_for_undo(seg) is False


def test_segmentation_follows_a_transformed_reference_volume(scene, ct):
    node = mrml.volume_node_from_ctvolume(scene, ct, "CT")
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    import vtk

    m = vtk.vtkMatrix4x4()
    m.SetElement(1, 3, -7.5)
    transform.SetMatrixTransformToParent(m)
    node.SetAndObserveTransformNodeID(transform.GetID())
    seg = mrml.segmentation_node_from_labels(scene, make_labels(), node)
    assert np.array_equal(mrml.labels_from_segmentation(seg, node)[0], make_labels())


# --- bad inputs: clear errors, no segfault ---------------------------------------------------


def test_label_array_on_another_grid_is_rejected(scene, volume):
    with pytest.raises(LCTfoundError, match=r"label array shape \(14, 22, 25\) differs from the grid of volume 'CT'"):
        mrml.segmentation_node_from_labels(scene, np.zeros((14, 22, 25), np.uint8), volume)
    with pytest.raises(LCTfoundError, match="must be 3-D"):
        mrml.segmentation_node_from_labels(scene, np.zeros((22, 26), np.uint8), volume)
    with pytest.raises(LCTfoundError, match="integers"):
        mrml.segmentation_node_from_labels(scene, np.full(SHAPE, 0.5), volume)
    with pytest.raises(LCTfoundError, match="negative"):
        mrml.segmentation_node_from_labels(scene, np.full(SHAPE, -1, np.int16), volume)
    assert scene.GetNodesByClass("vtkMRMLSegmentationNode").GetNumberOfItems() == 0


def test_none_and_wrong_nodes_raise_lctfounderror(scene, volume, seg, ct):
    labels = make_labels()
    calls = [
        lambda: mrml.volume_node_from_ctvolume(None, ct, "CT"),
        lambda: mrml.volume_node_from_ctvolume(scene, None, "CT"),
        lambda: mrml.volume_node_from_ctvolume(scene, ct, ""),
        lambda: mrml.ctvolume_from_volume_node(None),
        lambda: mrml.ctvolume_from_volume_node(seg),
        lambda: mrml.apply_window_preset(None),
        lambda: mrml.segmentation_node_from_labels(scene, labels, None),
        lambda: mrml.segmentation_node_from_labels(None, labels, volume),
        lambda: mrml.segmentation_node_from_labels(scene, None, volume),
        lambda: mrml.segmentation_node_from_labels(scene, labels, seg),
        lambda: mrml.set_segment_from_mask(None, "Lung", labels, volume),
        lambda: mrml.set_segment_from_mask(seg, "Lung", None, volume),
        lambda: mrml.set_segment_from_mask(seg, None, labels, volume),
        lambda: mrml.mask_from_segment(None, "Lung", volume),
        lambda: mrml.mask_from_segment(volume, "Lung", volume),
        lambda: mrml.labels_from_segmentation(None, volume),
        lambda: mrml.snapshot(None),
        lambda: mrml.restore(seg, None),
        lambda: mrml.SegmentationUndoStack(None),
        lambda: mrml.save_segmentation(None, "x.seg.nrrd"),
        lambda: mrml.update_volume_node_from_array(volume, None),
    ]
    for call in calls:
        with pytest.raises(LCTfoundError):
            call()


def test_unknown_segment_name_is_a_clear_error(seg, volume):
    with pytest.raises(LCTfoundError, match=r"has no segment 'Heart' \(segments: 'Lung', 'Lesion'\)"):
        mrml.mask_from_segment(seg, "Heart", volume)
    with pytest.raises(LCTfoundError, match="has no segment"):
        mrml.set_segment_from_mask(seg, "Heart", make_labels(), volume)
    with pytest.raises(LCTfoundError, match="has no segment"):
        mrml.labels_from_segmentation(seg, volume, segments=["Heart"])
    # names are matched case- and underscore-insensitively
    assert mrml.resolve_segment_id(seg, "LUNG") == mrml.resolve_segment_id(seg, "Lung")


def test_missing_reference_volume_is_a_clear_error(scene, volume):
    seg = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    sid = mrml.add_segment(seg, "Lung")
    with pytest.raises(LCTfoundError, match="no reference volume"):
        mrml.mask_from_segment(seg, sid)
    assert mrml.mask_from_segment(seg, sid, volume).sum() == 0  # empty segment, full grid


def test_file_errors(scene, volume, seg, tmp_path):
    with pytest.raises(InputError, match="no such file"):
        mrml.load_segmentation(scene, tmp_path / "missing.seg.nrrd")
    with pytest.raises(InputError, match="no such file"):
        mrml.load_volume(scene, tmp_path / "missing.nrrd")
    (tmp_path / "junk.seg.nrrd").write_bytes(b"not a nrrd file")
    with pytest.raises(InputError, match="could not read"):
        mrml.load_segmentation(scene, tmp_path / "junk.seg.nrrd")
    with pytest.raises(LCTfoundError, match="unsupported"):
        mrml.save_segmentation(seg, tmp_path / "case.png")
    # a label map on another grid cannot reference this volume
    other = mrml.volume_node_from_ctvolume(scene, make_ct(shape=(5, 6, 7)), "small")
    small = mrml.segmentation_node_from_labels(scene, np.ones((5, 6, 7), np.uint8), other)
    mrml.save_segmentation(small, tmp_path / "small.nii.gz")
    with pytest.raises(InputError, match="does not match volume 'CT'"):
        mrml.load_segmentation(scene, tmp_path / "small.nii.gz", reference_volume_node=volume)


# --- structure table (pure Python) -----------------------------------------------------------


def test_structure_table_contents_and_growth():
    table = default_structure_table()
    assert table["background"].label == 0
    expected = {
        "Lung": "39607008", "Right upper lobe": "45653009", "Right middle lobe": "72481006",
        "Right lower lobe": "90572001", "Left upper lobe": "45653009", "Left lower lobe": "90572001",
        "Trachea": "44567001", "Bronchus": "955009", "Pulmonary artery": "81040000",
        "Pulmonary vein": "122972007", "Lesion": "4147007", "Nodule": "27925004",
    }
    for name, code in expected.items():
        assert table[name].terminology_entry.type.value == code
    assert table["left upper lobe"].terminology_entry.type_modifier.meaning == "Left"
    assert table.find("lung_upper_lobe_right").name == "Right upper lobe"
    assert len({s.label for s in table}) == len(table)
    assert max(s.label for s in table) < table.user_label_start
    grown = table.extended(["my thing", "Lung", "My_Thing"])
    assert grown.label_for("my thing") == table.user_label_start and len(grown) == len(table) + 1
    assert grown.extended(["other"]).label_for("other") == table.user_label_start + 1
    round_trip = StructureTable.from_dict(grown.to_dict())
    assert round_trip.label_names() == grown.label_names()
    with pytest.raises(LCTfoundError, match="unknown structure"):
        table["spleen"]
    with pytest.raises(LCTfoundError, match="share label"):
        StructureTable.from_dict({"structures": [{"name": "a", "label": 1}, {"name": "b", "label": 1}]})


def test_segmentation_is_placed_next_to_its_volume_in_subject_hierarchy(scene, volume):
    shn = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    study = shn.CreateStudyItem(shn.GetSceneItemID(), "Study")
    shn.CreateItem(study, volume)  # in Slicer the subject hierarchy logic does this on node addition
    seg = mrml.segmentation_node_from_labels(scene, make_labels(), volume)
    assert shn.GetItemParent(shn.GetItemByDataNode(seg)) == study
