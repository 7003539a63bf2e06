"""The Enhance panel: `EnhanceModuleLogic` (the LCTfoundEnhance module's logic) running every
enhancement task as a job on the loaded CT, and the input/result comparison it offers: a slider
(the result over the input, with an opacity slider) or side by side (two axial views scrolled
together)."""

from __future__ import annotations

from typing import Any

from trame.widgets import html
from trame.widgets import vuetify3 as v3
from trame_slicer.views import Layout, LayoutDirection, ViewLayoutDefinition

from ..logic.base import RunState
from ..logic.enhance import EnhanceModuleLogic
from .panel_base import LogicPanel, button_dict, choice_items

FIELDS = ("task", "model_name", "task_model", "denoiser", "dose", "views", "reconstruction", "geometry", "factor", "axis",
          "interpolation", "steps", "seed", "window", "count", "guidance_scale", "device")
SELECTS = ("task", "model_name", "task_model", "denoiser", "reconstruction", "geometry", "axis", "interpolation", "window",
           "device")
NUMBERS = {"dose": float, "views": int, "factor": int, "steps": int, "seed": int, "count": int,
           "guidance_scale": float}
#: Singleton tag of the second axial view of the side-by-side comparison.
RESULT_VIEW = "Result"
COMPARE_LAYOUT = "Compare side by side"
DEFAULT_LAYOUT = "Axial Primary"


class EnhancePanel(LogicPanel):
    prefix = "lct_enh"
    fields = FIELDS

    def __init__(self, app: Any):
        super().__init__(app)
        self.logic = EnhanceModuleLogic(runs_root=app.config.runs_root)
        self.logic.set_scene(app.scene)
        defaults = {"task": "super-resolution", "model_name": "", "task_model": "", "dose": 0.1, "views": 32,
                    "denoiser": "tv", "reconstruction": "tv", "geometry": "parallel", "factor": 4, "axis": "in-plane",
                    "interpolation": "ddnm", "steps": 50, "seed": 0, "window": "lung", "count": 8,
                    "guidance_scale": 1.0, "device": "auto"}
        for name, value in defaults.items():
            self.set(name, value)
        for name in SELECTS:
            self.set(f"{name}_items", [])
        self.set("visible", [])
        self.set("start", {"enabled": False, "tooltip": ""})
        self.set("summary", "")
        self.set("compare_mode", "slider")
        self.set("opacity", 1.0)
        self.set("result_name", "")
        self.set("has_input", False)
        self.publish_run_state()
        self.watch_fields(self.refresh)
        self.state.change(self.key("compare_mode"))(lambda **_: self.app.run_guarded(self.show_comparison,
                                                                                     "showing the comparison"))
        self.state.change(self.key("opacity"))(lambda **_: self._set_opacity())
        app.layout_logic.layout_manager.register_layout(COMPARE_LAYOUT, Layout(LayoutDirection.Horizontal, [
            ViewLayoutDefinition.axial_view(),
            ViewLayoutDefinition.slice_view("Axial", label=RESULT_VIEW, color="#4A90E2"),
        ]), lazy_initialization=True)
        self.refresh()

    def parameters(self) -> dict[str, Any]:
        values = self.values()
        for name, kind in NUMBERS.items():
            try:
                values[name] = kind(float(values[name]))
            except (TypeError, ValueError):
                values[name] = kind(0)
        values["input_volume"] = self.app.volume_node
        return values

    def refresh(self) -> None:
        logic = self.logic
        values = self.parameters()
        for name in SELECTS:
            self.set(f"{name}_items", choice_items(logic.choices(name, parameters=values)))
        for name, value in logic.default_values(values).items():
            if name in self.fields and self.get(name) != value:
                self.set(name, value)
                values[name] = value
        self.set("visible", sorted(logic.visible_fields(values)))
        self.set("start", button_dict(logic.start_button_state(values)))
        self.set("summary", logic.selection_summary(values))

    def start(self) -> None:
        def run() -> None:
            self.logic.start(self.parameters())
            self.started("enhance")

        self.app.run_guarded(run, "starting the enhancement")

    # -- results -------------------------------------------------------------------------------

    def on_job_ended(self) -> None:
        if self.logic.state is RunState.FINISHED and self.logic.result_volume is not None:
            self.set("result_name", self.logic.result_volume.GetName())
            self.set("has_input", self.logic.comparison()[0] is not None)
            self.show_comparison()
        self.report_end()

    def _set_layout(self, layout_id: str) -> None:
        """Switch the view layout now, and the layout button's state with it."""
        self.app.layout_logic.layout_manager.set_layout(layout_id)
        self.app.layout_logic.data.current_layout_id = layout_id

    def _result_view(self):
        return self.app.slicer.view_manager.get_view(RESULT_VIEW)

    def show_comparison(self) -> None:
        """Slider: the result over the input in every slice view; side by side: the input in the
        axial view and the result in a second axial view."""
        if self.logic.result_volume is None or self.logic.result_volume.GetScene() is not self.app.scene:
            return
        source, result = self.logic.comparison()
        manager = self.app.slicer.display_manager
        layout = self.app.layout_logic
        if source is None:  # a generated volume: nothing to compare with
            manager.show_volume_in_slice_background(result)
            manager.show_volume_in_slice_foreground(None)
            self._set_layout(DEFAULT_LAYOUT)
            return
        if self.get("compare_mode") == "side":
            self._set_layout(COMPARE_LAYOUT)
            manager.show_volume_in_slice_background(source)
            manager.show_volume_in_slice_foreground(None)
            view = self._result_view()
            if view is not None:
                view.set_background_volume_id(result.GetID())
            self.app.sync_result_view()
        else:
            if layout.layout_manager.layout_id == COMPARE_LAYOUT:
                self._set_layout(DEFAULT_LAYOUT)
            manager.show_volume_in_slice_background(source)
            manager.show_volume_in_slice_foreground(result)
            self._set_opacity()

    def _set_opacity(self) -> None:
        if self.get("compare_mode") != "slider" or self.logic.result_volume is None:
            return
        try:
            opacity = min(max(float(self.get("opacity")), 0.0), 1.0)
        except (TypeError, ValueError):
            return
        for view in self.app.slicer.view_manager.get_slice_views():
            if view.get_singleton_tag() != RESULT_VIEW:
                view.set_foreground_opacity(opacity)

    def on_volume_changed(self) -> None:
        self.set("result_name", "")
        self.set("has_input", False)
        if self.app.layout_logic.layout_manager.layout_id == COMPARE_LAYOUT:
            self._set_layout(DEFAULT_LAYOUT)
        self.refresh()

    # -- UI --------------------------------------------------------------------------------------

    def build_ui(self) -> None:
        k = self.key
        shown = lambda field: f"{k('visible')}.includes('{field}')"  # noqa: E731 - a JS expression builder
        with html.Div(classes="pa-3 lct-small", id="lct-enhance-panel"):
            html.Div("LCTfound enhancement", classes="text-subtitle-1 mb-2")
            self.build_run_on()
            v3.VSelect(label="Task", v_model=(k("task"),), items=(k("task_items"),), density="compact",
                       hide_details=True, classes="mb-2", id="lct-enh-task")
            for name, label in (("model_name", "Backbone model"), ("denoiser", "Method"),
                                ("task_model", "Trained model"),
                                ("reconstruction", "Reconstruction"), ("geometry", "Geometry"), ("axis", "Axis"),
                                ("interpolation", "Method"), ("window", "Window")):
                v3.VSelect(v_if=(shown(name),), label=label, v_model=(k(name),), items=(k(f"{name}_items"),),
                           density="compact", hide_details=True, classes="mb-2",
                           id=f"lct-enh-{name.replace('_', '-')}", no_data_text="None installed")
            with html.Div(classes="d-flex flex-wrap ga-2 mb-2"):
                for name, label in (("dose", "Dose fraction"), ("views", "Views"), ("factor", "Factor (2, 4, 8)"),
                                    ("steps", "Steps"), ("count", "Slices"), ("guidance_scale", "Guidance"),
                                    ("seed", "Seed")):
                    v3.VTextField(v_if=(shown(name),), label=label, v_model=(k(name),), type="number",
                                  density="compact", hide_details=True, style="max-width: 105px;",
                                  id=f"lct-enh-{name.replace('_', '-')}")
            v3.VSelect(v_if=(shown("device"),), label="Device", v_model=(k("device"),), items=(k("device_items"),),
                       density="compact", hide_details=True, classes="mb-2")
            html.Div(f"{{{{ {k('summary')} }}}}", classes="text-caption text-grey mb-2")
            with html.Div(classes="d-flex ga-2"):
                with html.Div(title=(f"{k('start')}.tooltip",), style="flex: 1;"):
                    v3.VBtn("Run", block=True, color="primary", prepend_icon="mdi-play", click=self.start,
                            disabled=(f"!{k('start')}.enabled",), id="lct-enh-start")
                v3.VBtn("Cancel", color="error", variant="tonal", click=self.cancel, disabled=(f"!{k('busy')}",),
                        id="lct-enh-cancel")
            with html.Div(v_if=(f"{k('progress')}.visible",), classes="mt-2", id="lct-enh-progress"):
                v3.VProgressLinear(model_value=(f"{k('progress')}.value",),
                                   indeterminate=(f"{k('progress')}.indeterminate",), height=14, color="primary")
                html.Span(f"{{{{ {k('progress')}.text }}}}", classes="text-caption")
            html.Div(f"{{{{ {k('status')} }}}}", classes="text-caption mt-1", id="lct-enh-status")
            with html.Div(v_if=(f"{k('result_name')} && {k('has_input')}",), classes="mt-3", id="lct-enh-compare"):
                html.Div("Compare the input with {{ " + k("result_name") + " }}", classes="text-caption")
                with v3.VBtnToggle(v_model=(k("compare_mode"),), mandatory=True, density="compact",
                                   classes="my-1"):
                    v3.VBtn("Slider", value="slider", size="small", id="lct-enh-compare-slider")
                    v3.VBtn("Side by side", value="side", size="small", id="lct-enh-compare-side")
                v3.VSlider(v_if=(f"{k('compare_mode')} === 'slider'",), v_model=(k("opacity"),), min=0, max=1,
                           step=0.05, label="Input ↔ result", hide_details=True, density="compact",
                           id="lct-enh-opacity")
