"""``--server URL`` for `segment distill`, `classify predict`, `ctfm embed` and `ctfm search`
(`lctfound.cli.remote` has the shared pieces and the few-shot/enhancement commands).

Each command checks its local inputs and output first (an output that is an input, or exists
without ``--overwrite``, is refused before anything is uploaded), runs the server's task of the same
name and writes what comes back the way the local command writes it:

* ``segment distill``: the volumes (and label maps) go up; the student stays on the server in this
  client's models, named by ``-o`` (`segment predict --model NAME --server` uses it). The teacher is
  named by its server name.
* ``classify predict``: one volume; the server's results-table row comes back (JSON) and is written
  into OUTPUT with the local command's columns, continuing a table of the same model (another model's
  table is refused; ``--overwrite`` starts a new one). With ``--server`` the scan is classified again
  even when OUTPUT already holds it, and its row is replaced.
* ``ctfm embed``: the embedding and its record come back (JSON, exact float32 values) and are written
  as the same ``.json`` or ``.safetensors`` file; the record names the server's model and the server.

* ``ctfm search INDEX --server``: INDEX names an index the server's administrator offers, given on
  the server's command line like a model (``--models cohort=INDEX_FOLDER``); the query volume goes up
  and the ranking comes back (names and scores; the indexed volumes' paths stay on the server).
  Why this design: a search needs the index's vectors where the query is embedded, and no
  client-chosen server path may be opened, so the index must be one the server names. An index the
  administrator builds once over a department's cohort is the real use (search "cases like this");
  building per-client indexes from uploads would mean uploading a whole cohort per client, for no
  more than a local `ctfm index` gives. ``--heatmap`` (a second result volume) is refused with
  ``--server``. With ``--events`` the ranking is the last event line, a ``result`` event as a local run
  prints it (without paths), so that the CT-FM panel's search job reads it the same way.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..errors import LCTfoundError
from .remote import _client, _geometry, _refuse, _run

#: The server task's input names for the volumes and label maps of one distillation
#: (`lctfound.server.tasks.DISTILL_VOLUMES` / `DISTILL_LABELS`; not imported: the server package
#: needs FastAPI, this client does not).
MAX_DISTILL_VOLUMES = 4


def _server_name(value: str, option: str) -> str:
    from ..remote.wire import check_name

    return check_name(value, f"with --server, {option} names a model on the server;")


def run_segment_distill(args: argparse.Namespace) -> int:
    import numpy as np

    from ..io.volume import read_label_volume, read_volume
    from .segment import distill_label_paths

    _refuse(args, "register", "device")
    name = _server_name(args.output, "-o")
    teacher = _server_name(args.teacher, "--teacher")
    if args.backbone:
        _server_name(args.backbone, "--backbone")
    if len(args.volumes) > MAX_DISTILL_VOLUMES:
        raise LCTfoundError(f"with --server, segment distill takes at most {MAX_DISTILL_VOLUMES} volumes; "
                            f"{len(args.volumes)} were given")
    label_paths = distill_label_paths(args)
    client = _client(args)
    volumes = {}
    for number, path in enumerate(args.volumes, start=1):
        suffix = "" if number == 1 else str(number)
        volume = read_volume(path)
        volumes[f"volume{suffix}"] = _geometry(volume)
        if label_paths and label_paths[number - 1] != "-":
            label = read_label_volume(label_paths[number - 1], reference=volume).array.astype(np.int16)
            volumes[f"labels{suffix}"] = (label, *_geometry(volume)[1:])
    options = {"model": name, "teacher": teacher, "backbone": args.backbone, "epochs": args.epochs,
               "time_budget": args.time_budget, "resolution": args.resolution, "overwrite": bool(args.overwrite)}
    result, _ = _run(args, client, "segment-distill", volumes, options, "segment distill", "step")
    names = ", ".join(f"{value}={label_name}" for value, label_name in sorted(result.get("labels", {}).items()))
    print(f"student {result['model']!r} ({names}) is on {client.url}; predict with "
          f"`lctfound segment predict VOLUME --model {result['model']} --server {client.url} -o OUT`")
    return 0


def run_classify_predict(args: argparse.Namespace) -> int:
    from ..atomic import check_writable, refuse_input_conflict
    from ..io.volume import find_volumes, read_volume, volume_stem
    from ..pipelines.results_table import table_class_names, write_results_csv
    from .classify import _previous_rows, _print_table, check_results_output

    _refuse(args, "saliency", "device")
    output = Path(args.output).expanduser()
    check_results_output(output)
    source = Path(args.input).expanduser().absolute()  # absolute: the key a local run writes
    inputs = [] if source.suffix.lower() == ".csv" else find_volumes(source)
    if not (len(inputs) == 1 and inputs[0] == source):
        raise LCTfoundError("with --server, classify predict takes one volume, not a folder or a table")
    refuse_input_conflict(output, [source])
    check_writable(output)
    continuing = output.is_file() and not args.overwrite
    if continuing:
        table_class_names(output)  # a file that is no results table is refused before the upload
    client = _client(args)
    volume = read_volume(source)
    slices = args.slices.replace(" ", "").lower() if args.slices else None
    options = {"model": _server_name(args.model, "--model"),
               "backbone": _server_name(args.backbone, "--backbone") if args.backbone else None,
               "slices": slices, "batch_size": args.batch_size}
    result, _ = _run(args, client, "classify-predict", {"volume": _geometry(volume)}, options, "classify", "scan",
                     show_log=False)
    classes, rows = result["data"]["classes"], result["data"]["rows"]
    if len(rows) != 1:
        raise LCTfoundError(f"the server at {client.url} sent {len(rows)} result rows for one scan")
    row = {**rows[0], "case": volume_stem(source), "input": str(source)}  # named as here, not as on the server
    previous = _previous_rows(output, classes, row) if continuing else []
    table = [old for old in previous if old.get("input") != row["input"]] + [row]
    write_results_csv(table, output, classes)
    _print_table([row], classes)
    print(f"model {row['model']} (sha256 {row['model_sha256'][:12]}…), backbone {row['backbone']} "
          f"(sha256 {row['backbone_sha256'][:12] or '?'}…), classified on {client.url}")
    print(f"1 scan classified; results in {output}")
    print(row.get("note", ""))
    return 0


def run_ctfm_embed(args: argparse.Namespace) -> int:
    import numpy as np

    from ..atomic import check_outputs
    from ..io.volume import read_volume
    from . import argument_inputs
    from .ctfm import check_embedding_output, write_embedding

    _refuse(args, "device")
    output = Path(args.output)
    check_embedding_output(output)
    check_outputs([output], argument_inputs(args), args.overwrite)
    model = _server_name(args.model, "--model")
    client = _client(args)
    volume = read_volume(args.volume, validate=not args.no_validate)
    options = {"model": model, "aggregation": args.aggregation, "window": args.window.replace(" ", ""),
               "overlap": args.overlap, "batch_size": args.batch_size, "no_validate": bool(args.no_validate)}
    result, _ = _run(args, client, "ctfm-embed", {"volume": _geometry(volume)}, options, "embed", "window",
                     show_log=False)
    data = result["data"]
    tensors = {key: np.asarray(value["values"], dtype=value["dtype"]).reshape(value["shape"])
               for key, value in data["tensors"].items()}
    # The record is the server's (same model checksum, windows and preprocessing); named as here.
    info = {**data["info"], "volume": str(args.volume), "model": model, "server": client.url}
    write_embedding(output, info, tensors)
    print(f"wrote {output} ({tensors['embedding'].shape[0]}-d embedding, {info.get('window_count', 0)} windows) "
          f"on {client.url}", file=sys.stderr if args.events else sys.stdout)
    return 0


def _server_coordinates(text: str, count: int, option: str) -> str:
    """``count`` comma-separated mm values as the server's ctfm-search takes them: each with at most 6
    decimals (a micrometre, far below a voxel), so that a point placed in Slicer (``-20.123456789…``) is
    not refused for its digits."""
    try:
        values = [float(value) for value in text.replace(" ", "").split(",")]
    except ValueError:
        values = []
    if len(values) != count or not all(abs(value) < 1e6 for value in values):
        raise LCTfoundError(f"cannot read {option} {text!r}; use {count} comma-separated numbers in mm")
    return ",".join(f"{value:.6f}".rstrip("0").rstrip(".") for value in values)


def run_ctfm_search(args: argparse.Namespace) -> int:
    from ..io.volume import read_volume
    from ..progress import print_event
    from .ctfm import print_search_result

    _refuse(args, "heatmap", "heatmap_volume", "device")
    index = _server_name(args.index, "INDEX")
    model = _server_name(args.model, "--model")
    client = _client(args)
    volume = read_volume(args.query, validate=not args.no_validate)
    options = {"index": index, "model": model, "top": args.top, "no_validate": bool(args.no_validate),
               "point": _server_coordinates(args.point, 3, "--point") if args.point else None,
               "region": _server_coordinates(args.region, 6, "--region") if args.region else None}
    result, _ = _run(args, client, "ctfm-search", {"volume": _geometry(volume)}, options, "query", "window",
                     show_log=False)
    found = {**result["data"], "heatmap": None}
    if args.events:  # the server keeps its own result event (it names its files): this one is a local run's
        print_event({"event": "result", **found})
    else:
        print_search_result(found, args.json)
    return 0
