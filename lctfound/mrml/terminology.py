"""Slicer terminology-entry strings (standard codes that say what a segment is).

A segment's terminology is stored by Slicer as one string in the segment tag
``TerminologyEntry``: seven ``~``-separated parts

    contextName ~ category ~ type ~ typeModifier ~ regionContextName ~ region ~ regionModifier

where every code is a ``scheme^value^meaning`` triplet (``^^`` when empty), for example
``SCT^39607008^Lung``. This module only parses and builds those strings; it does not
import ``slicer`` and works without the terminology JSON files.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import LCTfoundError

GENERAL_ANATOMY_CONTEXT = "Segmentation category and type - 3D Slicer General Anatomy list"
DICOM_MASTER_CONTEXT = "Segmentation category and type - DICOM master list"
DICOM_REGION_CONTEXT = "Anatomic codes - DICOM master list"


@dataclass(frozen=True)
class Code:
    """One coded concept: ``scheme^value^meaning`` (e.g. SCT, 39607008, Lung)."""

    scheme: str = ""
    value: str = ""
    meaning: str = ""

    @classmethod
    def parse(cls, text: str) -> "Code":
        parts = text.split("^")
        if len(parts) != 3:
            raise LCTfoundError(f"terminology code {text!r} is not of the form scheme^value^meaning")
        return cls(*parts)

    def __str__(self) -> str:
        return f"{self.scheme}^{self.value}^{self.meaning}"

    def __bool__(self) -> bool:
        return bool(self.scheme or self.value)

    def same_concept(self, other: "Code") -> bool:
        """Equal scheme and value (the meaning is display text and may differ)."""
        return bool(self) and bool(other) and (self.scheme, self.value) == (other.scheme, other.value)


@dataclass(frozen=True)
class TerminologyEntry:
    """A parsed Slicer terminology entry."""

    context: str
    category: Code
    type: Code
    type_modifier: Code = Code()
    region_context: str = DICOM_REGION_CONTEXT
    region: Code = Code()
    region_modifier: Code = Code()

    @classmethod
    def parse(cls, text: str) -> "TerminologyEntry":
        parts = (text or "").split("~")
        if len(parts) != 7:
            raise LCTfoundError(
                f"terminology entry {text!r} has {len(parts)} '~'-separated parts; Slicer uses 7 "
                "(context~category~type~modifier~regionContext~region~regionModifier)"
            )
        entry = cls(
            parts[0], Code.parse(parts[1]), Code.parse(parts[2]), Code.parse(parts[3]),
            parts[4], Code.parse(parts[5]), Code.parse(parts[6]),
        )
        if not entry.category or not entry.type:
            raise LCTfoundError(f"terminology entry {text!r} has no category or type code")
        return entry

    def __str__(self) -> str:
        return "~".join(
            [self.context, str(self.category), str(self.type), str(self.type_modifier),
             self.region_context, str(self.region), str(self.region_modifier)]
        )

    def same_concept(self, other: "TerminologyEntry") -> bool:
        """Same category, type and type modifier (and region when both name one).

        Context names and code meanings are ignored: the same SNOMED concept picked from a
        different terminology list is the same structure.
        """
        if not (self.category.same_concept(other.category) and self.type.same_concept(other.type)):
            return False
        if bool(self.type_modifier) != bool(other.type_modifier):
            return False
        if self.type_modifier and not self.type_modifier.same_concept(other.type_modifier):
            return False
        if self.region and other.region and not self.region.same_concept(other.region):
            return False
        return True

    def describe(self) -> str:
        """Human-readable text, e.g. 'Lung, Left' or 'Mass in Lung'."""
        text = self.type.meaning
        if self.type_modifier:
            text += f", {self.type_modifier.meaning}"
        if self.region:
            text += f" in {self.region.meaning}"
            if self.region_modifier:
                text += f", {self.region_modifier.meaning}"
        return text


def parse_terminology(text: str | None) -> TerminologyEntry | None:
    """Parse a terminology string; None for an empty or malformed one (segments may have junk)."""
    if not text:
        return None
    try:
        return TerminologyEntry.parse(text)
    except LCTfoundError:
        return None


def make_terminology(
    type_code: str,
    category: str = "SCT^123037004^Anatomical Structure",
    modifier: str = "^^",
    region: str = "^^",
    region_modifier: str = "^^",
    context: str = GENERAL_ANATOMY_CONTEXT,
    region_context: str = DICOM_REGION_CONTEXT,
) -> str:
    """Build a terminology-entry string from code triplets (validated)."""
    entry = TerminologyEntry(
        context, Code.parse(category), Code.parse(type_code), Code.parse(modifier),
        region_context, Code.parse(region), Code.parse(region_modifier),
    )
    if not entry.category or not entry.type:
        raise LCTfoundError("a terminology entry needs a category and a type code")
    return str(entry)
