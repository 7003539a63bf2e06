"""``lctfound classify``: scan classification on deep LCTfound features (research use): train and predict."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Callable, Optional

from ..errors import LCTfoundError
from ..validation import batch_int
from .remote import add_server_options
from .train import FINETUNE_LOOP_DEFAULTS, add_classification_arguments, add_loop_arguments, run_finetune
from ..compat import strict_zip


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "classify", help="scan classification (research use): train a classifier, predict scans",
        description="Slice- and scan-level classification from deep LCTfound features for any binary or "
                    "multi-class label (e.g. PAP, mediastinal neoplasm, survival > 5 years, therapy response). "
                    "Research tool, not a medical device.")
    commands = parser.add_subparsers(dest="classify_command", metavar="SUBCOMMAND")
    commands.required = True

    train = commands.add_parser(
        "train", help="train a classifier from a table of scans and class names",
        description="Train a slice classifier (up-block features at the chosen timesteps → convolution to 256 "
                    "channels → pooling → MLP) on the central slices of each scan in --table. The same command "
                    "as `lctfound train finetune --task classification`, with classification defaults.")
    train.add_argument("--backbone", default="default", help="backbone model name or folder (default: embedded)")
    train.add_argument("--mode", choices=("frozen", "full"), default="frozen",
                       help="frozen: train the head only (default); full: fine-tune the backbone too")
    train.add_argument("--window", default="mediastinal", help="input window (default mediastinal)")
    add_classification_arguments(train, table_required=True)
    add_loop_arguments(train, **FINETUNE_LOOP_DEFAULTS)
    train.set_defaults(func=run_finetune, task="classification")

    predict = commands.add_parser(
        "predict", help="classify a scan, a folder of scans or the scans of a table",
        description="Classify scans: slice probabilities on the model's central slices (or --slices), scan "
                    "probability = their mean. Writes one row per input to the results table OUTPUT; a table "
                    "of the same model is continued, skipping inputs already classified, so an interrupted "
                    "batch resumes. Exit code 1 when any input failed (its row holds the error).")
    predict.add_argument("input", help="a CT volume (NIfTI/NRRD/MHA file or DICOM folder), a folder of volumes, "
                                       "or a CSV table with an image column (paths relative to the table)")
    predict.add_argument("--model", required=True, help="classification model folder or registered name")
    predict.add_argument("--backbone", help="backbone model (default: the one the classification model names)")
    predict.add_argument("--output", "-o", required=True, help="results table (.csv)")
    predict.add_argument("--saliency", metavar="FILE_OR_FOLDER",
                         help="also write Grad-CAM saliency volumes on each input's grid: a file for one volume, "
                              "else a folder of <case>_saliency.nii.gz")
    predict.add_argument("--overwrite", action="store_true",
                         help="start a new results table instead of continuing OUTPUT, and replace existing "
                              "saliency volumes")
    predict.add_argument("--slices", help="'all' or slice indices such as 10-20 (default: the model's central slices)")
    predict.add_argument("--batch-size", type=batch_int, default=4, help="slices per forward pass (default 4)")
    predict.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default auto)")
    predict.add_argument("--events", action="store_true", help="print JSON event lines on stdout (for front ends)")
    add_server_options(predict)
    predict.set_defaults(func=run_predict)


def _inputs(source: Path) -> tuple[list[Path], bool]:
    """The volumes to classify and whether ``source`` is one volume."""
    from ..io.volume import find_volumes
    from ..training.tables import read_case_table, table_path

    if source.is_file() and source.suffix.lower() == ".csv":
        return [table_path(source, row["image"]) for row in read_case_table(source, ("image",))], False
    inputs = find_volumes(source)
    return inputs, len(inputs) == 1 and inputs[0] == source


def _saliency_target(option: Optional[str], single: bool) -> Optional[Callable[[Path], Path]]:
    from ..io.volume import WRITE_FORMATS, volume_stem

    if option is None:
        return None
    path = Path(option).expanduser()
    if path.name.lower().endswith(WRITE_FORMATS):
        if not single:
            raise LCTfoundError(f"--saliency {option}: with several inputs, give a folder for the saliency volumes")
        return lambda _source: path
    if path.exists() and not path.is_dir():
        raise LCTfoundError(f"--saliency {option}: not a folder (give a folder, or a .nii.gz/.nrrd/.mha file)")
    return lambda source: path / f"{volume_stem(source)}_saliency.nii.gz"


def _previous_rows(output: Path, class_names: list[str], provenance: dict[str, Any]) -> list[dict[str, Any]]:
    """Rows of an existing results table of the same model, else a clear error."""
    from ..pipelines.results_table import read_results_csv

    rows = read_results_csv(output, class_names)
    for row in rows:
        for key in ("model_sha256", "backbone_sha256"):
            if row.get(key) and row[key] != provenance[key]:
                raise LCTfoundError(f"{output}: holds results of another model ({row.get('model')}, {key} "
                                    f"{row[key][:12]}…); choose a new output file")
    return rows


def _print_table(rows: list[dict[str, Any]], class_names: list[str]) -> None:
    columns = ["case", "predicted"] + [f"probability_{name}" for name in class_names] + ["status"]
    headers = ["case", "predicted"] + [f"p({name})" for name in class_names] + ["status"]

    def cell(row: dict[str, Any], column: str) -> str:
        value = row.get(column, "")
        if column.startswith("probability_") and value not in ("", None):
            return f"{float(value):.4f}"
        return str(value)

    cells = [[cell(row, column) for column in columns] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    for line in [headers] + cells:
        print("  ".join(value.ljust(width) for value, width in strict_zip(line, widths)).rstrip())


def check_results_output(output: Path) -> None:
    if output.suffix.lower() != ".csv" or output.is_dir():
        raise LCTfoundError(f"{output}: the results table must be a .csv file")


def run_predict(args: argparse.Namespace) -> int:
    if args.server:
        from .remote_tasks import run_classify_predict

        return run_classify_predict(args)
    from ..features import parse_slices
    from ..io.volume import read_volume, volume_stem, write_volume
    from ..pipelines.diagnosis import (
        RESEARCH_USE_NOTE,
        ScanClassifier,
        error_row,
        results_rows,
        saliency_volume,
    )
    from ..pipelines.results_table import write_results_csv
    from ..progress import Progress, command_progress

    output = Path(args.output).expanduser()
    check_results_output(output)
    if args.batch_size < 1:
        raise LCTfoundError("--batch-size must be at least 1")
    if args.slices and args.slices.strip().lower() != "all":
        parse_slices(args.slices, sys.maxsize)  # the syntax, before any work; ranges are checked per volume
    inputs, single = _inputs(Path(args.input).expanduser().absolute())  # absolute: a resumed run may start elsewhere
    cases: dict[str, Path] = {}
    for path in inputs:
        other = cases.setdefault(volume_stem(path), path)
        if other != path:
            raise LCTfoundError(f"{other} and {path} have the same case name {volume_stem(path)!r}; rename one")
    saliency_target = _saliency_target(args.saliency, single)
    from ..atomic import check_writable, refuse_input_conflict

    for path in inputs:  # no output may land on a scan (or the table) being classified
        refuse_input_conflict(output, [path, Path(args.input)])
        if saliency_target:
            refuse_input_conflict(saliency_target(path), [*inputs, Path(args.input), output])
    check_writable(output)
    if saliency_target:
        check_writable(saliency_target(inputs[0]))
    from ..batch import BatchRun, launcher_ranks, rank_device

    ranks = launcher_ranks()
    classifier = ScanClassifier.from_pretrained(args.model, args.backbone, device=rank_device(args.device, ranks),
                                                batch_size=args.batch_size)
    if args.backbone and classifier.task_model.backbone_folder() is not None and ranks.main:
        print("note: this model was fine-tuned in full mode and carries its own backbone; --backbone is not used",
              file=sys.stderr)
    names, provenance = classifier.class_names, classifier.provenance
    keys = [str(path) for path in inputs]
    failures = 0
    with BatchRun(output, keys, lambda path: _previous_rows(path, names, provenance),
                  lambda rows, path: write_results_csv(rows, path, names), restart=args.overwrite,
                  ranks=ranks) as run:

        def done(index: int) -> bool:
            target = saliency_target(inputs[index]) if saliency_target else None
            return run.previous.get(keys[index], {}).get("status") == "ok" and (target is None or target.is_file())

        mine = run.plan(done)
        with command_progress(args.events, "classify", unit="scan") as bar:
            for number, index in enumerate(mine):
                path = inputs[index]
                case = volume_stem(path)
                target = saliency_target(path) if saliency_target else None

                def report(done: int, total: int, message: str, number: int = number, case: str = case) -> None:
                    bar.update(number, len(mine), f"{case}: {message} ({done}/{total})")

                progress = Progress(report, cancel_token=bar.cancel_token)
                try:
                    if target is not None and target.exists() and not args.overwrite:
                        raise LCTfoundError(f"{target}: already exists; choose another --saliency or pass --overwrite")
                    volume = read_volume(path)
                    prediction = classifier(volume, args.slices, progress, source=str(path))
                    if target is not None:
                        saliency = saliency_volume(classifier, volume, prediction=prediction, progress=progress)
                        target.parent.mkdir(parents=True, exist_ok=True)
                        write_volume(volume.with_array(saliency, kind="saliency"), target)
                    row = results_rows([prediction])[0]
                except LCTfoundError as error:
                    failures += 1
                    row = error_row(str(path), str(error), names, provenance)
                    # Also said on stderr: a job's last stderr line is its error (e.g. on a server).
                    print(f"{case}: not classified: {error}", file=sys.stderr)
                run.record(keys[index], row)
                bar.update(number + 1, len(mine), case)
        totals = run.finish(failed=failures, done=len(mine) - failures)
    if not ranks.main:
        print(run.shard_line(len(mine) - failures, failures, "scan(s) classified"))
        return run.exit_code(totals["failed"])
    listed = set(keys)
    _print_table([row for row in run.merged if row.get("input") in listed], names)
    print(f"model {provenance['model']} (sha256 {provenance['model_sha256'][:12]}…), backbone {provenance['backbone']} "
          f"(sha256 {provenance['backbone_sha256'][:12] or '?'}…), trained {provenance['trained'] or 'date unknown'}")
    print(f"{totals['done']} scan(s) classified, {run.skipped} already in {output}, {totals['failed']} failed; "
          f"results in {output}")
    print(RESEARCH_USE_NOTE)
    return run.exit_code(totals["failed"])
