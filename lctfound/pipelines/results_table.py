"""The results table of scan classification (`lctfound classify predict`), read and written without
torch: the command line's ``--server`` path writes the server's rows here with only the thin
client's packages installed. `lctfound.pipelines.diagnosis` makes the rows."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any, Sequence, Union

from ..atomic import atomic_file
from ..errors import InputError


def result_columns(class_names: Sequence[str]) -> list[str]:
    """The columns of a results table (``case``, ``predicted`` and ``probability_<class>`` are read by evaluation)."""
    return (["case", "input", "predicted"] + [f"probability_{name}" for name in class_names]
            + ["slices", "model", "model_sha256", "backbone", "backbone_sha256", "status", "note"])


def write_results_csv(rows: Sequence[dict[str, Any]], path: Union[str, Path], class_names: Sequence[str]) -> Path:
    """Write a results table atomically (probabilities with 6 decimals)."""
    path = Path(path)
    columns = result_columns(class_names)
    with atomic_file(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, columns, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({key: f"{value:.6f}" if isinstance(value, float) else value for key, value in row.items()})
    return path


def read_results_csv(path: Union[str, Path], class_names: Sequence[str]) -> list[dict[str, str]]:
    """The rows of an existing results table of a model with these classes, or a clear error."""
    path = Path(path)
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            header = list(reader.fieldnames or [])
            rows = list(reader)
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise InputError(f"{path}: cannot be read ({error})") from None
    if header != result_columns(class_names):
        raise InputError(f"{path}: is not a results table of this model's classes "
                         f"({', '.join(class_names)}); choose a new output file")
    return rows



def table_class_names(path: Union[str, Path]) -> list[str]:
    """The class names of an existing results table, read from its ``probability_<class>`` columns (a
    table written elsewhere, e.g. on a server, before the model's own class list is at hand)."""
    path = Path(path)
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            header = next(csv.reader(handle), [])
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise InputError(f"{path}: cannot be read ({error})") from None
    names = [column[len("probability_"):] for column in header if column.startswith("probability_")]
    if not names or header != result_columns(names):
        raise InputError(f"{path}: is not a results table of `lctfound classify predict`; choose a new output file")
    return names
