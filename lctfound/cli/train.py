"""``lctfound train``: diffusion pretraining (and, with later task issues, fine-tuning)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..errors import LCTfoundError



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
    pretrain.add_argument("--output", "-o", required=True, help="run folder (checkpoints, model, logs, samples)")
    pretrain.add_argument("--resume", action="store_true",
                          help="continue the run in --output from its newest checkpoint (same settings)")
    pretrain.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                          help="auto = CUDA when available; under `accelerate launch` the launcher decides")
    pretrain.add_argument("--preset", default="cpu-tiny", help="network preset for a new model (default cpu-tiny)")
    pretrain.add_argument("--init-model", help="start from this model folder instead of random weights")
    pretrain.add_argument("--resolution", type=int, default=256, help="training image size (default 256)")
    pretrain.add_argument("--patch-size", type=int,
                          help="train on random patches of this size cut from the resized slices (CPU-friendly)")
    pretrain.add_argument("--batch-size", type=int, default=24, help="images per optimizer step per process (default 24)")
    pretrain.add_argument("--micro-batch-size", type=int, help="images per forward pass (gradient accumulation)")
    group = pretrain.add_mutually_exclusive_group()
    group.add_argument("--max-steps", type=int, help="stop after this many optimizer steps")
    group.add_argument("--epochs", type=float, default=6.0, help="epochs over all (slice, window) items (default 6)")
    pretrain.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate (default 1e-4)")
    pretrain.add_argument("--warmup-steps", type=int, default=10_000,
                          help="linear warm-up steps (default 10000, capped at 10%% of the run)")
    pretrain.add_argument("--mixed-precision", default="auto", choices=("auto", "no", "bf16", "fp16"),
                          help="auto = bf16 on GPUs that support it, none on CPU")
    pretrain.add_argument("--windows", default="lung,mediastinal", help="windows per slice (default lung,mediastinal)")
    pretrain.add_argument("--condition-dropout", type=float, default=0.05, help="null-prompt probability (default 0.05)")
    pretrain.add_argument("--no-augment", action="store_true", help="only resize (no crops, flips, rotations, contrast)")
    pretrain.add_argument("--checkpoint-every", type=int, default=1000, help="steps between checkpoints (default 1000)")
    pretrain.add_argument("--keep-checkpoints", type=int, default=2, help="checkpoints kept (default 2)")
    pretrain.add_argument("--ema", type=float, metavar="DECAY", help="keep an EMA of the weights (e.g. 0.999)")
    pretrain.add_argument("--num-samples", type=int, default=4, help="sample images per window at each checkpoint")
    pretrain.add_argument("--sample-steps", type=int, default=25, help="DDIM steps for those samples (default 25)")
    pretrain.add_argument("--seed", type=int, default=421, help="seed of weights, data order and noise (default 421)")
    pretrain.add_argument("--num-workers", type=int, default=0, help="data-loading worker processes (default 0)")
    pretrain.add_argument("--log-every", type=int, default=10, help="steps between metric rows (default 10)")
    pretrain.add_argument("--name", help="model name recorded in its metadata")
    pretrain.add_argument("--register", metavar="NAME",
                          help="also copy the final model into the user model folder under NAME (all modules list it)")
    pretrain.add_argument("--events", action="store_true", help="print JSON event lines on stdout (for front ends)")
    pretrain.set_defaults(func=run_pretrain)


def config_from_args(args: argparse.Namespace):
    from ..training.pretrain import PretrainConfig

    return PretrainConfig(
        data=args.data, output=args.output, preset=args.preset, init_model=args.init_model,
        resolution=args.resolution, patch_size=args.patch_size, batch_size=args.batch_size, micro_batch_size=args.micro_batch_size,
        max_steps=args.max_steps, epochs=args.epochs, learning_rate=args.lr, warmup_steps=args.warmup_steps,
        mixed_precision=args.mixed_precision, windows=tuple(w.strip() for w in args.windows.split(",") if w.strip()),
        condition_dropout=args.condition_dropout, augment=not args.no_augment,
        checkpoint_every=args.checkpoint_every, keep_checkpoints=args.keep_checkpoints, ema_decay=args.ema,
        num_samples=args.num_samples, sample_steps=args.sample_steps, seed=args.seed,
        num_workers=args.num_workers, log_every=args.log_every, name=args.name or args.register, device=args.device)


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
    from ..models.registry import register_model
    from ..models.presets import get_preset
    from ..progress import Progress, TqdmProgress
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
    if args.register:
        from ..models.registry import check_new_model_name

        check_new_model_name(args.register)
    events = (lambda event: print(json.dumps(event), flush=True)) if args.events else None
    progress = Progress() if args.events else TqdmProgress("pretrain", unit="step")
    try:
        result = pretrain(config, resume=args.resume, progress=progress, on_event=events)
    finally:
        if isinstance(progress, TqdmProgress):
            progress.close()
    if not result.is_main_process:
        return 0
    print(f"trained {result.steps} steps; recent loss {result.final_loss:.4f}; model in {result.model_folder}",
          file=sys.stderr if args.events else sys.stdout)
    if args.register:
        path = register_model(result.model_folder, args.register)
        print(f"registered as {args.register!r} in {path}", file=sys.stderr if args.events else sys.stdout)
    skipped = result.extra.get("skipped_sources", [])
    if skipped:
        print(f"warning: skipped {len(skipped)} unreadable source(s), e.g. {skipped[0][0]}: {skipped[0][1]}",
              file=sys.stderr)
    return 0


