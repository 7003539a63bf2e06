"""The LCTfound web app: trame-slicer views and Segment Editor plus the LCTfound panels.

Composition, not subclassing: the app is its own `TrameApp` assembled from trame-slicer's
public building blocks (``SlicerApp``, ``register_rca_factories``, ``LayoutManager`` through
``LayoutButtonLogic``, ``SegmentEditorLogic``/``SegmentEditorUI``, ``VolumePropertyLogic``/``UI``)
rather than a ``SegmentationApp`` subclass, because ``SegmentationApp`` 2.0.0 exposes its
scene and sub-logics only as private attributes, points its favicon and "about" image at
GitHub (requests leaving the machine), and loads uploads without a size limit or our error
messages. Everything the panels do goes through the same Qt-free logic classes as the Slicer
modules (`lctfound.logic`), on this app's MRML scene.

State keys of this app start with ``lct_``. Two of them exist for scripted clients (the
browser tests, automation): ``lct_voxels`` (voxel count per segment of the segmentation being
edited) and ``lct_axial`` (the axial view's slice index and IJK → view-pixel matrix).
"""

from __future__ import annotations

import asyncio
import atexit
import base64
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
from trame.app import TrameApp
from trame.ui.vuetify3 import VAppLayout
from trame.widgets import client, html
from trame.widgets import vuetify3 as v3
from trame_server.utils.typed_state import TypedState
from trame_slicer import module as trame_slicer_module
from trame_slicer.app.logic import (
    LayoutButtonLogic,
    MprInteractionButtonLogic,
    SegmentEditorLogic,
    VolumePropertyLogic,
)
from trame_slicer.app.ui import (
    ControlButton,
    LayoutButton,
    MprInteractionButton,
    PaintEffectState,
    SegmentEditorToolbarUI,
    SegmentEditorUI,
    SegmentEditorUndoRedoUI,
    ViewerLayoutState,
    VolumePropertyUI,
)
from trame_slicer.core import SlicerApp
from trame_slicer.rca_view import register_rca_factories

from ..errors import InputError, LCTfoundError
from ..io.volume import CTVolume
from .config import WebConfig
from .loading import FILE_SUFFIXES, read_path, read_sample, upload_kind
from ..compat import strict_zip
from .security import UploadBudget, hide_folder, safe_file_name

logger = logging.getLogger(__name__)

#: A 1×1 transparent PNG: the page's favicon, inline so the browser requests nothing.
FAVICON = "data:image/png;base64," + base64.b64encode(bytes.fromhex(
    "89504e470d0a1a0a0000000d4948445200000001000000010806000000"
    "1f15c4890000000d49444154789c636060606000000005000162dd4e95"
    "0000000049454e44ae426082")).decode()

#: Drawer panels, in toolbar order: (tool id, icon, tooltip).
TOOLS = (
    ("segmentation", "mdi-auto-fix", "LCTfound segmentation: train, predict, review"),
    ("editor", "mdi-format-paint", "Segment Editor: paint, erase, threshold, islands, scissors, smoothing"),
    ("enhance", "mdi-image-filter-center-focus",
     "LCTfound enhancement: low dose, sparse view, super-resolution, virtual CTA, synthetic CT"),
    ("train", "mdi-school", "LCTfound training: pretrain or fine-tune models"),
    ("export", "mdi-download", "Export segmentation and volume files"),
    ("volume", "mdi-tune-variant", "Volume display properties"),
)
POLL_INTERVAL_S = 0.25
VOXEL_COUNT_INTERVAL_S = 0.3
#: How long a success message stays over the views.
INFO_SECONDS = 6.0


def _matrix_list(matrix: Any) -> list[float]:
    return [float(matrix.GetElement(r, c)) for r in range(4) for c in range(4)]


class LCTfoundWebApp(TrameApp):
    """One user's LCTfound session: the scene, the views and the panels (see the module docstring)."""

    def __init__(self, config: WebConfig, server: Any = None):
        super().__init__(server, client_type="vue3")
        self.config = config
        self.server.enable_module(trame_slicer_module)  # window.load_files_by_chunks (chunked uploads)
        self.slicer = SlicerApp()
        self._adopt_segmentations_logic()
        register_rca_factories(self.slicer.view_manager, self.server)
        self.editor_logic = SegmentEditorLogic(self.server, self.slicer)
        self.volume_property_logic = VolumePropertyLogic(self.server, self.slicer)
        self.layout_logic = LayoutButtonLogic(self.server, self.slicer)
        self.mpr_logic = MprInteractionButtonLogic(self.server, self.slicer)
        self.layout_state = TypedState(self.state, ViewerLayoutState)
        # A 2D brush by default: few-shot training takes whole slices as fully labelled, and a
        # sphere brush would leave partial labels on the neighbouring slices.
        TypedState(self.state, PaintEffectState).data.use_sphere_brush = False

        self.volume_node: Any = None
        self.reference_labels: Optional[CTVolume] = None  # the sample's lesion label (shown as a count)
        self.dicom_source: Optional[tuple[Path, str]] = None  # (folder, series UID) of a DICOM CT
        self._upload_dir: Optional[Path] = None
        self._upload_files: list[dict] = []
        self._upload_budget: Optional[UploadBudget] = None
        self._load_task: Optional[asyncio.Task] = None
        self._voxels_dirty = True
        self._voxels_at = 0.0
        self._axial_mtime = -1
        self._poll_task: Optional[asyncio.Task] = None
        self._info_at = 0.0

        from .enhance_panel import EnhancePanel
        from .export_panel import ExportPanel
        from .segmentation_panel import SegmentationPanel
        from .train_panel import TrainPanel

        self.segmentation_panel = SegmentationPanel(self)
        self.enhance_panel = EnhancePanel(self)
        self.train_panel = TrainPanel(self)
        self.export_panel = ExportPanel(self)
        self.panels = (self.segmentation_panel, self.enhance_panel, self.train_panel, self.export_panel)

        self._init_state()
        self.editor.segmentation_modified.connect(self._mark_voxels_dirty)
        self.editor.active_segment_id_changed.connect(lambda *_: self._mark_voxels_dirty())
        self._build_ui()
        self.server.controller.on_server_ready.add(self._on_server_ready)
        self.server.controller.on_server_exited.add(lambda **_: self.shutdown())
        atexit.register(self.shutdown)

    # -- plumbing ----------------------------------------------------------------------------

    @property
    def editor(self):
        return self.slicer.segmentation_editor

    @property
    def scene(self):
        return self.slicer.scene

    @property
    def segmentation_node(self):
        """The segmentation being edited (the Segment Editor's active one)."""
        return self.editor.active_segmentation_node

    def _adopt_segmentations_logic(self) -> None:
        """Let `lctfound.mrml` use the SlicerApp's segmentations logic (a second logic on the
        same scene would register the converter rules and scene observers twice)."""
        from ..mrml import ensure_segmentations_logic

        ensure_segmentations_logic(self.scene, self.slicer.segmentations_logic)

    def _init_state(self) -> None:
        state = self.state
        state.trame__title = self.config.title
        state.trame__favicon = FAVICON
        state.lct_error = ""
        state.lct_info = ""
        state.lct_loading = False
        state.lct_load_message = ""
        state.lct_volume_name = ""
        state.lct_volume_summary = ""
        state.lct_voxels = {}
        state.lct_reference_voxels = 0
        state.lct_axial = {"k": -1, "slices": 0, "size": [0, 0], "ijk_to_xy": []}
        state.lct_upload_limit = self.config.max_upload_bytes
        state.lct_upload_limit_text = f"{self.config.max_upload_bytes / 1e6:g} MB"
        state.lct_open_dialog = False
        roots = self.config.data_roots.roots
        state.lct_roots = [{"title": str(root), "value": number} for number, root in enumerate(roots)]
        state.lct_root = 0 if roots else None
        state.lct_browse_path = ""
        state.lct_browse_entries = []
        state.lct_browse_error = "" if roots else "This server opens no server-side files (start it with --data-root)."
        state.lct_window = "mediastinal"
        self.layout_state.data.is_drawer_visible = True
        self.layout_state.data.active_tool = "segmentation"
        self.layout_state.data.is_volume_loaded = False

    def _on_server_ready(self, **_: Any) -> None:
        if self._poll_task is None:
            self._poll_task = asyncio.get_event_loop().create_task(self._poll_loop())

    async def _poll_loop(self) -> None:
        while True:
            await asyncio.sleep(POLL_INTERVAL_S)
            try:
                with self.state:
                    for panel in self.panels:
                        panel.tick()
                    self._update_axial()
                    self._update_voxels()
                    if self.state.lct_info and time.monotonic() - self._info_at > INFO_SECONDS:
                        self.state.lct_info = ""
            except Exception:  # noqa: BLE001 - the loop must survive; the traceback goes to the log
                logger.exception("web app tick failed")

    def shutdown(self) -> None:
        """Stop every running job (their process trees) and drop the uploaded files: a job must
        not outlive the server that would read its result."""
        for panel in self.panels:
            job = getattr(getattr(panel, "logic", None), "job", None)
            if job is not None and panel.busy:
                logger.warning("stopping the running %s job at server exit", panel.logic.task_name)
                job.cancel()
        if self._upload_dir is not None:
            shutil.rmtree(self._upload_dir, ignore_errors=True)
            self._upload_dir = None

    def show_error(self, message: str) -> None:
        self.state.lct_error = message
        self.state.lct_info = ""

    def show_info(self, message: str) -> None:
        self.state.lct_info = message
        self._info_at = time.monotonic()

    def run_guarded(self, action: Callable[[], Any], what: str) -> Any:
        """Run ``action``; a user mistake becomes the page's error line, a bug its type and message."""
        self.state.lct_error = ""
        try:
            return action()
        except LCTfoundError as error:
            self.show_error(str(error))
        except Exception as error:  # noqa: BLE001 - shown in the page, traceback in the log
            logger.exception("%s failed", what)
            self.show_error(f"{what} failed: {type(error).__name__}: {error}")
        return None

    def busy_job(self) -> str:
        for panel in self.panels:
            if panel.busy:
                return panel.busy_message()
        return ""

    # -- loading -----------------------------------------------------------------------------

    def start_load(self, description: str, read: Callable[[], Any], dicom_source: Optional[tuple[Path, str]] = None,
                   cleanup: Optional[Callable[[], None]] = None) -> None:
        """Read a CT in a worker thread (progress bar, Cancel), then show it."""
        busy = self.busy_job()
        if busy:
            self.show_error(f"cannot open another CT while {busy}; cancel it first")
            if cleanup:
                cleanup()
            return
        if self._load_task is not None and not self._load_task.done():
            self.show_error("a CT is already being opened; wait for it or cancel it")
            if cleanup:
                cleanup()
            return
        self.state.lct_error = ""
        self.state.lct_loading = True
        self.state.lct_load_message = description
        self._load_task = asyncio.get_event_loop().create_task(self._load(description, read, dicom_source, cleanup))

    async def _load(self, description: str, read: Callable[[], Any], dicom_source, cleanup) -> None:
        try:
            result = await asyncio.to_thread(read)
            with self.state:
                self.run_guarded(lambda: self._show(result, dicom_source), "opening the CT")
        except asyncio.CancelledError:
            with self.state:
                self.show_info(f"cancelled: {description}")
            if cleanup:
                cleanup()
            raise
        except LCTfoundError as error:
            with self.state:
                self.show_error(str(error))
            if cleanup:
                cleanup()
        except Exception as error:  # noqa: BLE001 - shown in the page
            logger.exception("reading %s failed", description)
            with self.state:
                self.show_error(f"could not read the CT: {type(error).__name__}: {error}")
            if cleanup:
                cleanup()
        finally:
            with self.state:
                self.state.lct_loading = False
                self.state.lct_load_message = ""

    def cancel_load(self) -> None:
        if self._load_task is not None and not self._load_task.done():
            self._load_task.cancel()

    def _show(self, result: Any, dicom_source: Optional[tuple[Path, str]]) -> None:
        from ..mrml import volume_node_from_ctvolume

        ct, reference = result if isinstance(result, tuple) else (result, None)
        busy = self.busy_job()
        if busy:
            raise LCTfoundError(f"cannot open another CT while {busy}; cancel it first")
        # trame-slicer 2.0.0: effect pipelines created before the views exist break Paint/Erase
        # until the scene is cleared once (see the trame-slicer probe, §4.5); a new CT replaces
        # the old one anyway.
        self.scene.Clear()
        name = str(ct.metadata.get("name") or "CT")
        node = volume_node_from_ctvolume(self.scene, ct, name=name, window=self.state.lct_window)
        self.volume_node = node
        self.reference_labels = reference
        self.dicom_source = dicom_source
        self.slicer.display_manager.show_volume(node, do_reset_views=True)
        self.volume_property_logic.on_volume_changed(node)
        self.editor_logic.on_volume_changed(node)
        data = self.layout_state.data
        data.is_volume_loaded = True
        data.is_drawer_visible = True
        k, j, i = ct.shape
        spacing = " × ".join(f"{s:.3g}" for s in ct.spacing)
        shrunk = f"; {ct.metadata['shrunk']}" if ct.metadata.get("shrunk") else ""
        self.state.lct_volume_name = node.GetName()
        self.state.lct_volume_summary = f"{i} × {j} × {k} voxels, {spacing} mm{shrunk}"
        self.state.lct_reference_voxels = int((reference.array > 0).sum()) if reference is not None else 0
        self._axial_mtime = -1
        self._mark_voxels_dirty()
        for panel in self.panels:
            panel.on_volume_changed()
        self.show_info(f"opened {node.GetName()}")

    # sample
    def load_sample(self, name: str) -> None:
        options = self.config.sample
        self.start_load(f"loading the {name} sample CT", lambda: read_sample(name, options))

    # server-side path
    def browse(self, path: Optional[str] = None) -> None:
        roots = self.config.data_roots
        state = self.state
        state.lct_browse_error = ""
        if not roots:
            state.lct_browse_error = "This server opens no server-side files (start it with --data-root)."
            return
        path = state.lct_browse_path if path is None else path
        try:
            entries = roots.listing(path, state.lct_root, FILE_SUFFIXES)
        except LCTfoundError as error:
            state.lct_browse_error = str(error)
            return
        folder = roots.resolve(path, state.lct_root)
        state.lct_browse_path = roots.relative(folder, int(state.lct_root or 0))
        rows = [{"name": "..", "is_dir": True, "size": ""}] if state.lct_browse_path else []
        rows += [{"name": e.name, "is_dir": e.is_dir, "size": "" if e.is_dir else f"{e.size / 1e6:.1f} MB"}
                 for e in entries]
        state.lct_browse_entries = rows

    def browse_into(self, name: str) -> None:
        current = self.state.lct_browse_path
        target = str(Path(current).parent) if name == ".." else (f"{current}/{name}" if current else name)
        self.browse("" if target == "." else target)

    def open_server_path(self, path: Optional[str] = None) -> None:
        roots = self.config.data_roots
        state = self.state
        text = state.lct_browse_path if path is None else path
        try:
            real = roots.resolve_input(text, state.lct_root)
        except LCTfoundError as error:
            state.lct_browse_error = str(error)
            return
        state.lct_open_dialog = False
        dicom = None
        if real.is_dir():
            dicom = (real, "")
        self.start_load(f"opening {real.name}", lambda: self._read_named(real), dicom_source=dicom)

    @staticmethod
    def _read_named(path: Path) -> CTVolume:
        ct = read_path(path)
        ct.metadata["name"] = ct.metadata.get("name") or _volume_name(path)
        return ct

    # upload
    def upload_chunk(self, files: list[dict]) -> None:
        """One chunk of an upload (trame's chunked file transfer); an empty list ends it."""
        state = self.state
        if files:
            if self._upload_budget is None:
                self._upload_budget = UploadBudget(self.config.max_upload_bytes)
                self._upload_files = []
            for entry in files:
                content = entry.get("content") or b""
                size = sum(len(part) for part in content) if isinstance(content, list) else len(content)
                if self._upload_budget.add(size):
                    self._upload_files.append(entry)
            if self._upload_budget.exceeded:
                self._upload_files = []
            return
        budget, received = self._upload_budget, self._upload_files
        self._upload_budget, self._upload_files = None, []
        if budget is None:
            return
        if budget.exceeded:
            self.show_error(budget.message())
            state.lct_loading = False
            return
        self.run_guarded(lambda: self._start_upload_load(received), "opening the upload")

    def _start_upload_load(self, files: list[dict]) -> None:
        from trame.app.file_upload import ClientFile

        names = [safe_file_name(entry.get("name", "")) for entry in files]
        kind = upload_kind(names)
        if self._upload_dir is not None:
            shutil.rmtree(self._upload_dir, ignore_errors=True)
        folder = Path(tempfile.mkdtemp(prefix="lctfound-web-upload-"))
        self._upload_dir = folder
        for number, (entry, name) in enumerate(strict_zip(files, names)):
            # DICOM slices may share names across sub-folders: keep them apart.
            target = folder / (name if kind == "file" else f"{number:05d}-{name}")
            target.write_bytes(ClientFile(entry).content or b"")
        path = folder / names[0] if kind == "file" else folder
        dicom = (folder, "") if kind == "dicom" else None

        def read() -> CTVolume:
            # Messages name the uploaded file, never the server's temporary folder.
            try:
                return self._read_named(path)
            except LCTfoundError as error:
                raise InputError(hide_folder(str(error), folder)) from None
            except Exception as error:  # noqa: BLE001 - a reader's bug: traceback to the log, one line to the page
                logger.exception("reading an upload failed")
                raise InputError(hide_folder(f"could not read the upload: {type(error).__name__}: {error}",
                                             folder)) from None

        self.start_load(f"opening {names[0] if kind == 'file' else f'{len(names)} DICOM files'}", read,
                        dicom_source=dicom)

    # window presets
    def apply_window(self, preset: str) -> None:
        from ..mrml import apply_window_preset

        self.state.lct_window = preset
        if self.volume_node is not None:
            apply_window_preset(self.volume_node, preset)

    # -- slice views -------------------------------------------------------------------------

    def axial_view(self):
        """The main axial view (Slicer's "Red"; the Enhance panel may add a second axial view)."""
        return self.slicer.view_manager.get_view("Red")

    def sync_result_view(self) -> None:
        """Show in the side-by-side result view what the axial view shows: same slice, same framing."""
        from .enhance_panel import RESULT_VIEW

        red, result = self.axial_view(), self.slicer.view_manager.get_view(RESULT_VIEW)
        if red is None or result is None:
            return
        red_node, result_node = red.get_view_node(), result.get_view_node()
        # Same field of view and in-plane position, so a higher-resolution result is not shown zoomed.
        result_node.SetFieldOfView(*red_node.GetFieldOfView())
        result_node.SetXYZOrigin(*red_node.GetXYZOrigin())
        result_node.GetSliceToRAS().DeepCopy(red_node.GetSliceToRAS())
        result_node.UpdateMatrices()

    def current_slice(self) -> Optional[int]:
        """The axial slice (K index of the volume) shown in the axial view."""
        from ..logic.segmentation import slice_index_at

        view = self.axial_view()
        if view is None or self.volume_node is None:
            return None
        slice_to_ras = view.get_view_node().GetSliceToRAS()
        point = [slice_to_ras.GetElement(r, 3) for r in range(3)]
        try:
            return slice_index_at(self.volume_node, point)
        except LCTfoundError:
            return None

    def go_to_slice(self, k: int) -> None:
        """Show slice ``k`` in the axial view."""
        from ..mrml.volumes import ijk_to_ras_of

        view = self.axial_view()
        if view is None or self.volume_node is None:
            return
        slices = self.volume_node.GetImageData().GetDimensions()[2]
        k = min(max(int(k), 0), slices - 1)
        slice_to_ras = view.get_view_node().GetSliceToRAS()
        normal = np.array([slice_to_ras.GetElement(r, 2) for r in range(3)])
        point = ijk_to_ras_of(self.volume_node) @ np.array([0.0, 0.0, float(k), 1.0])
        view.set_slice_value(float(normal @ point[:3]))

    def _update_axial(self) -> None:
        from ..mrml.volumes import ijk_to_ras_of

        view = self.axial_view()
        if view is None or self.volume_node is None:
            return
        node = view.get_view_node()
        mtime = node.GetMTime()
        if mtime == self._axial_mtime:
            return
        self._axial_mtime = mtime
        xy_to_ras = np.array(_matrix_list(node.GetXYToRAS())).reshape(4, 4)
        ijk_to_xy = np.linalg.inv(xy_to_ras) @ ijk_to_ras_of(self.volume_node)
        k = self.current_slice()
        self.state.lct_axial = {
            "k": -1 if k is None else int(k),
            "slices": int(self.volume_node.GetImageData().GetDimensions()[2]),
            "size": [int(d) for d in node.GetDimensions()[:2]],
            "ijk_to_xy": [float(x) for x in ijk_to_xy.reshape(-1)],
        }
        for panel in self.panels:
            panel.on_slice_changed(k)
        self.sync_result_view()

    # -- voxel counts --------------------------------------------------------------------------

    def _mark_voxels_dirty(self, *_: Any) -> None:
        self._voxels_dirty = True

    def segment_voxels(self) -> dict[str, int]:
        """{segment name: voxel count} of the segmentation being edited."""
        editor = self.editor
        if editor.active_segmentation is None:
            return {}
        counts = {}
        for segment_id, properties in editor.get_all_segment_properties().items():
            mask = editor.get_segment_labelmap(segment_id, as_numpy_array=True)
            counts[properties.name] = int(np.count_nonzero(mask)) if mask is not None else 0
        return counts

    def _update_voxels(self, force: bool = False) -> None:
        now = time.monotonic()
        if not (self._voxels_dirty or force) or (not force and now - self._voxels_at < VOXEL_COUNT_INTERVAL_S):
            return
        self._voxels_dirty = False
        self._voxels_at = now
        counts = self.segment_voxels()
        if counts != self.state.lct_voxels:
            self.state.lct_voxels = counts
            for panel in self.panels:  # button states depend on what is painted
                if not panel.busy:
                    panel.refresh()

    # -- UI ----------------------------------------------------------------------------------

    def _tool_active(self, tool: str) -> str:
        return f"{self.layout_state.name.active_tool} === '{tool}'"

    def _select_tool(self, tool: str) -> None:
        data = self.layout_state.data
        visible = not data.is_drawer_visible or data.active_tool != tool
        data.is_drawer_visible = visible
        data.active_tool = tool if visible else None

    def _build_ui(self) -> None:
        names = self.layout_state.name
        with VAppLayout(self.server, template_name="main", theme="dark") as self.ui:
            client.Style("html { overflow-y: auto; } .lct-small { font-size: 0.8rem; }")
            with v3.VAppBar(density="compact"):
                html.Div(self.config.title, classes="text-h6 mx-4", style="user-select: none;")
                self._build_open_controls()
                v3.VSpacer()
                html.Div("{{ lct_volume_name }} {{ lct_volume_summary ? '(' + lct_volume_summary + ')' : '' }}",
                         classes="text-caption mx-2", id="lct-volume", title=("lct_volume_summary",),
                         style="white-space: nowrap; overflow: hidden; text-overflow: ellipsis; max-width: 45vw;")
                with v3.VBtnToggle(v_model=("lct_window",), mandatory=True, density="compact", classes="mx-2",
                                   update_modelValue=(self.apply_window, "[$event]")):
                    v3.VBtn("Lung", value="lung", id="lct-window-lung", size="small")
                    v3.VBtn("Mediastinal", value="mediastinal", id="lct-window-mediastinal", size="small")

            with v3.VFooter(app=True, classes="my-0 py-0", border=True):
                v3.VProgressCircular(indeterminate=("!!trame__busy",), color="#04a94d", size=16, width=3,
                                     classes="ml-n3 mr-1")
                html.Span("LCTfound web — one user per server process", classes="text-caption text-grey")

            with v3.VMain():
                with html.Div(style="position: relative; height: 100%;"):
                    # Messages float over the views so that they never resize them.
                    with html.Div(style="position: absolute; top: 4px; left: 50%; transform: translateX(-50%); "
                                        "z-index: 20; width: min(720px, 90%);"):
                        v3.VProgressLinear(v_if="lct_loading", indeterminate=True, color="primary", height=4)
                        with v3.VAlert(v_if="lct_loading", density="compact", type="info", classes="mb-1",
                                       id="lct-loading"):
                            html.Span("{{ lct_load_message }}…")
                            v3.VBtn("Cancel", size="small", variant="text", click=self.cancel_load, classes="ml-2")
                        v3.VAlert(v_if="lct_error", text=("lct_error",), type="error", density="compact",
                                  closable=True, classes="mb-1", id="lct-error", click_close="lct_error = ''")
                        v3.VAlert(v_if="lct_info && !lct_error", text=("lct_info",), type="success",
                                  density="compact", closable=True, classes="mb-1", id="lct-info",
                                  click_close="lct_info = ''")
                    with html.Div(classes="d-flex flex-row fill-height"):
                        self.layout_logic.layout_manager.initialize_layout_grid(self.ui)

            with v3.VNavigationDrawer(disable_resize_watcher=True, disable_route_watcher=True, permanent=True,
                                      location="left", v_model=(names.is_drawer_visible,), width=380):
                with html.Div(v_if=(self._tool_active("segmentation"),)):
                    self.segmentation_panel.build_ui()
                self.editor_ui = SegmentEditorUI(v_if=(self._tool_active("editor"),))
                with html.Div(v_if=(self._tool_active("enhance"),)):
                    self.enhance_panel.build_ui()
                with html.Div(v_if=(self._tool_active("train"),)):
                    self.train_panel.build_ui()
                with html.Div(v_if=(self._tool_active("export"),)):
                    self.export_panel.build_ui()
                self.volume_ui = VolumePropertyUI(v_if=(self._tool_active("volume"),))

            with v3.VNavigationDrawer(disable_resize_watcher=True, disable_route_watcher=True, permanent=True,
                                      width=44, location="left"):
                with html.Div(classes="d-flex flex-column fill-height"):
                    with html.Div(classes="d-flex flex-column align-center py-2"):
                        for tool, icon, tooltip in TOOLS:
                            ControlButton(name=tooltip, icon=icon, click=lambda tool=tool: self._select_tool(tool),
                                          active=(self._tool_active(tool),), classes="mt-1", id=f"lct-tool-{tool}")
                        LayoutButton(classes="mt-1", disabled=(f"!{names.is_volume_loaded}",))
                        self.mpr_button = MprInteractionButton(classes="mt-1", disabled=(f"!{names.is_volume_loaded}",))
                        SegmentEditorToolbarUI(editor_ui=self.editor_ui)
                    v3.VSpacer()
                    with html.Div(classes="d-flex flex-column align-center py-2"):
                        SegmentEditorUndoRedoUI(editor_ui=self.editor_ui)

        self.editor_logic.set_ui(self.editor_ui)
        self.volume_property_logic.set_ui(self.volume_ui)
        self.mpr_logic.set_ui(self.mpr_button)

    def _build_open_controls(self) -> None:
        chunk = self.server.trigger_name(self.upload_chunk)
        too_big = ("lct_error = 'upload refused: ' + (total / 1e6).toFixed(1) + ' MB is more than this server accepts ("
                   "' + lct_upload_limit_text + '); open the file from a server-side data folder instead';")
        for directory, icon, label in ((False, "mdi-file-upload", "Upload a CT file (NIfTI, NRRD, MHA)"),
                                       (True, "mdi-folder-upload", "Upload a DICOM series folder")):
            script = (
                "const files = $event.target.files; let total = 0;"
                "for (const f of files) { total += f.size; }"
                f"if (total > lct_upload_limit) {{ {too_big} $event.target.value = ''; }}"
                "else if (files.length) { lct_error = ''; lct_loading = true; lct_load_message = 'uploading';"
                f" window.load_files_by_chunks(files, {{ trigger_name: '{chunk}' }})"
                " .then(({ status, errorMsg }) => { if (!status) { lct_loading = false;"
                " lct_error = 'upload failed: ' + errorMsg; } }); $event.target.value = ''; }"
            )
            with html.Div(style="width: 44px;", title=label):
                v3.VFileInput(change=script, prepend_icon=icon, hide_input=True, multiple=directory,
                              raw_attrs=["webkitdirectory"] if directory else [],
                              id=f"lct-upload-{'dir' if directory else 'file'}", density="compact",
                              disabled=("lct_loading",))
        with v3.VMenu():
            with v3.Template(v_slot_activator="{ props }"):
                v3.VBtn("Sample CT", v_bind="props", prepend_icon="mdi-lungs", size="small", variant="tonal",
                        id="lct-sample", disabled=("lct_loading",), classes="mx-1")
            with v3.VList(density="compact"):
                for name in ("lung1", "lung2"):
                    v3.VListItem(title=f"{name} (lesion CT)", click=lambda name=name: self.load_sample(name),
                                 id=f"lct-sample-{name}")
        v3.VBtn("Server file", prepend_icon="mdi-server", size="small", variant="tonal", classes="mx-1",
                id="lct-open-server", disabled=("lct_loading",),
                click=lambda: (setattr(self.state, "lct_open_dialog", True), self.browse("")))
        with v3.VDialog(v_model=("lct_open_dialog",), max_width=640):
            with v3.VCard(title="Open a CT on the server", id="lct-open-dialog"):
                with v3.VCardText():
                    v3.VSelect(v_if="lct_roots.length > 1", label="Data folder", items=("lct_roots",),
                               v_model=("lct_root",), density="compact",
                               update_modelValue=(self.browse, "['']"))
                    v3.VTextField(label="Path (relative to the data folder)", v_model=("lct_browse_path",),
                                  density="compact", id="lct-open-path", append_inner_icon="mdi-arrow-right",
                                  click_appendInner=lambda: self.browse(None))
                    v3.VAlert(v_if="lct_browse_error", text=("lct_browse_error",), type="error", density="compact",
                              id="lct-browse-error")
                    with v3.VList(density="compact", max_height=300, style="overflow-y: auto;"):
                        v3.VListItem(
                            v_for="entry in lct_browse_entries", key="entry.name",
                            title=("entry.name",), subtitle=("entry.size",),
                            prepend_icon=("entry.is_dir ? 'mdi-folder' : 'mdi-file'",),
                            click=(self._browse_clicked, "[entry.name, entry.is_dir]"),
                        )
                with v3.VCardActions():
                    v3.VSpacer()
                    v3.VBtn("Close", click="lct_open_dialog = false")
                    v3.VBtn("Open", color="primary", click=lambda: self.open_server_path(None), id="lct-open-go")

    def _browse_clicked(self, name: str, is_dir: bool) -> None:
        if is_dir:
            dicom = name != ".." and self._looks_like_dicom_folder(name)
            if not dicom:
                self.browse_into(name)
                return
        current = self.state.lct_browse_path
        self.open_server_path(f"{current}/{name}" if current else name)

    def _looks_like_dicom_folder(self, name: str) -> bool:
        from ..io.dicom import looks_like_dicom

        try:
            folder = self.config.data_roots.resolve(
                f"{self.state.lct_browse_path}/{name}" if self.state.lct_browse_path else name, self.state.lct_root)
        except LCTfoundError:
            return False
        files = [path for path in sorted(folder.iterdir())[:5] if path.is_file()]
        return bool(files) and all(looks_like_dicom(path) for path in files)


def _volume_name(path: Path) -> str:
    from ..io.volume import volume_stem

    return volume_stem(path) or "CT"


def describe_environment() -> dict[str, str]:
    """Versions of the web stack (for `lctfound doctor`-style reports and the benchmark)."""
    from importlib.metadata import PackageNotFoundError, version

    versions = {}
    for package in ("trame", "trame-slicer", "slicer-core", "vtk", "wslink"):
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            versions[package] = "missing"
    versions["VTK_DEFAULT_OPENGL_WINDOW"] = os.environ.get("VTK_DEFAULT_OPENGL_WINDOW", "")
    return versions
