"""What the LCTfound web panels share: parameters in trame state, choices, button states, "Run on"
(this computer or a department server, with Test connection) and the run state of one
`lctfound.logic` module logic, polled by the app's async loop."""

from __future__ import annotations

from dataclasses import asdict
from typing import TYPE_CHECKING, Any, Iterable

from trame.widgets import html
from trame.widgets import vuetify3 as v3

from ..errors import LCTfoundError
from ..logic.base import ButtonState, Choice, ModuleLogicBase

if TYPE_CHECKING:
    from .app import LCTfoundWebApp


def choice_items(choices: Iterable[Choice]) -> list[dict[str, str]]:
    """Vuetify select items (``title``/``value``/``tooltip``)."""
    return [{"title": c.label, "value": c.value, "tooltip": c.tooltip} for c in choices]


def button_dict(state: ButtonState) -> dict[str, Any]:
    return {"enabled": bool(state.enabled), "tooltip": state.tooltip}


#: The "Run on" parameters every panel has (`lctfound.logic.server`).
RUN_ON_FIELDS = ("server_url", "server_token_file")


class LogicPanel:
    """A panel over one module logic. Subclasses set `prefix`, `fields` (snake_case parameter
    names kept in state as ``<prefix>_<name>``) and build their UI."""

    prefix = "lct"
    fields: tuple[str, ...] = ()
    logic: ModuleLogicBase

    def __init__(self, app: "LCTfoundWebApp"):
        self.app = app
        self._reported_end = True
        #: What the panel started last ("train", "predict", ...).
        self.action = ""
        #: Runs started so far (in state as ``<prefix>_runs``: scripts wait for a run by its number).
        self.runs = 0
        for name in RUN_ON_FIELDS:
            self.set(name, "")
        self.set("connection", "")  # the line Test connection wrote

    # -- state helpers -------------------------------------------------------------------------

    @property
    def state(self):
        return self.app.state

    def key(self, name: str) -> str:
        return f"{self.prefix}_{name}"

    def get(self, name: str) -> Any:
        return self.state[self.key(name)]

    def set(self, name: str, value: Any) -> None:
        self.state[self.key(name)] = value

    def watch_fields(self, callback) -> None:
        self.state.change(*[self.key(name) for name in self.fields + RUN_ON_FIELDS])(lambda **_: callback())

    def values(self) -> dict[str, Any]:
        """The panel's parameters as a dict (the logic's ``parameters_from`` reads it), "Run on" included."""
        values = {name: self.get(name) for name in self.fields}
        values["server_url"] = str(self.get("server_url") or "")
        values["server_token_file"] = self._token_file()[0]
        return values

    # -- run on a server -----------------------------------------------------------------------

    def _token_file(self) -> tuple[str, str]:
        """(the token file resolved inside the data roots or "", why it cannot be used or "").
        The token file is a path the browser names, so it is read only inside the data roots; and this
        web server's own ``$LCTFOUND_SERVER_TOKEN`` is never sent to an address a browser chose, so the
        file is required (`test_connection`)."""
        text = str(self.get("server_token_file") or "").strip()
        if not text:
            return "", ("Enter the token file: a file in a data folder holding the server's access token "
                        "(from its administrator).")
        try:
            return str(self.app.config.data_roots.resolve_input(text)), ""
        except LCTfoundError as error:
            return "", str(error)

    def test_connection(self) -> None:
        """The Test connection button: reach the server in "Run on"; one line says what it offers or why
        not. The panel's selectors then list the server's models."""
        try:
            _, problem = self._token_file()
            if problem and str(self.get("server_url") or "").strip():
                raise LCTfoundError(problem)
            message = self.logic.test_connection(self.values())
        except LCTfoundError as error:
            message = str(error)
        self.set("connection", message)
        self.refresh()

    def build_run_on(self) -> None:
        """The "Run on" rows: server address, token file, Test connection and its line."""
        k, name = self.key, self.prefix.replace("_", "-")
        with html.Div(classes="mb-2", id=f"{name}-run-on"):
            v3.VTextField(label="Run on: a server address (empty: this computer)", v_model=(k("server_url"),),
                          placeholder="http://gpu-host:8765", density="compact", hide_details=True, classes="mb-1",
                          id=f"{name}-server-url")
            v3.VTextField(label="Token file (in a data folder)", v_model=(k("server_token_file"),),
                          density="compact", hide_details=True, classes="mb-1", id=f"{name}-server-token-file")
            v3.VBtn("Test connection", size="small", variant="tonal", click=self.test_connection,
                    disabled=(f"!{k('server_url')}",), id=f"{name}-test-connection")
            html.Div(f"{{{{ {k('connection')} }}}}", classes="text-caption", id=f"{name}-connection")

    # -- run state -----------------------------------------------------------------------------

    @property
    def busy(self) -> bool:
        return self.logic.state.busy

    def busy_message(self) -> str:
        return f"{self.logic.task_name} is running"

    def publish_run_state(self) -> None:
        bar = self.logic.progress_bar_state()
        self.set("progress", {**asdict(bar), "indeterminate": bar.visible and bar.maximum == 0})
        self.set("status", self.logic.status_summary())
        self.set("busy", self.logic.state.busy)
        self.set("runs", self.runs)

    def tick(self) -> None:
        """Poll the running job (non-blocking) and publish progress; `on_job_ended` once per run."""
        logic = self.logic
        if logic.job is None or self._reported_end:
            return
        logic.poll()
        if not logic.state.busy:
            self._reported_end = True
            self.app.run_guarded(self.on_job_ended, f"finishing the {logic.task_name} run")
            self.refresh()
        self.publish_run_state()

    def started(self, action: str) -> None:
        self.action = action
        self.runs += 1
        self.set("runs", self.runs)
        self._reported_end = False
        self.app.state.lct_error = ""
        self.publish_run_state()
        self.refresh()

    def cancel(self) -> None:
        if self.logic.cancel():
            self.publish_run_state()
            self.refresh()

    def report_end(self) -> None:
        """After the job ended: the error in the page, or the finished/cancelled summary."""
        status = self.logic.status()
        if status.state.value == "Failed":
            self.app.show_error(status.summary())
        else:
            self.app.show_info(status.summary())

    # -- hooks ---------------------------------------------------------------------------------

    def refresh(self) -> None:
        """Recompute choices, visible fields and button states from the parameters."""

    def on_job_ended(self) -> None:
        self.report_end()

    def on_volume_changed(self) -> None:
        self.refresh()

    def on_slice_changed(self, k: Any) -> None:
        """The axial view moved to slice ``k`` (None: no volume)."""
