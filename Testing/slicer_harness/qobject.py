"""QObject, signals and properties as PythonQt shows them to Python.

PythonQt behaviour kept here (it decides whether module code works in a real Slicer):

* Qt properties are plain attributes (``button.enabled = False``, ``combo.count``, ``table.rowCount``),
  and each also has its ``setX(value)`` method; writing a property emits the signal the Qt class
  emits for it (``value`` → ``valueChanged``), only when the value changes.
* ``obj.connect("clicked(bool)", slot)`` and ``obj.clicked.connect(slot)``; an unknown signal is an
  error here (PythonQt only prints a warning and the slot never runs: a silent bug in Slicer).
* A signal passes a Python slot only as many arguments as the slot's code accepts
  (``co_argcount``, defaults included, ``self`` excluded; all with ``*args``), exactly like
  PythonQtSignalReceiver. So ``lambda name=name: ...`` on ``clicked(bool)`` receives ``False``.
* An exception in a slot does not propagate to the emitter: PythonQt prints it and goes on. The
  harness records it (`SLOT_ERRORS`) so a test can fail on it.
* ``property(name)`` / ``setProperty(name, value)`` read Qt properties and dynamic ones (``stdset="0"``
  in a .ui file); an unknown name reads as None.
"""

from __future__ import annotations

import inspect
import logging
import re
import traceback
import weakref

#: (slot, formatted traceback) of every exception raised inside a slot, in order.
SLOT_ERRORS: list = []

_SIGNATURE = re.compile(r"^\s*(\w+)\s*\((.*)\)\s*$")


def _normalize(signature: str) -> tuple[str, tuple[str, ...]]:
    match = _SIGNATURE.match(signature)
    if not match:
        raise ValueError(f"not a Qt signal signature: {signature!r}")
    args = tuple(arg.strip() for arg in match.group(2).split(",") if arg.strip())
    return match.group(1), args


def _accepted_count(slot, offered: int) -> int:
    """How many of ``offered`` signal arguments PythonQt passes to ``slot``."""
    function = getattr(slot, "__func__", slot)
    code = getattr(function, "__code__", None)
    if code is None:
        return offered  # builtins, partials, callable objects: PythonQt passes everything
    if code.co_flags & inspect.CO_VARARGS:
        return offered
    count = code.co_argcount - (1 if inspect.ismethod(slot) else 0)
    return min(max(count, 0), offered)


def invoke_slot(slot, args) -> None:
    try:
        slot(*args[: _accepted_count(slot, len(args))])
    except Exception:  # noqa: BLE001 - PythonQt prints slot exceptions and carries on
        text = traceback.format_exc()
        logging.error("exception in a Qt slot (PythonQt prints it and carries on):\n%s", text)
        SLOT_ERRORS.append((slot, text))


class BoundSignal:
    """One signal of one object (``obj.clicked``)."""

    def __init__(self, owner, name: str, args: tuple[str, ...]):
        self._owner = weakref.ref(owner)
        self.name, self.args = name, args
        self.slots: list = []

    def connect(self, slot) -> bool:
        if not callable(slot):
            raise TypeError(f"{self.name}: slot {slot!r} is not callable")
        self.slots.append(slot)
        return True

    def disconnect(self, slot=None) -> bool:
        if slot is None:
            self.slots.clear()
            return True
        for index, connected in enumerate(self.slots):
            if connected == slot:
                del self.slots[index]
                return True
        return False

    def emit(self, *args) -> None:
        owner = self._owner()
        if owner is not None and owner._signalsBlocked:
            return
        for slot in list(self.slots):
            invoke_slot(slot, args)


class qproperty:
    """A Qt property: attribute access, ``setName()``, and the change signal(s) emitted on change.

    ``signals`` maps signal names to a function (obj, new value) → the signal's arguments."""

    def __init__(self, default=None, convert=None, signals=None, notify_always=False):
        self.default, self.convert, self.signals = default, convert, signals or {}
        self.notify_always = notify_always

    def __set_name__(self, owner, name):
        self.name = name
        setter = "set" + name[0].upper() + name[1:]
        if setter not in owner.__dict__:
            setattr(owner, setter, lambda obj, value: setattr(obj, name, value))
        getter = "is" + name[0].upper() + name[1:]
        if isinstance(self.default, bool) and getter not in owner.__dict__:
            setattr(owner, getter, lambda obj: getattr(obj, name))

    def __get__(self, obj, owner=None):
        if obj is None:
            return self
        return obj._props.get(self.name, self.default)

    def __set__(self, obj, value):
        if self.convert is not None:
            value = self.convert(obj, value)
        old = obj._props.get(self.name, self.default)
        obj._props[self.name] = value
        if old != value or self.notify_always:
            for signal, arguments in self.signals.items():
                getattr(obj, signal).emit(*arguments(obj, value))


class QObject:
    #: Signal signatures this class emits (the bases' are included).
    SIGNALS: tuple = ("destroyed()", "objectNameChanged(QString)")

    def __init__(self, parent=None):
        object.__setattr__(self, "_props", {})
        self._dynamic = {}
        self._children = []
        self._parent = None
        self._signalsBlocked = False
        self._signals = {}
        if parent is not None:
            self.setParent(parent)

    # -- signals -----------------------------------------------------------------------------

    @classmethod
    def _declared_signals(cls):
        for klass in cls.__mro__:
            for signature in vars(klass).get("SIGNALS", ()):
                yield _normalize(signature)

    def _signal(self, name: str, args=None) -> BoundSignal:
        for declared_name, declared_args in self._declared_signals():
            if declared_name == name and (args is None or declared_args == args):
                key = (declared_name, declared_args)
                if key not in self._signals:
                    self._signals[key] = BoundSignal(self, declared_name, declared_args)
                return self._signals[key]
        raise AttributeError(f"{type(self).__name__} has no signal {name}({', '.join(args or ())})")

    def __getattr__(self, name):
        if name.startswith("_"):
            raise AttributeError(name)
        if any(declared == name for declared, _ in self._declared_signals()):
            return self._signal(name)
        raise AttributeError(f"'{type(self).__name__}' stand-in has no attribute '{name}'")

    def connect(self, signature, slot) -> bool:
        name, args = _normalize(signature)
        return self._signal(name, args).connect(slot)

    def disconnect(self, signature, slot=None) -> bool:
        name, args = _normalize(signature)
        return self._signal(name, args).disconnect(slot)

    def emit(self, signature, *args):
        """Emit a signal by signature (tests use it for user actions without a setter)."""
        name, declared = _normalize(signature)
        self._signal(name, declared).emit(*args)

    def blockSignals(self, block: bool) -> bool:
        was, self._signalsBlocked = self._signalsBlocked, bool(block)
        return was

    def signalsBlocked(self) -> bool:
        return self._signalsBlocked

    # -- properties ----------------------------------------------------------------------------

    objectName = qproperty("", signals={"objectNameChanged": lambda obj, value: (value,)})

    @property
    def name(self):  # PythonQt's alias of objectName
        return self.objectName

    @name.setter
    def name(self, value):
        self.objectName = value

    def property(self, name):
        descriptor = getattr(type(self), name, None)
        if isinstance(descriptor, qproperty):
            return getattr(self, name)
        return self._dynamic.get(name)

    def setProperty(self, name, value) -> bool:
        descriptor = getattr(type(self), name, None)
        if isinstance(descriptor, qproperty):
            setattr(self, name, value)
            return True
        self._dynamic[name] = value
        return False  # Qt returns false for a dynamic property

    def dynamicPropertyNames(self):
        return list(self._dynamic)

    def className(self) -> str:
        return type(self).__name__

    def metaObject(self):
        return type(self)

    def isWidgetType(self) -> bool:
        return False

    # -- object tree ---------------------------------------------------------------------------

    def parent(self):
        return self._parent

    def setParent(self, parent) -> None:
        if self._parent is not None and self in self._parent._children:
            self._parent._children.remove(self)
        self._parent = parent
        if parent is not None:
            parent._children.append(self)

    def children(self) -> list:
        return list(self._children)

    def findChildren(self, kind=None) -> list:
        """All descendants (depth first), of a class (or its name) when given."""
        found = []
        for child in self._children:
            if kind is None or (isinstance(kind, str) and child.className() == kind) or (
                    isinstance(kind, type) and isinstance(child, kind)):
                found.append(child)
            found.extend(child.findChildren(kind))
        return found

    def findChild(self, kind, name=""):
        for child in self.findChildren(kind):
            if not name or child.objectName == name:
                return child
        return None

    def deleteLater(self) -> None:
        pass

    def __repr__(self):
        return f"<{type(self).__name__} stand-in {self.objectName!r}>"
