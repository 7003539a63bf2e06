"""The Export panel: writes exports into the server's export folder (`lctfound.web.export`) and
hands each file to the browser as a download over the (authenticated) websocket."""

from __future__ import annotations

from typing import Any, Optional

from trame.widgets import html
from trame.widgets import vuetify3 as v3

from ..errors import LCTfoundError
from .export import KINDS, SEGMENTATION_KINDS, export


class ExportPanel:
    """Not a job panel: each export takes seconds at most and runs on the server's loop."""

    busy = False

    def __init__(self, app: Any):
        self.app = app
        self.state.lct_export_files = []
        self.state.lct_export_last = {}
        self.state.lct_export_folder = str(app.config.export_dir)
        self.trigger = app.server.trigger("lct_export")(self.export)

    @property
    def state(self):
        return self.app.state

    def busy_message(self) -> str:
        return ""

    def export(self, kind: str) -> Optional[dict[str, Any]]:
        """Write one export; returns the download (name, MIME type, bytes) or None after an error
        (shown in the page)."""
        app = self.app
        app.state.lct_error = ""
        try:
            result = export(kind, app.volume_node, app.segmentation_node, app.config.export_dir, app.dicom_source)
        except LCTfoundError as error:
            with app.state:
                app.show_error(f"export failed: {error}")
            return None
        except Exception as error:  # noqa: BLE001 - shown in the page, traceback in the log
            import logging

            logging.getLogger(__name__).exception("export %s failed", kind)
            with app.state:
                app.show_error(f"export failed: {type(error).__name__}: {error}")
            return None
        folder = app.config.export_dir
        others = len(result.files) - 1
        name = result.path.relative_to(folder).as_posix() if result.path.is_relative_to(folder) else result.path.name
        rows = [{"kind": KINDS[kind][0], "name": name + (f" (+ {others} files beside it)" if others > 0 else ""),
                 "size": f"{result.path.stat().st_size / 1e6:.2f} MB"}]
        with app.state:
            app.state.lct_export_files = rows + list(app.state.lct_export_files)[:12]
            app.state.lct_export_last = {"kind": kind, "path": str(result.path),
                                         "files": [str(p) for p in result.files]}
            app.show_info(f"exported {result.path.name}" + (f" ({result.note})" if result.note else ""))
        return {"name": result.download_name, "mime": result.mime, "data": result.path.read_bytes()}

    def tick(self) -> None:
        """Nothing runs in the background."""

    def refresh(self) -> None:
        """Nothing to recompute."""

    def on_volume_changed(self) -> None:
        self.state.lct_export_last = {}

    def on_slice_changed(self, k: Any) -> None:
        """Exports do not depend on the slice shown."""

    def build_ui(self) -> None:
        with html.Div(classes="pa-3 lct-small", id="lct-export-panel"):
            html.Div("Export", classes="text-subtitle-1 mb-2")
            html.Div("Files are written on the server into {{ lct_export_folder }} and downloaded by this browser.",
                     classes="text-caption text-grey mb-2")
            for kind, (label, _, _) in KINDS.items():
                needs_segment = kind in SEGMENTATION_KINDS
                v3.VBtn(
                    label, block=True, variant="tonal", classes="mb-2", prepend_icon="mdi-download",
                    id=f"lct-export-{kind.replace('_', '-')}",
                    disabled=("!lct_volume_name" + (" || !Object.keys(lct_voxels).length" if needs_segment else ""),),
                    click=(f"trigger('lct_export', ['{kind}']).then(r => r && utils.download(r.name, r.data, r.mime))"),
                )
            html.Div("Written:", v_if="lct_export_files.length", classes="text-caption mt-2")
            html.Div("{{ f.name }} — {{ f.size }}", v_for="f in lct_export_files", key="f.name",
                     classes="text-caption text-grey")
