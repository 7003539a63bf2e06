"""One set of checks for the numbers and lists a user gives: command-line options, panel fields, configs.

Engine code checks settings with `check_int` / `check_float` (one-line `LCTfoundError` naming
the setting); the command line uses the same rules as argparse types (`int_type`, `float_type`
and the named ones below), so a bad value stops a command while its arguments are parsed, before
any file is read or any folder is created. Slice lists ("3,5,10-12") have one parser,
`parse_slice_list`, used by every command and logic that takes them.
"""

from __future__ import annotations

import argparse
import math
from typing import Callable, Optional

from .errors import LCTfoundError

# Upper bounds that catch absurd values (a typo, a unit mix-up) before any work: far above every
# sensible setting, far below what would exhaust a machine.
MAX_EPOCHS = 100_000
MAX_STEPS = 100_000_000
MAX_DIFFUSION_STEPS = 1000  # every LCTfound scheduler has 1000 training timesteps
MAX_IMAGE_SIZE = 2048
MAX_BATCH = 4096
MAX_WORKERS = 256
MAX_SEED = 2**32 - 1


def _describe(integer: bool, minimum, maximum, above, below, multiple_of) -> str:
    kind = "a whole number" if integer else "a finite number"
    parts = []
    if minimum is not None and maximum is not None:
        parts.append(f"from {minimum:g} to {maximum:g}")
    else:
        if minimum is not None:
            parts.append(f"≥ {minimum:g}")
        if maximum is not None:
            parts.append(f"≤ {maximum:g}")
    if above is not None:
        parts.append(f"> {above:g}")
    if below is not None:
        parts.append(f"< {below:g}")
    text = f"{kind} {' and '.join(parts)}".strip()
    if multiple_of:
        text += f", a multiple of {multiple_of}"
    return text


def check_int(value, name: str, minimum: Optional[int] = None, maximum: Optional[int] = None,
              multiple_of: Optional[int] = None) -> int:
    """``value`` as an int within the bounds, else a one-line `LCTfoundError` naming ``name``."""
    rule = _describe(True, minimum, maximum, None, None, multiple_of)
    integer = _as_int(value)
    if integer is None or (minimum is not None and integer < minimum) or (maximum is not None and integer > maximum) \
            or (multiple_of and integer % multiple_of):
        raise LCTfoundError(f"{name} must be {rule}, not {value!r}" if isinstance(value, str)
                            else f"{name} must be {rule}, not {value}")
    return integer


def _as_int(value) -> Optional[int]:
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            return None
    if hasattr(value, "__index__"):  # int, NumPy integers
        return int(value.__index__())
    if isinstance(value, float) or hasattr(value, "is_integer"):
        number = float(value)
        return int(number) if math.isfinite(number) and number.is_integer() else None
    return None


def check_float(value, name: str, minimum: Optional[float] = None, maximum: Optional[float] = None,
                above: Optional[float] = None, below: Optional[float] = None) -> float:
    """``value`` as a finite float within the bounds (``above``/``below`` are strict), else a one-line error."""
    rule = _describe(False, minimum, maximum, above, below, None)
    try:
        number = float(value) if not isinstance(value, bool) else float("nan")
    except (TypeError, ValueError):
        number = float("nan")
    if (not math.isfinite(number) or (minimum is not None and number < minimum)
            or (maximum is not None and number > maximum) or (above is not None and number <= above)
            or (below is not None and number >= below)):
        raise LCTfoundError(f"{name} must be {rule}, not {value!r}" if isinstance(value, str)
                            else f"{name} must be {rule}, not {value}")
    return number


def check_optional_int(value, name: str, **bounds) -> Optional[int]:
    return None if value is None else check_int(value, name, **bounds)


def check_optional_float(value, name: str, **bounds) -> Optional[float]:
    return None if value is None else check_float(value, name, **bounds)


def _argparse_type(check: Callable, label: str) -> Callable[[str], object]:
    def parse(text: str):
        try:
            return check(text)
        except LCTfoundError as error:
            # argparse prefixes "argument --option: "; drop our generic subject.
            raise argparse.ArgumentTypeError(str(error).replace("the value must be", "must be", 1)) from None

    parse.__name__ = label
    return parse


def int_type(minimum: Optional[int] = None, maximum: Optional[int] = None,
             multiple_of: Optional[int] = None) -> Callable[[str], int]:
    """An argparse ``type=`` for a whole number within bounds."""
    return _argparse_type(lambda text: check_int(text, "the value", minimum, maximum, multiple_of), "int")


def float_type(minimum: Optional[float] = None, maximum: Optional[float] = None,
               above: Optional[float] = None, below: Optional[float] = None) -> Callable[[str], float]:
    """An argparse ``type=`` for a finite number within bounds (NaN and inf are always refused)."""
    return _argparse_type(lambda text: check_float(text, "the value", minimum, maximum, above, below), "float")


# The named option types used by every command.
positive_int = int_type(1)
non_negative_int = int_type(0)
seed_int = int_type(0, MAX_SEED)
epochs_int = int_type(1, MAX_EPOCHS)
steps_int = int_type(1, MAX_STEPS)
diffusion_steps_int = int_type(1, MAX_DIFFUSION_STEPS)
timestep_int = int_type(0, MAX_DIFFUSION_STEPS - 1)
batch_int = int_type(1, MAX_BATCH)
workers_int = int_type(0, MAX_WORKERS)
image_size_int = int_type(16, MAX_IMAGE_SIZE, multiple_of=8)
iterations_int = int_type(0, 100_000)
finite_float = float_type()
non_negative_float = float_type(0)
positive_float = float_type(above=0)
fraction_float = float_type(0, 1)  # a probability or share, 0..1 inclusive
open_fraction_float = float_type(above=0, below=1)  # strictly between 0 and 1
learning_rate_float = float_type(above=0, maximum=10)
epochs_float = float_type(above=0, maximum=MAX_EPOCHS)


def parse_slice_list(text: Optional[str], num_slices: Optional[int] = None) -> Optional[list[int]]:
    """``"3,5,10-12"`` → [3, 5, 10, 11, 12] (inclusive ranges, in the order given, repeats dropped).

    None or empty → None (all slices). Refuses negative indices, reversed ranges ("5-2"), an empty
    list and, when ``num_slices`` is given, slices outside the volume, each in one line.
    """
    if text is None or not str(text).strip():
        return None
    indices: list[int] = []
    for part in str(text).split(","):
        part = part.strip()
        try:
            if "-" in part[1:]:
                first_text, last_text = part.split("-", 1)
                first, last = int(first_text), int(last_text)
                if last < first:
                    raise LCTfoundError(f"slice range {part!r} runs backwards; write it as {last}-{first}")
                indices.extend(range(first, last + 1))
            else:
                indices.append(int(part))
        except ValueError:
            raise LCTfoundError(f"cannot read slice list {text!r}; use e.g. 3,5,10-12 (slices count from 0)") from None
    negative = [i for i in indices if i < 0]
    if negative:
        raise LCTfoundError(f"slice {negative[0]} is negative; slices count from 0")
    if num_slices is not None:
        outside = [i for i in indices if i >= num_slices]
        if outside:
            raise LCTfoundError(f"slice {outside[0]} is outside the volume (0..{num_slices - 1})")
    return list(dict.fromkeys(indices))


def slice_list_type(text: str) -> str:
    """An argparse ``type=`` that checks a slice list's syntax at once (its range is checked per volume)."""
    try:
        parse_slice_list(text)
    except LCTfoundError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return text


slice_list_type.__name__ = "slice list"


def parse_label_names(text: Optional[str], present: "set[int] | list[int]", source: str = "the label map",
                      option: str = "names") -> dict[int, str]:
    """``{value: name}`` for the label values > 0 of a training label map.

    Without ``text`` every present value is named "Label N". With ``text`` ("1=Lesion,2=Vessel")
    the names must match the present values exactly: a present value without a name would be
    trained as a class nobody named, a name without voxels would be a class with nothing to learn;
    both are refused, saying which values exist.
    """
    values = sorted(int(v) for v in present if int(v) > 0)
    if not text or not str(text).strip():
        return {value: f"Label {value}" for value in values}
    names: dict[int, str] = {}
    for part in str(text).split(","):
        if not part.strip():
            continue
        key, sep, name = part.partition("=")
        try:
            value = int(key.strip())
        except ValueError:
            value = -1
        if not sep or value <= 0 or not name.strip():
            raise LCTfoundError(f"cannot read the label name {part.strip()!r}; use e.g. 1=Lesion,2=Vessel "
                                "(label values are positive whole numbers)")
        if value in names:
            raise LCTfoundError(f"label value {value} is named twice")
        names[value] = name.strip()
    existing = ", ".join(map(str, values)) or "none"
    unnamed = [v for v in values if v not in names]
    empty = [v for v in names if v not in values]
    problems = []
    if unnamed:
        problems.append(f"label value(s) {', '.join(map(str, unnamed))} have no name")
    if empty:
        problems.append(f"named value(s) {', '.join(f'{v} ({names[v]})' for v in empty)} have no voxels")
    if problems:
        example = ",".join(f"{v}={names.get(v, 'Name')}" for v in values)
        raise LCTfoundError(f"the label names do not match {source}: {' and '.join(problems)}; its label values are "
                            f"{existing}, name exactly those" + (f" (e.g. {example})" if values else ""))
    return dict(sorted(names.items()))
