"""``lctfound ctfm``: the CT-FM backbone — inspect a model, embed volumes, index a cohort, search it,
train and run linear probes (``probe-train``, ``probe-predict``) and segmentation decoders
(``seg-train``, ``seg-predict``)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..errors import LCTfoundError
from ..compat import strict_zip
from ..validation import batch_int, float_type, int_type
from .remote import add_server_options

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
                    "512-d embeddings, an embedding index of a folder of volumes, search by scan, point or "
                    "region with a similarity heat map, linear probes (scan classification) and segmentation "
                    "decoders (frozen or fully fine-tuned encoder). " + WEIGHTS_NOTE)
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
    embed.add_argument("--events", action="store_true", help="print JSON event lines on stdout (for front ends)")
    add_server_options(embed)
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
    index.add_argument("--events", action="store_true", help="print JSON event lines on stdout (for front ends)")
    index.set_defaults(func=run_index)

    search = groups.add_parser("search", help="rank indexed volumes by similarity with a query",
                               description="Query an index by a whole scan (default), by the window around a point "
                                           "(--point R,A,S) or by a box (--region R1,A1,S1,R2,A2,S2) of the query "
                                           "volume, using cosine similarity. --heatmap writes the per-window "
                                           "similarity with the query vector as a volume on the query's own grid "
                                           "(or --heatmap-volume's), ready to overlay in Slicer. The window settings "
                                           "come from the index. " + WEIGHTS_NOTE)
    search.add_argument("index", help="index folder from `lctfound ctfm index` (with --server: the name of an index "
                                      "the server offers)")
    search.add_argument("--query", required=True, help="query CT volume")
    search.add_argument("--model", required=True, help=MODEL_HELP + " Must be the model the index was built with.")
    where = search.add_mutually_exclusive_group()
    where.add_argument("--point", help="RAS point in mm (Slicer's coordinates); write --point=-20.5,10,-140 when it "
                                       "starts with '-'")
    where.add_argument("--region", help="RAS box: two opposite corners R1,A1,S1,R2,A2,S2 in mm (--region=... when it "
                                        "starts with '-')")
    search.add_argument("--top", type=int_type(1, 100_000), default=10, help="number of results (default 10)")
    search.add_argument("--heatmap", help="write the similarity heat map here (.nii.gz, .nrrd, .mha)")
    search.add_argument("--heatmap-volume", help="volume to map the similarity over (default: the query volume)")
    search.add_argument("--json", action="store_true", help="print results as JSON")
    search.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default auto)")
    search.add_argument("--no-validate", action="store_true", help="skip the CT plausibility check of the inputs")
    search.add_argument("--events", action="store_true",
                        help="print JSON event lines on stdout (for front ends): progress, then one 'result' event "
                             "holding what --json prints")
    add_server_options(search)
    search.set_defaults(func=run_search)

    listing = groups.add_parser(
        "list", help="list the CT-FM encoders, probes and decoders found here and the devices to run them on",
        description="List the CT-FM encoders found in the --folder(s) (each strictly checked without loading its "
                    "weights; a folder that fails says why) and the published repos already in the local Hugging Face "
                    "cache, the trained ctfm-probe and ctfm-segmentation task models in the user model folder, and the "
                    "devices PyTorch can use here. The Slicer and browser panels run it in a child process, so that "
                    "their own process never imports PyTorch. " + WEIGHTS_NOTE)
    listing.add_argument("--folder", action="append", default=[], help="a CT-FM encoder folder to check (repeat)")
    listing.add_argument("--json", action="store_true", help="print JSON")
    listing.set_defaults(func=run_list)

    _register_tasks(groups)


# ---------------------------------------------------------------------------- task models

def _window_options(parser: argparse.ArgumentParser, window: str = "32,128,128") -> None:
    parser.add_argument("--window", default=window,
                        help=f"embedding window D,H,W in preprocessed voxels, multiples of 16 (default {window})")
    parser.add_argument("--overlap", type=float_type(0, below=1), default=0.5,
                        help="embedding window overlap (default 0.5)")
    parser.add_argument("--window-batch", type=batch_int, default=2, help="windows per forward pass (default 2)")


def _set_default(parser: argparse.ArgumentParser, dest: str, value, help_text: str) -> None:
    """Replace the default and help of an option added by a shared helper."""
    for action in parser._actions:  # argparse has no public accessor for one action
        if action.dest == dest:
            action.default, action.help = value, help_text


def _register_tasks(groups) -> None:
    from .train import add_loop_arguments

    probe_train = groups.add_parser(
        "probe-train", help="train a linear probe (scan classification) on frozen CT-FM embeddings",
        description="Embed every scan of --table (CSV with columns image,label; label = class name; image paths "
                    "relative to the table) once with CT-FM (cached per volume and model, so retraining and later "
                    "predictions reuse the embeddings), then train a linear layer on the standardised 512-d "
                    "embeddings with class-balanced cross-entropy on the shared training loop (checkpoints, "
                    "--resume, --events). The result, OUTPUT/model, is a task model (ctfm-probe) that names its "
                    "CT-FM backbone by the sha256 of its weights. " + WEIGHTS_NOTE)
    probe_train.add_argument("--model", required=True, help=MODEL_HELP)
    probe_train.add_argument("--table", required=True, help="CSV with columns image,label")
    probe_train.add_argument("--aggregation", choices=("mean", "min", "whole"), default="mean",
                             help="scan vector from the window vectors: mean (default), element-wise min, or one "
                                  "pass of the whole volume")
    _window_options(probe_train)
    probe_train.add_argument("--no-cache", action="store_true", help="recompute embeddings (and do not store them)")
    probe_train.add_argument("--no-validate", action="store_true", help="skip the CT plausibility check of the inputs")
    add_loop_arguments(probe_train, batch_size=16, lr=1e-3, warmup=0, checkpoint_every=100, epochs=100.0,
                       log_every=10)
    _set_default(probe_train, "batch_size", None, "scans per optimizer step (default: all scans, at most 16)")
    probe_train.set_defaults(func=run_probe_train)

    probe_predict = groups.add_parser(
        "probe-predict", help="classify scans with a CT-FM linear probe",
        description="Classify a volume, every volume of a folder, or every image of a CSV table (column image) "
                    "with a ctfm-probe task model and write a predictions CSV with the columns of `lctfound classify "
                    "predict` (case, input, predicted, probability_<class>, model, model_sha256, backbone, "
                    "backbone_sha256, note), ready for `lctfound evaluate classification`. " + WEIGHTS_NOTE)
    probe_predict.add_argument("input", help="a CT volume, a folder of volumes, or a CSV table with an image column")
    probe_predict.add_argument("--probe", required=True, help="ctfm-probe task model folder or registered name")
    probe_predict.add_argument("--model", help=MODEL_HELP + " Default: the CT-FM folder the probe was trained on.")
    probe_predict.add_argument("--output", "-o", required=True, help="predictions .csv file")
    probe_predict.add_argument("--window-batch", type=batch_int, default=2, help="windows per forward pass (default 2)")
    probe_predict.add_argument("--no-cache", action="store_true", help="recompute embeddings (and do not store them)")
    _predict_options(probe_predict)
    probe_predict.set_defaults(func=run_probe_predict)

    seg_train = groups.add_parser(
        "seg-train", help="train a 3D segmentation decoder on the CT-FM encoder (frozen or full fine-tune)",
        description="Train MONAI SegResNetDS with the CT-FM encoder on (image, label map) pairs: random patches "
                    "(multiples of 16, half of them centred on labels) in CT-FM's preprocessing space (SPL, 3x1x1 mm, "
                    "body crop, HU -1024..2048 -> 0..1; label maps resampled exactly, nearest neighbour), Dice + "
                    "cross-entropy, on the shared training loop (checkpoints, --resume, --events). --mode frozen "
                    "trains the decoder only; --mode full fine-tunes the encoder too (it is then stored in the task "
                    "model). OUTPUT/model is a task model (ctfm-segmentation). " + WEIGHTS_NOTE)
    seg_train.add_argument("--model", required=True, help=MODEL_HELP)
    seg_train.add_argument("--image", action="append", default=[], help="a CT volume (repeat, paired with --labels)")
    seg_train.add_argument("--labels", action="append", default=[], help="the label map of the --image before it")
    seg_train.add_argument("--pairs", help="CSV with columns image,labels (paths relative to the CSV)")
    seg_train.add_argument("--names", help="label names, e.g. 1=Lesion,2=Vessel (default Label N)")
    seg_train.add_argument("--mode", choices=("frozen", "full"), default="frozen",
                           help="frozen: train the decoder on the fixed encoder (default); full: fine-tune both")
    seg_train.add_argument("--patch", default="32,128,128",
                           help="training patch D,H,W in preprocessed voxels, multiples of 16 (default 32,128,128); "
                                "prediction uses the same windows")
    seg_train.add_argument("--patches-per-case", type=int_type(1, 10_000), default=4,
                           help="random patches per scan and epoch (default 4)")
    seg_train.add_argument("--no-validate", action="store_true", help="skip the CT plausibility check of the inputs")
    add_loop_arguments(seg_train, batch_size=2, lr=1e-3, warmup=0, checkpoint_every=100, epochs=50.0, log_every=5)
    _set_default(seg_train, "lr", None, "AdamW learning rate (default 1e-3 for --mode frozen, 1e-4 for full)")
    seg_train.set_defaults(func=run_seg_train)

    seg_predict = groups.add_parser(
        "seg-predict", help="segment volumes with a CT-FM segmentation decoder",
        description="Segment a volume (OUTPUT: a label map file) or every volume of a folder (OUTPUT: a folder of "
                    "CASE_seg.nii.gz files; volumes already done are skipped, so an interrupted batch resumes) with "
                    "a ctfm-segmentation task model: sliding windows of the training patch in CT-FM's preprocessing "
                    "space, Gaussian blending, arg-max, and nearest-neighbour resampling onto the input's own voxel "
                    "grid. " + WEIGHTS_NOTE)
    seg_predict.add_argument("input", help="a CT volume or a folder of volumes")
    seg_predict.add_argument("--decoder", required=True, help="ctfm-segmentation task model folder or registered name")
    seg_predict.add_argument("--model", help=MODEL_HELP + " Default: the CT-FM folder the decoder was trained on "
                                                          "(not needed after --mode full).")
    seg_predict.add_argument("--output", "-o", required=True, help="label map file (.nii.gz/.nrrd/.mha) or a folder")
    seg_predict.add_argument("--overlap", type=float_type(0, below=1), default=0.5, help="window overlap (default 0.5)")
    seg_predict.add_argument("--window-batch", type=batch_int, default=1, help="windows per forward pass (default 1)")
    _predict_options(seg_predict)
    seg_predict.set_defaults(func=run_seg_predict)


def _predict_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default auto)")
    parser.add_argument("--no-validate", action="store_true", help="skip the CT plausibility check of the inputs")
    parser.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    parser.add_argument("--events", action="store_true", help="print JSON event lines on stdout (for front ends)")


def _triplet(text: str, option: str) -> tuple[int, int, int]:
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 3:
        raise LCTfoundError(f"cannot read {option} {text!r}; use D,H,W, e.g. 32,128,128")
    return values


def _recipe(args):
    from ..ctfm.features import WindowSettings, check_windows
    from ..ctfm.probe import EmbeddingRecipe

    settings = WindowSettings(_triplet(args.window, "--window"), args.overlap, args.window_batch)
    check_windows(settings)
    return EmbeddingRecipe(settings, args.aggregation)


def _training_device(args):
    from ..devices import resolve_device

    return resolve_device("cpu" if args.device == "cpu" else "auto")


def run_probe_train(args: argparse.Namespace) -> int:
    from ..ctfm.probe import read_probe_table, train_probe
    from .train import loop_config_from_args, run_training

    recipe = _recipe(args)
    paths, _, _ = read_probe_table(args.table)
    if args.batch_size is None:
        args.batch_size = min(16, len(paths))
    loop = loop_config_from_args(args)
    model = _load(args.model, str(_training_device(args)))
    name = args.name or args.register
    return run_training(args, "probe", lambda progress, events: train_probe(
        model, args.table, loop, recipe, use_cache=not args.no_cache,
        validate=not args.no_validate, name=name, resume=args.resume, progress=progress, on_event=events))


def _inputs(source: str) -> list[Path]:
    """Volumes of a file, a folder or a CSV table with an image column."""
    from ..io.volume import find_volumes
    from ..training.tables import read_case_table, table_path

    if source.lower().endswith(".csv"):
        return [table_path(source, row["image"]) for row in read_case_table(source, ("image",))]
    return find_volumes(source)


def run_probe_predict(args: argparse.Namespace) -> int:
    from ..ctfm.probe import LinearProbe, predict_probe
    from ..devices import resolve_device
    from ..progress import command_progress, print_event

    output = Path(args.output)
    if output.suffix.lower() != ".csv":
        raise LCTfoundError(f"{output}: predictions are written as a .csv file")
    from ..atomic import check_outputs
    from . import argument_inputs

    if args.window_batch < 1:
        raise LCTfoundError("--window-batch must be at least 1")
    inputs = _inputs(args.input)
    check_outputs([output], [*argument_inputs(args), *inputs], args.overwrite)
    device = resolve_device(args.device)
    probe = LinearProbe.load(args.probe, args.model, device=device, batch_size=args.window_batch)
    with command_progress(args.events, "classify", unit="scan") as progress:
        rows = predict_probe(probe, inputs, output, validate=not args.no_validate, use_cache=not args.no_cache,
                             overwrite=args.overwrite, progress=progress)
    out = sys.stderr if args.events else sys.stdout
    for row in rows:
        if args.events:
            print_event({"event": "result", "row": row})
        print(f"{row['case']}: {row['predicted']} "
              f"({', '.join(f'{k[12:]} {float(v):.3f}' for k, v in row.items() if k.startswith('probability_'))})",
              file=out)
    print(f"wrote {output} ({len(rows)} scan(s)); {rows[0]['note']}", file=out)
    return 0


def run_seg_train(args: argparse.Namespace) -> int:
    import numpy as np

    from ..ctfm.decoder import label_names_for, read_training_pairs, train_decoder
    from .train import loop_config_from_args, read_pairs, run_training

    images, labels = list(args.image), list(args.labels)
    if args.pairs:
        more_images, more_labels = read_pairs(args.pairs)
        images, labels = images + more_images, labels + more_labels
    roi = _triplet(args.patch, "--patch")
    if args.lr is None:
        args.lr = 1e-4 if args.mode == "full" else 1e-3
    loop = loop_config_from_args(args)
    pairs = read_training_pairs(images, labels, validate=not args.no_validate)
    values = set().union(*(set(np.unique(label.array).tolist()) for _, _, label in pairs))
    names = label_names_for(values, args.names)
    model = _load(args.model, "cpu")
    name = args.name or args.register
    return run_training(args, f"segmentation decoder ({args.mode})", lambda progress, events: train_decoder(
        model, pairs, loop, names, args.mode, roi, args.patches_per_case, name=name,
        resume=args.resume, progress=progress, on_event=events))


def run_seg_predict(args: argparse.Namespace) -> int:
    from ..ctfm.decoder import DecoderSegmenter
    from ..devices import resolve_device
    from ..io.volume import WRITE_FORMATS, find_volumes, read_volume, volume_stem, write_volume
    from ..progress import command_progress, print_event

    source, output = Path(args.input), Path(args.output)
    inputs = find_volumes(source)
    batch = source.is_dir() and not (len(inputs) == 1 and inputs[0] == source)
    from ..atomic import check_outputs, check_writable, output_is_complete, refuse_input_conflict
    from . import argument_inputs

    if not batch:
        if not any(output.name.lower().endswith(ext) for ext in WRITE_FORMATS):
            raise LCTfoundError(f"{output}: use one of {', '.join(WRITE_FORMATS)} for the label map")
        check_outputs([output], argument_inputs(args), args.overwrite)
    elif output.exists() and not output.is_dir():
        raise LCTfoundError(f"{output}: not a folder (a folder of volumes writes one label map per volume)")
    else:
        refuse_input_conflict(output, [*argument_inputs(args), *inputs])
        check_writable(output / "x")
    if args.window_batch < 1:
        raise LCTfoundError("--window-batch must be at least 1")
    segmenter = DecoderSegmenter.load(args.decoder, args.model, device=resolve_device(args.device))
    out = sys.stderr if args.events else sys.stdout
    targets = [output] if not batch else [output / f"{volume_stem(path)}_seg.nii.gz" for path in inputs]
    written = 0
    for path, target in strict_zip(inputs, targets):
        refuse_input_conflict(target, inputs)
        if batch and not args.overwrite and output_is_complete(target, lambda p: read_volume(p, labels=True)):
            print(f"{target.name}: already done, skipped", file=out)
            continue
        volume = read_volume(path, validate=not args.no_validate)
        with command_progress(args.events, volume_stem(path), unit="window") as progress:
            labels = segmenter.predict(volume, args.overlap, args.window_batch, progress)
        target.parent.mkdir(parents=True, exist_ok=True)
        write_volume(labels, target)
        written += 1
        if args.events:
            print_event({"event": "result", "input": str(path), "output": str(target),
                         "labels": {str(value): name for value, name in sorted(segmenter.label_names.items())},
                         "decoder": str(segmenter.task_model.folder)})
        counts = ", ".join(f"{name} {int((labels.array == value).sum())} voxels"
                           for value, name in sorted(segmenter.label_names.items()))
        print(f"wrote {target}: {counts}", file=out)
    if batch:
        print(f"{written} of {len(inputs)} volume(s) segmented into {output}", file=out)
    return 0


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help=MODEL_HELP)
    parser.add_argument("--aggregation", choices=("mean", "min", "whole"), default="mean",
                        help="volume vector from the window vectors: mean (default) or element-wise min; "
                             "whole: one forward pass of the whole preprocessed volume (memory grows with it)")
    parser.add_argument("--window", default="32,128,128",
                        help="window D,H,W in preprocessed voxels, multiples of 16 (default 32,128,128)")
    parser.add_argument("--overlap", type=float_type(0, below=1), default=0.5, help="window overlap (default 0.5)")
    parser.add_argument("--batch-size", type=batch_int, default=2, help="windows per forward pass (default 2)")
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


def check_embedding_output(output: Path) -> None:
    if output.suffix.lower() not in (".json", ".safetensors"):
        raise LCTfoundError(f"{output}: use a .json or .safetensors output file")


def write_embedding(output: Path, info: dict, tensors: dict) -> None:
    """The file `ctfm embed` writes (here or with ``--server``), atomically: ``.json`` holds ``info``
    and the vector; ``.safetensors`` holds ``tensors`` (name -> numpy array: ``embedding``, and
    ``window_embeddings`` / ``window_centres_ras`` when there are windows) with ``info`` as metadata."""
    import numpy as np

    from ..atomic import atomic_file

    vector = tensors["embedding"]
    if output.suffix.lower() == ".json":
        with atomic_file(output) as tmp:
            tmp.write_text(json.dumps({**info, "embedding_dim": int(vector.shape[0]),
                                       "embedding": [float(v) for v in vector]}, indent=1))
    else:
        from safetensors.numpy import save_file

        with atomic_file(output) as tmp:
            save_file({name: np.ascontiguousarray(array) for name, array in tensors.items()}, str(tmp),
                      metadata={"lctfound": json.dumps(info)})


def run_embed(args: argparse.Namespace) -> int:
    if args.server:
        from .remote_tasks import run_ctfm_embed

        return run_ctfm_embed(args)
    import numpy as np

    from ..ctfm.features import embed_volume
    from ..ctfm.preprocess import DEFAULT_PREPROCESSING, prepare_volume
    from ..io.volume import read_volume
    from ..progress import command_progress

    output = Path(args.output)
    check_embedding_output(output)
    from ..atomic import check_outputs
    from . import argument_inputs

    check_outputs([output], argument_inputs(args), args.overwrite)
    settings = _settings(args)
    volume = read_volume(args.volume, validate=not args.no_validate)
    model = _load(args.model, args.device)
    prepared = prepare_volume(volume)
    with command_progress(args.events, "embed", unit="window") as progress:
        vector, windows = embed_volume(model, prepared, args.aggregation, settings, progress=progress)
    info = {"volume": str(args.volume), "model": str(model.path), "weights_sha256": model.weights_sha256,
            "aggregation": args.aggregation, "windows": settings.as_dict(),
            "preprocessing": DEFAULT_PREPROCESSING.as_dict(), "prepared_shape": list(prepared.shape),
            "window_count": 0 if windows is None else len(windows.embeddings)}
    tensors = {"embedding": np.asarray(vector, np.float32)}
    if windows is not None:
        tensors["window_embeddings"] = windows.embeddings
        tensors["window_centres_ras"] = windows.centres_ras
    write_embedding(output, info, tensors)
    print(f"wrote {output} ({vector.shape[0]}-d embedding, {info['window_count']} windows)",
          file=sys.stderr if args.events else sys.stdout)  # with --events, stdout holds only JSON lines
    return 0


def run_index(args: argparse.Namespace) -> int:
    from ..ctfm.retrieval import build_index
    from ..io.volume import find_volumes
    from ..progress import command_progress

    settings = _settings(args)
    volumes = find_volumes(args.folder)
    output = Path(args.output)
    from ..atomic import check_outputs
    from . import argument_inputs

    check_outputs([output], [*argument_inputs(args), *volumes], args.overwrite)
    model = _load(args.model, args.device)
    with command_progress(args.events, "index", unit="volume") as progress:
        build_index(model, volumes, output, settings, args.aggregation, windows=not args.no_windows,
                    validate=not args.no_validate, overwrite=args.overwrite, progress=progress)
    if not args.events:  # with --events, stdout holds only JSON lines
        print(f"wrote {output} ({len(volumes)} volumes)")
    return 0


def run_search(args: argparse.Namespace) -> int:
    if args.server:
        from .remote_tasks import run_ctfm_search

        return run_ctfm_search(args)
    from ..ctfm.features import embed_point, embed_region, embed_volume, similarity_volume
    from ..ctfm.preprocess import prepare_volume
    from ..ctfm.retrieval import load_index, parse_region, parse_triplet
    from ..io.volume import WRITE_FORMATS, read_volume, write_volume
    from ..progress import command_progress, print_event

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
        with command_progress(args.events, "query", unit="window") as progress:
            query, _ = embed_volume(model, prepared, index.aggregation, settings, progress=progress)
        level = "volume"
    matches = index.search(query, level, args.top)
    heatmap_path = None
    if args.heatmap:
        target = volume if not args.heatmap_volume else read_volume(args.heatmap_volume, validate=not args.no_validate)
        with command_progress(args.events, "heat map", unit="window") as progress:
            heatmap, _ = similarity_volume(model, target, query, settings,
                                           prepared=prepared if not args.heatmap_volume else None, progress=progress)
        heatmap_path = write_volume(heatmap, args.heatmap)
    result = {"level": level, "query_centre_ras": None if centre is None else [float(v) for v in centre],
              "matches": [m.as_dict() for m in matches], "heatmap": str(heatmap_path) if heatmap_path else None}
    if args.events:  # stdout holds only JSON event lines
        print_event({"event": "result", **result})
        return 0
    print_search_result(result, args.json)
    return 0


def print_search_result(result: dict, as_json: bool) -> None:
    """What `ctfm search` prints (here or with ``--server``): JSON, else one line per match."""
    if as_json:
        print(json.dumps(result, indent=2))
        return
    if result["query_centre_ras"] is not None:
        print(f"query window centred at RAS ({', '.join(f'{v:.1f}' for v in result['query_centre_ras'])})")
    for match in result["matches"]:
        centre = match.get("centre_ras")
        where = f"  at RAS ({', '.join(f'{v:.1f}' for v in centre)})" if centre else ""
        print(f"{match['rank']:3d}  {match['score']:+.4f}  {match['name']}{where}")
    if result.get("heatmap"):
        print(f"wrote {result['heatmap']}")


def run_list(args: argparse.Namespace) -> int:
    from ..ctfm.tasks import inventory

    found = inventory(args.folder)
    if args.json:
        print(json.dumps(found, indent=2))
        return 0
    print("CT-FM encoders:" + ("" if found["encoders"] else " none (add the folder of a local copy with --folder)"))
    for entry in found["encoders"]:
        print(f"  {entry['name']}  ({entry['source']}) {entry['path']}: {entry['description']}")
    for reason in found["rejected"].values():
        print(f"  not an encoder: {reason}")
    print("CT-FM task models:" + ("" if found["task_models"] else " none"))
    for entry in found["task_models"]:
        print(f"  {entry['name']}  ({entry['task']}) {entry['path']}")
    print(f"devices: {', '.join(found['devices'])}")
    return 0
