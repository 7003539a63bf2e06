"""The web app in-process (trame-slicer scene and panels, no browser, no server started):
uploads (size limit, bad files), server-side opening inside the data roots, window presets,
reviewed slices, diagnosis display, and every export read back (.seg.nrrd, NIfTI labelmap,
DICOM SEG against a derived or the original DICOM series, volumes)."""

from __future__ import annotations

import asyncio
import os
import zipfile

import numpy as np
import pytest

pytest.importorskip("trame_slicer", reason="the web app needs trame-slicer (pip install 'lctfound[web]')")
pytest.importorskip("slicer")

from data_factory import synthetic_ct, write_dicom_series  # noqa: E402
from event_loop import run_coroutine  # noqa: E402

from lctfound.io.dicom_seg import read_dicom_seg_labels  # noqa: E402
from lctfound.io.volume import read_volume, write_volume  # noqa: E402

pytestmark = [pytest.mark.mrml, pytest.mark.slow]


@pytest.fixture
def data_root(tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    ct = synthetic_ct()
    write_volume(ct, root / "chest.nrrd")
    write_dicom_series(ct, root / "dicom")
    (root / "notes.txt").write_text("not an image")
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    write_volume(ct, outside / "other.nrrd")
    return root


@pytest.fixture
def web(tmp_path, data_root, empty_cache):
    """A fresh app on its own trame server (not started), run inside one event loop."""
    os.environ.setdefault("VTK_DEFAULT_OPENGL_WINDOW", "vtkOSOpenGLRenderWindow")
    from trame.app import get_server

    from lctfound.web.app import LCTfoundWebApp
    from lctfound.web.config import WebConfig
    from lctfound.web.security import DataRoots

    config = WebConfig(data_roots=DataRoots([data_root]), max_upload_bytes=200_000,
                       export_dir=tmp_path / "exports", runs_root=tmp_path / "runs")
    server = get_server(f"lctfound-test-{tmp_path.name}", client_type="vue3")
    return LCTfoundWebApp(config, server)


def run_in_loop(body):
    async def main():
        return await body()

    return run_coroutine(main())


async def finish_load(app):
    if app._load_task is not None:
        await asyncio.wait_for(asyncio.shield(app._load_task), 60)


def upload(app, name: str, content: bytes) -> None:
    app.upload_chunk([{"name": name, "size": len(content), "content": content}])
    app.upload_chunk([])


def test_uploads_are_size_limited_and_checked(web, data_root):
    async def body():
        upload(web, "big.nrrd", b"\0" * 300_000)
        assert "upload refused" in web.state.lct_error and "200.0 KB" in web.state.lct_error
        assert web.volume_node is None
        upload(web, "notes.txt", b"hello")
        assert "not a CT file" in web.state.lct_error
        upload(web, "broken.nrrd", b"NRRD0004\nnot really\n")
        await finish_load(web)
        assert web.volume_node is None and web.state.lct_error
        upload(web, "chest.nrrd", (data_root / "chest.nrrd").read_bytes())
        await finish_load(web)
        assert web.state.lct_error == ""
        assert web.volume_node is not None and web.state.lct_volume_name == "chest"
        assert web.state.lct_volume_summary.startswith("48 × 40 × 12 voxels")

    run_in_loop(body)


def test_server_paths_stay_inside_the_data_roots(web, data_root):
    async def body():
        web.browse("")
        names = [entry["name"] for entry in web.state.lct_browse_entries]
        assert names == ["dicom", "chest.nrrd"]  # folders first; notes.txt is not a CT file
        web.open_server_path("../elsewhere/other.nrrd")
        assert "outside the data folders" in web.state.lct_browse_error and web.volume_node is None
        web.open_server_path(str(data_root.parent / "elsewhere" / "other.nrrd"))
        assert "outside the data folders" in web.state.lct_browse_error
        web._browse_clicked("dicom", True)  # a DICOM folder opens instead of being entered
        await finish_load(web)
        assert web.volume_node is not None and web.dicom_source[0] == (data_root / "dicom").resolve()

    run_in_loop(body)


def paint_lesion(app, k: int = 5):
    """Add a segment and fill a square on slice ``k`` through the Segment Editor's API."""
    editor = app.editor
    segment_id = editor.add_empty_segment(segment_name="Lesion")
    mask = np.zeros(editor.get_segment_labelmap(segment_id, as_numpy_array=True).shape, np.uint8)
    mask[k, 10:20, 15:30] = 1
    editor.active_segment_modifier.set_segment_labelmap(segment_id, mask)
    return mask.astype(bool)


def test_exports_read_back(web, data_root, tmp_path):
    from lctfound.web.export import export

    async def body():
        web.open_server_path("chest.nrrd")
        await finish_load(web)
        mask = paint_lesion(web)
        web._update_voxels(force=True)
        assert web.state.lct_voxels == {"Lesion": int(mask.sum())}
        folder = tmp_path / "exports"
        results = {kind: export(kind, web.volume_node, web.segmentation_node, folder)
                   for kind in ("seg_nrrd", "labelmap", "dicom_seg", "volume_nifti", "volume_nrrd")}
        return mask, results

    mask, results = run_in_loop(body)
    import SimpleITK as sitk

    seg = sitk.ReadImage(str(results["seg_nrrd"].path))
    assert seg.GetMetaData("Segment0_Name") == "Lesion"
    assert np.array_equal(sitk.GetArrayFromImage(seg) > 0, mask)
    labels = read_volume(results["labelmap"].path, labels=True)
    assert np.array_equal(labels.array > 0, mask) and "= Lesion" in results["labelmap"].note
    ct = read_volume(data_root / "chest.nrrd")
    for kind in ("volume_nifti", "volume_nrrd"):
        assert np.array_equal(read_volume(results[kind].path).array, ct.array)
    # The CT came from NRRD: the SEG references a derived CT series, both in the zip.
    bundle = results["dicom_seg"]
    assert bundle.path.suffix == ".zip" and bundle.download_name.endswith("_seg_and_ct.zip")
    with zipfile.ZipFile(bundle.path) as archive:
        archive.extractall(tmp_path / "unzipped")
    import pydicom

    sources = sorted((pydicom.dcmread(str(p)) for p in (tmp_path / "unzipped").glob("*_ct/*.dcm")),
                     key=lambda ds: int(ds.InstanceNumber))
    assert len(sources) == 12
    derived = np.stack([ds.pixel_array for ds in sources])
    assert np.array_equal(derived, ct.array)
    seg_labels, names = read_dicom_seg_labels(next((tmp_path / "unzipped").glob("*.seg.dcm")), sources)
    assert names == {1: "Lesion"} and np.array_equal(seg_labels == 1, mask)
    # Nothing is overwritten: a second export gets a new name.
    first = results["seg_nrrd"].path
    assert first.exists() and first.name == "Segmentation.seg.nrrd" or first.name.endswith(".seg.nrrd")


def test_dicom_seg_references_the_original_series(web, data_root, tmp_path):
    from lctfound.web.export import export

    async def body():
        web.open_server_path("dicom")
        await finish_load(web)
        mask = paint_lesion(web, k=3)
        return mask, export("dicom_seg", web.volume_node, web.segmentation_node, tmp_path / "exports",
                            web.dicom_source)

    mask, result = run_in_loop(body)
    assert result.path.suffix == ".dcm" and "original CT series" in result.note
    import pydicom

    originals = sorted((pydicom.dcmread(str(p), stop_before_pixels=True) for p in (data_root / "dicom").iterdir()),
                       key=lambda ds: float(ds.ImagePositionPatient[2]))
    labels, names = read_dicom_seg_labels(result.path, originals)
    assert names == {1: "Lesion"} and np.array_equal(labels == 1, mask)
    seg = pydicom.dcmread(str(result.path))
    assert seg.StudyInstanceUID == originals[0].StudyInstanceUID


def test_exports_need_data(web, tmp_path):
    from lctfound.errors import LCTfoundError
    from lctfound.web.export import export

    with pytest.raises(LCTfoundError, match="open a CT first"):
        export("seg_nrrd", None, None, tmp_path)
    assert web.export_panel.export("seg_nrrd") is None
    assert "export failed: open a CT first" in web.state.lct_error


def test_review_window_and_slice_navigation(web):
    async def body():
        web.open_server_path("chest.nrrd")
        await finish_load(web)
        panel = web.segmentation_panel
        web.go_to_slice(7)
        assert web.current_slice() == 7
        web._update_axial()
        assert web.state.lct_axial["k"] == 7 and web.state.lct_axial["slices"] == 12
        panel.mark_reviewed(True)
        web.go_to_slice(2)
        panel.mark_reviewed(True)
        assert panel.get("reviewed") == "2,7"
        panel.mark_reviewed(False)
        assert panel.get("reviewed") == "7"
        web.apply_window("lung")
        display = web.volume_node.GetDisplayNode()
        assert (display.GetWindow(), display.GetLevel()) == (1500.0, -500.0)
        # The panel's parameters reach the module logic: no painted slice, no model name problem.
        panel.set("new_model_name", "")
        panel.refresh()
        assert panel.get("new_model_name") == "fewshot"
        panel.set("new_model_name", "bad name!")
        panel.refresh()
        assert not panel.get("train")["enabled"] and "model name" in panel.get("train")["tooltip"]

    run_in_loop(body)


def test_diagnosis_rows_and_saliency_overlay(web):
    from lctfound.mrml import ctvolume_from_volume_node, volume_node_from_ctvolume

    async def body():
        web.open_server_path("chest.nrrd")
        await finish_load(web)
        panel = web.segmentation_panel
        ct = ctvolume_from_volume_node(web.volume_node)
        saliency = volume_node_from_ctvolume(web.scene, ct.with_array(np.random.rand(*ct.shape).astype(np.float32)),
                                             name="saliency")
        panel.logic.diagnosis_rows = [{"predicted": "nodule", "probability_nodule": "0.9", "note": "research"}]
        panel.logic.saliency_volume = saliency
        panel._show_diagnosis()
        assert panel.get("diagnosis_rows")[0]["predicted"] == "nodule"
        assert [h["key"] for h in panel.get("diagnosis_headers")] == ["predicted", "probability_nodule", "note"]
        views = web.slicer.view_manager.get_slice_views()
        assert all(view.get_foreground_volume_id() == saliency.GetID() for view in views)
        panel._show_saliency(False)
        assert all(view.get_foreground_volume_id() is None for view in views)

    run_in_loop(body)


def test_train_panel_starts_cancels_and_stops_jobs_at_exit(web):
    """A real training job from the loaded CT: Start, progress published, Cancel (process tree
    ended), then a second run stopped by the app's shutdown (no job outlives the server)."""
    import psutil

    from lctfound.logic import RunState

    async def wait_busy_end(panel, timeout=60.0):
        deadline = asyncio.get_event_loop().time() + timeout
        while panel.busy:
            assert asyncio.get_event_loop().time() < deadline, panel.logic.status_summary()
            panel.tick()
            await asyncio.sleep(0.1)
        panel.tick()

    async def body():
        web.open_server_path("chest.nrrd")
        await finish_load(web)
        panel = web.train_panel
        panel.set("task", "pretrain")
        panel.refresh()
        panel.set("data_source", "volumes")
        for name, value in (("resolution", 32), ("patch_size", 0), ("batch_size", 1), ("max_steps", 50),
                            ("checkpoint_every", 25), ("new_model_name", "web-pretrain")):
            panel.set(name, value)
        panel.refresh()
        assert panel.get("start")["enabled"], panel.get("start")["tooltip"]
        panel.start()
        assert web.state.lct_error == "" and panel.busy
        assert panel.get("progress")["visible"] and panel.get("runs") == 1
        assert panel.get("cancel_button")["enabled"]
        process = psutil.Process(panel.logic.job.pid)
        panel.cancel()
        await wait_busy_end(panel)
        assert panel.logic.state is RunState.CANCELLED and "Cancelled" in panel.get("status")
        assert not process.is_running() or process.status() == psutil.STATUS_ZOMBIE
        assert not panel.get("resume")["enabled"] and "Nothing to resume" in panel.get("resume")["tooltip"]
        # Opening another CT is refused while a job runs; the app's exit stops the job.
        panel.start()
        assert panel.busy
        web.open_server_path("chest.nrrd")
        assert "cancel it first" in web.state.lct_error
        process = psutil.Process(panel.logic.job.pid)
        web.shutdown()
        process.wait(timeout=30)

    run_in_loop(body)


def test_enhance_panel_runs_a_task_and_compares(web):
    """A real enhancement job (bicubic super-resolution, no model needed) through the Enhance
    panel, then the input/result comparison as a slider and side by side."""
    from lctfound.logic import RunState
    from lctfound.web.enhance_panel import COMPARE_LAYOUT, RESULT_VIEW

    async def body():
        web.open_server_path("chest.nrrd")
        await finish_load(web)
        panel = web.enhance_panel
        panel.set("task", "super-resolution")
        panel.set("interpolation", "bicubic")
        panel.set("factor", 2)
        panel.refresh()
        assert "model_name" not in panel.get("visible") or panel.get("start")["enabled"]
        assert panel.get("start")["enabled"], panel.get("start")["tooltip"]
        panel.start()
        deadline = asyncio.get_event_loop().time() + 600
        while panel.busy or panel.logic.job is None:
            assert asyncio.get_event_loop().time() < deadline, panel.logic.status_summary()
            panel.tick()
            await asyncio.sleep(0.2)
        panel.tick()
        assert panel.logic.state is RunState.FINISHED, panel.logic.status_summary()
        result = panel.logic.result_volume
        assert panel.get("result_name") == result.GetName() and panel.get("has_input")
        assert result.GetImageData().GetDimensions() == (96, 80, 12)
        red = web.axial_view()
        assert red.get_background_volume_id() == web.volume_node.GetID()
        assert red.get_foreground_volume_id() == result.GetID()
        panel.set("opacity", 0.3)
        panel._set_opacity()
        assert abs(red.get_foreground_opacity() - 0.3) < 1e-6
        panel.set("compare_mode", "side")
        panel.show_comparison()
        web.state.flush()
        assert web.layout_logic.layout_manager.layout_id == COMPARE_LAYOUT
        side = web.slicer.view_manager.get_view(RESULT_VIEW)
        assert side.get_background_volume_id() == result.GetID() and red.get_foreground_volume_id() is None
        web.go_to_slice(9)
        web.sync_result_view()
        assert side.get_slice_value() == red.get_slice_value()
        # the same framing (the ×2 result is not shown zoomed in)
        red_node, side_node = red.get_view_node(), side.get_view_node()
        assert np.allclose(side_node.GetFieldOfView(), red_node.GetFieldOfView())
        assert np.allclose(side_node.GetXYZOrigin(), red_node.GetXYZOrigin())
        web.open_server_path("chest.nrrd")  # a new CT ends the comparison
        await finish_load(web)
        web.state.flush()
        assert panel.get("result_name") == "" and web.layout_logic.layout_manager.layout_id != COMPARE_LAYOUT

    run_in_loop(body)


def test_training_tables_naming_files_outside_the_roots_are_refused(web, data_root):
    """A CSV inside the data root whose rows point outside it (even to /etc/shadow) is refused
    before anything runs; a folder of pairs with a link out likewise (issue 12, rule 8)."""
    secret = data_root.parent / "elsewhere" / "other.nrrd"
    (data_root / "cases.csv").write_text(f"image,label\nchest.nrrd,clear\n{secret}\t,cancer\n/etc/shadow,cancer\n")
    pairs = data_root / "pairs"
    pairs.mkdir()
    os.symlink(data_root / "chest.nrrd", pairs / "a_image.nrrd")
    os.symlink(secret, pairs / "a_label.nrrd")

    async def body():
        panel = web.train_panel
        panel.set("task", "finetune-classification")
        panel.refresh()
        panel.set("data_source", "table")
        panel.set("table_path", "cases.csv")
        panel.refresh()
        assert not panel.get("start")["enabled"]
        assert "outside the data folders" in panel.get("start")["tooltip"]
        assert "outside the data folders" in panel.get("data_summary")
        panel.start()
        assert "outside the data folders" in web.state.lct_error and not panel.busy
        assert not list((web.config.runs_root).glob("*")) if web.config.runs_root.exists() else True
        panel.set("task", "finetune-segmentation")
        panel.refresh()
        panel.set("data_source", "folder")
        panel.set("data_folder", "pairs")
        panel.refresh()
        assert "a_label.nrrd" in panel.get("start")["tooltip"] and not panel.get("start")["enabled"]

    run_in_loop(body)


def test_upload_errors_do_not_show_the_server_temporary_folder(web):
    async def body():
        upload(web, "broken.nii.gz", b"\x1f\x8b\x08\x00garbage")
        await finish_load(web)
        assert web.volume_node is None and web.state.lct_error
        assert "lctfound-web-upload" not in web.state.lct_error and "/tmp" not in web.state.lct_error
        assert "broken.nii.gz" in web.state.lct_error

    run_in_loop(body)


@pytest.fixture(scope="module")
def lctfound_server(tmp_path_factory):
    pytest.importorskip("httpx")
    from server_helpers import Server

    folder = tmp_path_factory.mktemp("web-server")
    running = Server(folder / "data", folder / "server-cache")
    yield running
    running.stop()


def test_run_on_a_server_in_the_panels(web, data_root, tmp_path, lctfound_server, monkeypatch):
    """Every panel has the same "Run on" rows (the shared panel base): the token file must lie in a data
    folder (this web server's own token never goes to an address a browser chose); Enhance runs low-dose
    TV on the server into a new volume; Train says training is no server task."""
    from lctfound.logic import RunState
    from lctfound.mrml.volumes import get_provenance

    monkeypatch.setenv("LCTFOUND_SERVER_TOKEN", lctfound_server.token)  # never used by the web panels
    monkeypatch.setenv("LCTFOUND_CLIENT_ID", "web-desk")
    (data_root / "token").write_text(lctfound_server.token + "\n")
    (tmp_path / "elsewhere" / "token").write_text(lctfound_server.token + "\n")

    for name in ("lct-seg", "lct-enh", "lct-train"):  # the rows of the shared base, in each panel
        assert f'id="{name}-run-on"' in web.ui.html and f'id="{name}-test-connection"' in web.ui.html

    async def body():
        web.open_server_path("chest.nrrd")
        await finish_load(web)
        panel = web.enhance_panel
        panel.set("task", "low-dose")
        panel.set("denoiser", "tv")
        panel.set("server_url", lctfound_server.url)
        panel.refresh()
        assert "device" not in panel.get("visible")
        assert not panel.get("start")["enabled"] and "Test connection" in panel.get("start")["tooltip"]
        panel.test_connection()
        assert panel.get("connection").startswith("Enter the token file") and panel.logic.server is None
        panel.set("server_token_file", str(tmp_path / "elsewhere" / "token"))
        panel.test_connection()
        assert "data folder" in panel.get("connection") and panel.logic.server is None
        panel.set("server_token_file", "token")
        panel.test_connection()
        assert panel.get("connection").startswith(f"connected to {lctfound_server.url}"), panel.get("connection")
        assert all(item["title"].endswith("(on the server)") for item in panel.get("model_name_items"))
        assert panel.get("start")["enabled"], panel.get("start")["tooltip"]
        panel.start()
        deadline = asyncio.get_event_loop().time() + 600  # a hang guard, not a speed requirement
        while panel.busy or panel.logic.job is None:
            assert asyncio.get_event_loop().time() < deadline, panel.logic.status_summary()
            panel.tick()
            await asyncio.sleep(0.2)
        panel.tick()
        assert panel.logic.state is RunState.FINISHED, panel.logic.status_summary()
        assert "--server" in panel.logic.job.command
        result = panel.logic.result_volume
        assert result is not web.volume_node and get_provenance(result)["server"] == lctfound_server.url
        assert panel.get("result_name") == result.GetName()

        train = web.train_panel
        train.set("server_url", lctfound_server.url)
        train.refresh()
        for button in ("start", "resume"):
            assert not train.get(button)["enabled"]
            assert train.get(button)["tooltip"].startswith("Pretraining and fine-tuning run on this computer only")
        train.set("server_url", "")
        train.refresh()
        assert not train.get("start")["tooltip"].startswith("Pretraining")

    run_in_loop(body)
