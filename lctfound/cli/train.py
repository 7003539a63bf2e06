"""``lctfound train``: diffusion pretraining and task fine-tuning, all on the one resumable training loop."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Callable

from ..errors import LCTfoundError
from ..validation import (
    MAX_DIFFUSION_STEPS, MAX_IMAGE_SIZE, MAX_STEPS, batch_int, check_int, diffusion_steps_int, epochs_float, float_type,
    fraction_float, int_type, learning_rate_float, open_fraction_float, parse_label_names, seed_int,
    steps_int, timestep_int, workers_int,
)

#: Loop defaults of every fine-tuning command (`train finetune`, `classify train`).
FINETUNE_LOOP_DEFAULTS = dict(batch_size=4, lr=1e-4, warmup=100, checkpoint_every=200, epochs=20.0, log_every=5)


def add_loop_arguments(parser: argparse.ArgumentParser, *, batch_size: int, lr: float, warmup: int,
                       checkpoint_every: int, epochs: float, log_every: int) -> None:
    """Options every training command shares (they map onto `LoopConfig`)."""
    parser.add_argument("--output", "-o", required=True, help="run folder (checkpoints, model, logs)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in --output from its newest checkpoint (same settings)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                        help="auto = CUDA when available; under `accelerate launch` the launcher decides")
    parser.add_argument("--batch-size", type=batch_int, default=batch_size,
                        help=f"items per optimizer step per process (default {batch_size})")
    parser.add_argument("--micro-batch-size", type=batch_int, help="items per forward pass (gradient accumulation)")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--max-steps", type=steps_int, help="stop after this many optimizer steps")
    group.add_argument("--epochs", type=epochs_float, default=epochs, help=f"epochs over the data (default {epochs:g})")
    parser.add_argument("--lr", type=learning_rate_float, default=lr, help=f"AdamW learning rate (default {lr:g})")
    parser.add_argument("--warmup-steps", type=int_type(0, MAX_STEPS), default=warmup,
                        help=f"linear warm-up steps (default {warmup}, capped at 10%% of the run)")
    parser.add_argument("--mixed-precision", default="auto", choices=("auto", "no", "bf16", "fp16"),
                        help="auto = bf16 on GPUs that support it, none on CPU")
    parser.add_argument("--checkpoint-every", type=steps_int, default=checkpoint_every,
                        help=f"steps between checkpoints (default {checkpoint_every})")
    parser.add_argument("--keep-checkpoints", type=int_type(1, 1000), default=2, help="checkpoints kept (default 2)")
    parser.add_argument("--ema", type=open_fraction_float, metavar="DECAY",
                        help="keep an EMA of the weights (e.g. 0.999)")
    parser.add_argument("--seed", type=seed_int, default=421,
                        help="seed of new weights, data order and noise (default 421)")
    parser.add_argument("--num-workers", type=workers_int, default=0, help="data-loading worker processes (default 0)")
    parser.add_argument("--log-every", type=steps_int, default=log_every,
                        help=f"steps between metric rows (default {log_every})")
    parser.add_argument("--name", help="model name recorded in its metadata")
    parser.add_argument("--register", metavar="NAME",
                        help="also copy the final model into the user model folder under NAME (all modules list it)")
    parser.add_argument("--events", action="store_true", help="print JSON event lines on stdout (for front ends)")


def register(subparsers) -> None:
    parser = subparsers.add_parser("train", help="pretrain or fine-tune models",
                                   description="Train LCTfound models. Runs unchanged under `accelerate launch`.")
    commands = parser.add_subparsers(dest="train_command", metavar="SUBCOMMAND")
    commands.required = True

    pretrain = commands.add_parser(
        "pretrain", help="DDPM pretraining on a folder of CT volumes or slices",
        description="DDPM pretraining as the official code did (ε-MSE, AdamW, cosine warm-up, clip 1.0, "
                    "both windows, 5%% null prompts, official augmentations). Checkpoints are complete model "
                    "folders; --resume continues after a crash with the same step count and data order.")
    pretrain.add_argument("data", nargs="?",
                          help="folder of CT volumes (DICOM series, NIfTI, NRRD, MHA) or 2D .npy/.npz HU slices "
                               "(omit it with --resume to continue with the run's saved settings)")
    add_loop_arguments(pretrain, batch_size=24, lr=1e-4, warmup=10_000, checkpoint_every=1000, epochs=6.0,
                       log_every=10)
    pretrain.add_argument("--preset", default="cpu-tiny", help="network preset for a new model (default cpu-tiny)")
    pretrain.add_argument("--init-model", help="start from this model folder instead of random weights")
    pretrain.add_argument("--resolution", type=int_type(16, MAX_IMAGE_SIZE, multiple_of=16), default=256,
                          help="training image size, a multiple of 16 (default 256)")
    pretrain.add_argument("--patch-size", type=int_type(16, MAX_IMAGE_SIZE, multiple_of=16),
                          help="train on random patches of this size cut from the resized slices (CPU-friendly)")
    pretrain.add_argument("--windows", default="lung,mediastinal", help="windows per slice (default lung,mediastinal)")
    pretrain.add_argument("--condition-dropout", type=fraction_float, default=0.05,
                          help="null-prompt probability (default 0.05)")
    pretrain.add_argument("--no-augment", action="store_true", help="only resize (no crops, flips, rotations, contrast)")
    pretrain.add_argument("--num-samples", type=int_type(0, 256), default=4,
                          help="sample images per window at each checkpoint")
    pretrain.add_argument("--sample-steps", type=diffusion_steps_int, default=25,
                          help="DDIM steps for those samples (default 25)")
    pretrain.set_defaults(func=run_pretrain)

    finetune = commands.add_parser(
        "finetune", help="fine-tune a backbone for segmentation or classification",
        description="Train a task model on a backbone: a trainable head on the frozen backbone (--mode frozen), "
                    "adapter sub-networks (--mode adapter, segmentation), or full fine-tuning with a replaced "
                    "output layer (--mode full). The result is a task model folder that names its backbone.")
    finetune.add_argument("--task", required=True, choices=("segmentation", "classification"))
    finetune.add_argument("--backbone", default="default", help="backbone model name or folder (default: embedded)")
    finetune.add_argument("--mode", choices=("frozen", "adapter", "full"),
                          help="default: full for segmentation, frozen for classification")
    finetune.add_argument("--window", default="mediastinal", help="input window (default mediastinal)")
    finetune.add_argument("--image", action="append", default=[], help="segmentation: a CT volume (repeat, paired with --labels)")
    finetune.add_argument("--labels", action="append", default=[], help="segmentation: the label map of the --image before it")
    finetune.add_argument("--pairs", help="segmentation: CSV with columns image,labels (paths relative to the CSV)")
    finetune.add_argument("--names", help="segmentation: label names, e.g. 1=Lesion,2=Trachea (default Label N)")
    finetune.add_argument("--background-slices", type=float_type(0, 1000), default=1.0,
                          help="segmentation: unlabelled slices per labelled slice to include (default 1)")
    finetune.add_argument("--timestep", type=timestep_int, default=0,
                          help="segmentation: diffusion timestep of the input (default 0)")
    add_classification_arguments(finetune, prefix="classification: ")
    add_loop_arguments(finetune, **FINETUNE_LOOP_DEFAULTS)
    finetune.set_defaults(func=run_finetune)


def add_classification_arguments(parser: argparse.ArgumentParser, prefix: str = "",
                                 table_required: bool = False) -> None:
    """The classification options of `train finetune` and `classify train` (one handler: `run_finetune`)."""
    parser.add_argument("--table", required=table_required,
                        help=f"{prefix}CSV with columns image,label (label = class name; paths relative to the CSV)")
    parser.add_argument("--slices-per-scan", type=int_type(0, 10_000), default=12,
                        help=f"{prefix}central slices used per scan, 0 = all (default 12, as the paper); "
                             "prediction uses the same choice")
    parser.add_argument("--timesteps", default="0,50,100", help=f"{prefix}timesteps (default 0,50,100)")
    parser.add_argument("--block", type=int_type(0, 4), default=1, help=f"{prefix}U-Net up block to read (default 1)")


# ---------------------------------------------------------------------------- shared running

def loop_config_from_args(args: argparse.Namespace):
    """The loop settings of every training command; the run folder is checked here, before any data
    are read (an existing run, an input, a folder that cannot be written)."""
    from ..training.loop import LoopConfig, check_run_folder
    from . import argument_inputs

    check_run_folder(Path(args.output), bool(getattr(args, "resume", False)), argument_inputs(args))

    return LoopConfig(output=args.output, batch_size=args.batch_size, micro_batch_size=args.micro_batch_size,
                      max_steps=args.max_steps, epochs=args.epochs, learning_rate=args.lr,
                      warmup_steps=args.warmup_steps, mixed_precision=args.mixed_precision,
                      checkpoint_every=args.checkpoint_every, keep_checkpoints=args.keep_checkpoints,
                      ema_decay=args.ema, seed=args.seed, num_workers=args.num_workers, log_every=args.log_every,
                      device=args.device)


def run_training(args: argparse.Namespace, label: str, train: Callable) -> int:
    """Progress (tqdm or JSON events), registration and the closing lines for every training command."""
    from ..models.registry import check_new_model_name, register_model
    from ..progress import Progress, TqdmProgress

    if args.register:
        check_new_model_name(args.register)
    events = (lambda event: print(json.dumps(event), flush=True)) if args.events else None
    progress = Progress() if args.events else TqdmProgress(label, unit="step")
    try:
        result = train(progress, events)
    finally:
        if isinstance(progress, TqdmProgress):
            progress.close()
    if not result.is_main_process:
        return 0
    out = sys.stderr if args.events else sys.stdout
    print(f"trained {result.steps} steps; recent loss {result.final_loss:.4f}; model in {result.model_folder}", file=out)
    if args.register:
        path = register_model(result.model_folder, args.register)
        print(f"registered as {args.register!r} in {path}", file=out)
    skipped = result.extra.get("skipped_sources", [])
    if skipped:
        print(f"warning: skipped {len(skipped)} unreadable source(s), e.g. {skipped[0][0]}: {skipped[0][1]}",
              file=sys.stderr)
    return 0


# ---------------------------------------------------------------------------- pretrain

def config_from_args(args: argparse.Namespace):
    import dataclasses

    from ..training.pretrain import PretrainConfig

    loop = loop_config_from_args(args)
    return PretrainConfig(
        **dataclasses.asdict(loop), data=args.data, preset=args.preset, init_model=args.init_model,
        resolution=args.resolution, patch_size=args.patch_size,
        windows=tuple(w.strip() for w in args.windows.split(",") if w.strip()),
        condition_dropout=args.condition_dropout, augment=not args.no_augment, num_samples=args.num_samples,
        sample_steps=args.sample_steps, name=args.name or args.register)


def saved_config(output: str, device: str):
    """The settings of the run in ``output`` from its newest checkpoint (``--resume`` without DATA)."""
    import dataclasses

    from ..models.bundle import read_metadata
    from ..training.loop import list_checkpoints
    from ..training.pretrain import PretrainConfig

    checkpoints = list_checkpoints(Path(output))
    if not checkpoints:
        raise LCTfoundError(f"{output}: nothing to resume (no complete checkpoint)")
    saved = read_metadata(checkpoints[-1][1] / "model").get("training", {}).get("config")
    if not saved:
        raise LCTfoundError(f"{checkpoints[-1][1]}: has no saved training settings; pass DATA and the original options")
    fields = {field.name for field in dataclasses.fields(PretrainConfig)}
    return PretrainConfig(**{**{k: v for k, v in saved.items() if k in fields}, "output": output, "device": device})


def run_pretrain(args: argparse.Namespace) -> int:
    from ..models.presets import get_preset
    from ..training.pretrain import pretrain
    from ..windows import get_window

    if args.data is None:
        if not args.resume:
            raise LCTfoundError("DATA is required (only --resume may omit it)")
        config = saved_config(args.output, args.device)
    else:
        get_preset(args.preset)
        for window in args.windows.split(","):
            get_window(window)
        config = config_from_args(args)
    return run_training(args, "pretrain",
                        lambda progress, events: pretrain(config, resume=args.resume, progress=progress, on_event=events))


# ---------------------------------------------------------------------------- finetune

def read_pairs(table: str) -> tuple[list[str], list[str]]:
    """(images, label maps) from a CSV with columns image,labels; relative paths are relative to the CSV."""
    from ..training.tables import read_case_table, table_path

    rows = read_case_table(table, ("image", "labels"))
    return [str(table_path(table, row["image"])) for row in rows], [str(table_path(table, row["labels"])) for row in rows]


def segmentation_slices(images: list[str], labels: list[str], background_ratio: float, seed: int):
    """Labelled slices of each (image, label map) pair plus a seeded share of unlabelled ones."""
    import numpy as np

    from ..io.volume import read_label_volume, read_volume

    if not images or len(images) != len(labels):
        raise LCTfoundError("give each CT image with its label map (at least one pair)",
                            option_hints={"image": "pass --image CT --labels LABELS for each pair, or --pairs CSV"})
    rng = np.random.default_rng(seed)
    slices, masks, values = [], [], set()
    for image_path, label_path in zip(images, labels):
        image = read_volume(image_path)
        label = read_label_volume(label_path, reference=image)
        labelled = np.flatnonzero(label.array.reshape(label.shape[0], -1).any(axis=1))
        if labelled.size == 0:
            raise LCTfoundError(f"{label_path}: has no labelled voxel")
        empty = np.setdiff1d(np.arange(label.shape[0]), labelled)
        extra = rng.choice(empty, size=min(len(empty), int(round(background_ratio * len(labelled)))), replace=False)
        for index in sorted(np.concatenate([labelled, extra]).astype(int)):
            slices.append(image.array[index].astype(np.float32))
            masks.append(label.array[index].astype(np.int64))
        values |= set(int(v) for v in np.unique(label.array))
    return slices, masks, values


def classification_slices(table: str, per_scan: int):
    """Slices, class indices, scan ids and class names from a CSV of image,label rows."""
    import numpy as np

    from ..io.volume import read_volume
    from ..training.finetune import central_slices
    from ..training.tables import read_case_table, table_path

    path = Path(table)
    rows = read_case_table(path, ("image", "label"))
    class_names = sorted({row["label"] for row in rows})
    if len(class_names) < 2:  # before any volume is read
        raise LCTfoundError(f"{path}: only one class ({class_names[0]!r}); classification needs at least two")
    slices, classes, scans = [], [], []
    for row in rows:
        image_path = table_path(path, row["image"])
        volume = read_volume(image_path)
        for index in central_slices(volume.shape[0], per_scan):
            slices.append(volume.array[index].astype(np.float32))
            classes.append(class_names.index(row["label"]))
            scans.append(str(image_path))
    return slices, classes, scans, class_names


def run_finetune(args: argparse.Namespace) -> int:
    from ..devices import resolve_device
    from ..models import load_model, resolve_model
    from ..training.finetune import DenseSegmentationTask, SliceClassificationTask
    from ..training.loop import TrainingLoop

    loop = loop_config_from_args(args)
    device = resolve_device("cpu" if args.device == "cpu" else "auto")
    name = args.name or args.register
    # Data, label names and settings are checked before the backbone is loaded.
    if args.task == "segmentation":
        mode = args.mode or "full"
        images, labels = list(args.image), list(args.labels)
        if args.pairs:
            more_images, more_labels = read_pairs(args.pairs)
            images, labels = images + more_images, labels + more_labels
        slices, masks, values = segmentation_slices(images, labels, args.background_slices, args.seed)
        names = parse_label_names(args.names, values, "the label maps")
        backbone = load_model(resolve_model(args.backbone), device=device)
        task = DenseSegmentationTask(backbone, slices, masks, names, mode=mode, timestep=args.timestep,
                                     window=args.window, seed=args.seed, name=name)
    else:
        mode = args.mode or "frozen"
        if mode == "adapter":
            raise LCTfoundError("classification supports the modes frozen or full, not adapter")
        if not args.table:
            raise LCTfoundError("classification needs a table: a CSV with columns image,label",
                                option_hints={"table": "pass it with --table CSV"})
        try:
            timesteps = tuple(check_int(t, "a timestep", 0, MAX_DIFFUSION_STEPS - 1)
                              for t in args.timesteps.split(",") if t.strip())
        except LCTfoundError as error:
            raise LCTfoundError(f"cannot use the timesteps {args.timesteps!r}: {error}; use e.g. 0,50,100") from None
        if not timesteps:
            raise LCTfoundError(f"no timesteps in {args.timesteps!r}; use e.g. 0,50,100")
        slices, classes, scans, class_names = classification_slices(args.table, args.slices_per_scan)
        backbone = load_model(resolve_model(args.backbone), device=device)
        task = SliceClassificationTask(backbone, slices, classes, scans, class_names, mode=mode, timesteps=timesteps,
                                       block=args.block, window=args.window, seed=args.seed, name=name,
                                       slices_per_scan=args.slices_per_scan)
    return run_training(args, f"finetune {args.task}",
                        lambda progress, events: TrainingLoop(loop, task, args.resume, progress, events).run())
