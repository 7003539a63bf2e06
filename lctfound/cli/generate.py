"""``lctfound generate``: synthetic CT slices from a model and a window prompt."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import LCTfoundError
from ..pipelines.choices import SAMPLERS
from ..validation import batch_int, diffusion_steps_int, float_type, image_size_int, int_type, seed_int



def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "generate", help="generate synthetic CT slices from a window prompt",
        description="Sample slices with a fast sampler (DDIM by default) and optional classifier-free guidance. "
                    "--output decides the export: a .png grid; a NEW .nrrd/.mha/.nii.gz/.nii volume in HU (the fixed "
                    "window mapping inverted); or a new folder (a path without extension) of per-slice PNGs. The "
                    "provenance (prompt, window, guidance, sampler, steps, seeds, model sha256) goes to OUT.json "
                    "(a folder: provenance.json inside; a grid: the PNG's text chunk). Image i uses seed SEED+i, "
                    "whatever the batch size.")
    parser.add_argument("--model", default="default", help="model name or folder (default: the embedded model)")
    parser.add_argument("--window", default="lung", help="lung, mediastinal or WIDTH,LEVEL known to the model")
    parser.add_argument("--disease", help="optional disease text the model was trained with")
    parser.add_argument("--prompt", help="a prompt the model's conditioning knows, instead of --window/--disease "
                                         "(--window still sets the HU range of a volume)")
    parser.add_argument("--num-images", "-n", type=int_type(1, 100_000), default=8, help="number of slices (default 8)")
    parser.add_argument("--steps", type=diffusion_steps_int, default=50, help="sampler steps (default 50)")
    parser.add_argument("--sampler", choices=SAMPLERS, default="ddim", help="default ddim")
    parser.add_argument("--guidance-scale", type=float_type(0, 100), default=1.0,
                        help="classifier-free guidance (1 = off)")
    parser.add_argument("--seed", type=seed_int, default=0, help="random seed of the first image (default 0)")
    parser.add_argument("--size", type=image_size_int, help="image size (default: the model's)")
    parser.add_argument("--batch-size", type=batch_int, default=8, help="images sampled together (default 8)")
    parser.add_argument("--spacing", default="1", help="voxel size of a volume in mm: S or X,Y,Z (default 1)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    parser.add_argument("--output", "-o", required=True,
                        help="grid .png, .nrrd/.mha/.nii.gz/.nii volume (HU), or a new folder for per-slice PNGs")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    parser.add_argument("--events", action="store_true", help="print JSON event lines on stdout (for front ends)")
    from .remote import add_server_options

    add_server_options(parser)
    parser.set_defaults(func=run)


def parse_spacing(text: str) -> tuple[float, float, float]:
    try:
        values = [float(v) for v in text.replace(" ", "").split(",")]
    except ValueError:
        values = []
    if len(values) == 1:
        values *= 3
    if len(values) != 3 or not all(0 < v < float("inf") for v in values):  # NaN and inf fail too
        raise LCTfoundError(f"--spacing {text!r}: give one or three positive numbers in mm, e.g. 0.7,0.7,2.5")
    return values[0], values[1], values[2]


VOLUME_FORMATS = (".nii", ".nii.gz", ".nrrd", ".mha")


def output_kind(output: Path) -> str:
    """What ``--output`` asks for: "grid" (.png), "volume" or "slices" (a folder of PNGs)."""
    name = output.name.lower()
    if name.endswith(".png"):
        return "grid"
    if name.endswith(VOLUME_FORMATS):
        return "volume"
    if not output.suffix:
        return "slices"
    raise LCTfoundError(f"{output}: choose a .png grid, a {', '.join(VOLUME_FORMATS)} volume or a folder "
                        "(a path without extension) for per-slice PNGs")


def run(args: argparse.Namespace) -> int:
    import sys

    from ..atomic import check_outputs
    from ..io.provenance import check_new_output, write_volume_with_provenance
    from . import given_paths

    output = Path(args.output).expanduser()
    kind = output_kind(output)
    if args.server and kind != "volume":  # a server sends volumes back; PNGs of its HU would not be the images
        raise LCTfoundError(f"{output}: with --server, generate writes a volume ({', '.join(VOLUME_FORMATS)}); "
                            "PNG grids and folders are made by a local run")
    if kind == "volume":
        check_new_output(output, args.overwrite, inputs=[] if args.server else given_paths(args.model))
    else:
        check_outputs([output], given_paths(args.model), args.overwrite)
    if args.batch_size < 1:
        raise LCTfoundError("--batch-size must be at least 1")
    spacing = parse_spacing(args.spacing)
    if args.server:
        from .remote_enhance import run_remote_generate

        return run_remote_generate(args, output)
    from ..pipelines.generation import (
        GenerationPipeline,
        images_to_volume,
        load_diffusion_model,
        save_image_grid,
        save_image_slices,
    )
    from ..progress import command_progress, print_event
    from ..windows import get_window

    window = get_window(args.window)
    model = load_diffusion_model(args.model, args.device)
    pipeline = GenerationPipeline(model, args.sampler)
    settings = dict(window=args.window, disease=args.disease, num_images=args.num_images, steps=args.steps,
                    guidance_scale=args.guidance_scale, seed=args.seed, size=args.size, prompt=args.prompt)
    with command_progress(args.events, "generate", unit="step") as progress:
        images = pipeline(**settings, batch_size=args.batch_size, progress=progress)
    provenance = pipeline.provenance(**settings)
    if kind == "slices":
        save_image_slices(images, output, provenance)
        side = output / "provenance.json"
    elif kind == "volume":
        side = write_volume_with_provenance(images_to_volume(images, window, spacing, provenance), output)
    else:  # a preview: the provenance goes into the PNG's text chunk
        save_image_grid(images, output, columns=min(4, len(images)), provenance=provenance)
        side = None
    where = f"; provenance in {side}" if side else ""
    print(f"wrote {len(images)} slice(s) to {output}{where}", file=sys.stderr if args.events else sys.stdout)
    if args.events:
        print_event({"event": "result", "task": provenance["task"], "output": str(output),
                     "provenance": str(side) if side else None, "name": provenance["name"]})
    return 0
