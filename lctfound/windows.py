"""HU display windows and the prompts that name them.

The official model was trained on slices windowed with the lung (W1500/L−500) or the
mediastinal (W400/L0) window and told which one through the prompt
``window width and window level is <W> and <L>.`` (reference §2.4).
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import LCTfoundError


@dataclass(frozen=True)
class Window:
    width: float
    level: float
    name: str = "custom"

    def __post_init__(self) -> None:
        if not self.width > 0:
            raise LCTfoundError(f"window width must be positive, got {self.width}")

    @property
    def low(self) -> float:
        return self.level - self.width / 2

    @property
    def high(self) -> float:
        return self.level + self.width / 2

    def prompt(self, period: bool = True) -> str:
        """The official prompt sentence; the zero-shot code used it without the final period."""
        return f"window width and window level is {_number(self.width)} and {_number(self.level)}" + (
            "." if period else ""
        )


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


WINDOWS: dict[str, Window] = {
    "lung": Window(1500, -500, "lung"),
    "mediastinal": Window(400, 0, "mediastinal"),
}

#: The official null prompt used for 5 % condition dropout (reference §2.4).
NULL_PROMPT = "freedom."


def get_window(spec: str | Window) -> Window:
    """``lung``, ``mediastinal`` or ``W,L`` (e.g. ``350,40``) → `Window`."""
    if isinstance(spec, Window):
        return spec
    key = spec.strip().lower()
    if key in WINDOWS:
        return WINDOWS[key]
    try:
        width, level = (float(part) for part in key.replace("/", ",").split(","))
    except ValueError:
        raise LCTfoundError(
            f"unknown window {spec!r}; use {', '.join(WINDOWS)} or WIDTH,LEVEL (e.g. 350,40)"
        ) from None
    return Window(width, level)
