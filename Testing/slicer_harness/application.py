"""The Slicer application around the modules: ``slicer.app``, ``slicer.mrmlScene``, ``slicer.modules``,
the main window's module selector, the layout manager's slice views and the Segment Editor.

A module is loaded as Slicer's scripted-module factory does it: its folder on ``sys.path``, the file
imported under its own name, ``<Module>(parent)`` with a module representation as parent, and its
widget ``<Module>Widget(parent)`` built inside a qSlicerScriptedLoadableModuleWidget when the module
is first shown; selecting another module calls ``exit()``, showing it again ``enter()``.
"""

from __future__ import annotations

import sys
from types import SimpleNamespace

from .mrml_widgets import qMRMLSegmentEditorWidget, qMRMLWidget
from .qobject import QObject, qproperty
from .qt_standins import QSettings, QTimer, QVBoxLayout, QWidget


class qSlicerScriptedLoadableModuleWidget(qMRMLWidget):
    """The panel Slicer builds for a scripted module; it holds the Python widget (``self()``)."""

    isEntered = qproperty(False)

    def __init__(self, parent=None):
        qMRMLWidget.__init__(self, parent)
        self.setLayout(QVBoxLayout())
        self._python = None

    def self(self):
        return self._python


class qSlicerScriptedLoadableModule(QObject):
    """A module as the module manager holds it (``slicer.modules.<name lower case>``)."""

    def __init__(self, name: str, path: str, app):
        QObject.__init__(self)
        self.name, self.path, self._app = name, path, app
        self.title = ""
        self.categories, self.dependencies, self.contributors = [], [], []
        self.helpText = self.acknowledgementText = ""
        self.icon = None
        self.hidden = False
        self._widget = None
        self.python = None  # the module's Python object (slicer.modules.<Name>Instance)

    def widgetRepresentation(self):
        if self._widget is None:
            module = sys.modules[self.name]
            self._widget = qSlicerScriptedLoadableModuleWidget()
            self._widget.objectName = self.name + "Widget"
            self._widget.setMRMLScene(self._app.mrmlScene)
            python = getattr(module, self.name + "Widget")(self._widget)
            self._widget._python = python
            setattr(self._app.modules, self.name + "Widget", python)
            python.setup()
        return self._widget

    def createNewWidgetRepresentation(self):
        raise NotImplementedError("one widget per module in the harness")

    def logic(self):
        return None


class _BuiltinModule(QObject):
    """A Slicer core module the panels talk to (Segment Editor, Segmentations, Volumes, Markups)."""

    def __init__(self, name: str, logic=None, widget=None):
        QObject.__init__(self)
        self.name, self._logic, self._widget, self.path = name, logic, widget, ""
        self.title = name

    def logic(self):
        return self._logic

    def widgetRepresentation(self):
        return self._widget


class SegmentEditorModuleWidget:
    """``slicer.modules.SegmentEditorWidget``: the Segment Editor module's Python widget."""

    def __init__(self):
        self.editor = qMRMLSegmentEditorWidget()

    def enter(self) -> None:
        pass

    def exit(self) -> None:
        pass


class ModuleSelector:
    def __init__(self, app):
        self._app = app
        self.selectedModule = ""

    def selectModule(self, name: str) -> None:
        """What the module selector does: exit the shown module's panel, enter the new one."""
        app = self._app
        if name == self.selectedModule:
            return
        old = app.moduleManager().module(self.selectedModule) if self.selectedModule else None
        if isinstance(old, qSlicerScriptedLoadableModule) and old._widget is not None:
            old._widget.isEntered = False
            old._widget.self().exit()
        elif isinstance(old, _BuiltinModule) and isinstance(old._widget, SegmentEditorModuleWidget):
            old._widget.exit()
        self.selectedModule = name
        new = app.moduleManager().module(name)
        if new is None:
            raise RuntimeError(f"no module {name!r}")
        if isinstance(new, qSlicerScriptedLoadableModule):
            panel = new.widgetRepresentation()
            panel.isEntered = True
            panel.self().enter()
        elif isinstance(new._widget, SegmentEditorModuleWidget):
            new._widget.enter()


class MainWindow(QWidget):
    def __init__(self, app):
        QWidget.__init__(self)
        self.objectName = "qSlicerMainWindow"
        self._selector = ModuleSelector(app)

    def moduleSelector(self):
        return self._selector

    def statusBar(self):
        return None


class ModuleManager(QObject):
    SIGNALS = ("moduleAboutToBeUnloaded(QString)", "moduleLoaded(QString)")

    def __init__(self, app):
        QObject.__init__(self)
        self._app = app
        self._modules = {}

    def module(self, name):
        return self._modules.get(name)

    def add(self, module) -> None:
        self._modules[module.name] = module
        setattr(self._app.modules, module.name.lower(), module)

    def factoryManager(self):
        return SimpleNamespace(loadedModuleNames=lambda: list(self._modules))

    def unload(self, name) -> None:
        self._signal("moduleAboutToBeUnloaded").emit(name)


class SliceWidget:
    def __init__(self, slice_node, logic):
        self._node, self._logic = slice_node, logic

    def mrmlSliceNode(self):
        return self._node

    def sliceLogic(self):
        return self._logic


class LayoutManager:
    """The three slice views (Red, Yellow, Green) with their real MRML slice and composite nodes."""

    VIEWS = {"Red": "Axial", "Yellow": "Sagittal", "Green": "Coronal"}

    def __init__(self, app):
        import slicer

        self._app = app
        self._widgets = {}
        scene = app.mrmlScene
        slicer.vtkMRMLSliceNode.AddDefaultSliceOrientationPresets(scene)
        for name, orientation in self.VIEWS.items():
            slice_node = scene.CreateNodeByClass("vtkMRMLSliceNode")  # with the scene's orientation presets
            slice_node.SetName(name)
            slice_node.SetLayoutName(name)
            slice_node.SetSingletonTag(name)
            slice_node.SetDefaultOrientation(orientation)
            slice_node.SetOrientation(orientation)
            slice_node = scene.AddNode(slice_node)
            composite = scene.CreateNodeByClass("vtkMRMLSliceCompositeNode")
            composite.SetLayoutName(name)
            composite.SetSingletonTag(name)
            composite = scene.AddNode(composite)
            logic = slicer.vtkMRMLSliceLogic()
            logic.SetMRMLScene(scene)
            logic.SetSliceNode(slice_node)
            self._widgets[name] = SliceWidget(slice_node, logic)

    def sliceViewNames(self):
        return list(self._widgets)

    def sliceWidget(self, name):
        return self._widgets.get(name)

    def mrmlSliceLogics(self):
        import vtk

        collection = vtk.vtkCollection()
        for widget in self._widgets.values():
            collection.AddItem(widget.sliceLogic())
        return collection

    def setLayout(self, layout) -> None:
        self.layout = layout


class SlicerApplication(QObject):
    """``slicer.app`` of a Slicer started with ``--testing --no-splash`` (popups only logged)."""

    SIGNALS = ("startupCompleted()", "aboutToQuit()")

    def __init__(self, scene):
        QObject.__init__(self)
        self.mrmlScene = scene
        self.modules = SimpleNamespace()
        self.applicationName = "Slicer"
        self.documentationBaseUrl = "https://slicer.readthedocs.io/en/latest/"
        self._manager = ModuleManager(self)
        self._mainWindow = MainWindow(self)
        self._layoutManager = None
        self.overrideCursorDepth = 0

    # -- what Slicer's Python layer calls ---------------------------------------------------

    def testingEnabled(self) -> bool:
        return True

    def translate(self, context, text, *args):
        return text

    def topLevelWidgets(self):
        return [self._mainWindow]

    def moduleManager(self):
        return self._manager

    def layoutManager(self):
        if self._layoutManager is None:
            self._layoutManager = LayoutManager(self)
        return self._layoutManager

    def settings(self):
        return QSettings()

    userSettings = settings

    def setOverrideCursor(self, cursor) -> None:
        self.overrideCursorDepth += 1

    def restoreOverrideCursor(self) -> None:
        self.overrideCursorDepth -= 1

    def processEvents(self, *args) -> None:
        QTimer.fire()

    def commandOptions(self):
        return SimpleNamespace(runPythonAndExit=False)

    def moduleDocumentationUrl(self, name):
        return self.documentationBaseUrl + name

    def keyboardModifiers(self):
        return 0

    def restart(self) -> None:
        raise AssertionError("a module asked Slicer to restart")

    def exit(self, status=0) -> None:
        raise AssertionError(f"a module asked Slicer to exit ({status})")

    def pythonConsole(self):
        return None
