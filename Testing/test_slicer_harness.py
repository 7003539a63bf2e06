"""The modules' real Module, Widget and Test classes on Slicer's own Python layer (each tag of
../shared/slicer-python), with stand-ins for Qt/CTK and the application (Testing/slicer_harness).

Fast checks: every panel loads from its .ui and binds to its parameter node, the in-Slicer self
tests pass, start-up logs no parameterNodeWrapper warnings, and the stand-ins keep PythonQt's rules.
The job flows driven through the widgets are in test_slicer_harness_flows.py.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest

from slicer_harness import MODULE_NAMES
from slicer_harness.fixtures import slicer_app, slicer_session, volume_from_array  # noqa: F401

pytestmark = pytest.mark.mrml


def bound_widgets(widget):
    """{parameter name: widget} of the panel's widgets that carry SlicerParameterName."""
    return {child.property("SlicerParameterName"): child for child in widget.parent.findChildren()
            if child.property("SlicerParameterName")}


def test_every_panel_loads_and_binds_its_parameters(slicer_app):
    import slicer

    for name in MODULE_NAMES:
        widget = slicer_app.selectModule(name)
        assert widget.parent.isEntered
        node = widget._parameterNode
        assert node is not None and node.parameterNode.GetAttribute("ModuleName") == name
        bound = bound_widgets(widget)
        assert bound, f"{name}: no widget carries SlicerParameterName"
        for parameter in bound:
            assert parameter in node.allParameters, f"{name}: .ui names unknown parameter {parameter!r}"
        assert widget.ui.statusLabel.text, f"{name}: empty status line"
        assert slicer.util.getModuleLogic(name) is widget.logic
    assert slicer.util.selectedModule() == MODULE_NAMES[-1]


def test_in_slicer_self_tests_pass(slicer_app):
    """What `Slicer --no-main-window --python-code "slicer.selfTests['<Module>']()"` runs."""
    import slicer

    for name in MODULE_NAMES:
        slicer_app.loadModule(name)
        slicer.selfTests[name]()


def test_module_metadata(slicer_app):
    import slicer

    for name in MODULE_NAMES:
        module = slicer_app.loadModule(name)
        assert module.title.startswith("LCTfound") and module.categories == ["LCTfound"]
        assert "doi:10.1038/s41467-025-66620-z" in module.acknowledgementText
        assert module.python.resourcePath("UI/x.ui").endswith(f"{name}/Resources/UI/x.ui")
        assert getattr(slicer.modules, name.lower()) is module


def test_loading_the_modules_logs_no_parameter_wrapper_warnings(slicer_session, caplog):
    """Slicer imports every module at start-up; a GUI-only annotation such as Decimals(...) in a
    @parameterNodeWrapper class is "unused" by the wrapper and logs a warning each time."""
    import importlib
    import sys

    caplog.set_level(logging.WARNING)
    for name in MODULE_NAMES:
        slicer_session.loadModule(name)
        caplog.clear()
        importlib.reload(sys.modules[name])
        assert not [record.getMessage() for record in caplog.records if "nused annotation" in record.getMessage()], name


def test_unset_paths_show_as_empty_fields(slicer_app):
    """An unset Path parameter must read as an empty field, not '.' (the current folder)."""
    widget = slicer_app.selectModule("LCTfoundTrain")
    for field in (widget.ui.dataFolderSelector, widget.ui.tablePathSelector, widget.ui.runFolderSelector):
        assert field.currentPath == "", f"{field.objectName} shows {field.currentPath!r}"
    # a chosen folder round-trips, and clearing the field unsets it again
    widget.ui.dataFolderSelector.currentPath = "/data/ct"
    assert str(widget._parameterNode.dataFolder) == "/data/ct"
    widget.ui.dataFolderSelector.currentPath = ""
    assert widget.ui.dataFolderSelector.currentPath == ""
    assert "folder" in widget.ui.statusLabel.text.lower()


def test_leaving_a_panel_unbinds_it(slicer_app):
    """exit() must disconnect the widgets from the parameter node, on every tag (Slicer 5.8's
    connectGui returns no tag, so disconnectGui(tag) cannot disconnect what it bound)."""
    for name in ("LCTfoundSegmentation", "LCTfoundEnhance", "LCTfoundSegmentation", "LCTfoundEnhance"):
        slicer_app.selectModule(name)
    widget = slicer_app.selectModule("LCTfoundSegmentation")
    slicer_app.selectModule("LCTfoundEnhance")
    node = widget.logic.getParameterNode()
    epochs = node.epochs
    widget.ui.epochsSpinBox.value = epochs + 3  # a panel that is not shown
    assert node.epochs == epochs
    slicer_app.selectModule("LCTfoundSegmentation")
    assert widget.ui.epochsSpinBox.value == epochs
    assert len(widget.ui.epochsSpinBox.valueChanged.slots) == 1  # bound once, not once per visit
    widget.ui.epochsSpinBox.value = epochs + 1
    assert node.epochs == epochs + 1


def test_node_selectors_list_scene_nodes_by_type(slicer_app):
    import slicer

    widget = slicer_app.selectModule("LCTfoundSegmentation")
    volume = volume_from_array(np.full((4, 16, 16), -800, dtype=np.int16), name="chest")
    segmentation = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "labels")
    assert widget.ui.inputVolumeSelector.nodes() == [volume]
    assert widget.ui.annotationSelector.nodes() == [segmentation]
    widget.ui.annotationSelector.select(segmentation)
    assert widget._parameterNode.annotationSegmentation is segmentation
    slicer.mrmlScene.RemoveNode(segmentation)
    assert widget.ui.annotationSelector.currentNode() is None
    assert widget._parameterNode.annotationSegmentation is None


def test_stand_ins_follow_pythonqt(slicer_app):
    """Slots get only the arguments they accept; slot exceptions do not reach the emitter."""
    import qt

    received = []
    button = qt.QPushButton("b")
    button.connect("clicked(bool)", lambda: received.append("none"))
    button.connect("clicked(bool)", lambda checked: received.append(("checked", checked)))
    button.connect("clicked(bool)", lambda tag="tag": received.append(("default", tag)))  # PythonQt fills it
    button.click()
    assert received == ["none", ("checked", False), ("default", False)]
    with pytest.raises(AttributeError):
        button.connect("clickd(bool)", print)
    button.connect("clicked()", lambda: 1 / 0)
    button.click()
    errors = slicer_app.takeSlotErrors()
    assert len(errors) == 1 and "ZeroDivisionError" in errors[0][1]
    assert len(received) == 6  # the other slots still ran
    button.enabled = False
    button.click()  # a disabled button ignores clicks
    assert len(received) == 6
