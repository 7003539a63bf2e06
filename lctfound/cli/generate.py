"""``lctfound generate``: synthetic CT slices from a model and a window prompt."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import LCTfoundError

SAMPLER_CHOICES = ("ddim", "dpm-solver", "ddpm")


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "generate", help="generate synthetic CT slices from a window prompt",
        description="Sample slices with a fast sampler (DDIM by default) and optional classifier-free guidance. "
                    "Writes a PNG grid, or a NIfTI/NRRD/MHA volume in HU when --output ends with such an extension.")
    parser.add_argument("--model", default="default", help="model name or folder (default: the embedded model)")
    parser.add_argument("--window", default="lung", help="lung, mediastinal or WIDTH,LEVEL known to the model")
    parser.add_argument("--disease", help="optional disease text the model was trained with")
    parser.add_argument("--num-images", "-n", type=int, default=8, help="number of slices (default 8)")
    parser.add_argument("--steps", type=int, default=50, help="sampler steps (default 50)")
    parser.add_argument("--sampler", choices=SAMPLER_CHOICES, default="ddim", help="default ddim")
    parser.add_argument("--guidance-scale", type=float, default=1.0, help="classifier-free guidance (1 = off)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--size", type=int, help="image size (default: the model's)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    parser.add_argument("--output", "-o", required=True, help="grid .png, or .nii.gz/.nrrd/.mha volume (HU)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import numpy as np

    from ..devices import resolve_device
    from ..models import load_model, resolve_model
    from ..pipelines.generation import GenerationPipeline, save_image_grid
    from ..progress import TqdmProgress
    from ..windows import get_window

    output = Path(args.output)
    name = output.name.lower()
    volume_formats = (".nii", ".nii.gz", ".nrrd", ".mha")
    if not (name.endswith(".png") or name.endswith(volume_formats)):
        raise LCTfoundError(f"{output}: choose a .png grid or a {', '.join(volume_formats)} volume")
    if output.exists() and not args.overwrite:
        raise LCTfoundError(f"{output}: already exists; choose a new name or pass --overwrite")
    window = get_window(args.window)
    model = load_model(resolve_model(args.model), device=resolve_device(args.device))
    pipeline = GenerationPipeline(model, args.sampler)
    with TqdmProgress("generate", unit="step") as progress:
        images = pipeline(args.window, args.disease, args.num_images, args.steps, args.guidance_scale,
                          args.seed, args.size, progress=progress)
    if name.endswith(".png"):
        save_image_grid(images, output, columns=min(4, len(images)))
    else:
        from ..io.volume import CTVolume, write_volume

        hu = images * window.width + window.low  # [0, 1] ↔ the window, as the training mapped it
        write_volume(CTVolume(hu.astype(np.float32), spacing=(1.0, 1.0, 1.0),
                              metadata={"generated": True}), output)
    print(f"wrote {len(images)} slice(s) to {output}")
    return 0
