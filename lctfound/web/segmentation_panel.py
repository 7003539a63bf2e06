"""The Segmentation panel: `SegmentationModuleLogic` (the LCTfoundSegmentation module's logic)
driving few-shot train / predict, lung structures and diagnosis on the web app's scene.

The annotation is always the Segment Editor's active segmentation: the user paints with the
stock Segment Editor tools, trains, predicts, and the result becomes the edited segmentation
(a new node, or the annotation itself in "update" mode), so corrections go straight into it.
"Mark slice reviewed" marks the axial slice on screen, as the desktop module does.
"""

from __future__ import annotations

from typing import Any

from trame.widgets import html
from trame.widgets import vuetify3 as v3

from ..logic.base import RunState
from ..logic.segmentation import (
    DIAGNOSIS,
    FEWSHOT,
    SegmentationModuleLogic,
    format_slices,
    mark_slice_reviewed,
    reviewed_slices,
)
from .panel_base import LogicPanel, button_dict, choice_items

FIELDS = ("task", "model_name", "task_model", "new_model_name", "epochs", "window", "output_mode",
          "keep_connected", "extent_margin_mm", "whole_volume", "keep_largest", "fill_holes", "smooth", "surfaces", "saliency", "device")


class SegmentationPanel(LogicPanel):
    prefix = "lct_seg"
    fields = FIELDS

    def __init__(self, app: Any):
        super().__init__(app)
        self.logic = SegmentationModuleLogic(runs_root=app.config.runs_root)
        self._undo_node: Any = None
        defaults = {"task": FEWSHOT, "model_name": "", "task_model": "", "new_model_name": "", "epochs": 30,
                    "window": "mediastinal", "output_mode": "new", "keep_connected": True, "extent_margin_mm": 15.0,
                    "whole_volume": False, "keep_largest": False, "fill_holes": False,
                    "smooth": False, "surfaces": False, "saliency": True, "device": "auto"}
        for name, value in defaults.items():
            self.set(name, value)
        for name in ("task", "model_name", "task_model", "output_mode", "window", "device"):
            self.set(f"{name}_items", [])
        self.set("visible", [])
        self.set("train", {"enabled": False, "tooltip": ""})
        self.set("predict", {"enabled": False, "tooltip": ""})
        self.set("summary", "")
        self.set("reviewed", "")
        self.set("slice", -1)
        self.set("can_undo", False)
        self.set("diagnosis_rows", [])
        self.set("diagnosis_headers", [])
        self.set("saliency_shown", False)
        self.set("has_saliency", False)
        self.publish_run_state()
        self.watch_fields(self.refresh)
        self.state.change(self.key("saliency_shown"))(lambda **_: self._show_saliency(self.get("saliency_shown")))
        self.refresh()

    # -- parameters ------------------------------------------------------------------------------

    def parameters(self) -> dict[str, Any]:
        values = self.values()
        values["epochs"] = _as_int(values["epochs"], 0)
        values["input_volume"] = self.app.volume_node
        values["annotation_segmentation"] = self.app.segmentation_node if self.app.volume_node is not None else None
        return values

    def _suggest_name(self) -> str:
        base = "fewshot"
        name, number = base, 1
        while self.logic.check_new_model_name(name):
            number += 1
            name = f"{base}-{number}"
            if number > 999:
                return ""
        return name

    def refresh(self) -> None:
        logic = self.logic
        values = self.parameters()
        self.set("task_items", choice_items(logic.choices("task")))
        self.set("model_name_items", choice_items(logic.choices("model_name", parameters=values)))
        self.set("task_model_items", choice_items(logic.choices("task_model", parameters=values)))
        self.set("output_mode_items", choice_items(logic.choices("output_mode")))
        self.set("window_items", choice_items(logic.choices("window")))
        self.set("device_items", choice_items(logic.choices("device")))
        defaults = logic.default_values(values)
        valid_models = {item["value"] for item in self.get("task_model_items")}
        if values["task_model"] and values["task_model"] not in valid_models:
            defaults.setdefault("task_model", next(iter(sorted(valid_models)), ""))
        if not values["new_model_name"]:
            defaults["new_model_name"] = self._suggest_name()
        for name, value in defaults.items():
            if name in self.fields and self.get(name) != value:
                self.set(name, value)
                values[name] = value
        self.set("visible", sorted(logic.visible_fields(values)))
        self.set("train", button_dict(logic.train_button_state(values)))
        self.set("predict", button_dict(logic.predict_button_state(values)))
        self.set("summary", logic.selection_summary(values) if self.app.volume_node is not None else
                 "Open a CT first (upload, server file or sample).")
        self._publish_review()

    # -- actions -------------------------------------------------------------------------------

    def train(self) -> None:
        def start() -> None:
            self.logic.start_train(self.parameters())
            self.started("train")

        self.app.run_guarded(start, "starting training")

    def predict(self) -> None:
        def start() -> None:
            parameters = self.parameters()
            self.logic.start_predict(parameters)
            if parameters["output_mode"] == "update" and self.get("task") != DIAGNOSIS:
                self._undo_node = parameters["annotation_segmentation"]
            self.started("classify" if self.get("task") == DIAGNOSIS else "predict")

        self.app.run_guarded(start, "starting prediction")

    def mark_reviewed(self, reviewed: bool = True) -> None:
        def mark() -> None:
            node = self.app.segmentation_node
            k = self.app.current_slice()
            if node is None or k is None:
                self.app.show_error("Open a CT and show the slice to mark in the axial view first.")
                return
            mark_slice_reviewed(node, k, reviewed)
            self._publish_review()
            self.app.show_info(f"slice {k} {'marked reviewed' if reviewed else 'no longer marked reviewed'}")

        self.app.run_guarded(mark, "marking the slice")

    def undo_result(self) -> None:
        def undo() -> None:
            node = self.app.segmentation_node
            if node is not None and self.logic.undo_stack(node).undo():
                self.app.editor.trigger_all_signals()
                self.app.show_info("the last result was undone")
            self._publish_review()

        self.app.run_guarded(undo, "undo")

    def go_to_slice(self, k: Any) -> None:
        value = _as_int(k, None)
        if value is not None:
            self.app.go_to_slice(value)

    # -- results -------------------------------------------------------------------------------

    def on_job_ended(self) -> None:
        logic = self.logic
        if logic.state is RunState.FINISHED:
            if self.action == "train":
                logic.refresh()
                trained = self.get("new_model_name")
                self.set("task_model", trained)
                self.set("new_model_name", self._suggest_name())
            elif self.action == "predict" and logic.result_segmentation is not None:
                self.activate_segmentation(logic.result_segmentation)
            elif self.action == "classify":
                self._show_diagnosis()
        self.report_end()

    def activate_segmentation(self, node: Any) -> None:
        """Make ``node`` the Segment Editor's segmentation (the previous one is hidden)."""
        editor = self.app.editor
        old = editor.active_segmentation_node
        if old is not None and old is not node and old.GetDisplayNode() is not None:
            old.GetDisplayNode().SetVisibility(False)
        if node.GetDisplayNode() is None:
            node.CreateDefaultDisplayNodes()
        node.GetDisplayNode().SetVisibility(True)
        if old is node:
            editor.trigger_all_signals()
        else:
            editor.set_active_segmentation(node, self.app.volume_node)
        self.app.slicer.display_manager.set_node_visible_in_group(node)
        self.app._mark_voxels_dirty()

    def _show_diagnosis(self) -> None:
        rows = self.logic.diagnosis_rows
        headers = [{"title": key, "key": key} for key in (rows[0] if rows else {})]
        self.set("diagnosis_headers", headers)
        self.set("diagnosis_rows", rows)
        self.set("has_saliency", self.logic.saliency_volume is not None)
        self.set("saliency_shown", self.logic.saliency_volume is not None)
        self._show_saliency(self.get("saliency_shown"))

    def _show_saliency(self, shown: bool) -> None:
        node = self.logic.saliency_volume
        if node is None or node.GetScene() is not self.app.scene:
            return
        display = node.GetDisplayNode()
        if display is not None:
            display.SetAndObserveColorNodeID("vtkMRMLColorTableNodeRainbow")
            display.AutoWindowLevelOn()
        manager = self.app.slicer.display_manager
        manager.show_volume_in_slice_foreground(node if shown else None)
        for view in self.app.slicer.view_manager.get_slice_views():
            view.set_foreground_opacity(0.4 if shown else 0.0)

    def on_volume_changed(self) -> None:
        self.set("diagnosis_rows", [])
        self.set("has_saliency", False)
        self.set("saliency_shown", False)
        self.refresh()

    def on_slice_changed(self, k: Any) -> None:
        self.set("slice", -1 if k is None else int(k))

    def _publish_review(self) -> None:
        node = self.app.segmentation_node if self.app.volume_node is not None else None
        slices = reviewed_slices(node) if node is not None else None
        self.set("reviewed", format_slices(slices) if slices else "")
        # Only a prediction in "update" mode saves undo states (on the logic's stack of that node).
        undoable = node is not None and node is self._undo_node
        self.set("can_undo", bool(undoable and self.logic.undo_stack(node).can_undo))

    # -- UI --------------------------------------------------------------------------------------

    def build_ui(self) -> None:
        k = self.key
        shown = lambda field: f"{k('visible')}.includes('{field}')"  # noqa: E731 - a JS expression builder
        with html.Div(classes="pa-3 lct-small", id="lct-segmentation-panel"):
            html.Div("LCTfound segmentation", classes="text-subtitle-1 mb-2")
            self.build_run_on()
            v3.VSelect(label="Task", v_model=(k("task"),), items=(k("task_items"),), density="compact",
                       id="lct-seg-task", hide_details=True, classes="mb-2")
            with html.Div(v_if=(shown("model_name"),)):
                html.Div("1. Paint the structure on a few slices (Segment Editor), then train.",
                         classes="text-caption mb-1")
                v3.VSelect(label="Backbone model", v_model=(k("model_name"),), items=(k("model_name_items"),),
                           density="compact", hide_details=True, id="lct-seg-backbone", classes="mb-2")
                with html.Div(classes="d-flex ga-2"):
                    v3.VTextField(label="New model name", v_model=(k("new_model_name"),), density="compact",
                                  hide_details=True, id="lct-seg-new-model")
                    v3.VTextField(label="Epochs", v_model=(k("epochs"),), type="number", density="compact",
                                  hide_details=True, style="max-width: 90px;", id="lct-seg-epochs")
                v3.VSelect(label="Input window", v_model=(k("window"),), items=(k("window_items"),),
                           density="compact", hide_details=True, classes="my-2")
                with html.Div(title=(f"{k('train')}.tooltip",)):
                    v3.VBtn("Train", block=True, color="primary", prepend_icon="mdi-school",
                            disabled=(f"!{k('train')}.enabled",), click=self.train, id="lct-seg-train")
            html.Div("2. Predict the whole volume", v_if=(shown("new_model_name"),), classes="text-caption mt-3 mb-1")
            v3.VSelect(label="Trained model", v_model=(k("task_model"),), items=(k("task_model_items"),),
                       density="compact", hide_details=True, id="lct-seg-task-model", classes="mb-2",
                       no_data_text="No model of this kind yet: train one")
            v3.VSelect(v_if=(shown("output_mode"),), label="Result", v_model=(k("output_mode"),),
                       items=(k("output_mode_items"),), density="compact", hide_details=True, classes="mb-1")
            with html.Div(classes="d-flex flex-wrap align-center", v_if=(shown("extent_margin_mm"),)):
                v3.VCheckbox(v_model=(k("keep_connected"),), label="Parts touching the annotation",
                             density="compact", hide_details=True)
                v3.VTextField(v_model=(k("extent_margin_mm"),), type="number", min=0, suffix="mm",
                              label="Margin beyond the annotated slices", density="compact", hide_details=True,
                              disabled=(k("whole_volume"),), classes="my-1", id="lct-seg-extent-margin")
                v3.VCheckbox(v_model=(k("whole_volume"),), label="Whole volume", density="compact",
                             hide_details=True)
            with html.Div(classes="d-flex flex-wrap", v_if=(shown("keep_largest"),)):
                for name, label in (("keep_largest", "Largest island"), ("fill_holes", "Fill holes"),
                                    ("smooth", "Smooth"), ("surfaces", "3D surfaces")):
                    v3.VCheckbox(v_model=(k(name),), label=label, density="compact", hide_details=True)
            v3.VCheckbox(v_if=(shown("saliency"),), v_model=(k("saliency"),), label="Saliency map",
                         density="compact", hide_details=True)
            v3.VSelect(v_if=(shown("device"),), label="Device", v_model=(k("device"),), items=(k("device_items"),),
                       density="compact", hide_details=True, classes="my-2")
            with html.Div(title=(f"{k('predict')}.tooltip",)):
                v3.VBtn("Predict", block=True, color="primary", prepend_icon="mdi-play",
                        disabled=(f"!{k('predict')}.enabled",), click=self.predict, id="lct-seg-predict")
            with html.Div(v_if=(f"{k('progress')}.visible",), classes="mt-2", id="lct-seg-progress"):
                v3.VProgressLinear(model_value=(f"{k('progress')}.value",),
                                   indeterminate=(f"{k('progress')}.indeterminate",), height=14, color="primary")
                with html.Div(classes="d-flex align-center"):
                    html.Span(f"{{{{ {k('progress')}.text }}}}", classes="text-caption")
                    v3.VSpacer()
                    v3.VBtn("Cancel", size="small", variant="text", color="error", click=self.cancel,
                            id="lct-seg-cancel")
            html.Div(f"{{{{ {k('status')} }}}}", classes="text-caption mt-1", id="lct-seg-status")
            html.Div(f"{{{{ {k('summary')} }}}}", classes="text-caption text-grey")

            v3.VDivider(classes="my-2")
            html.Div("3. Correct, mark reviewed, retrain", classes="text-caption mb-1")
            with html.Div(classes="d-flex align-center ga-2"):
                v3.VTextField(label="Axial slice", model_value=(k("slice"),), type="number", density="compact",
                              hide_details=True, style="max-width: 110px;", id="lct-seg-slice",
                              update_modelValue=(self.go_to_slice, "[$event]"))
                html.Span("of {{ lct_axial.slices }}", classes="text-caption")
            with html.Div(classes="d-flex ga-2 my-2"):
                v3.VBtn("Mark slice reviewed", size="small", variant="tonal", prepend_icon="mdi-check",
                        click=lambda: self.mark_reviewed(True), id="lct-seg-mark", disabled=(f"{k('slice')} < 0",))
                v3.VBtn("Unmark", size="small", variant="text", click=lambda: self.mark_reviewed(False),
                        id="lct-seg-unmark", disabled=(f"{k('slice')} < 0",))
            html.Div(f"Reviewed slices: {{{{ {k('reviewed')} || 'none (training uses the painted slices)' }}}}",
                     classes="text-caption", id="lct-seg-reviewed")
            v3.VBtn("Undo last result", v_if=(k("can_undo"),), size="small", variant="text",
                    prepend_icon="mdi-undo", click=self.undo_result)
            with html.Div(classes="mt-2", id="lct-seg-voxels"):
                html.Div("{{ name }}: {{ count }} voxels", v_for="(count, name) in lct_voxels", key="name",
                         classes="text-caption")
                html.Div("Sample reference lesion: {{ lct_reference_voxels }} voxels", v_if="lct_reference_voxels",
                         classes="text-caption text-grey")
            with html.Div(v_if=(f"{k('diagnosis_rows')}.length",), classes="mt-2", id="lct-seg-diagnosis"):
                html.Div("Diagnosis (research use only, not a diagnosis)", classes="text-caption")
                v3.VDataTable(items=(k("diagnosis_rows"),), headers=(k("diagnosis_headers"),), density="compact",
                              hide_default_footer=True)
                v3.VCheckbox(v_if=(k("has_saliency"),), v_model=(k("saliency_shown"),), label="Show saliency overlay",
                             density="compact", hide_details=True)


def _as_int(value: Any, default: Any) -> Any:
    try:
        return int(float(value))
    except (TypeError, ValueError):
        return default
