"""The Train panel: `TrainModuleLogic` (the LCTfoundTrain module's logic) starting, following
(progress, loss), cancelling and resuming training jobs.

Training data is the loaded CT (with the edited segmentation, or a class name), or a folder /
CSV table inside the server's data roots; run folders are made by the logic under its runs
root, never at a client-chosen path. Resume continues a run of that runs root.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any, Optional

from trame.widgets import html
from trame.widgets import vuetify3 as v3

from ..errors import LCTfoundError
from ..logic.base import ButtonState
from ..logic.train import JOB_FILE, SEGMENTATION, TrainModuleLogic, set_volume_class_name, volume_class_name
from .panel_base import LogicPanel, button_dict, choice_items

FIELDS = ("task", "data_source", "data_folder", "table_path", "backbone_model", "mode", "segment_filter",
          "slices_per_scan", "preset", "resolution", "patch_size", "batch_size", "max_steps", "learning_rate",
          "checkpoint_every", "ema_decay", "device", "new_model_name")
NUMBERS = {"slices_per_scan": int, "resolution": int, "patch_size": int, "batch_size": int, "max_steps": int,
           "learning_rate": float, "checkpoint_every": int, "ema_decay": float}
LOSS_POINTS = 200


class TrainPanel(LogicPanel):
    prefix = "lct_train"
    fields = FIELDS

    def __init__(self, app: Any):
        super().__init__(app)
        self.logic = TrainModuleLogic(runs_root=app.config.runs_root)
        defaults = {"task": SEGMENTATION, "data_source": "volumes", "data_folder": "", "table_path": "",
                    "backbone_model": "", "mode": "", "segment_filter": "all", "slices_per_scan": 12,
                    "preset": "cpu-tiny", "resolution": 256, "patch_size": 128, "batch_size": 8, "max_steps": 2000,
                    "learning_rate": 0.0, "checkpoint_every": 200, "ema_decay": 0.995, "device": "auto",
                    "new_model_name": ""}
        for name, value in defaults.items():
            self.set(name, value)
        for name in ("task", "data_source", "backbone_model", "mode", "segment_filter", "preset", "device"):
            self.set(f"{name}_items", [])
        self.set("class_name", "")
        self.set("visible", [])
        self.set("start", {"enabled": False, "tooltip": ""})
        self.set("cancel_button", {"enabled": False, "tooltip": ""})
        self.set("resume", {"enabled": False, "tooltip": ""})
        self.set("resume_run", "")
        self.set("resume_items", [])
        self.set("data_summary", "")
        self.set("loss_png", "")
        self.set("loss_values", [])
        self.set("warnings", [])
        self._loss_png_stamp: Optional[tuple] = None
        self.publish_run_state()
        self.watch_fields(self.refresh)
        self.state.change(self.key("class_name"))(lambda **_: self._set_class_name())
        self.state.change(self.key("resume_run"))(lambda **_: self.refresh())
        self.refresh()

    # -- parameters ------------------------------------------------------------------------------

    def _server_path(self, name: str) -> tuple[str, str]:
        """(resolved path or "", problem) of a data-root-relative path field."""
        text = str(self.get(name) or "").strip()
        if not text:
            return "", ""
        try:
            return str(self.app.config.data_roots.resolve_input(text)), ""
        except LCTfoundError as error:
            return "", str(error)

    def parameters(self) -> tuple[dict[str, Any], str]:
        """The logic's parameters, and a problem with a server path ('' when none)."""
        values = self.values()
        for name, kind in NUMBERS.items():
            try:
                values[name] = kind(float(values[name]))
            except (TypeError, ValueError):
                values[name] = kind(0)
        problem = ""
        for name in ("data_folder", "table_path"):
            values[name], path_problem = self._server_path(name)
            problem = problem or path_problem
        volume = self.app.volume_node
        values["training_volumes"] = [volume] if volume is not None else []
        segmentation = self.app.segmentation_node if volume is not None else None
        values["training_segmentations"] = [segmentation] if segmentation is not None else []
        values["run_folder"] = ""
        return values, problem

    def resumable_runs(self) -> list[dict[str, str]]:
        root = self.logic.runs_root()
        runs = []
        if root.is_dir():
            for folder in sorted(root.iterdir(), reverse=True):
                job = folder / JOB_FILE
                if not job.is_file():
                    continue
                try:
                    info = json.loads(job.read_text())
                except (OSError, ValueError):
                    continue
                if "args" in info and not self.logic.resume_problem(folder):
                    runs.append({"title": f"{folder.name} ({info.get('task', '?')})", "value": folder.name})
        return runs

    def refresh(self) -> None:
        logic = self.logic
        values, path_problem = self.parameters()
        for name in ("task", "data_source", "backbone_model", "mode", "segment_filter", "preset", "device"):
            self.set(f"{name}_items", choice_items(logic.choices(name, parameters=values)))
        defaults = logic.default_values(values)
        for name, value in defaults.items():
            if name in self.fields and self.get(name) != value:
                self.set(name, value)
                values[name] = value
        self.set("visible", sorted(logic.visible_fields(values)))
        start = logic.start_button_state(values)
        if path_problem and not logic.state.busy:
            start = ButtonState(False, path_problem)
        self.set("start", button_dict(start))
        self.set("cancel_button", button_dict(logic.cancel_button_state()))
        self.set("data_summary", path_problem or logic.data_summary(values))
        runs = self.resumable_runs()
        self.set("resume_items", runs)
        chosen = self.get("resume_run")
        if chosen and chosen not in {run["value"] for run in runs}:
            chosen = ""
            self.set("resume_run", "")
        target = logic.runs_root() / chosen if chosen else logic.run_folder
        problem = logic.server_problem(values) or logic.resume_problem(target)
        self.set("resume", button_dict(ButtonState(not problem, problem or f"Continue {Path(target).name} from its "
                                                   "newest checkpoint")))
        if self.app.volume_node is not None:
            self.set("class_name", volume_class_name(self.app.volume_node))

    def _set_class_name(self) -> None:
        if self.app.volume_node is not None:
            set_volume_class_name(self.app.volume_node, str(self.get("class_name") or "").strip())
            self.refresh()

    # -- actions -------------------------------------------------------------------------------

    def start(self) -> None:
        def run() -> None:
            values, problem = self.parameters()
            if problem:
                raise LCTfoundError(problem)
            self.logic.start(values)
            self.started("train")

        self.app.run_guarded(run, "starting training")

    def resume(self) -> None:
        def run() -> None:
            chosen = self.get("resume_run")
            if chosen and chosen not in {item["value"] for item in self.resumable_runs()}:
                raise LCTfoundError(f"{chosen}: not a resumable run of this server")
            target = self.logic.runs_root() / chosen if chosen else self.logic.run_folder
            problem = self.logic.server_problem(self.parameters()[0])
            if problem:
                raise LCTfoundError(problem)
            self.logic.resume(target)
            self.started("resume")

        self.app.run_guarded(run, "resuming training")

    # -- following -----------------------------------------------------------------------------

    def publish_run_state(self) -> None:
        super().publish_run_state()
        logic = self.logic
        self.set("loss_values", [round(loss, 5) for _, loss in logic.loss_history[-LOSS_POINTS:]])
        self.set("warnings", list(logic.warnings[-3:]))
        png = logic.loss_curve_png()
        if png is not None:
            stat = png.stat()
            stamp = (str(png), stat.st_mtime_ns, stat.st_size)
            if stamp != self._loss_png_stamp:
                self._loss_png_stamp = stamp
                self.set("loss_png", "data:image/png;base64," + base64.b64encode(png.read_bytes()).decode())
        self.set("cancel_button", button_dict(logic.cancel_button_state()))

    def on_job_ended(self) -> None:
        self.logic.refresh()
        self.app.segmentation_panel.logic.refresh()
        self.app.segmentation_panel.refresh()
        self.set("new_model_name", "")
        self.report_end()

    # -- UI --------------------------------------------------------------------------------------

    def build_ui(self) -> None:
        k = self.key
        shown = lambda field: f"{k('visible')}.includes('{field}')"  # noqa: E731 - a JS expression builder
        with html.Div(classes="pa-3 lct-small", id="lct-train-panel"):
            html.Div("LCTfound training", classes="text-subtitle-1 mb-2")
            self.build_run_on()
            v3.VSelect(label="Task", v_model=(k("task"),), items=(k("task_items"),), density="compact",
                       hide_details=True, classes="mb-2", id="lct-train-task")
            v3.VSelect(label="Training data", v_model=(k("data_source"),), items=(k("data_source_items"),),
                       density="compact", hide_details=True, classes="mb-2")
            v3.VTextField(v_if=(shown("data_folder"),), label="Data folder (inside a server data root)",
                          v_model=(k("data_folder"),), density="compact", hide_details=True, classes="mb-2")
            v3.VTextField(v_if=(shown("table_path"),), label="CSV table (inside a server data root)",
                          v_model=(k("table_path"),), density="compact", hide_details=True, classes="mb-2")
            v3.VTextField(v_if=(shown("volume_classes"),), label="Class name of the loaded CT",
                          v_model=(k("class_name"),), density="compact", hide_details=True, classes="mb-2")
            v3.VSelect(v_if=(shown("segment_filter"),), label="Segments", v_model=(k("segment_filter"),),
                       items=(k("segment_filter_items"),), density="compact", hide_details=True, classes="mb-2")
            v3.VSelect(v_if=(shown("backbone_model"),), label="Backbone model", v_model=(k("backbone_model"),),
                       items=(k("backbone_model_items"),), density="compact", hide_details=True, classes="mb-2")
            v3.VSelect(v_if=(shown("mode"),), label="Mode", v_model=(k("mode"),), items=(k("mode_items"),),
                       density="compact", hide_details=True, classes="mb-2")
            v3.VSelect(v_if=(shown("preset"),), label="Network preset", v_model=(k("preset"),),
                       items=(k("preset_items"),), density="compact", hide_details=True, classes="mb-2")
            with html.Div(classes="d-flex flex-wrap ga-2 mb-2"):
                for name, label in (("max_steps", "Steps"), ("batch_size", "Batch"), ("learning_rate", "LR (0=auto)"),
                                    ("checkpoint_every", "Checkpoint every"), ("slices_per_scan", "Slices/scan"),
                                    ("resolution", "Resolution"), ("patch_size", "Patch")):
                    v3.VTextField(v_if=(shown(name),), label=label, v_model=(k(name),), type="number",
                                  density="compact", hide_details=True, style="max-width: 105px;",
                                  id=f"lct-train-{name.replace('_', '-')}")
            v3.VTextField(label="New model name", v_model=(k("new_model_name"),), density="compact",
                          hide_details=True, classes="mb-2", id="lct-train-new-model")
            v3.VSelect(v_if=(shown("device"),), label="Device", v_model=(k("device"),), items=(k("device_items"),),
                       density="compact", hide_details=True, classes="mb-2")
            html.Div(f"{{{{ {k('data_summary')} }}}}", classes="text-caption text-grey mb-2")
            with html.Div(classes="d-flex ga-2"):
                with html.Div(title=(f"{k('start')}.tooltip",), style="flex: 1;"):
                    v3.VBtn("Start", block=True, color="primary", prepend_icon="mdi-play", click=self.start,
                            disabled=(f"!{k('start')}.enabled",), id="lct-train-start")
                with html.Div(title=(f"{k('cancel_button')}.tooltip",)):
                    v3.VBtn("Cancel", color="error", variant="tonal", click=self.cancel,
                            disabled=(f"!{k('cancel_button')}.enabled",), id="lct-train-cancel")
            with html.Div(classes="d-flex ga-2 mt-2 align-center"):
                v3.VSelect(label="Run to resume (default: the last one)", v_model=(k("resume_run"),),
                           items=(k("resume_items"),), density="compact", hide_details=True, clearable=True)
                with html.Div(title=(f"{k('resume')}.tooltip",)):
                    v3.VBtn("Resume", variant="tonal", click=self.resume, disabled=(f"!{k('resume')}.enabled",),
                            id="lct-train-resume")
            with html.Div(v_if=(f"{k('progress')}.visible",), classes="mt-2", id="lct-train-progress"):
                v3.VProgressLinear(model_value=(f"{k('progress')}.value",),
                                   indeterminate=(f"{k('progress')}.indeterminate",), height=14, color="primary")
                html.Span(f"{{{{ {k('progress')}.text }}}}", classes="text-caption")
            html.Div(f"{{{{ {k('status')} }}}}", classes="text-caption mt-1", id="lct-train-status")
            html.Div("{{ w }}", v_for=f"w in {k('warnings')}", key="w", classes="text-caption text-warning")
            v3.VSparkline(v_if=(f"{k('loss_values')}.length > 1",), model_value=(k("loss_values"),), height=60,
                          color="primary", line_width=1, smooth=False, id="lct-train-sparkline")
            html.Img(v_if=(k("loss_png"),), src=(k("loss_png"),), style="width: 100%;", id="lct-train-loss",
                     alt="loss curve")
