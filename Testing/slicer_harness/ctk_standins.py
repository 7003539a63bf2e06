"""Stand-ins for the CTK widgets (module ``ctk``) that the panels and Slicer's parameterNodeWrapper use.

Classes only named by the wrapper's GUI connectors (``type(widget) in (ctk.ctkSliderWidget, ...)``)
exist so that those checks run; they behave like their Qt base."""

from __future__ import annotations

from .qobject import qproperty
from .qt_standins import (
    QAbstractButton,
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QMessageBox,
    QPushButton,
    QWidget,
    _bool,
    _str,
)


class ctkCollapsibleButton(QAbstractButton):
    SIGNALS = ("contentsCollapsed(bool)",)

    checkable = qproperty(True, _bool)
    checked = qproperty(True, _bool, signals={"toggled": lambda obj, value: (value,),
                                               "contentsCollapsed": lambda obj, value: (not value,)})

    @property
    def collapsed(self) -> bool:
        return not self.checked

    @collapsed.setter
    def collapsed(self, value) -> None:
        self.checked = not value

    def setCollapsed(self, value) -> None:
        self.collapsed = value


class ctkPathLineEdit(QWidget):
    """``currentPath`` is the text of the path field; it emits currentPathChanged(QString)."""

    SIGNALS = ("currentPathChanged(QString)", "validInputChanged(bool)")

    currentPath = qproperty("", _str, signals={"currentPathChanged": lambda obj, value: (value,)})
    filters = qproperty("")
    nameFilters = qproperty([])
    showBrowseButton = qproperty(True, _bool)
    showHistoryButton = qproperty(True, _bool)

    def addCurrentPathToHistory(self) -> None:
        pass


class ctkDirectoryButton(QWidget):
    SIGNALS = ("directoryChanged(QString)",)

    directory = qproperty("", _str, signals={"directoryChanged": lambda obj, value: (value,)})


class ctkSliderWidget(QDoubleSpinBox):
    tracking = qproperty(True, _bool)


class ctkDoubleSpinBox(QDoubleSpinBox):
    pass


class ctkDoubleSlider(QDoubleSpinBox):
    pass


class ctkCheckBox(QCheckBox):
    pass


class ctkComboBox(QComboBox):
    pass


class ctkCheckablePushButton(QPushButton):
    checkBoxControlsButtonToggleState = qproperty(False, _bool)


class ctkRangeWidget(QWidget):
    SIGNALS = ("valuesChanged(double,double)",)


class ctkDoubleRangeSlider(ctkRangeWidget):
    pass


class ctkColorPickerButton(QPushButton):
    SIGNALS = ("colorChanged(QColor)",)


class ctkMessageBox(QMessageBox):
    text = qproperty("", _str)
    dontShowAgainSettingsKey = qproperty("", _str)


class ctkMenuButton(QPushButton):
    pass
