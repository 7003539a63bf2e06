"""``lctfound data``: fetch the sample CTs and inspect volumes."""

from __future__ import annotations

import argparse
import json
import sys


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "data",
        help="fetch the sample CT volumes, inspect CT files and DICOM folders",
        description="Fetch the sample CT volumes and inspect CT files and DICOM folders.",
    )
    commands = parser.add_subparsers(dest="data_command", metavar="SUBCOMMAND")
    commands.required = True

    fetch = commands.add_parser(
        "fetch-sample",
        help="download the two sample chest CTs with lesion labels (lung1, lung2)",
        description=(
            "Download the pyradiomics 3.0.1 source package with pip, check its sha256, and keep "
            "its two chest CTs with lesion labels (lung1, lung2) in the LCTfound cache "
            "($LCTFOUND_CACHE_DIR/sample-data). Does nothing when they are already there and intact."
        ),
    )
    fetch.add_argument("--force", action="store_true", help="download and extract again even if the files are intact")
    fetch.set_defaults(func=_fetch_sample)

    info = commands.add_parser(
        "info",
        help="print the geometry and HU statistics of a volume or DICOM folder",
        description=(
            "Print size, spacing, origin, direction and HU statistics of a CT volume (NIfTI, NRRD, "
            "MHA/MHD, DICOM); for a DICOM folder also list its series."
        ),
    )
    info.add_argument("path", help="a volume file or a folder of DICOM files")
    info.add_argument("--series-uid", metavar="UID", help="the SeriesInstanceUID to read from a DICOM folder (default: the largest series)")
    info.add_argument("--label", action="store_true", help="read the file as an integer label map (no CT check; prints label counts)")
    info.add_argument("--no-validate", action="store_true", help="skip the check that the intensities look like CT in HU")
    info.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    info.set_defaults(func=_info)


def _fetch_sample(args: argparse.Namespace) -> int:
    from ..io.sample_data import SAMPLE_NAMES, fetch_sample
    from ..progress import TqdmProgress

    with TqdmProgress("sample data", unit="step") as progress:
        data = fetch_sample(force=args.force, progress=progress)
    print(f"sample data in {data.folder}")
    for name in SAMPLE_NAMES:
        image, label = data.paths(name)
        print(f"  {name}: {image.name} (CT)  {label.name} (lesion label)")
    print("  source: pyradiomics 3.0.1 sdist (BSD-3-Clause); image origin not documented, see README.txt")
    return 0


def _info(args: argparse.Namespace) -> int:
    from pathlib import Path

    import numpy as np

    from ..io.dicom import list_dicom_series
    from ..io.volume import describe_volume, read_volume

    path = Path(args.path).expanduser()
    series = list_dicom_series(path) if path.is_dir() else []
    volume = read_volume(path, series_uid=args.series_uid, validate=not args.no_validate, labels=args.label)
    report = {"path": str(path), "format": volume.metadata.get("format")}
    if series:
        report["series"] = [{"uid": s.uid, "files": s.num_files, "description": s.description} for s in series]
        report["series_uid"] = volume.metadata.get("series_uid")
        report["modality"] = volume.metadata.get("modality")
    report.update(describe_volume(volume))
    if args.label:
        values, counts = np.unique(volume.array, return_counts=True)
        report["labels"] = {int(v): int(c) for v, c in zip(values, counts)}
    if args.json:
        json.dump(report, sys.stdout, indent=2)
        print()
        return 0
    _print_report(report, args.label)
    return 0


def _print_report(report: dict, label: bool) -> None:
    def triple(values) -> str:
        return ", ".join(f"{v:.7g}" for v in values)

    print(f"path:        {report['path']}")
    print(f"format:      {report['format']}")
    if report.get("series"):
        print(f"series:      {len(report['series'])} in the folder (largest first; * = read)")
        for entry in report["series"]:
            mark = "*" if entry["uid"] == report.get("series_uid") else " "
            description = f"  {entry['description']}" if entry["description"] else ""
            print(f"  {mark} {entry['uid']}  {entry['files']} files{description}")
        if report.get("modality"):
            print(f"modality:    {report['modality']}")
    print(f"size (i,j,k): {' × '.join(str(n) for n in report['size_ijk'])}")
    print(f"spacing:     {triple(report['spacing'])} mm")
    print(f"origin:      {triple(report['origin'])} mm (LPS)")
    rows = report["direction"]
    print(f"direction:   [{triple(rows[0])}]  (columns: i, j, k axes in LPS)")
    for row in rows[1:]:
        print(f"             [{triple(row)}]")
    print(f"extent:      {triple(report['physical_extent_mm'])} mm")
    print(f"voxel type:  {report['dtype']}")
    unit = "" if label else " HU"
    print(f"min / max:   {report['min']:g} / {report['max']:g}{unit}")
    print("percentiles: " + "  ".join(f"{k} {v:g}" for k, v in report["percentiles"].items()) + unit)
    if label:
        print("labels:      " + "  ".join(f"{k}: {v} voxels" for k, v in report["labels"].items()))
