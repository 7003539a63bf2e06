"""``lctfound segment``: few-shot segmentation from a few labelled slices, and batch prediction."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from ..errors import LCTfoundError
from .remote import add_server_options
from ..validation import MAX_IMAGE_SIZE, epochs_int, float_type, int_type, parse_label_names, slice_list_type

#: Below this Dice with its teacher on the distillation slices a student is said to have missed a structure.
STUDENT_MISSED_DICE = 0.2


def register(subparsers) -> None:
    parser = subparsers.add_parser("segment", help="few-shot segmentation: train on a few slices, predict volumes",
                                   description="Few-shot segmentation on frozen LCTfound features (the paper's "
                                               "protocol): a per-pixel MLP trained on the labelled slices only.")
    commands = parser.add_subparsers(dest="segment_command", metavar="SUBCOMMAND")
    commands.required = True

    train = commands.add_parser("train", help="train a few-shot model on the labelled slices of a volume",
                                description="Train on the slices of LABELS that hold a structure (or on --slices); "
                                            "every other slice is ignored. Features are cached, so retraining "
                                            "after corrections is fast.")
    train.add_argument("volume", help="CT volume: DICOM folder, NIfTI, NRRD or MHA")
    train.add_argument("--labels", required=True, help="label map on the volume's grid (0 = background)")
    train.add_argument("--slices", type=slice_list_type,
                       help="slices that are fully labelled, e.g. 10,12-14 (default: slices with labels)")
    train.add_argument("--names", help="structure names, e.g. 1=Lesion,2=Vessel (default Label N)")
    train.add_argument("--backbone", help="backbone model (default: the --init model's, else the embedded model)")
    train.add_argument("--init", metavar="MODEL",
                       help="continue from this few-shot model (after corrections): its head is the start, and "
                            "pixels it gets wrong on the labelled slices count more")
    train.add_argument("--window", default="mediastinal", help="input window (default mediastinal)")
    train.add_argument("--recipe", default="auto", choices=("auto", "official", "fast"),
                       help="training recipe: 'official' reproduces the paper's code (every pixel at the model's "
                            "input size, batches of 4 augmented images through the backbone, 20 epochs; slow on "
                            "a CPU); 'fast' trains on cached features of a grid of at most 128² (default 'auto': "
                            "official for the official backbone, fast for any other; see docs/recipes.md)")
    train.add_argument("--epochs", type=epochs_int, help="head training epochs (default: the recipe's, 20 official, 30 fast)")
    train.add_argument("--output", "-o", required=True, help="new task-model folder")
    train.add_argument("--overwrite", action="store_true", help="replace an existing model folder")
    train.add_argument("--register", metavar="NAME", help="also register it under NAME for every front end")
    train.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    train.add_argument("--events", action="store_true", help="print JSON event lines on stdout (for front ends)")
    add_server_options(train)
    train.set_defaults(func=run_train)

    predict = commands.add_parser("predict", help="segment a volume, or every volume of a folder",
                                  description="Predict with any segmentation task model: few-shot, structures "
                                              "(fine-tuned) or a distilled student. With a folder as input, writes "
                                              "one label map per volume into --output and a summary.csv, skipping "
                                              "volumes already done (so an interrupted batch resumes). Under "
                                              "torchrun or accelerate launch the processes share the volumes out "
                                              "and rank 0 merges the summary.")
    predict.add_argument("input", help="a CT volume or a folder of volumes (NIfTI/NRRD/MHA files or DICOM folders)")
    predict.add_argument("--model", required=True, help="task model folder or registered name")
    predict.add_argument("--backbone", help="backbone model (default: the one the task model names)")
    predict.add_argument("--output", "-o", required=True, help="label map file (.nii.gz/.nrrd/.mha) or a folder")
    predict.add_argument("--overwrite", action="store_true",
                         help="replace an existing label map (with a folder: redo every volume)")
    predict.add_argument("--postprocess", default="connected",
                         help="comma list of: connected (keep the 3D components that touch the annotation; "
                              "without one, the largest), largest, fill, smooth; 'none' for the raw prediction "
                              "(default connected)")
    predict.add_argument("--annotation", metavar="LABELS",
                         help="the annotator's label map on this volume: prediction is kept to its extent (plus "
                              "--extent-margin) and 'connected' keeps what touches it (default: the annotation "
                              "a few-shot model was trained from, when this is its training volume)")
    predict.add_argument("--extent-margin", default="15mm", metavar="N|Nmm",
                         help="slices predicted beyond the first and last annotated slice holding a structure, "
                              "in slices (3) or millimetres (15mm; default 15mm)")
    predict.add_argument("--whole-volume", action="store_true",
                         help="predict every slice, not only the annotated extent")
    predict.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    predict.add_argument("--events", action="store_true", help="print JSON event lines on stdout (for front ends)")
    add_server_options(predict)
    predict.set_defaults(func=run_predict)

    distill = commands.add_parser("distill", help="distil a segmentation model into a small, fast student",
                                  description="The teacher (any segmentation model) labels every slice of the "
                                              "volumes; a small 2D U-Net learns to reproduce its probabilities "
                                              "(KL divergence, T=3) and, on annotated slices, the annotation. The "
                                              "student needs no backbone and segments a whole CT in seconds.")
    distill.add_argument("volumes", nargs="+", metavar="VOLUME", help="CT volumes to distil on")
    distill.add_argument("--teacher", required=True, help="segmentation task model folder or registered name")
    distill.add_argument("--labels", nargs="+", action="extend", metavar="LABELS",
                         help="label maps, one per VOLUME in the same order ('-' for none); slices holding a "
                              "structure count as annotated, other slices are left to the teacher")
    distill.add_argument("--backbone", help="the teacher's backbone (default: the one the teacher names)")
    distill.add_argument("--epochs", type=epochs_int, default=20,
                         help="student training epochs at most (default 20; fewer if --time-budget runs out)")
    distill.add_argument("--time-budget", type=float_type(minimum=0), default=10.0, metavar="MINUTES",
                         help="wall-clock budget of the whole run in minutes (default 10, a coffee break on a "
                              "2-core laptop; 0 for none): after the first epoch the student trains only the "
                              "epochs that fit, with a shortened schedule; progress shows an ETA")
    distill.add_argument("--resolution", type=int_type(16, MAX_IMAGE_SIZE, multiple_of=16),
                         help="student working resolution, a multiple of 16 (default: the teacher's input size)")
    distill.add_argument("--output", "-o", required=True, help="new task-model folder")
    distill.add_argument("--overwrite", action="store_true", help="replace an existing model folder")
    distill.add_argument("--register", metavar="NAME", help="also register it under NAME for every front end")
    distill.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    distill.add_argument("--events", action="store_true", help="print JSON event lines on stdout (for front ends)")
    add_server_options(distill)
    distill.set_defaults(func=run_distill)


def _format_names(names: dict[int, str]) -> str:
    return ",".join(f"{value}={name}" for value, name in sorted(names.items()) if value > 0) or "nothing"


def run_train(args: argparse.Namespace) -> int:
    if args.server:
        from .remote import run_segment_train

        return run_segment_train(args)
    import numpy as np

    from ..devices import resolve_device
    from ..features import parse_slices
    from ..io.volume import read_label_volume, read_volume
    from ..models import load_model, resolve_model
    from ..models.registry import check_new_model_name, register_model
    from ..pipelines.segmentation import TASK, UNLABELLED, FewShotConfig, FewShotSegmenter
    from ..progress import command_progress

    from ..atomic import check_outputs
    from . import given_paths

    output, = check_outputs([args.output], given_paths(args.volume, args.labels, args.init, args.backbone),
                            args.overwrite)
    if args.register:
        check_new_model_name(args.register)
    volume = read_volume(args.volume)
    label = read_label_volume(args.labels, reference=volume)
    chosen = parse_slices(args.slices, volume.shape[0])
    if chosen is None:
        chosen = [int(k) for k in np.flatnonzero(label.array.reshape(volume.shape[0], -1).any(axis=1))]
    if not chosen:
        raise LCTfoundError(f"{args.labels}: no labelled slice; paint the structure on at least one slice")
    labels = np.full(volume.shape, UNLABELLED, dtype=np.int16)
    labels[chosen] = label.array[chosen]
    values = sorted(int(v) for v in np.unique(label.array[chosen])) if chosen else []
    names = parse_label_names(args.names, values,
                              f"{args.labels} (on the chosen slices)" if args.slices else args.labels)
    if args.init:
        from dataclasses import replace

        from ..models.task_models import load_task_model

        init_folder = resolve_model(args.init)
        init = load_task_model(init_folder, TASK)
        backbone_spec = args.backbone or init.backbone.get("path") or init.backbone.get("name") or "default"
        backbone = load_model(resolve_model(backbone_spec), device=resolve_device(args.device))
        segmenter = FewShotSegmenter.load(init_folder, backbone)
        if segmenter.label_names != {value: name for value, name in names.items() if value > 0}:
            raise LCTfoundError(f"--init model {args.init} segments {_format_names(segmenter.label_names)}, "
                                f"these labels are {_format_names(names)}; train without --init")
        if args.recipe != "auto" and args.recipe != segmenter.config.recipe:
            raise LCTfoundError(f"--init model {args.init} was trained with the {segmenter.config.recipe} recipe; "
                                f"drop --recipe or train without --init")
        if args.epochs is not None:
            segmenter.config = replace(segmenter.config, epochs=args.epochs)
    else:
        backbone = load_model(resolve_model(args.backbone or "default"), device=resolve_device(args.device))
        config = FewShotConfig.for_model(backbone, args.recipe, window=args.window, epochs=args.epochs)
        segmenter = FewShotSegmenter(backbone, names, config)
    from ..pipelines.recipes import describe_recipe

    print(f"training with the {describe_recipe(segmenter.config.recipe)}")
    start = time.perf_counter()
    with command_progress(args.events, "segment train", unit="step") as progress:
        report = segmenter.fit(volume.array, labels, progress=progress)
    segmenter.save(output, extra={"name": args.register or output.name,
                                  "training": {"volume": str(args.volume), "slices": report.slices,
                                               "recipe": segmenter.config.recipe,
                                               "pixels": report.pixels, "final_loss": report.final_loss,
                                               "epochs": report.epochs,
                                               "requested_epochs": report.requested_epochs,
                                               "epochs_note": report.epochs_note}},
                   overwrite=args.overwrite)
    if report.epochs_note:
        print(f"note: {report.epochs_note}")
    print(f"trained on slices {report.slices} ({report.pixels} pixels, {report.epochs} epochs) in {time.perf_counter() - start:.1f} s; "
          f"model in {output}")
    if report.cache:
        print(report.cache)
    if args.register:
        print(f"registered as {args.register!r} in {register_model(output, args.register)}")
    return 0


def _segmentation_done(target: Path) -> bool:
    """Whether a batch output from an earlier run is complete: a non-empty label map that reads back
    (`lctfound.atomic.output_is_complete`). An empty or unreadable file is redone."""
    from ..atomic import output_is_complete
    from ..io.volume import read_volume

    return output_is_complete(target, lambda path: read_volume(path, labels=True))


def _predict_in_extent(segmenter, volume, args: argparse.Namespace, steps, progress, annotation=None):
    """Predict ``volume`` on the annotated extent ± the margin (all slices with --whole-volume or
    without an annotation), saying which slices were predicted."""
    from ..pipelines.segmentation import annotated_extent, parse_extent_margin, prediction_slices

    if annotation is None:
        annotation = segmenter.annotation_for(volume.array)
    slices = None
    extent = None if annotation is None else annotated_extent(annotation)
    if extent is not None and not args.whole_volume:
        margin = parse_extent_margin(args.extent_margin, volume.spacing[2])
        slices = prediction_slices(volume.shape[0], annotation, margin)
        print(f"predicting slices {slices[0]}-{slices[-1]} of {volume.shape[0]}: the annotated extent "
              f"{extent[0]}-{extent[1]} ± {margin} slice(s) ({args.extent_margin}); --whole-volume predicts all")
    return segmenter.predict(volume.array, progress=progress, postprocess=steps, slices=slices,
                             annotation=annotation)


def run_predict(args: argparse.Namespace) -> int:
    if args.server:
        from .remote import run_segment_predict

        return run_segment_predict(args)
    from ..atomic import check_outputs, check_writable, refuse_input_conflict
    from ..io.volume import find_volumes, read_volume, volume_stem, write_volume
    from ..pipelines.predictors import load_segmentation_predictor
    from ..pipelines.segmentation import POSTPROCESSING, parse_extent_margin
    from ..progress import command_progress
    from . import given_paths

    steps = [s.strip() for s in args.postprocess.split(",") if s.strip() and s.strip() != "none"]
    unknown = [s for s in steps if s not in POSTPROCESSING]
    if unknown:
        raise LCTfoundError(f"unknown post-processing {unknown[0]!r}; choose from {', '.join(POSTPROCESSING)} "
                            "or none")
    parse_extent_margin(args.extent_margin, 1.0)  # a bad margin is one line before any work
    source, output = Path(args.input).expanduser(), Path(args.output).expanduser()
    inputs = find_volumes(source)
    batch = source.is_dir() and not (len(inputs) == 1 and inputs[0] == source)
    if batch and args.annotation:
        raise LCTfoundError("--annotation belongs to one volume; predict that volume on its own")
    model_paths = given_paths(args.model, args.backbone, args.annotation)
    # Every output location is checked before the model is loaded.
    if not batch:
        check_outputs([output], [source, *model_paths], args.overwrite)
    else:
        if output.exists() and not output.is_dir():
            raise LCTfoundError(f"{output}: is a file; with a folder of volumes give an output folder")
        refuse_input_conflict(output, [source, *inputs, *model_paths])
        check_writable(output / "summary.csv")
    from ..batch import BatchRun, idle_rank, launcher_ranks, rank_device, read_table, write_table

    ranks = launcher_ranks()
    if not batch and idle_rank(ranks, output):
        return 0
    segmenter = load_segmentation_predictor(args.model, args.backbone, rank_device(args.device, ranks))
    if not batch:
        volume = read_volume(inputs[0])
        annotation = None
        if args.annotation:
            from ..io.volume import read_label_volume

            annotation = read_label_volume(args.annotation, reference=volume).array
        with command_progress(args.events, "segment", unit="slice") as progress:
            labels = _predict_in_extent(segmenter, volume, args, steps, progress, annotation)
        write_volume(volume.with_array(labels), output)
        print(f"wrote {output}: " + ", ".join(f"{name} {int((labels == value).sum())} voxels"
                                              for value, name in sorted(segmenter.label_names.items())))
        return 0
    output.mkdir(parents=True, exist_ok=True)  # every rank may: exist_ok
    summary_path = output / "summary.csv"
    names = [name for _, name in sorted(segmenter.label_names.items())]
    columns = ["input", "output", "status", "seconds", *names]
    keys = [str(path) for path in inputs]
    targets = [output / f"{volume_stem(path)}_seg.nii.gz" for path in inputs]
    for target in targets:
        refuse_input_conflict(target, [*inputs, *model_paths])
    failures = 0
    with BatchRun(summary_path, keys, read_table, lambda rows, path: write_table(rows, path, columns),
                  restart=args.overwrite, ranks=ranks) as run:
        done = {key for key, row in run.previous.items() if row.get("status") == "ok"}
        mine = run.plan(lambda i: keys[i] in done and _segmentation_done(targets[i]))
        for index in mine:
            path, target = inputs[index], targets[index]
            if target.exists() and not args.overwrite and keys[index] not in done:
                # Not made by this batch (or its summary row is lost): never replace it silently.
                failures += 1
                row = {"input": keys[index], "output": "", "seconds": "", **{n: "" for n in names},
                       "status": run.unlisted_output(target)}
            else:
                start = time.perf_counter()
                try:
                    volume = read_volume(path)
                    with command_progress(args.events, path.name, unit="slice") as progress:
                        labels = _predict_in_extent(segmenter, volume, args, steps, progress)
                    write_volume(volume.with_array(labels), target)
                    row = {"input": keys[index], "output": str(target), "status": "ok",
                           "seconds": f"{time.perf_counter() - start:.1f}",
                           **{name: int((labels == value).sum())
                              for value, name in sorted(segmenter.label_names.items())}}
                except LCTfoundError as error:
                    from ..atomic import DiskFullError

                    if isinstance(error, DiskFullError):
                        raise  # every later volume would fail the same way
                    failures += 1
                    row = {"input": keys[index], "output": "", "status": f"error: {error}", "seconds": "",
                           **{n: "" for n in names}}
            run.record(keys[index], row)
        totals = run.finish(failed=failures, done=len(mine) - failures)
    if ranks.main:
        print(f"{len(inputs) - totals['failed']} of {len(inputs)} volume(s) segmented; summary in {summary_path}")
    else:
        print(run.shard_line(len(mine) - failures, failures, "volume(s) segmented"))
    return run.exit_code(totals["failed"])


def distill_label_paths(args: argparse.Namespace) -> list:
    """The --labels of `segment distill`, one per volume ('-' for none), every named file present."""
    label_paths = list(args.labels or [])
    if label_paths and len(label_paths) != len(args.volumes):
        raise LCTfoundError(f"{len(label_paths)} label map(s) for {len(args.volumes)} volume(s); give one per volume "
                            "('-' for a volume without labels)")
    missing = [p for p in [*args.volumes, *(p for p in label_paths if p != "-")] if not Path(p).exists()]
    if missing:
        raise LCTfoundError(f"{missing[0]}: no such file or folder")
    return label_paths


def run_distill(args: argparse.Namespace) -> int:
    if args.server:
        from .remote_tasks import run_segment_distill

        return run_segment_distill(args)
    import numpy as np

    from ..io.volume import read_label_volume, read_volume
    from ..models.registry import check_new_model_name, register_model
    from ..pipelines.predictors import load_segmentation_predictor
    from ..pipelines.student import UNLABELLED, StudentConfig, distill
    from ..progress import command_progress

    from ..atomic import check_outputs
    from . import given_paths

    output, = check_outputs([args.output], given_paths(args.volumes, args.labels, args.teacher, args.backbone),
                            args.overwrite)
    if args.register:
        check_new_model_name(args.register)
    label_paths = distill_label_paths(args)
    config = StudentConfig(epochs=args.epochs, resolution=args.resolution,
                           time_budget=args.time_budget * 60 if args.time_budget else None)
    config.check()
    teacher = load_segmentation_predictor(args.teacher, args.backbone, args.device)
    current: dict = {}

    # Volumes are read one at a time (the teacher reduces each to the working resolution before
    # the next); `distill` takes volume i, then its labels, which are checked against that volume.
    def volumes():
        for path in args.volumes:
            current["volume"] = read_volume(path)
            yield current["volume"].array

    def labels():
        for path in label_paths:
            if path == "-":
                yield None
                continue
            label = read_label_volume(path, reference=current["volume"]).array
            annotated = label.reshape(label.shape[0], -1).any(axis=1)
            partial = np.full(label.shape, UNLABELLED, dtype=np.int16)
            partial[annotated] = label[annotated]
            yield partial

    start = time.perf_counter()
    with command_progress(args.events, "segment distill", unit="step") as progress:
        student = distill(teacher, volumes(), labels() if label_paths else None, config, progress,
                          device=teacher.device)
    report = student.report
    student.save(output, extra={"name": args.register or output.name,
                                "description": f"student of {teacher.provenance['model']['name']}",
                                "training": {"volumes": [str(p) for p in args.volumes], "labels": label_paths}},
                 overwrite=args.overwrite)
    agreement = ", ".join(f"{name} {dice:.3f}" for name, dice in report.agreement.items())
    print(f"distilled on {report.slices} slices of {report.volumes} volume(s) ({report.annotated_slices} annotated) "
          f"in {time.perf_counter() - start:.1f} s; Dice with the teacher: {agreement}; model in {output}")
    # A small structure can be lost altogether (1 of 3 seeds on the sample CT's lesion at the default budget).
    missed = [name for name, dice in report.agreement.items() if dice < STUDENT_MISSED_DICE]
    if missed:
        print(f"warning: the student has not learnt {', '.join(missed)} (Dice with the teacher below "
              f"{STUDENT_MISSED_DICE} on the distillation slices); distil again with more --epochs and a larger "
              "--time-budget, or predict with the teacher",
              file=sys.stdout if args.events else sys.stderr)  # --events: a log event, e.g. for a server's client
    if args.register:
        print(f"registered as {args.register!r} in {register_model(output, args.register)}")
    return 0

