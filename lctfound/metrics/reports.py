"""Writing evaluation results (JSON report or per-case CSV, atomically) and printing them as text tables."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Any, Optional, Sequence

from ..errors import LCTfoundError
from .statistics import json_ready
from ..compat import strict_zip

OUTPUT_SUFFIXES = (".json", ".csv")


def check_output(path: str | os.PathLike, overwrite: bool = False, inputs=()) -> Path:
    """Refuse an output that is not .json/.csv, is a folder, exists (unless ``overwrite``), is one of
    ``inputs`` or cannot be written (`lctfound.atomic.check_outputs`)."""
    from ..atomic import check_outputs

    path = Path(path).expanduser()
    if path.suffix.lower() not in OUTPUT_SUFFIXES:
        raise LCTfoundError(f"{path}: use a .json (full report) or .csv (per-case values) output file")
    if path.is_dir():
        raise LCTfoundError(f"{path}: is a folder; give a file name")
    check_outputs([path], inputs, overwrite)
    return path


def write_results(path: str | os.PathLike, report: dict[str, Any], rows: Sequence[dict[str, Any]],
                  overwrite: bool = False) -> Path:
    """Write ``report`` as JSON (.json) or ``rows`` as CSV (.csv), atomically.

    JSON has no NaN: undefined values are written as null. CSV columns are the union of the
    rows' keys in first-seen order; undefined values are empty cells.
    """
    from ..atomic import atomic_file

    path = check_output(path, overwrite)
    with atomic_file(path) as tmp:
        if path.suffix.lower() == ".json":
            tmp.write_text(json.dumps(json_ready(report), indent=2, ensure_ascii=False, allow_nan=False) + "\n",
                           encoding="utf-8")
        else:
            columns: list[str] = []
            for row in rows:
                columns += [key for key in row if key not in columns]
            with open(tmp, "w", newline="", encoding="utf-8") as handle:
                writer = csv.DictWriter(handle, fieldnames=columns)
                writer.writeheader()
                for row in json_ready(list(rows)):
                    writer.writerow({k: "" if v is None else v for k, v in row.items()})
    return path


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain-text table with columns padded to their widest cell."""
    cells = [[str(h) for h in headers]] + [["" if c is None else str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["  ".join(cell.ljust(width) for cell, width in strict_zip(row, widths)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def value_with_interval(value: Optional[float], interval: Optional[dict[str, Any]], digits: int = 3) -> str:
    """``0.812 [0.741, 0.866]``; ``[n/a]`` when the interval is not available; ``-`` without a value."""
    if value is None:
        return "-"
    text = f"{value:.{digits}f}"
    if interval is None:
        return text
    if interval.get("low") is None or interval.get("high") is None:
        return f"{text} [n/a]"
    return f"{text} [{interval['low']:.{digits}f}, {interval['high']:.{digits}f}]"


def p_text(value: Optional[float]) -> str:
    if value is None:
        return "n/a"
    return "<0.001" if value < 0.001 else f"{value:.3f}"
