"""The fixed structure table: name → label value, colour and standard terminology.

Label values are fixed by structure *name* (never by segment order), so every exported case
uses the same integers. The table lives in ``structures.json`` next to this file. Names are
matched case-insensitively, ignoring ``_``/``-``/extra spaces, and through aliases
("tumour" → Lesion, "lung_upper_lobe_right" → Right upper lobe); a segment whose name is
unknown but whose terminology codes match a structure maps to that structure.
Names that are not in the table get values from ``user_label_start`` (100) upwards, in
sorted order, through `StructureTable.extended`; keep the extended table to give the same
names the same values across cases.

Pure Python: no ``slicer`` import, usable by the engine and the command line.
"""

from __future__ import annotations

import colorsys
import functools
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping

from ..errors import LCTfoundError
from .terminology import TerminologyEntry, parse_terminology

TABLE_PATH = Path(__file__).with_name("structures.json")
MAX_LABEL = 65535


def normalize_name(name: str) -> str:
    """Comparison key of a structure name: lower case, ``_``/``-`` as spaces, single spaces."""
    return " ".join(re.sub(r"[_\-]+", " ", str(name)).lower().split())


def _label_color(label: int) -> tuple[float, float, float]:
    """A stable, distinct colour for a label that has none in the table (golden-angle hues)."""
    hue = (label * 0.618033988749895) % 1.0
    return colorsys.hsv_to_rgb(hue, 0.55, 0.95)


@dataclass(frozen=True)
class Structure:
    """One row of the table. ``color`` is RGB in 0..1; ``terminology`` is a Slicer entry string ('' if none)."""

    name: str
    label: int
    color: tuple[float, float, float]
    terminology: str = ""
    aliases: tuple[str, ...] = ()
    fixed: bool = True

    @property
    def terminology_entry(self) -> TerminologyEntry | None:
        return parse_terminology(self.terminology)


@dataclass(frozen=True)
class StructureTable:
    """An immutable name ↔ label table (the fixed structures plus any user-defined extras)."""

    structures: tuple[Structure, ...]
    user_label_start: int = 100
    _by_key: dict = field(default=None, init=False, repr=False, compare=False)
    _by_label: dict = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        by_key: dict[str, Structure] = {}
        by_label: dict[int, Structure] = {}
        for s in self.structures:
            if not isinstance(s.label, int) or not 0 <= s.label <= MAX_LABEL:
                raise LCTfoundError(f"structure {s.name!r}: label {s.label!r} is not an integer in 0..{MAX_LABEL}")
            if s.label in by_label:
                raise LCTfoundError(f"structures {by_label[s.label].name!r} and {s.name!r} share label {s.label}")
            by_label[s.label] = s
            for key in (s.name, *s.aliases):
                k = normalize_name(key)
                if not k:
                    raise LCTfoundError(f"structure with label {s.label} has an empty name or alias")
                if k in by_key and by_key[k] is not s:
                    raise LCTfoundError(f"name {key!r} is used by both {by_key[k].name!r} and {s.name!r}")
                by_key[k] = s
        object.__setattr__(self, "_by_key", by_key)
        object.__setattr__(self, "_by_label", by_label)

    # --- construction -------------------------------------------------------------------

    @classmethod
    def from_json(cls, path: str | Path) -> "StructureTable":
        path = Path(path)
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise LCTfoundError(f"{path}: cannot read the structure table ({exc})") from exc
        return cls.from_dict(doc, source=str(path))

    @classmethod
    def from_dict(cls, doc: Mapping, source: str = "structure table") -> "StructureTable":
        try:
            rows = doc["structures"]
            structures = tuple(
                Structure(
                    name=str(row["name"]),
                    label=int(row["label"]),
                    color=tuple(float(c) / 255.0 for c in row.get("color") or ()) or _label_color(int(row["label"])),
                    terminology=str(row.get("terminology") or ""),
                    aliases=tuple(str(a) for a in row.get("aliases", ())),
                    fixed=bool(row.get("fixed", True)),
                )
                for row in rows
            )
            start = int(doc.get("user_label_start", max((s.label for s in structures), default=0) + 1))
        except (KeyError, TypeError, ValueError) as exc:
            raise LCTfoundError(f"{source}: malformed structure table ({exc!r})") from exc
        for s in structures:
            if len(s.color) != 3:
                raise LCTfoundError(f"{source}: structure {s.name!r} colour must have 3 components")
            if s.terminology and s.terminology_entry is None:
                raise LCTfoundError(f"{source}: structure {s.name!r} has a malformed terminology entry")
        return cls(structures, start)

    def to_dict(self) -> dict:
        """JSON-ready form (colours back to 0..255), e.g. to store next to exported label maps."""
        return {
            "user_label_start": self.user_label_start,
            "structures": [
                {
                    "label": s.label,
                    "name": s.name,
                    "color": [round(c * 255) for c in s.color],
                    "terminology": s.terminology,
                    "aliases": list(s.aliases),
                    "fixed": s.fixed,
                }
                for s in self.structures
            ],
        }

    # --- look-ups ---------------------------------------------------------------------

    def find(self, name: str | None, terminology: str | None = None) -> Structure | None:
        """The structure for a segment name (aliases, case-insensitive), else by terminology codes."""
        if name:
            hit = self._by_key.get(normalize_name(name))
            if hit is not None:
                return hit
        entry = parse_terminology(terminology)
        if entry is not None:
            for s in self.structures:
                other = s.terminology_entry
                if other is not None and other.same_concept(entry):
                    return s
        return None

    def by_label(self, label: int) -> Structure | None:
        return self._by_label.get(int(label))

    def label_for(self, name: str, terminology: str | None = None) -> int | None:
        s = self.find(name, terminology)
        return None if s is None else s.label

    def __getitem__(self, name: str) -> Structure:
        s = self.find(name)
        if s is None:
            raise LCTfoundError(f"unknown structure {name!r}; known: {', '.join(self.names())}")
        return s

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self.find(name) is not None

    def __iter__(self):
        return iter(self.structures)

    def __len__(self) -> int:
        return len(self.structures)

    def names(self) -> list[str]:
        return [s.name for s in self.structures]

    def label_names(self) -> dict[int, str]:
        """{label: name} of every structure, background included."""
        return {s.label: s.name for s in self.structures}

    def color_for_label(self, label: int) -> tuple[float, float, float]:
        s = self.by_label(label)
        return s.color if s is not None else _label_color(int(label))

    # --- growth -----------------------------------------------------------------------

    def next_user_label(self) -> int:
        used = [s.label for s in self.structures if s.label >= self.user_label_start]
        return max(used, default=self.user_label_start - 1) + 1

    def extended(self, names: Iterable[str]) -> "StructureTable":
        """A table that also knows ``names``: each unknown name gets the next free user label.

        Names are added in the order given (pass them sorted for a deterministic result);
        names already known (directly or by alias) keep their value.
        """
        added: list[Structure] = []
        keys: set[str] = set()
        label = self.next_user_label()
        for name in names:
            key = normalize_name(name)
            if not key or key in keys or self.find(name) is not None:
                continue
            if label > MAX_LABEL:
                raise LCTfoundError(f"too many structure names: no label value left for {name!r}")
            keys.add(key)
            added.append(Structure(str(name).strip(), label, _label_color(label), fixed=False))
            label += 1
        if not added:
            return self
        return StructureTable(self.structures + tuple(added), self.user_label_start)


@functools.lru_cache(maxsize=1)
def default_structure_table() -> StructureTable:
    """The packaged table (structures.json)."""
    return StructureTable.from_json(TABLE_PATH)
