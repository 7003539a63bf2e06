"""``lctfound features``: extract LCTfound denoising features of a CT volume and store them compactly."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from ..errors import LCTfoundError
from ..validation import MAX_IMAGE_SIZE, batch_int, int_type, seed_int, slice_list_type

DTYPES = ("float16", "float32")


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "features", help="extract denoising features of a volume (or chosen slices), or of every volume of a folder",
        description="Extract the paper's denoising features (timesteps × up blocks 1-4) slice by slice and "
                    "store them as OUTPUT/features.npy (slices, channels, R, R) with OUTPUT/features.json "
                    "describing the channel layout. Full-resolution official features are ~1 GB per 256² "
                    "slice in float32, so the default stores float16 at 64×64 and the command states the "
                    "size before it starts. With a folder of volumes, writes OUTPUT/<case>/features.npy|json "
                    "per volume and OUTPUT/summary.csv, skipping volumes already done (an interrupted batch "
                    "resumes); under torchrun or accelerate launch the processes share the volumes out.")
    parser.add_argument("volume", help="CT volume (DICOM folder, NIfTI, NRRD or MHA) or a folder of volumes")
    parser.add_argument("--output", "-o", required=True,
                        help="new folder for features.npy + features.json (with a folder of volumes: a folder "
                             "for one sub-folder per volume and summary.csv; an existing one is continued)")
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
    parser.add_argument("--max-size", default="4GB", help="refuse to store more than this per volume (default 4GB)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing output folder (with a folder of volumes: redo every volume)")
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

    from ..atomic import check_outputs, check_writable, refuse_input_conflict
    from ..batch import idle_rank, launcher_ranks, rank_device
    from ..devices import resolve_device
    from ..features import FeatureExtractor, FeatureSpec
    from ..io.volume import find_volumes, read_volume
    from ..models import load_model, resolve_model
    from . import given_paths

    source, output = Path(args.volume).expanduser(), Path(args.output).expanduser()
    inputs = find_volumes(source)
    batch = source.is_dir() and not (len(inputs) == 1 and inputs[0] == source)
    if batch and args.series_uid:
        raise LCTfoundError("--series-uid belongs to one DICOM folder; extract that series on its own")
    model_paths = given_paths(args.model)
    if not batch:
        check_outputs([output], [source, *model_paths], args.overwrite)
    else:
        if output.exists() and not output.is_dir():
            raise LCTfoundError(f"{output}: is a file; with a folder of volumes give an output folder")
        refuse_input_conflict(output, [source, *inputs, *model_paths])
        check_writable(output / "summary.csv")
    if args.batch_size < 1:
        raise LCTfoundError("--batch-size must be at least 1")
    limit = parse_size(args.max_size)
    spec = FeatureSpec(timesteps=_int_list(args.timesteps, "timesteps"), blocks=_int_list(args.blocks, "blocks"),
                       window=args.window, resolution=args.resolution, seed=args.seed)
    ranks = launcher_ranks()
    if not batch and idle_rank(ranks, output):
        return 0
    volume = None if batch else read_volume(inputs[0], series_uid=args.series_uid)  # a bad volume before the model
    device = resolve_device(rank_device(args.device, ranks))
    extractor = FeatureExtractor(load_model(resolve_model(args.model), device=device), spec)
    dtype = getattr(torch, args.dtype)
    if volume is not None:
        _extract(extractor, volume, inputs[0], output, args, dtype, limit, args.overwrite)
        print(f"wrote {output}")
        return 0
    return _extract_folder(extractor, inputs, output, args, dtype, limit, ranks, [source, *model_paths])


def _extract(extractor, volume, path: Path, output: Path, args: argparse.Namespace, dtype, limit: int,
             overwrite: bool) -> int:
    """Store the features of ``volume`` (read from ``path``) in the folder ``output``; returns the number of
    slices."""
    from ..features import feature_bytes, human_bytes, parse_slices, save_volume_features
    from ..progress import TqdmProgress

    slices = parse_slices(args.slices, volume.shape[0])
    count = len(slices) if slices is not None else volume.shape[0]
    size = feature_bytes(count, extractor.channels, extractor.resolution, dtype)
    print(f"storing {count} slices × {extractor.channels} channels × {extractor.resolution}×{extractor.resolution} "
          f"{args.dtype} = {human_bytes(size)} in {output}/features.npy (layout in features.json)")
    if size > limit:
        raise LCTfoundError(f"features would take {human_bytes(size)}, more than --max-size {args.max_size}; "
                            "lower --resolution, choose --slices, or raise --max-size")
    with TqdmProgress(f"features {path.name}", unit="slice") as progress:
        save_volume_features(extractor, volume.array, output, slices, args.batch_size, dtype, progress,
                             extra_metadata={"volume": str(path), "spacing": volume.spacing,
                                             "shape_kji": list(volume.shape)},
                             overwrite=overwrite)
    return count


def _features_done(folder: Path) -> bool:
    """Whether a feature folder from an earlier run is complete: features.json and a features.npy of the
    shape it states that reads back (an empty or truncated one is redone)."""
    from ..atomic import output_is_complete
    from ..features import load_volume_features

    def read(path: Path) -> None:
        array, metadata = load_volume_features(path.parent)
        if list(array.shape) != list(metadata.get("shape", [])):
            raise ValueError("shape differs from features.json")

    return output_is_complete(folder / "features.npy", read)


def _extract_folder(extractor, inputs: list, output: Path, args: argparse.Namespace, dtype, limit: int,
                    ranks, input_paths: list) -> int:
    """`features` over a folder: one sub-folder per volume and summary.csv, resumable and shared out
    over the ranks of a launch (`lctfound.batch.BatchRun`)."""
    from ..atomic import DiskFullError, refuse_input_conflict
    from ..batch import BatchRun, read_table, write_table
    from ..io.volume import read_volume, volume_stem

    output.mkdir(parents=True, exist_ok=True)  # every rank may: exist_ok
    summary_path = output / "summary.csv"
    columns = ["input", "output", "status", "seconds", "slices"]
    keys = [str(path) for path in inputs]
    targets = [output / volume_stem(path) for path in inputs]
    for target in targets:
        refuse_input_conflict(target, [*inputs, *input_paths], replaces_folder=True)
    failures = 0
    with BatchRun(summary_path, keys, read_table, lambda rows, path: write_table(rows, path, columns),
                  restart=args.overwrite, ranks=ranks) as run:
        done = {key for key, row in run.previous.items() if row.get("status") == "ok"}
        mine = run.plan(lambda i: keys[i] in done and _features_done(targets[i]))
        for index in mine:
            path, target = inputs[index], targets[index]
            row = {"input": keys[index], "output": "", "status": "", "seconds": "", "slices": ""}
            if target.exists() and not args.overwrite and keys[index] not in done:
                failures += 1
                row["status"] = run.unlisted_output(target)
            else:
                start = time.perf_counter()
                try:
                    # A listed folder that does not read back (a killed run) is replaced.
                    count = _extract(extractor, read_volume(path), path, target, args, dtype, limit,
                                     overwrite=args.overwrite or keys[index] in done)
                    row.update(output=str(target), status="ok", seconds=f"{time.perf_counter() - start:.1f}",
                               slices=count)
                except DiskFullError:
                    raise  # every later volume would fail the same way
                except LCTfoundError as error:
                    failures += 1
                    row["status"] = f"error: {error}"
            run.record(keys[index], row)
        totals = run.finish(failed=failures)
    if ranks.main:
        print(f"{len(inputs) - totals['failed']} of {len(inputs)} volume(s) done; summary in {summary_path}")
    else:
        print(run.shard_line(len(mine) - failures, failures, "volume(s) done"))
    return run.exit_code(totals["failed"])
