"""``lctfound features``: extract LCTfound denoising features of a CT volume and store them compactly."""

from __future__ import annotations

import argparse

from ..errors import LCTfoundError
from ..validation import MAX_IMAGE_SIZE, batch_int, int_type, seed_int, slice_list_type

DTYPES = ("float16", "float32")


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "features", help="extract denoising features of a volume (or chosen slices)",
        description="Extract the paper's denoising features (timesteps × up blocks 1-4) slice by slice and "
                    "store them as OUTPUT/features.npy (slices, channels, R, R) with OUTPUT/features.json "
                    "describing the channel layout. Full-resolution official features are ~1 GB per 256² "
                    "slice in float32, so the default stores float16 at 64×64 and the command states the "
                    "size before it starts.")
    parser.add_argument("volume", help="CT volume: DICOM folder, NIfTI, NRRD or MHA")
    parser.add_argument("--output", "-o", required=True, help="new folder for features.npy + features.json")
    parser.add_argument("--model", default="default", help="model name or folder (default: the embedded model)")
    parser.add_argument("--series-uid", help="DICOM SeriesInstanceUID (default: the largest series)")
    parser.add_argument("--slices", type=slice_list_type, help="slice indices, e.g. 20,21,30-34 (default: all)")
    parser.add_argument("--window", default="mediastinal", help="lung, mediastinal or WIDTH,LEVEL (default: mediastinal)")
    parser.add_argument("--timesteps", default="0,50,100,150", help="diffusion timesteps (default: 0,50,100,150)")
    parser.add_argument("--blocks", default="1,2,3,4", help="U-Net up blocks to hook (default: 1,2,3,4)")
    parser.add_argument("--resolution", type=int_type(8, MAX_IMAGE_SIZE), default=64,
                        help="stored feature map size R (default 64; the model size, e.g. 256, is full resolution)")
    parser.add_argument("--dtype", choices=DTYPES, default="float16", help="stored precision (default float16)")
    parser.add_argument("--batch-size", type=batch_int, default=1, help="slices per forward pass (default 1)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default auto)")
    parser.add_argument("--seed", type=seed_int, default=0, help="noise seed (default 0)")
    parser.add_argument("--max-size", default="4GB", help="refuse to store more than this (default 4GB)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    parser.set_defaults(func=run)


def _int_list(text: str, what: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise LCTfoundError(f"cannot read {what} {text!r}; use comma-separated integers") from None


def parse_size(text: str) -> int:
    units = {"TB": 2**40, "GB": 2**30, "MB": 2**20, "KB": 2**10, "B": 1}
    cleaned = text.strip().upper()
    for unit, factor in units.items():
        if cleaned.endswith(unit):
            try:
                return int(float(cleaned[: -len(unit)]) * factor)
            except ValueError:
                break
    raise LCTfoundError(f"cannot read size {text!r}; use e.g. 500MB or 4GB")


def run(args: argparse.Namespace) -> int:
    import torch

    from ..devices import resolve_device
    from ..features import FeatureExtractor, FeatureSpec, feature_bytes, human_bytes, parse_slices, save_volume_features
    from ..io.volume import read_volume
    from ..models import load_model, resolve_model
    from ..progress import TqdmProgress

    from ..atomic import check_outputs
    from . import given_paths

    output, = check_outputs([args.output], given_paths(args.volume, args.model), args.overwrite)
    if args.batch_size < 1:
        raise LCTfoundError("--batch-size must be at least 1")
    limit = parse_size(args.max_size)
    spec = FeatureSpec(timesteps=_int_list(args.timesteps, "timesteps"), blocks=_int_list(args.blocks, "blocks"),
                       window=args.window, resolution=args.resolution, seed=args.seed)
    volume = read_volume(args.volume, series_uid=args.series_uid)
    slices = parse_slices(args.slices, volume.shape[0])
    device = resolve_device(args.device)
    model = load_model(resolve_model(args.model), device=device)
    extractor = FeatureExtractor(model, spec)
    dtype = getattr(torch, args.dtype)
    count = len(slices) if slices is not None else volume.shape[0]
    size = feature_bytes(count, extractor.channels, extractor.resolution, dtype)
    print(f"storing {count} slices × {extractor.channels} channels × {extractor.resolution}×{extractor.resolution} "
          f"{args.dtype} = {human_bytes(size)} in {output}/features.npy (layout in features.json)")
    if size > limit:
        raise LCTfoundError(f"features would take {human_bytes(size)}, more than --max-size {args.max_size}; "
                            "lower --resolution, choose --slices, or raise --max-size")
    with TqdmProgress("features", unit="slice") as progress:
        save_volume_features(extractor, volume.array, output, slices, args.batch_size, dtype, progress,
                             extra_metadata={"volume": str(args.volume), "spacing": volume.spacing,
                                             "shape_kji": list(volume.shape)},
                             overwrite=args.overwrite)
    print(f"wrote {output}")
    return 0
