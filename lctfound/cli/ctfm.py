"""``lctfound ctfm``: the CT-FM backbone — inspect a model, embed volumes, index a cohort, search it."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..errors import LCTfoundError

MODEL_HELP = ("CT-FM model: a folder in the published Hugging Face layout (config.json + model.safetensors, "
              "e.g. a local copy of project-lighter/ct_fm_feature_extractor), a .safetensors file, or a repo id "
              "already in the local Hugging Face cache. Required: LCTfound ships no CT-FM weights and never "
              "downloads any.")
WEIGHTS_NOTE = ("CT-FM weights are not bundled and are never downloaded: every command needs --model pointing "
                "at a local folder in the published layout (download project-lighter/ct_fm_feature_extractor once "
                "on a connected machine, e.g. with `huggingface-cli download ... --local-dir FOLDER`).")


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "ctfm", help="CT-FM 3D encoder: embeddings, similarity search and heat maps",
        description="CT-FM (a 3D MONAI SegResEncoder pretrained on whole-body CT) as a second backbone: "
                    "512-d embeddings, an embedding index of a folder of volumes, and search by scan, point or "
                    "region with a similarity heat map. " + WEIGHTS_NOTE)
    groups = parser.add_subparsers(dest="ctfm_command", metavar="COMMAND")
    groups.required = True

    inspect = groups.add_parser("inspect", help="strictly check a CT-FM model and describe it",
                                description="Check a CT-FM model folder without loading its weights (every encoder "
                                            "tensor present with its exact shape) and print its configuration, "
                                            "parameter and tensor counts. " + WEIGHTS_NOTE)
    inspect.add_argument("model", help=MODEL_HELP)
    inspect.add_argument("--json", action="store_true", help="print JSON")
    inspect.set_defaults(func=run_inspect)

    embed = groups.add_parser("embed", help="embed one volume (512-d vector, optional per-window vectors)",
                              description="Preprocess a CT volume with CT-FM's contract (SPL, 3x1x1 mm, body crop, "
                                          "HU -1024..2048 -> 0..1) and write its embedding. OUTPUT .json holds the "
                                          "vector and settings; .safetensors holds 'embedding' plus the per-window "
                                          "'window_embeddings' and 'window_centres_ras'. " + WEIGHTS_NOTE)
    embed.add_argument("volume", help="CT volume: DICOM folder, NIfTI, NRRD or MHA")
    _common(embed)
    embed.add_argument("--output", "-o", required=True, help="output file: .json or .safetensors")
    embed.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    embed.set_defaults(func=run_embed)

    index = groups.add_parser("index", help="index a folder of volumes for similarity search",
                              description="Embed every volume in FOLDER (NIfTI/NRRD/MHA files and DICOM series "
                                          "folders) and write an index folder (embeddings.safetensors + index.json), "
                                          "atomically. " + WEIGHTS_NOTE)
    index.add_argument("folder", help="folder of volumes")
    _common(index)
    index.add_argument("--output", "-o", required=True, help="new index folder")
    index.add_argument("--no-windows", action="store_true",
                       help="store only one vector per volume (point/region queries then need a rebuild)")
    index.add_argument("--overwrite", action="store_true", help="replace an existing index folder")
    index.set_defaults(func=run_index)

    search = groups.add_parser("search", help="rank indexed volumes by similarity with a query",
                               description="Query an index by a whole scan (default), by the window around a point "
                                           "(--point R,A,S) or by a box (--region R1,A1,S1,R2,A2,S2) of the query "
                                           "volume, using cosine similarity. --heatmap writes the per-window "
                                           "similarity with the query vector as a volume on the query's own grid "
                                           "(or --heatmap-volume's), ready to overlay in Slicer. The window settings "
                                           "come from the index. " + WEIGHTS_NOTE)
    search.add_argument("index", help="index folder from `lctfound ctfm index`")
    search.add_argument("--query", required=True, help="query CT volume")
    search.add_argument("--model", required=True, help=MODEL_HELP + " Must be the model the index was built with.")
    where = search.add_mutually_exclusive_group()
    where.add_argument("--point", help="RAS point in mm (Slicer's coordinates); write --point=-20.5,10,-140 when it starts with '-'")
    where.add_argument("--region", help="RAS box: two opposite corners R1,A1,S1,R2,A2,S2 in mm (--region=... when it starts with '-')")
    search.add_argument("--top", type=int, default=10, help="number of results (default 10)")
    search.add_argument("--heatmap", help="write the similarity heat map here (.nii.gz, .nrrd, .mha)")
    search.add_argument("--heatmap-volume", help="volume to map the similarity over (default: the query volume)")
    search.add_argument("--json", action="store_true", help="print results as JSON")
    search.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default auto)")
    search.add_argument("--no-validate", action="store_true", help="skip the CT plausibility check of the inputs")
    search.set_defaults(func=run_search)


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help=MODEL_HELP)
    parser.add_argument("--aggregation", choices=("mean", "min", "whole"), default="mean",
                        help="volume vector from the window vectors: mean (default) or element-wise min; "
                             "whole: one forward pass of the whole preprocessed volume (memory grows with it)")
    parser.add_argument("--window", default="32,128,128",
                        help="window D,H,W in preprocessed voxels, multiples of 16 (default 32,128,128)")
    parser.add_argument("--overlap", type=float, default=0.5, help="window overlap (default 0.5)")
    parser.add_argument("--batch-size", type=int, default=2, help="windows per forward pass (default 2)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default auto)")
    parser.add_argument("--no-validate", action="store_true", help="skip the CT plausibility check of the inputs")


def _settings(args):
    from ..ctfm.features import WindowSettings, check_windows

    try:
        window = tuple(int(v) for v in args.window.split(","))
    except ValueError:
        window = ()
    if len(window) != 3:
        raise LCTfoundError(f"cannot read --window {args.window!r}; use D,H,W, e.g. 32,128,128")
    settings = WindowSettings(window, args.overlap, args.batch_size)
    check_windows(settings)
    return settings


def _load(spec: str, device_name: str):
    from ..ctfm.model import load_model
    from ..devices import resolve_device

    return load_model(spec, device=resolve_device(device_name))


def run_inspect(args: argparse.Namespace) -> int:
    from ..ctfm.model import REFERENCE_FILE_BYTES, REFERENCE_PARAMETERS, REFERENCE_TENSORS, inspect_model

    info = inspect_model(args.model)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    config = info["config"]
    print(f"weights:        {info['weights']}  ({info['file_bytes']:,} bytes)")
    print(f"config:         init_filters {config['init_filters']}, blocks_down {config['blocks_down']}"
          f"{'  (CT-FM architecture)' if info['is_ctfm_architecture'] else '  (not CT-FM size)'}")
    dropped = f"; {info['dropped_tensors']} head tensors ignored" if info["dropped_tensors"] else ""
    print(f"key prefix:     {info['key_prefix'] or '(none: published feature-extractor layout)'}{dropped}")
    print(f"tensors:        {info['encoder_tensors']} encoder tensors ({info['batchnorm_statistics']} BatchNorm "
          f"running statistics), dtypes {', '.join(info['dtypes'])}")
    print(f"parameters:     {info['parameters']:,}")
    print(f"embedding:      {info['embedding_dim']}-d")
    print(f"layout size:    {info['published_layout_bytes']:,} bytes for this config in the published layout")
    if info["is_ctfm_architecture"]:
        print(f"reference:      {REFERENCE_PARAMETERS:,} parameters, {REFERENCE_TENSORS} tensors, "
              f"{REFERENCE_FILE_BYTES:,} bytes (project-lighter/ct_fm_feature_extractor)")
    print("check:          ok (strict)")
    return 0


def run_embed(args: argparse.Namespace) -> int:
    import numpy as np

    from ..atomic import atomic_file
    from ..ctfm.features import embed_volume
    from ..ctfm.preprocess import DEFAULT_PREPROCESSING, prepare_volume
    from ..io.volume import read_volume
    from ..progress import TqdmProgress

    output = Path(args.output)
    suffix = output.suffix.lower()
    if suffix not in (".json", ".safetensors"):
        raise LCTfoundError(f"{output}: use a .json or .safetensors output file")
    if output.exists() and not args.overwrite:
        raise LCTfoundError(f"{output}: already exists; choose a new file or pass --overwrite")
    settings = _settings(args)
    volume = read_volume(args.volume, validate=not args.no_validate)
    model = _load(args.model, args.device)
    prepared = prepare_volume(volume)
    with TqdmProgress("embed", unit="window") as progress:
        vector, windows = embed_volume(model, prepared, args.aggregation, settings, progress=progress)
    info = {"volume": str(args.volume), "model": str(model.path), "weights_sha256": model.weights_sha256,
            "aggregation": args.aggregation, "windows": settings.as_dict(),
            "preprocessing": DEFAULT_PREPROCESSING.as_dict(), "prepared_shape": list(prepared.shape),
            "window_count": 0 if windows is None else len(windows.embeddings)}
    if suffix == ".json":
        with atomic_file(output) as tmp:
            tmp.write_text(json.dumps({**info, "embedding_dim": int(vector.shape[0]),
                                       "embedding": [float(v) for v in vector]}, indent=1))
    else:
        import torch
        from safetensors.torch import save_file

        tensors = {"embedding": torch.from_numpy(np.asarray(vector, np.float32))}
        if windows is not None:
            tensors["window_embeddings"] = torch.from_numpy(windows.embeddings)
            tensors["window_centres_ras"] = torch.from_numpy(np.ascontiguousarray(windows.centres_ras))
        with atomic_file(output) as tmp:
            save_file(tensors, str(tmp), metadata={"lctfound": json.dumps(info)})
    print(f"wrote {output} ({vector.shape[0]}-d embedding, {info['window_count']} windows)")
    return 0


def run_index(args: argparse.Namespace) -> int:
    from ..ctfm.retrieval import build_index, find_volumes
    from ..progress import TqdmProgress

    settings = _settings(args)
    volumes = find_volumes(args.folder)
    output = Path(args.output)
    if output.exists() and not args.overwrite:
        raise LCTfoundError(f"{output}: already exists; choose a new index folder or pass --overwrite")
    model = _load(args.model, args.device)
    with TqdmProgress("index", unit="volume") as progress:
        build_index(model, volumes, output, settings, args.aggregation, windows=not args.no_windows,
                    validate=not args.no_validate, overwrite=args.overwrite, progress=progress)
    print(f"wrote {output} ({len(volumes)} volumes)")
    return 0


def run_search(args: argparse.Namespace) -> int:
    from ..ctfm.features import embed_point, embed_region, embed_volume, similarity_volume
    from ..ctfm.preprocess import prepare_volume
    from ..ctfm.retrieval import load_index, parse_region, parse_triplet
    from ..io.volume import WRITE_FORMATS, read_volume, write_volume
    from ..progress import TqdmProgress

    if args.top < 1:
        raise LCTfoundError("--top must be at least 1")
    if args.heatmap and not any(args.heatmap.lower().endswith(ext) for ext in WRITE_FORMATS):
        raise LCTfoundError(f"{args.heatmap}: use one of {', '.join(WRITE_FORMATS)} for --heatmap")
    point = parse_triplet(args.point, "--point") if args.point else None
    region = parse_region(args.region) if args.region else None
    index = load_index(args.index)
    settings = index.settings
    volume = read_volume(args.query, validate=not args.no_validate)
    model = _load(args.model, args.device)
    index.check_model(model)
    prepared = prepare_volume(volume)
    centre = None
    if point is not None:
        query, centre = embed_point(model, prepared, point, settings.window)
        level = "window"
    elif region is not None:
        query, centre = embed_region(model, prepared, region[0], region[1], settings)
        level = "window"
    else:
        with TqdmProgress("query", unit="window") as progress:
            query, _ = embed_volume(model, prepared, index.aggregation, settings, progress=progress)
        level = "volume"
    matches = index.search(query, level, args.top)
    heatmap_path = None
    if args.heatmap:
        target = volume if not args.heatmap_volume else read_volume(args.heatmap_volume, validate=not args.no_validate)
        with TqdmProgress("heat map", unit="window") as progress:
            heatmap, _ = similarity_volume(model, target, query, settings,
                                           prepared=prepared if not args.heatmap_volume else None, progress=progress)
        heatmap_path = write_volume(heatmap, args.heatmap)
    if args.json:
        print(json.dumps({"level": level, "query_centre_ras": None if centre is None else [float(v) for v in centre],
                          "matches": [m.as_dict() for m in matches],
                          "heatmap": str(heatmap_path) if heatmap_path else None}, indent=2))
        return 0
    if centre is not None:
        print(f"query window centred at RAS ({', '.join(f'{v:.1f}' for v in centre)})")
    for match in matches:
        where = f"  at RAS ({', '.join(f'{v:.1f}' for v in match.centre_ras)})" if match.centre_ras else ""
        print(f"{match.rank:3d}  {match.score:+.4f}  {match.name}{where}")
    if heatmap_path:
        print(f"wrote {heatmap_path}")
    return 0
