"""The dependency installer through the real panels (Testing/slicer_harness: Slicer's own util.py of each
tag, stand-ins for Qt): packages hidden as in a fresh Slicer, the user clicks Start / the Dependencies
buttons, and the dialog comes before any job; declining starts nothing; accepting runs
``slicer.util.pip_install`` with the exact arguments and then the job starts.

Slicer's ``confirmOkCancelDisplay`` returns OK without a dialog in testing mode, so the tests replace it
(and ``pip_install``, which would really install) with recorders on ``slicer.util``.
"""

from __future__ import annotations

import numpy as np
import pytest

from import_blocker import hidden_packages
from slicer_harness.fixtures import slicer_app, slicer_session, volume_from_array  # noqa: F401

pytestmark = pytest.mark.mrml


@pytest.fixture
def recorders(slicer_app, monkeypatch):
    """Replace the dialog and pip in Slicer's util with recorders; returns (calls, answers)."""
    import slicer

    calls, answers = [], {"confirm": False, "on_pip": None}

    def confirm(text, windowTitle=None, **kwargs):
        calls.append(("confirm", text))
        return answers["confirm"]

    def pip_install(arguments):
        calls.append(("pip_install", list(arguments)))
        if answers["on_pip"]:
            answers["on_pip"](arguments)

    monkeypatch.setattr(slicer.util, "confirmOkCancelDisplay", confirm)
    monkeypatch.setattr(slicer.util, "pip_install", pip_install)
    from lctfound.logic import dependencies

    monkeypatch.setattr(dependencies, "platform_problem", lambda *args: "")
    return calls, answers


def enhance_panel_with_a_volume(slicer_app):
    widget = slicer_app.selectModule("LCTfoundEnhance")
    volume_from_array(np.full((4, 24, 24), -700, dtype=np.int16), name="chest")
    widget.initializeParameterNode()
    widget._updateStatus()
    assert widget.ui.startButton.enabled, widget.ui.statusLabel.text
    return widget


def test_declining_the_dialog_starts_no_job(slicer_app, recorders):
    calls, answers = recorders
    widget = enhance_panel_with_a_volume(slicer_app)
    with hidden_packages("diffusers", "psutil"):
        widget.ui.startButton.click()
    assert [kind for kind, *_ in calls] == ["confirm"]
    assert "diffusers 0.42.1" in calls[0][1] and "psutil 7.2.2" in calls[0][1]
    assert widget.logic.engine.job is None and not widget.logic.engine.state.busy
    # tryWithErrorDisplay shows "The task could not start" with this message, then re-raises into the slot
    errors = slicer_app.takeSlotErrors()
    assert len(errors) == 1 and "DependenciesMissing: Nothing was started" in errors[0][1]
    assert "diffusers, psutil" in errors[0][1]


def test_accepting_installs_then_starts_the_job(slicer_app, recorders):
    calls, answers = recorders
    widget = enhance_panel_with_a_volume(slicer_app)
    with hidden_packages("tqdm") as blocker:
        answers["confirm"] = True
        answers["on_pip"] = lambda arguments: blocker.unhide("tqdm")
        widget.ui.startButton.click()
    assert [kind for kind, *_ in calls] == ["confirm", "pip_install"]
    arguments = calls[1][1]
    assert arguments[:3] == ["--only-binary", ":all:", "--constraint"] and arguments[4:] == ["tqdm==4.70.1"]
    job = widget.logic.engine.job
    assert job is not None
    widget.ui.cancelButton.click()
    widget.logic.engine._cancel_thread.join(60)
    job.wait(60)


def test_dependencies_section_checks_and_installs(slicer_app, recorders):
    calls, answers = recorders
    widget = slicer_app.selectModule("LCTfoundSegmentation")
    widget.checkDependenciesButton.click()
    assert widget.dependenciesLabel.text.startswith("All Python packages LCTfound needs are installed.")
    assert "monai: 1.6.1" in widget.dependenciesLabel.text
    with hidden_packages("monai"):
        widget.checkDependenciesButton.click()
        assert widget.dependenciesLabel.text.startswith("Missing: monai.")
        widget.installDependenciesButton.click()  # declined
        assert [kind for kind, *_ in calls] == ["confirm"]
        errors = slicer_app.takeSlotErrors()
        assert len(errors) == 1 and "were not installed: monai" in errors[0][1]
