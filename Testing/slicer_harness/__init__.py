"""Run the LCTfound modules' real Module, Widget and Test classes against Slicer's own Python layer.

What is real: Slicer's ``slicer/util.py``, ``i18n.py``, ``ScriptedLoadableModule.py``, ``logic.py`` and
``parameterNodeWrapper/`` of a release tag (``../shared/slicer-python/<tag>``, loaded from there,
unmodified), MRML (nodes, scene, segmentations/volumes/slice logics from the ``slicer-core`` wheel),
the modules' files, their .ui files, the engine and its child-process jobs.

What is a stand-in (this package): the Qt/CTK classes (`qt_standins`, `ctk_standins`), Slicer's MRML
widgets (`mrml_widgets`), QUiLoader (`ui_loader`) and the application (`application`: ``slicer.app``
in testing mode, module manager and selector, layout manager, Segment Editor). They follow
PythonQt's rules (see `qobject`) but draw nothing. Known differences from a real Slicer:

* No event loop or real time: a QTimer fires only when a test calls `SlicerHarness.processEvents`.
* QUiLoader's property application is approximated (no geometry, size policy, style, icons);
  a spin box's range from the .ui does not re-clamp its value until the value is next set.
* PythonQt's C++ type conversions are not checked: a stand-in accepts any Python value where Qt
  would raise a TypeError or convert (e.g. a float given to an int property is rounded here).
* Overloaded signals: ``obj.signal.connect`` takes the first declared overload.
* ``isinstance`` follows Python inheritance here; between PythonQt-wrapped classes it is unreliable
  (see ``parameterNodeWrapper.wrapper._isWidget``), so module code should test ``type(widget)``.
* Only the signals, properties and methods the modules and Slicer's layer use exist; anything else
  is an AttributeError here (in Slicer it might exist).
* Popups: ``slicer.app.testingEnabled()`` is true, as under ``Slicer --testing``, so Slicer's util only
  logs message boxes; a real modal dialog (``exec_``) fails the test.
* Rendering, interaction in views, the Segment Editor's effects and undo stack contents are not run.
"""

from __future__ import annotations

import importlib
import os
import sys
import time
import types
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _layer_root() -> Path:
    """Slicer's Python layer per tag: $LCTFOUND_SLICER_PYTHON, else the nearest
    ``shared/slicer-python`` above the repository (``../shared`` of a checkout)."""
    if os.environ.get("LCTFOUND_SLICER_PYTHON"):
        return Path(os.environ["LCTFOUND_SLICER_PYTHON"])
    for folder in REPO.parents:
        if (folder / "shared" / "slicer-python").is_dir():
            return folder / "shared" / "slicer-python"
    return REPO.parent / "shared" / "slicer-python"


LAYER_ROOT = _layer_root()
MODULE_NAMES = ("LCTfoundSegmentation", "LCTfoundEnhance", "LCTfoundTrain", "LCTfoundCTFM")
_LAYER_MODULES = ("util", "i18n", "ScriptedLoadableModule", "logic", "parameterNodeWrapper")


def available_tags() -> list[str]:
    """The tags whose layer is present (``<tag>/Base/Python/slicer/util.py``)."""
    if not LAYER_ROOT.is_dir():
        return []
    return sorted(path.name for path in LAYER_ROOT.iterdir()
                  if (path / "Base" / "Python" / "slicer" / "util.py").is_file())


class SlicerHarness:
    """One Slicer session of one tag. `install()` puts ``qt``, ``ctk`` and Slicer's layer in place;
    `uninstall()` restores the interpreter (so another tag can follow in the same process)."""

    def __init__(self, tag: str):
        self.tag = tag
        self.layer = LAYER_ROOT / tag / "Base" / "Python" / "slicer"
        self.app = None
        self.scene = None
        self._saved = {}
        self._added_paths = []

    # -- set up --------------------------------------------------------------------------------

    def install(self) -> "SlicerHarness":
        import slicer  # the slicer-core wheel's package: real MRML classes

        from . import application, ctk_standins, mrml_widgets, qobject, qt_standins

        self._slicer = slicer
        names = ["qt", "ctk", "SlicerBaseLogicPython"] + [f"slicer.{name}" for name in _LAYER_MODULES]
        self._saved = {
            "modules": {name: sys.modules.get(name) for name in list(sys.modules)
                        if name in names or name.startswith("slicer.parameterNodeWrapper")},
            "path": list(slicer.__path__),
            "attributes": {name: getattr(slicer, name) for name in dir(slicer) if not name.startswith("__")},
        }
        for name in list(sys.modules):
            if name in names or name.startswith("slicer.parameterNodeWrapper"):
                del sys.modules[name]

        sys.modules["qt"] = _namespace("qt", qt_standins)
        sys.modules["ctk"] = _namespace("ctk", ctk_standins)
        import slicer_core.vtkSlicerBaseLogic as base_logic

        sys.modules["SlicerBaseLogicPython"] = base_logic  # what slicer/logic.py re-exports
        slicer.__path__[:] = [str(self.layer)] + [path for path in slicer.__path__ if path != str(self.layer)]

        # the application and its scene, as Slicer creates them before any module loads
        self.scene = slicer.vtkMRMLScene()
        self.app = application.SlicerApplication(self.scene)
        for name in ("qMRMLWidget", "qSlicerWidget", "qMRMLNodeComboBox", "qMRMLCheckableNodeComboBox",
                     "qMRMLSliderWidget", "qMRMLSpinBox", "qMRMLRangeWidget", "qMRMLTableView",
                     "qSlicerMarkupsPlaceWidget", "qMRMLSegmentEditorWidget"):
            setattr(slicer, name, getattr(mrml_widgets, name))
        slicer.qSlicerScriptedLoadableModuleWidget = application.qSlicerScriptedLoadableModuleWidget
        slicer.qSlicerScriptedLoadableModule = application.qSlicerScriptedLoadableModule
        slicer.app = self.app
        slicer.mrmlScene = self.scene
        slicer.modules = self.app.modules
        slicer.selfTests = {}
        qt_standins.QTimer.reset()
        qt_standins.QSettings._values.clear()
        qobject.SLOT_ERRORS.clear()
        for name in _LAYER_MODULES:
            importlib.import_module(f"slicer.{name}")
        self._add_core_modules()
        return self

    def _add_core_modules(self) -> None:
        from .application import SegmentEditorModuleWidget, _BuiltinModule

        slicer, scene, manager = self._slicer, self.scene, self.app.moduleManager()
        # singletons Slicer's application scene has before modules load
        for class_name, tag in (("vtkMRMLSelectionNode", "Singleton"), ("vtkMRMLInteractionNode", "Singleton")):
            node = scene.CreateNodeByClass(class_name)
            node.SetSingletonTag(tag)
            scene.AddNode(node)
        segmentations = slicer.vtkSlicerSegmentationsModuleLogic()
        segmentations.SetMRMLScene(scene)
        volumes = slicer.vtkSlicerVolumesLogic()
        volumes.SetMRMLScene(scene)
        markups = slicer.vtkSlicerMarkupsLogic()
        markups.SetMRMLScene(scene)
        self._logics = (segmentations, volumes, markups)
        editor = SegmentEditorModuleWidget()
        editor.editor.setMRMLScene(scene)
        self.app.modules.SegmentEditorWidget = editor
        for module in (_BuiltinModule("Segmentations", segmentations), _BuiltinModule("Volumes", volumes),
                       _BuiltinModule("Markups", markups), _BuiltinModule("SegmentEditor", None, editor),
                       _BuiltinModule("Data")):
            manager.add(module)
        self.app.layoutManager()

    def uninstall(self) -> None:
        from . import qt_standins

        for module in self.app.moduleManager()._modules.values():
            widget = getattr(module, "_widget", None)
            if hasattr(widget, "self") and widget.self() is not None:
                self.app.moduleManager().unload(module.name)  # Slicer calls cleanup() on exit
        qt_standins.QTimer.reset()
        slicer = self._slicer
        for name in list(sys.modules):
            if name in MODULE_NAMES or name == "LCTfoundSlicerLib" or name.startswith("LCTfoundSlicerLib."):
                del sys.modules[name]
            elif name in ("qt", "ctk", "SlicerBaseLogicPython") or any(
                    name == f"slicer.{layer}" or name.startswith(f"slicer.{layer}.") for layer in _LAYER_MODULES):
                del sys.modules[name]
        for name, module in self._saved["modules"].items():
            if module is not None:
                sys.modules[name] = module
        slicer.__path__[:] = self._saved["path"]
        for name in [name for name in dir(slicer) if not name.startswith("__")]:
            if name not in self._saved["attributes"]:
                delattr(slicer, name)
        for name, value in self._saved["attributes"].items():
            setattr(slicer, name, value)
        for path in self._added_paths:
            if path in sys.path:
                sys.path.remove(path)
        self.scene.Clear(1)

    # -- modules -------------------------------------------------------------------------------

    def loadModule(self, name: str):
        """Load ``<name>/<name>.py`` as Slicer's scripted module factory does; returns its module object."""
        from .application import qSlicerScriptedLoadableModule

        manager = self.app.moduleManager()
        if manager.module(name) is not None:
            return manager.module(name)
        path = REPO / name / f"{name}.py"
        folder = str(path.parent)
        if folder not in sys.path:
            sys.path.append(folder)
            self._added_paths.append(folder)
        module = importlib.import_module(name)
        representation = qSlicerScriptedLoadableModule(name, str(path), self.app)
        python = getattr(module, name)(representation)
        representation.python = python
        setattr(self.app.modules, name + "Instance", python)
        manager.add(representation)
        return representation

    def selectModule(self, name: str):
        """Show module ``name`` as the module selector does (through Slicer's util.selectModule);
        returns its Python widget for scripted modules."""
        if name in MODULE_NAMES:
            self.loadModule(name)
        self._slicer.util.selectModule(name)
        module = self.app.moduleManager().module(name)
        return self._slicer.util.getModuleWidget(name) if hasattr(module, "python") else None

    # -- time ----------------------------------------------------------------------------------

    def processEvents(self) -> None:
        """One turn of the event loop: pending single-shot calls, then each active timer once."""
        from .qt_standins import QTimer

        QTimer.fire()

    def runUntil(self, done, what: str, poll_s: float = 0.05, hang_s: float = 3600.0) -> None:
        """Turn the event loop until ``done()``; ``hang_s`` only guards against a hung job."""
        started = time.monotonic()
        while not done():
            if time.monotonic() - started > hang_s:
                raise AssertionError(f"still waiting for {what} after {hang_s:.0f} s")
            self.processEvents()
            time.sleep(poll_s)

    def takeSlotErrors(self) -> list:
        """The exceptions raised in slots since the last call (PythonQt prints them and goes on)."""
        from .qobject import SLOT_ERRORS

        errors = list(SLOT_ERRORS)
        SLOT_ERRORS.clear()
        return errors


def _namespace(name: str, source) -> types.ModuleType:
    """A module ``qt``/``ctk`` holding the public classes of ``source`` (PythonQt's flat namespaces)."""
    module = types.ModuleType(name, f"harness stand-in for PythonQt's {name} (see Testing/slicer_harness)")
    for attribute in dir(source):
        value = getattr(source, attribute)
        if not attribute.startswith("_") and isinstance(value, type):
            setattr(module, attribute, value)
    return module
