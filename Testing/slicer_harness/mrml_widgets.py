"""Stand-ins for Slicer's MRML widgets (qMRMLNodeComboBox & co.), working on a real MRML scene.

A node combo box lists the scene's nodes whose class is one of ``nodeTypes`` (subclasses too unless
``showChildNodeTypes`` is false; hidden nodes only with ``showHidden``), follows node additions and
removals, and, when ``noneEnabled`` is false, selects the first node as soon as there is one — the
behaviours a panel's parameter binding relies on.
"""

from __future__ import annotations

from .qobject import qproperty
from .qt_standins import Qt, QWidget, _bool, _str


class qMRMLWidget(QWidget):
    SIGNALS = ("mrmlSceneChanged(vtkMRMLScene*)",)

    def __init__(self, parent=None):
        QWidget.__init__(self, parent)
        self._scene = None

    def setMRMLScene(self, scene) -> None:
        if scene is self._scene:
            return
        self._scene = scene
        self._signal("mrmlSceneChanged").emit(scene)

    def mrmlScene(self):
        return self._scene


class qSlicerWidget(qMRMLWidget):
    pass


class qMRMLNodeComboBox(qMRMLWidget):
    SIGNALS = ("currentNodeChanged(vtkMRMLNode*)", "currentNodeChanged(bool)", "currentNodeIDChanged(QString)",
               "nodeAdded(vtkMRMLNode*)", "nodeAboutToBeRemoved(vtkMRMLNode*)", "nodeActivated(vtkMRMLNode*)")

    nodeTypes = qproperty([], lambda obj, value: [str(name) for name in value])
    showChildNodeTypes = qproperty(True, _bool)
    hideChildNodeTypes = qproperty([], lambda obj, value: [str(name) for name in value])
    showHidden = qproperty(False, _bool)
    noneEnabled = qproperty(False, _bool)
    addEnabled = qproperty(True, _bool)
    removeEnabled = qproperty(True, _bool)
    renameEnabled = qproperty(False, _bool)
    editEnabled = qproperty(False, _bool)
    selectNodeUponCreation = qproperty(True, _bool)
    baseName = qproperty("", _str)
    noneDisplay = qproperty("None", _str)

    def __init__(self, parent=None):
        qMRMLWidget.__init__(self, parent)
        self._currentID = ""
        self._observations = []

    # -- scene ---------------------------------------------------------------------------------

    def setMRMLScene(self, scene) -> None:
        if scene is self._scene:
            return
        for observed, tag in self._observations:
            observed.RemoveObserver(tag)
        self._observations = []
        qMRMLWidget.setMRMLScene(self, scene)
        if scene is not None:
            for event in (scene.NodeAddedEvent, scene.NodeRemovedEvent, scene.EndCloseEvent, scene.EndImportEvent):
                self._observations.append((scene, scene.AddObserver(event, self._onSceneChanged)))
        self._onSceneChanged()

    def _listed(self, node) -> bool:
        if node is None:
            return False
        if not self.showHidden and node.GetHideFromEditors():
            return False
        if any(node.IsA(name) for name in self.hideChildNodeTypes):
            return False
        if self.showChildNodeTypes:
            return any(node.IsA(name) for name in self.nodeTypes)
        return node.GetClassName() in self.nodeTypes

    def nodes(self) -> list:
        scene = self._scene
        if scene is None:
            return []
        found = []
        for index in range(scene.GetNumberOfNodes()):
            node = scene.GetNthNode(index)
            if self._listed(node):
                found.append(node)
        return found

    def _onSceneChanged(self, caller=None, event=None) -> None:
        if "_scene" not in self.__dict__:
            return  # the widget was already torn down when its scene went (end of the test process)
        listed = self.nodes()
        ids = [node.GetID() for node in listed]
        if self._currentID and self._currentID not in ids:
            self._setCurrentID("")
        if not self._currentID and not self.noneEnabled and listed:
            self._setCurrentID(ids[0])

    # -- selection -----------------------------------------------------------------------------

    def currentNode(self):
        return self._scene.GetNodeByID(self._currentID) if self._scene is not None and self._currentID else None

    @property
    def currentNodeID(self) -> str:
        return self._currentID

    def setCurrentNodeID(self, nodeID) -> None:
        nodeID = nodeID or ""
        if nodeID and nodeID not in [node.GetID() for node in self.nodes()]:
            nodeID = ""  # not listed here: Qt finds no row for it
        if not nodeID and not self.noneEnabled and self.nodes():
            nodeID = self.nodes()[0].GetID()
        self._setCurrentID(nodeID)

    def setCurrentNode(self, node) -> None:
        self.setCurrentNodeID(node.GetID() if node is not None else "")

    def _setCurrentID(self, nodeID) -> None:
        if nodeID == self._currentID:
            return
        self._currentID = nodeID
        node = self.currentNode()
        self._signal("currentNodeChanged", ("vtkMRMLNode*",)).emit(node)
        self._signal("currentNodeChanged", ("bool",)).emit(node is not None)
        self._signal("currentNodeIDChanged").emit(nodeID)

    def nodeCount(self) -> int:
        return len(self.nodes())

    def nodeFromIndex(self, index):
        listed = self.nodes()
        return listed[index] if 0 <= index < len(listed) else None

    def select(self, node) -> None:
        """The user picks ``node`` (or None) in the drop-down."""
        if not self.enabled:
            raise AssertionError(f"{self.objectName} is disabled")
        if node is not None and node not in self.nodes():
            raise AssertionError(f"{self.objectName}: {node.GetName()} is not listed ({self.nodeTypes})")
        if node is None and not self.noneEnabled:
            raise AssertionError(f"{self.objectName} offers no 'None'")
        self.setCurrentNode(node)
        self._signal("nodeActivated").emit(node)

    def addNode(self):
        if self._scene is None or not self.nodeTypes:
            return None
        node = self._scene.AddNewNodeByClass(self.nodeTypes[0], self.baseName or "")
        self.setCurrentNode(node)
        return node


class qMRMLCheckableNodeComboBox(qMRMLNodeComboBox):
    SIGNALS = ("checkedNodesChanged()", "checkStateChanged(vtkMRMLNode*)")

    noneEnabled = qproperty(True, _bool)  # no automatic current node: nodes are checked instead

    def __init__(self, parent=None):
        qMRMLNodeComboBox.__init__(self, parent)
        self._checked = set()

    def _onSceneChanged(self, caller=None, event=None) -> None:
        ids = {node.GetID() for node in self.nodes()}
        if self._checked - ids:
            self._checked &= ids
            self._signal("checkedNodesChanged").emit()

    def checkState(self, node) -> int:
        return Qt.Checked if node is not None and node.GetID() in self._checked else Qt.Unchecked

    def setCheckState(self, node, state) -> None:
        if node is None:
            return
        before = set(self._checked)
        if state == Qt.Checked:
            self._checked.add(node.GetID())
        else:
            self._checked.discard(node.GetID())
        if before != self._checked:
            self._signal("checkStateChanged").emit(node)
            self._signal("checkedNodesChanged").emit()

    def checkedNodes(self) -> list:
        return [node for node in self.nodes() if node.GetID() in self._checked]

    def check(self, *nodes) -> None:
        """The user ticks ``nodes`` in the drop-down."""
        for node in nodes:
            if node not in self.nodes():
                raise AssertionError(f"{self.objectName}: {node.GetName()} is not listed ({self.nodeTypes})")
            self.setCheckState(node, Qt.Checked)


class qMRMLSliderWidget(QWidget):
    pass


class qMRMLSpinBox(QWidget):
    pass


class qMRMLRangeWidget(QWidget):
    pass


class _ModelIndex:
    def __init__(self, row):
        self._row = row

    def row(self) -> int:
        return self._row

    def isValid(self) -> bool:
        return self._row >= 0


class qMRMLTableView(QWidget):
    """Shows a table node; ``currentIndex`` is a model index (row) of the view, which maps to the
    table node's row through the sort proxy (identity here: no sorting)."""

    SIGNALS = ("selectionChanged()",)

    def __init__(self, parent=None):
        QWidget.__init__(self, parent)
        self._table = None
        self._row = -1

    def setMRMLScene(self, scene) -> None:
        self._scene = scene

    def setMRMLTableNode(self, node) -> None:
        self._table = node

    def mrmlTableNode(self):
        return self._table

    def currentIndex(self):
        return _ModelIndex(self._row)

    def selectRow(self, row) -> None:
        self._row = row

    def sortFilterProxyModel(self):
        class _Proxy:
            @staticmethod
            def mapToSource(index):
                return index

        return _Proxy()

    def setFirstRowLocked(self, locked) -> None:
        pass


class qSlicerMarkupsPlaceWidget(QWidget):
    SIGNALS = ("activeMarkupsFiducialPlaceModeChanged(bool)",)

    placeMultipleMarkups = qproperty(0)
    buttonsVisible = qproperty(True, _bool)

    def __init__(self, parent=None):
        QWidget.__init__(self, parent)
        self._node = None

    def setMRMLScene(self, scene) -> None:
        self._scene = scene

    def setCurrentNode(self, node) -> None:
        self._node = node

    def currentNode(self):
        return self._node

    def setPlaceModeEnabled(self, enabled) -> None:
        pass


class qMRMLSegmentEditorWidget(qMRMLWidget):
    """The Segment Editor's editor: which segmentation and source volume it edits, and its undo states."""

    SIGNALS = ("segmentationNodeChanged(vtkMRMLSegmentationNode*)", "sourceVolumeNodeChanged(vtkMRMLVolumeNode*)")

    def __init__(self, parent=None):
        qMRMLWidget.__init__(self, parent)
        self._segmentation = None
        self._source = None
        self.undoStates = []

    def setSegmentationNode(self, node) -> None:
        self._segmentation = node
        self._signal("segmentationNodeChanged").emit(node)

    def segmentationNode(self):
        return self._segmentation

    def setSourceVolumeNode(self, node) -> None:
        self._source = node
        self._signal("sourceVolumeNodeChanged").emit(node)

    def sourceVolumeNode(self):
        return self._source

    def setSourceVolumeNodeID(self, nodeID) -> None:
        self.setSourceVolumeNode(self._segmentation.GetScene().GetNodeByID(nodeID) if self._segmentation else None)

    def saveStateForUndo(self) -> None:
        import slicer

        state = slicer.vtkSegmentation()
        if self._segmentation is not None:
            state.DeepCopy(self._segmentation.GetSegmentation())
        self.undoStates.append(state)
