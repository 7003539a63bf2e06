"""A .ui (Qt Designer XML) reader that builds stand-in widgets, as QUiLoader builds Qt ones.

Kept from QUiLoader: one object per <widget>/<layout> of the named class (an unknown class is an
error here; QUiLoader would print a warning and leave it out), objectName from ``name``, properties
applied in file order (a ``stdset="0"`` property becomes a dynamic property; any other name goes
through setProperty, so an unknown one also ends up dynamic, as in Qt), widgets in a layout
become children of the layout's widget, layouts children of their widget or parent layout,
combo box / list items, table columns, and the <connections> between widgets.
Not kept: geometry, size policies, stylesheets, icons, translations of the texts.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET


def _namespaces():
    import ctk
    import qt
    import slicer

    return (qt, ctk, slicer)


def _class(name: str):
    for namespace in _namespaces():
        cls = getattr(namespace, name, None)
        if isinstance(cls, type):
            return cls
    raise RuntimeError(f"the harness has no stand-in for the .ui class {name!r}; add one to Testing/slicer_harness")


def _value(element):
    """A <property>'s value as PythonQt would show it."""
    child = next(iter(element), None)
    if child is None:
        return None
    tag, text = child.tag, child.text or ""
    if tag in ("string", "cstring", "enum", "set"):
        return text
    if tag == "bool":
        return text.strip() == "true"
    if tag == "number":
        return int(text)
    if tag == "double":
        return float(text)
    if tag == "stringlist":
        return [item.text or "" for item in child.findall("string")]
    if tag in ("size", "rect", "point"):
        return tuple(int(part.text) for part in child)
    return text


def _apply_properties(obj, element) -> None:
    for prop in element.findall("property"):
        name, value = prop.get("name"), _value(prop)
        if prop.get("stdset") == "0":
            obj._dynamic[name] = value
        else:
            obj.setProperty(name, value)


def _build_widget(element, parent, objects):
    cls = _class(element.get("class"))
    widget = cls(parent) if parent is not None else cls()
    widget.objectName = element.get("name", "")
    objects[widget.objectName] = widget
    _apply_properties(widget, element)
    # combo box and list items, table columns
    texts = [_value(item.find("property[@name='text']")) or "" for item in element.findall("item")
             if item.find("property[@name='text']") is not None]
    if texts and hasattr(widget, "addItem"):
        for text in texts:
            widget.addItem(text)
    columns = element.findall("column")
    if columns and hasattr(widget, "setColumnCount"):
        widget.setColumnCount(len(columns))
        widget.setHorizontalHeaderLabels([_value(column.find("property[@name='text']")) or "" for column in columns])
    for child in element:
        if child.tag == "widget":
            _build_widget(child, widget, objects)
        elif child.tag == "layout":
            layout = _build_layout(child, objects)
            widget.setLayout(layout)
            _fill_layout(layout, child, objects)
    return widget


def _build_layout(element, objects):
    layout = _class(element.get("class"))()
    layout.objectName = element.get("name", "")
    objects[layout.objectName] = layout
    _apply_properties(layout, element)
    return layout


def _fill_layout(layout, element, objects) -> None:
    for item in element.findall("item"):
        for child in item:
            if child.tag == "widget":
                widget = _build_widget(child, None, objects)
                layout.addWidget(widget)
            elif child.tag == "layout":
                sub = _build_layout(child, objects)
                layout.addLayout(sub)
                _fill_layout(sub, child, objects)
            # <spacer>: not an object in Qt either (QSpacerItem)


def load_ui(path: str, parent=None):
    root = ET.parse(path).getroot()
    top = root.find("widget")
    if top is None:
        return None
    objects: dict = {}
    widget = _build_widget(top, parent, objects)
    connections = root.find("connections")
    for connection in connections if connections is not None else ():
        sender = objects[connection.findtext("sender")]
        receiver = objects[connection.findtext("receiver")]
        slot_name = connection.findtext("slot").split("(")[0]
        sender.connect(connection.findtext("signal"), getattr(receiver, slot_name))
    return widget
