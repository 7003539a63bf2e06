"""Case tables: the CSV files that list training cases (image,label or image,labels rows)."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Sequence

from ..errors import InputError


def read_case_table(path: str | Path, columns: Sequence[str]) -> list[dict[str, str]]:
    """Non-blank rows of a CSV whose header holds ``columns`` (names and values stripped; a BOM is fine).

    Raises `InputError` with one line naming the file for a missing file, an unreadable file,
    missing columns or no rows.
    """
    path = Path(path)
    listing = ",".join(columns)
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            fields = {name.strip() for name in (reader.fieldnames or []) if name}
            if not set(columns) <= fields:
                raise InputError(f"{path.name}: needs a header line with the columns {listing}.")
            rows = [{key.strip(): (value or "").strip() for key, value in row.items() if key} for row in reader]
    except FileNotFoundError:
        raise InputError(f"{path}: no such table") from None
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise InputError(f"{path.name}: cannot be read ({error}).") from None
    rows = [row for row in rows if any(row.get(column) for column in columns)]
    if not rows:
        raise InputError(f"{path.name}: has no rows (one line per scan: {listing}).")
    return rows


def table_path(table: str | Path, value: str) -> Path:
    """A path written in a case table; relative paths are relative to the table's folder."""
    path = Path(value).expanduser()
    return path if path.is_absolute() else Path(table).parent / path
