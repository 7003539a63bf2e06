"""``lctfound evaluate``: score predictions against references, with bootstrap intervals and paired tests.

Each subcommand is one ``_add_<name>(commands)`` function listed in `SUBCOMMANDS`; they share the
statistics and output options (`_add_shared_options`) and the output writer (`_write_output`), so
a new kind of evaluation is one more function in the list.
"""

from __future__ import annotations

import argparse
import contextlib
import re
import sys
from typing import Any, Optional

from ..validation import int_type, seed_int, slice_list_type


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "evaluate", help="evaluate segmentations or classifications against references",
        description="Score predictions against references per case, summarise them with seeded bootstrap "
                    "confidence intervals over cases, and compare two prediction sets with paired tests.")
    commands = parser.add_subparsers(dest="evaluate_command", metavar="COMMAND")
    commands.required = True
    for add in SUBCOMMANDS:
        add(commands)


def _add_shared_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output", "-o", help="write the full report (.json) or the per-case values (.csv)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    parser.add_argument("--bootstrap", type=int_type(100, 1_000_000), default=1000, metavar="N",
                        help="bootstrap resamples for confidence intervals (default 1000, at least 100)")
    parser.add_argument("--seed", type=seed_int, default=0, help="bootstrap seed (default 0)")


def _add_segmentation(commands) -> None:
    parser = commands.add_parser(
        "segmentation", help="Dice, HD95 (mm) and volumes of label maps per structure",
        description="Dice (MONAI), HD95 in mm (MONAI, 95th-percentile symmetric Hausdorff distance with the voxel "
                    "spacing) and volumes in mL of each structure in each case, summarised over cases as mean and "
                    "median with 95% bootstrap intervals (BCa, percentile where BCa is undefined; none for a single "
                    "case). Both maps empty: Dice 1, HD95 0. One empty: Dice 0, HD95 undefined and left out of HD95 "
                    "summaries (counted). Folders are matched by case name: file names without .nii.gz etc. and "
                    "without the endings _seg, _label, _labels, _mask, _image. --compare adds a second prediction "
                    "set and paired tests (Wilcoxon signed-rank, paired t-test, bootstrap interval of the mean "
                    "difference) on the common cases.")
    parser.add_argument("--prediction", "-p", required=True, help="predicted label map, or a folder of them")
    parser.add_argument("--reference", "-r", required=True, help="reference label map, or a folder of them")
    parser.add_argument("--compare", help="a second prediction (file or folder) to compare with --prediction")
    names = parser.add_mutually_exclusive_group()
    names.add_argument("--names", help="structure names by label value, e.g. 1=Lesion,2=Vessel "
                                       "(default: every label found, named 'Label N')")
    names.add_argument("--model", help="segmentation task-model folder whose label names to use")
    parser.add_argument("--slices", type=slice_list_type,
                        help="evaluate only these slice indices, e.g. 10,12-14 (held-out slices)")
    _add_shared_options(parser)
    parser.set_defaults(func=run_segmentation)


def _add_classification(commands) -> None:
    parser = commands.add_parser(
        "classification", help="AUROC, accuracy, sensitivity and specificity of a predictions table",
        description="Evaluate a predictions table from `lctfound classify predict` (case, predicted, "
                    "probability_<class> columns) against a truth table (case,label or image,label). Predictions "
                    "are the most probable class. AUROC by torchmetrics (one-vs-rest macro average for more than "
                    "two classes). 95% intervals from a seeded bootstrap over cases, stratified by true class so "
                    "that every resample holds every class. --compare adds a second model's table: DeLong's test "
                    "and a paired bootstrap interval for the AUROC difference, McNemar's exact test for accuracy.")
    parser.add_argument("--predictions", required=True, help="predictions CSV")
    parser.add_argument("--truth", required=True, help="truth CSV: case,label or image,label")
    parser.add_argument("--compare", help="a second predictions CSV of the same cases to compare with")
    parser.add_argument("--positive", help="positive class of a two-class problem (default: the second class in "
                                           "sorted order)")
    _add_shared_options(parser)
    parser.set_defaults(func=run_classification)


def _add_image(commands) -> None:
    parser = commands.add_parser(
        "image", help="PSNR, SSIM, RMSE (HU) and VIF of a CT volume against a reference, per slice",
        description="Image quality of a volume (e.g. an enhanced or reconstructed CT) against a reference on the "
                    "same grid, per slice and per volume. PSNR = 10·log10(R²/MSE) with both images clipped to the HU "
                    "range (--range, default -1000,1000: R = 2000 HU); SSIM (scikit-image, Gaussian σ 1.5) on the "
                    "clipped images; RMSE in HU unclipped; VIF (torchmetrics VIF-P) on the clipped images scaled to "
                    "0..255. --mask restricts PSNR, SSIM and RMSE to its non-zero voxels (VIF uses the whole "
                    "slice). Slice summaries carry bootstrap intervals over slices (slices are not independent). "
                    "--compare adds a second volume and paired tests over slices (Wilcoxon signed-rank, paired "
                    "t-test). LPIPS is not offered (it needs torchvision).")
    parser.add_argument("--prediction", "-p", required=True, help="volume to score")
    parser.add_argument("--reference", "-r", required=True, help="reference volume on the same grid")
    parser.add_argument("--compare", help="a second volume to compare with --prediction, slice by slice")
    parser.add_argument("--range", dest="hu_range", default="-1000,1000", metavar="LOW,HIGH",
                        help="HU range for PSNR/SSIM/VIF (default -1000,1000, data range 2000 HU)")
    parser.add_argument("--mask", help="label map on the reference grid; metrics over its non-zero voxels")
    parser.add_argument("--slices", type=slice_list_type, help="evaluate only these slice indices, e.g. 20-27")
    _add_shared_options(parser)
    # Let "--range -1000,1000" read its negative value: argparse takes only plain negative numbers
    # ("-5") for values, anything else starting with "-" for an option (no public setting for this).
    parser._negative_number_matcher = re.compile(r"^-\d+(\.\d*)?(,-?\d+(\.\d*)?)?$|^-\d*\.\d+$")
    parser.set_defaults(func=run_image)


#: The ``evaluate`` subcommands, in the order ``--help`` lists them.
SUBCOMMANDS = (_add_segmentation, _add_classification, _add_image)


def _check_shared(args: argparse.Namespace) -> None:
    from ..metrics.reports import check_output
    from ..metrics.statistics import check_bootstrap_settings

    check_bootstrap_settings(args.bootstrap, 0.95)
    if args.output:
        from . import argument_inputs

        check_output(args.output, args.overwrite, inputs=argument_inputs(args))  # before any work


def _write_output(args: argparse.Namespace, report: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    from ..metrics.reports import write_results

    if args.output:
        path = write_results(args.output, report, rows, overwrite=args.overwrite)
        print(f"wrote {path}")


@contextlib.contextmanager
def _progress(description: str):
    """A progress bar on an interactive terminal; none otherwise (errors stay one line)."""
    if not sys.stderr.isatty():
        yield None
        return
    from ..progress import TqdmProgress

    progress = TqdmProgress(description, unit="case")
    try:
        yield progress
    finally:
        progress.close()


# --------------------------------------------------------------------------------------------
# Segmentation
# --------------------------------------------------------------------------------------------


def run_segmentation(args: argparse.Namespace) -> int:
    from ..metrics.segmentation import (
        evaluate_segmentation_files,
        parse_structure_names,
        segmentation_report,
        segmentation_rows,
        structure_names_from_model,
    )

    _check_shared(args)
    structures = None
    if args.names:
        structures = parse_structure_names(args.names)
    elif args.model:
        structures = structure_names_from_model(args.model)
    with _progress("evaluate") as progress:
        evaluation = evaluate_segmentation_files(args.prediction, args.reference, structures, args.slices, progress)
    compare = None
    if args.compare:
        with _progress("evaluate --compare") as progress:
            compare = evaluate_segmentation_files(args.compare, args.reference, structures or evaluation.structures,
                                                  args.slices, progress)
    report = segmentation_report(evaluation, compare, n_resamples=args.bootstrap, seed=args.seed)
    _print_segmentation(report)
    rows = segmentation_rows(evaluation, "prediction")
    if compare is not None:
        rows += segmentation_rows(compare, "compare")
    _write_output(args, report, rows)
    return 0


def _print_set(block: dict[str, Any], title: str) -> None:
    from ..metrics.reports import format_table, value_with_interval

    count = len(block["cases"])
    print(f"{title}: {block['prediction']} — {count} case{'' if count == 1 else 's'}")
    for kind in ("predictions", "references"):
        unmatched = block[f"unmatched_{kind}"]
        if unmatched:
            print(f"  unmatched {kind} ({len(unmatched)}): {', '.join(unmatched)}")
    rows = []
    for entry in block["summary"]:
        dice, hd = entry["dice"], entry["hd95_mm"]
        rows.append([entry["structure"], entry["n"], value_with_interval(dice["mean"], dice["mean_ci"]),
                     value_with_interval(dice["median"], None),
                     value_with_interval(hd["median"], hd["median_ci"], 2), hd["undefined"],
                     value_with_interval(entry["prediction_ml"]["mean"], None, 2),
                     value_with_interval(entry["reference_ml"]["mean"], None, 2)])
    print(format_table(["structure", "n", "Dice mean [95% CI]", "Dice median", "HD95 mm median [95% CI]",
                        "HD95 undefined", "pred mL mean", "ref mL mean"], rows))
    for note in block["notes"]:
        print(f"  note: {note}")
    for entry in block["summary"]:
        if entry["both_empty"]:
            print(f"  {entry['structure']}: prediction and reference both empty in {entry['both_empty']} of "
                  f"{entry['n']} cases (Dice 1, HD95 0)")
    for score in block["scores"]:
        if score["note"] and score["hd95_mm"] is None:
            print(f"  {score['case']} / {score['structure']}: {score['note']}")


def _print_segmentation(report: dict[str, Any]) -> None:
    from ..metrics.reports import format_table, p_text, value_with_interval

    print(f"reference: {report['reference']}")
    if report["slices"]:
        print(f"slices: {report['slices']} only")
    _print_set(report["results"], "prediction")
    if any(e["n"] == 1 for e in report["results"]["summary"]):
        print("  n=1: no confidence interval for a single case (slices are not resampled instead)")
    if "compare" in report:
        _print_set(report["compare"], "compare")
        rows = []
        for entry in report["comparison"]["structures"]:
            dice = entry["dice"]
            rows.append([entry["structure"], dice["n"], f"{dice['mean_a']:.3f}", f"{dice['mean_b']:.3f}",
                         value_with_interval(dice["mean_difference"], dice["mean_difference_ci"]),
                         p_text(dice["wilcoxon"]["p_value"]), p_text(dice["t_test"]["p_value"])])
        print("paired Dice comparison (prediction − compare, common cases):")
        print(format_table(["structure", "n", "Dice prediction", "Dice compare", "difference [95% CI]",
                            "Wilcoxon p", "t-test p"], rows))
        for entry in report["comparison"]["structures"]:
            if entry["dice"].get("note"):
                print(f"  {entry['structure']}: {entry['dice']['note']}")
    bootstrap = report["bootstrap"]
    print(f"intervals: {bootstrap['resamples']} bootstrap resamples over cases, seed {bootstrap['seed']}")


# --------------------------------------------------------------------------------------------
# Classification
# --------------------------------------------------------------------------------------------


def run_classification(args: argparse.Namespace) -> int:
    from ..metrics.classification import classification_report, classification_rows, evaluate_classification_files

    _check_shared(args)
    data = evaluate_classification_files(args.predictions, args.truth, args.positive)
    compare = None
    if args.compare:
        positive = data.classes[data.positive] if data.positive is not None else None
        compare = evaluate_classification_files(args.compare, args.truth, positive)
    report = classification_report(data, compare, truth=args.truth, n_resamples=args.bootstrap, seed=args.seed)
    _print_classification(report, args.positive)
    rows = classification_rows(data, "predictions")
    if compare is not None:
        rows += classification_rows(compare, "compare")
    _write_output(args, report, rows)
    return 0


def _print_metrics(block: dict[str, Any], title: str) -> None:
    from ..metrics.reports import format_table, value_with_interval

    counts = ", ".join(f"{name} {count}" for name, count in block["class_counts"].items())
    print(f"{title}: {block['predictions']} — {block['n']} cases ({counts})")
    for kind in ("predictions", "truth"):
        unmatched = block[f"unmatched_{kind}"]
        if unmatched:
            print(f"  unmatched {kind} ({len(unmatched)}): {', '.join(unmatched)}")
    metrics = block["metrics"]
    labels = {"auroc": "AUROC" if "sensitivity" in metrics else "AUROC (macro one-vs-rest)"}
    overall = [[labels.get(name, name), value_with_interval(m["value"], m["ci"])]
               for name, m in metrics.items() if "/" not in name]
    print(format_table(["metric", "value [95% CI]"], overall))
    per_class: dict[str, dict[str, Any]] = {}
    for name, m in metrics.items():
        if "/" in name:
            cls, metric = name.rsplit("/", 1)
            per_class.setdefault(cls, {})[metric] = m
    if per_class:
        rows = [[cls, block["class_counts"].get(cls, 0)] + [value_with_interval(v[k]["value"], v[k]["ci"])
                                                            for k in ("auroc", "sensitivity", "specificity")]
                for cls, v in per_class.items()]
        print(format_table(["class (one-vs-rest)", "n", "AUROC [95% CI]", "sensitivity [95% CI]",
                            "specificity [95% CI]"], rows))
    for note in block["notes"]:
        print(f"  note: {note}")


def _print_classification(report: dict[str, Any], positive_given: Optional[str]) -> None:
    from ..metrics.reports import p_text, value_with_interval

    print(f"classes: {', '.join(report['classes'])}")
    if report["positive_class"] is not None:
        how = "--positive" if positive_given else "default: the second class in sorted order; change with --positive"
        print(f"positive class: {report['positive_class']} ({how})")
    _print_metrics(report["results"], "predictions")
    if "compare" in report:
        _print_metrics(report["compare"], "compare")
        comparison = report["comparison"]
        auroc, accuracy = comparison["auroc"], comparison["accuracy"]
        print(f"paired comparison (predictions − compare, {comparison['n']} common cases):")
        print(f"  AUROC difference {value_with_interval(auroc['difference'], auroc['ci'])}")
        delong = auroc["delong"]
        if "p_value" in delong:
            note = f" ({delong['note']})" if delong.get("note") else ""
            print(f"  DeLong test p = {p_text(delong['p_value'])}{note}")
        else:
            for name, test in delong.items():
                print(f"  DeLong test, {name} vs rest: p = {p_text(test['p_value'])}")
        mcnemar = accuracy["mcnemar"]
        print(f"  accuracy {accuracy['first']:.3f} vs {accuracy['second']:.3f}, difference "
              f"{value_with_interval(accuracy['difference'], accuracy['ci'])}; McNemar exact p = "
              f"{p_text(mcnemar['p_value'])} ({mcnemar['only_a_correct']} vs {mcnemar['only_b_correct']} discordant)")
    bootstrap = report["bootstrap"]
    print(f"intervals: {bootstrap['resamples']} bootstrap resamples, seed {bootstrap['seed']}; "
          f"{bootstrap['stratified']}")


# --------------------------------------------------------------------------------------------
# Image quality
# --------------------------------------------------------------------------------------------


def run_image(args: argparse.Namespace) -> int:
    from ..metrics.image import evaluate_image_files, image_report, image_rows, parse_hu_range

    _check_shared(args)
    hu_range = parse_hu_range(args.hu_range)
    with _progress("evaluate image") as progress:
        evaluation = evaluate_image_files(args.prediction, args.reference, hu_range, args.mask, args.slices, progress)
    compare = None
    if args.compare:
        with _progress("evaluate image --compare") as progress:
            compare = evaluate_image_files(args.compare, args.reference, hu_range, args.mask, args.slices, progress)
    report = image_report(evaluation, compare, n_resamples=args.bootstrap, seed=args.seed)
    _print_image(report)
    rows = image_rows(evaluation, "prediction")
    if compare is not None:
        rows += image_rows(compare, "compare")
    _write_output(args, report, rows)
    return 0


def _print_image(report: dict[str, Any]) -> None:
    from ..metrics.image import METRICS
    from ..metrics.reports import format_table, p_text, value_with_interval

    low, high = report["hu_range"]
    print(f"reference: {report['reference']}" + (f"; mask: {report['mask']}" if report["mask"] else ""))
    print(f"PSNR and SSIM over {low:g}..{high:g} HU (data range {report['data_range_hu']:g} HU); RMSE in HU unclipped")
    labels = {"psnr": "PSNR dB", "ssim": "SSIM", "rmse_hu": "RMSE HU", "vif": "VIF"}
    digits = {"psnr": 2, "ssim": 4, "rmse_hu": 1, "vif": 4}
    blocks = [("prediction", report["results"])] + ([("compare", report["compare"])] if "compare" in report else [])
    for title, block in blocks:
        count = len(block["slices"])
        print(f"{title}: {block['prediction']} — {count} slice{'' if count == 1 else 's'}")
        rows = []
        for name in METRICS:
            summary = block["per_slice"][name]
            volume_value = block["volume"][name]
            rows.append([labels[name], "-" if volume_value is None else f"{volume_value:.{digits[name]}f}",
                         value_with_interval(summary["mean"], summary["mean_ci"], digits[name]),
                         value_with_interval(summary["median"], None, digits[name])])
        print(format_table(["metric", "volume", "slice mean [95% CI]", "slice median"], rows))
        for note in block["notes"]:
            print(f"  note: {note}")
    if "comparison" in report:
        rows = []
        for name in METRICS:
            entry = report["comparison"]["metrics"][name]
            if "wilcoxon" not in entry:
                rows.append([labels[name], entry["n"], "-", "-", "-", entry.get("note", "")])
                continue
            better = "prediction" if (entry["mean_difference"] > 0) == entry["higher_is_better"] else "compare"
            if entry["mean_difference"] == 0:
                better = "tie"
            rows.append([labels[name], entry["n"],
                         value_with_interval(entry["mean_difference"], entry["mean_difference_ci"], digits[name]),
                         p_text(entry["wilcoxon"]["p_value"]), p_text(entry["t_test"]["p_value"]), better])
        print("paired comparison over slices (prediction − compare):")
        print(format_table(["metric", "n", "mean difference [95% CI]", "Wilcoxon p", "t-test p", "better"], rows))
    print(f"intervals: {report['bootstrap']['resamples']} bootstrap resamples over slices, seed "
          f"{report['bootstrap']['seed']}")
