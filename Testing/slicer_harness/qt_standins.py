"""Stand-ins for the Qt classes the LCTfound panels and Slicer's Python layer use (module ``qt``).

Small and behavioural: widgets hold their Qt properties and emit the signals Qt emits when those
change (see `qobject`). Nothing is drawn. Each class is named like its Qt class, because Slicer's
parameterNodeWrapper picks a GUI connector by ``type(widget) in (qt.QCheckBox, ...)``.
"""

from __future__ import annotations

import os
from types import SimpleNamespace

from .qobject import QObject, invoke_slot, qproperty


class Qt:
    """The enums of the Qt namespace that the modules and Slicer's layer use."""

    DisplayRole, ToolTipRole, UserRole = 0, 3, 256
    NoItemFlags, ItemIsSelectable, ItemIsEditable, ItemIsEnabled, ItemIsUserCheckable = 0, 1, 2, 32, 16
    Unchecked, PartiallyChecked, Checked = 0, 1, 2
    WaitCursor, ArrowCursor = 3, 0
    FastTransformation, SmoothTransformation = 0, 1
    NoModifier, ShiftModifier, ControlModifier = 0, 0x02000000, 0x04000000
    Horizontal, Vertical = 1, 2
    AlignLeft, AlignRight, AlignCenter = 1, 2, 0x84
    TextSelectableByMouse = 1


def _int(obj, value):
    return int(value)


def _bool(obj, value):
    return bool(value)


def _str(obj, value):
    return "" if value is None else str(value)


class QWidget(QObject):
    SIGNALS = ("customContextMenuRequested(QPoint)",)

    enabled = qproperty(True, _bool)
    visible = qproperty(True, _bool)
    toolTip = qproperty("", _str)
    statusTip = qproperty("", _str)
    whatsThis = qproperty("", _str)
    windowTitle = qproperty("", _str)
    width = qproperty(100, _int)
    height = qproperty(30, _int)

    def __init__(self, parent=None):
        QObject.__init__(self, parent)
        self._layout = None

    def isWidgetType(self) -> bool:
        return True

    def layout(self):
        return self._layout

    def setLayout(self, layout) -> None:
        self._layout = layout
        layout.setParent(self)

    def show(self) -> None:
        self.visible = True

    def hide(self) -> None:
        self.visible = False

    def isVisibleTo(self, ancestor) -> bool:
        widget = self
        while widget is not None and widget is not ancestor:
            if isinstance(widget, QWidget) and not widget.visible:
                return False
            widget = widget.parent()
        return True

    def setSizePolicy(self, *args) -> None:
        pass

    def update(self) -> None:
        pass

    def close(self) -> bool:
        self.visible = False
        return True


class QFrame(QWidget):
    pass


class QDialog(QWidget):
    SIGNALS = ("accepted()", "rejected()", "finished(int)")

    def exec_(self):
        raise AssertionError("a modal dialog was opened; in testing mode Slicer's util shows none")

    exec = exec_


class QMainWindow(QWidget):
    pass


# -- layouts ---------------------------------------------------------------------------------


class QLayout(QObject):
    def __init__(self, parent=None):
        QObject.__init__(self, None)
        self._items = []
        if parent is not None:
            parent.setLayout(self)

    def _widget_parent(self):
        owner = self.parent()
        while owner is not None and not owner.isWidgetType():
            owner = owner.parent()
        return owner

    def addWidget(self, widget, *args) -> None:
        self._items.append(widget)
        widget.setParent(self._widget_parent())  # Qt reparents a laid-out widget to the layout's widget

    def addLayout(self, layout, *args) -> None:
        self._items.append(layout)
        layout.setParent(self)

    def addRow(self, *items) -> None:
        for item in items:
            if isinstance(item, QLayout):
                self.addLayout(item)
            elif isinstance(item, QWidget):
                self.addWidget(item)

    def addItem(self, item) -> None:
        self._items.append(item)

    def addStretch(self, *args) -> None:
        pass

    def count(self) -> int:
        return len(self._items)


class QVBoxLayout(QLayout):
    pass


class QHBoxLayout(QLayout):
    pass


class QFormLayout(QLayout):
    pass


class QGridLayout(QLayout):
    pass


class QSpacerItem:
    def __init__(self, *args):
        pass


class QSizePolicy:
    Fixed, Minimum, Maximum, Preferred, Expanding, MinimumExpanding, Ignored = 0, 1, 4, 5, 7, 3, 13

    def __init__(self, *args):
        pass


# -- buttons ---------------------------------------------------------------------------------


class QAbstractButton(QWidget):
    SIGNALS = ("clicked(bool)", "clicked()", "pressed()", "released()", "toggled(bool)")

    text = qproperty("", _str)
    checkable = qproperty(False, _bool)
    checked = qproperty(False, _bool, signals={"toggled": lambda obj, value: (value,)})

    def __init__(self, text=None, parent=None):
        if isinstance(text, QObject):
            text, parent = None, text
        QWidget.__init__(self, parent)
        if text:
            self.text = text

    def click(self) -> None:
        """A user click: nothing when disabled (or hidden behind a disabled ancestor), as in Qt."""
        if not self.isEnabledTo(None):
            return
        if self.checkable:
            self.checked = not self.checked
        self._signal("clicked", ("bool",)).emit(self.checked)
        self._signal("clicked", ()).emit()

    def isEnabledTo(self, ancestor) -> bool:
        widget = self
        while widget is not None and widget is not ancestor:
            if isinstance(widget, QWidget) and not widget.enabled:
                return False
            widget = widget.parent()
        return True

    def setIcon(self, icon) -> None:
        pass


class QPushButton(QAbstractButton):
    def setMenu(self, menu) -> None:
        pass


class QToolButton(QAbstractButton):
    def setMenu(self, menu) -> None:
        pass

    def setDefaultAction(self, action) -> None:
        pass


class QCheckBox(QAbstractButton):
    SIGNALS = ("stateChanged(int)",)

    checkable = qproperty(True, _bool)
    checked = qproperty(False, _bool, signals={
        "toggled": lambda obj, value: (value,),
        "stateChanged": lambda obj, value: (Qt.Checked if value else Qt.Unchecked,),
    })

    def checkState(self) -> int:
        return Qt.Checked if self.checked else Qt.Unchecked

    def setCheckState(self, state) -> None:
        self.checked = state == Qt.Checked


class QRadioButton(QAbstractButton):
    checkable = qproperty(True, _bool)


# -- labels, text, progress ------------------------------------------------------------------


class QLabel(QFrame):
    text = qproperty("", _str)
    wordWrap = qproperty(False, _bool)

    def __init__(self, text=None, parent=None):
        if isinstance(text, QObject):
            text, parent = None, text
        QFrame.__init__(self, parent)
        if text:
            self.text = text
        self.pixmap = None

    def clear(self) -> None:
        self.text = ""
        self.pixmap = None

    def setPixmap(self, pixmap) -> None:
        self.pixmap = pixmap


class QLineEdit(QWidget):
    SIGNALS = ("textChanged(QString)", "textEdited(QString)", "editingFinished()", "returnPressed()")

    text = qproperty("", _str, signals={"textChanged": lambda obj, value: (value,)})
    placeholderText = qproperty("", _str)
    readOnly = qproperty(False, _bool)

    def clear(self) -> None:
        self.text = ""

    def type(self, text: str) -> None:
        """The user types ``text`` over the field's content and leaves it."""
        self.text = text
        self._signal("textEdited", ("QString",)).emit(text)
        self._signal("editingFinished", ()).emit()


class QTextEdit(QWidget):
    SIGNALS = ("textChanged()",)

    plainText = qproperty("", _str, signals={"textChanged": lambda obj, value: ()})

    def toPlainText(self) -> str:
        return self.plainText


class QPlainTextEdit(QTextEdit):
    def appendPlainText(self, text) -> None:
        self.plainText = self.plainText + ("\n" if self.plainText else "") + text


class QProgressBar(QWidget):
    SIGNALS = ("valueChanged(int)",)

    minimum = qproperty(0, _int)
    maximum = qproperty(100, _int)
    value = qproperty(-1, _int, signals={"valueChanged": lambda obj, value: (value,)})
    format = qproperty("%p%", _str)
    textVisible = qproperty(True, _bool)

    def setRange(self, minimum, maximum) -> None:
        self.minimum, self.maximum = minimum, maximum


# -- numbers ---------------------------------------------------------------------------------


def _clamped_int(obj, value):
    return int(min(max(int(round(value)), obj.minimum), obj.maximum))


def _clamped_float(obj, value):
    return round(min(max(float(value), obj.minimum), obj.maximum), obj.decimals)


class QAbstractSpinBox(QWidget):
    SIGNALS = ("editingFinished()",)

    specialValueText = qproperty("", _str)
    suffix = qproperty("", _str)
    prefix = qproperty("", _str)
    readOnly = qproperty(False, _bool)


class QSpinBox(QAbstractSpinBox):
    """Qt clamps the value to [minimum, maximum]; changing the range re-clamps it."""

    SIGNALS = ("valueChanged(int)", "valueChanged(QString)")

    minimum = qproperty(0, _int)
    maximum = qproperty(99, _int)
    singleStep = qproperty(1, _int)
    value = qproperty(0, _clamped_int, signals={"valueChanged": lambda obj, value: (value,)})

    def setRange(self, minimum, maximum) -> None:
        self.minimum, self.maximum = minimum, max(minimum, maximum)
        self.value = self.value

    def setMinimum(self, minimum) -> None:
        self.setRange(minimum, max(minimum, self.maximum))

    def setMaximum(self, maximum) -> None:
        self.setRange(min(self.minimum, maximum), maximum)


class QDoubleSpinBox(QAbstractSpinBox):
    """Qt rounds the value to ``decimals`` and clamps it to [minimum, maximum]."""

    SIGNALS = ("valueChanged(double)", "valueChanged(QString)")

    decimals = qproperty(2, _int)
    minimum = qproperty(0.0, lambda obj, value: float(value))
    maximum = qproperty(99.99, lambda obj, value: float(value))
    singleStep = qproperty(1.0, lambda obj, value: float(value))
    value = qproperty(0.0, _clamped_float, signals={"valueChanged": lambda obj, value: (value,)})

    def setRange(self, minimum, maximum) -> None:
        self.minimum, self.maximum = minimum, max(minimum, maximum)
        self.value = self.value

    def setMinimum(self, minimum) -> None:
        self.setRange(minimum, max(minimum, self.maximum))

    def setMaximum(self, maximum) -> None:
        self.setRange(min(self.minimum, maximum), maximum)


class QSlider(QSpinBox):
    SIGNALS = ("sliderMoved(int)", "sliderReleased()")

    orientation = qproperty(Qt.Horizontal)


# -- item views ------------------------------------------------------------------------------


def _index(obj, value):
    value = int(value)
    return value if -1 <= value < len(obj._items) else -1


class QComboBox(QWidget):
    """Items are (text, {role: data}); ``currentIndex`` changes emit currentIndexChanged and
    currentTextChanged, as in Qt, also when addItem makes the first item current."""

    SIGNALS = ("currentIndexChanged(int)", "currentIndexChanged(QString)", "currentTextChanged(QString)",
               "activated(int)", "editTextChanged(QString)")

    currentIndex = qproperty(-1, _index, signals={
        "currentIndexChanged": lambda obj, value: (value,),
        "currentTextChanged": lambda obj, value: (obj.currentText,),
    })
    editable = qproperty(False, _bool)

    def __init__(self, parent=None):
        QWidget.__init__(self, parent)
        self._items = []

    @property
    def count(self) -> int:
        return len(self._items)

    @property
    def currentText(self) -> str:
        return self._items[self.currentIndex][0] if self.currentIndex >= 0 else ""

    def currentData(self, role=Qt.UserRole):
        return self.itemData(self.currentIndex, role)

    def addItem(self, text, userData=None) -> None:
        self._items.append((str(text), {Qt.UserRole: userData} if userData is not None else {}))
        if self.currentIndex < 0:
            self.currentIndex = 0

    def addItems(self, texts) -> None:
        for text in texts:
            self.addItem(text)

    def clear(self) -> None:
        self._items.clear()
        self.currentIndex = -1

    def itemText(self, index) -> str:
        return self._items[index][0] if 0 <= index < len(self._items) else ""

    def itemData(self, index, role=Qt.UserRole):
        return self._items[index][1].get(role) if 0 <= index < len(self._items) else None

    def setItemData(self, index, value, role=Qt.UserRole) -> None:
        if 0 <= index < len(self._items):
            self._items[index][1][role] = value

    def findData(self, data, role=Qt.UserRole) -> int:
        for index, (_, roles) in enumerate(self._items):
            if roles.get(role) == data:
                return index
        return -1

    def findText(self, text) -> int:
        for index, (item_text, _) in enumerate(self._items):
            if item_text == text:
                return index
        return -1

    def select(self, data) -> None:
        """The user picks the item holding ``data`` (or, failing that, titled ``data``)."""
        index = self.findData(data)
        if index < 0:
            index = self.findText(data)
        if index < 0:
            raise AssertionError(f"{self.objectName}: no item {data!r} in {[text for text, _ in self._items]}")
        if not self.enabled:
            raise AssertionError(f"{self.objectName} is disabled")
        self.currentIndex = index
        self._signal("activated", ("int",)).emit(index)


class _Item:
    def __init__(self, text=""):
        self._roles = {Qt.DisplayRole: str(text)}
        self._flags = Qt.ItemIsSelectable | Qt.ItemIsEditable | Qt.ItemIsEnabled
        self._view = None

    def text(self) -> str:
        return self._roles.get(Qt.DisplayRole, "")

    def setText(self, text) -> None:
        self.setData(Qt.DisplayRole, str(text))

    def data(self, role):
        return self._roles.get(role)

    def setData(self, role, value) -> None:
        self._roles[role] = value
        if self._view is not None:
            self._view._itemChanged(self)

    def flags(self) -> int:
        return self._flags

    def setFlags(self, flags) -> None:
        self._flags = flags

    def setToolTip(self, text) -> None:
        self._roles[Qt.ToolTipRole] = text

    def toolTip(self):
        return self._roles.get(Qt.ToolTipRole, "")


class QTableWidgetItem(_Item):
    pass


class QListWidgetItem(_Item):
    def __init__(self, text="", parent=None):
        _Item.__init__(self, text)
        if parent is not None:
            parent.addItem(self)


class QTableWidget(QFrame):
    """Qt emits cellChanged(row, column) for setItem and for any data change of an item in the table."""

    SIGNALS = ("cellChanged(int,int)", "itemChanged(QTableWidgetItem*)", "cellClicked(int,int)",
               "itemSelectionChanged()", "currentCellChanged(int,int,int,int)")

    def __init__(self, parent=None):
        QFrame.__init__(self, parent)
        self._cells = {}
        self._rows = 0
        self._columns = 0
        self.headerLabels = []

    @property
    def rowCount(self) -> int:
        return self._rows

    @rowCount.setter
    def rowCount(self, rows) -> None:
        self._rows = int(rows)
        self._cells = {key: item for key, item in self._cells.items() if key[0] < self._rows}

    @property
    def columnCount(self) -> int:
        return self._columns

    @columnCount.setter
    def columnCount(self, columns) -> None:
        self._columns = int(columns)

    def setRowCount(self, rows) -> None:
        self.rowCount = rows

    def setColumnCount(self, columns) -> None:
        self.columnCount = columns

    def setHorizontalHeaderLabels(self, labels) -> None:
        self.headerLabels = list(labels)

    def clear(self) -> None:
        self._cells.clear()
        self.headerLabels = []

    def clearContents(self) -> None:
        self._cells.clear()

    def item(self, row, column):
        return self._cells.get((row, column))

    def setItem(self, row, column, item) -> None:
        if 0 <= row < self._rows and 0 <= column < self._columns:
            item._view = self
            self._cells[(row, column)] = item
            self._itemChanged(item)

    def _itemChanged(self, item) -> None:
        for (row, column), cell in self._cells.items():
            if cell is item:
                self._signal("itemChanged").emit(item)
                self._signal("cellChanged").emit(row, column)

    def edit(self, row, column, text) -> None:
        """The user types ``text`` into a cell (Qt creates the item when the cell was empty)."""
        item = self.item(row, column)
        if item is None:
            self.setItem(row, column, QTableWidgetItem(text))
        elif not item.flags() & Qt.ItemIsEditable:
            raise AssertionError(f"{self.objectName}: cell ({row}, {column}) is not editable")
        else:
            item.setText(text)

    def horizontalHeader(self):
        return SimpleNamespace(setSectionResizeMode=lambda *args: None, setStretchLastSection=lambda *args: None)

    def resizeColumnsToContents(self) -> None:
        pass


class QListWidget(QFrame):
    SIGNALS = ("currentRowChanged(int)", "itemSelectionChanged()", "itemChanged(QListWidgetItem*)",
               "itemClicked(QListWidgetItem*)")

    currentRow = qproperty(-1, _int, signals={"currentRowChanged": lambda obj, value: (value,)})

    def __init__(self, parent=None):
        QFrame.__init__(self, parent)
        self._listItems = []

    @property
    def count(self) -> int:
        return len(self._listItems)

    def addItem(self, item) -> None:
        if isinstance(item, str):
            item = QListWidgetItem(item)
        item._view = self
        self._listItems.append(item)

    def item(self, row):
        return self._listItems[row] if 0 <= row < len(self._listItems) else None

    def clear(self) -> None:
        self._listItems.clear()
        self.currentRow = -1

    def _itemChanged(self, item) -> None:
        self._signal("itemChanged").emit(item)

    def selectedItems(self) -> list:
        return [self._listItems[self.currentRow]] if self.currentRow >= 0 else []


# -- not widgets -----------------------------------------------------------------------------


class QTimer(QObject):
    """A timer that runs only when the harness fires it (`SlicerApplication.processEvents`):
    real time plays no part, so a test's outcome never depends on the machine's speed."""

    SIGNALS = ("timeout()",)

    interval = qproperty(0, _int)
    singleShot_ = qproperty(False, _bool)
    _all = []
    _pending = []

    def __init__(self, parent=None):
        QObject.__init__(self, parent)
        self.active = False
        QTimer._all.append(self)

    def start(self, msec=None) -> None:
        if msec is not None:
            self.interval = msec
        self.active = True

    def stop(self) -> None:
        self.active = False

    def isActive(self) -> bool:
        return self.active

    def setSingleShot(self, value) -> None:
        self.singleShot_ = value

    @staticmethod
    def singleShot(msec, slot) -> None:
        QTimer._pending.append(slot)

    @classmethod
    def fire(cls) -> int:
        """One turn of the event loop: pending single shots, then every active timer once."""
        fired = 0
        pending, cls._pending[:] = list(cls._pending), []
        for slot in pending:
            invoke_slot(slot, ())
            fired += 1
        for timer in list(cls._all):
            if timer.active:
                if timer.singleShot_:
                    timer.active = False
                timer._signal("timeout").emit()
                fired += 1
        return fired

    @classmethod
    def reset(cls) -> None:
        for timer in cls._all:
            timer.active = False
        cls._all.clear()
        cls._pending.clear()


class QFile:
    ReadOnly = 1

    def __init__(self, path):
        self.path = str(path)

    def exists(self) -> bool:
        return os.path.isfile(self.path)

    def open(self, mode) -> bool:
        return self.exists()

    def close(self) -> None:
        pass


class QUiLoader:
    def load(self, qfile, parent=None):
        from .ui_loader import load_ui

        return load_ui(qfile.path, parent)


class QSettings:
    """In-memory settings shared by every QSettings() of one harness (Slicer's come from an ini file)."""

    _values: dict = {}

    def value(self, key, default=None):
        return QSettings._values.get(key, default)

    def setValue(self, key, value) -> None:
        QSettings._values[key] = value

    def contains(self, key) -> bool:
        return key in QSettings._values

    def remove(self, key) -> None:
        QSettings._values.pop(key, None)


class QIcon:
    def __init__(self, path=""):
        self.path = str(path)


class QPixmap:
    def __init__(self, path=""):
        self.path = str(path)
        self.loaded = os.path.isfile(self.path)
        self.width = 0

    def isNull(self) -> bool:
        return not self.loaded

    def scaledToWidth(self, width, mode=0):
        scaled = QPixmap(self.path)
        scaled.width = width
        return scaled


class QColor:
    def __init__(self, *args):
        self.args = args


class QUrl:
    TolerantMode = 0

    def __init__(self, url="", mode=0):
        self.url = url


class QMessageBox(QDialog):
    NoButton, Ok, Cancel, Yes, No, Retry, Close = 0, 0x400, 0x400000, 0x4000, 0x10000, 0x80000, 0x200000
    NoIcon, Information, Warning, Critical, Question = 0, 1, 2, 3, 4


class QProgressDialog(QDialog):
    minimumDuration = qproperty(0, _int)
    maximum = qproperty(100, _int)
    value = qproperty(0, _int)
    labelText = qproperty("", _str)

    def setCancelButton(self, button) -> None:
        """Qt: None removes the button (the dialog then cannot be cancelled)."""
        self.cancelButton = button


class QApplication:
    @staticmethod
    def setOverrideCursor(cursor) -> None:
        pass

    @staticmethod
    def restoreOverrideCursor() -> None:
        pass

    @staticmethod
    def processEvents(*args) -> None:
        QTimer.fire()


class QCoreApplication(QApplication):
    @staticmethod
    def translate(context, text, *args):
        return text
