"""``--server URL``: the same commands, run on an `lctfound serve` machine (`lctfound.remote`).

The local file is read and checked here, uploaded, the job's progress is shown as it arrives
(``--events`` passes the server job's events through), Ctrl-C cancels the job on the server, and
the result is written here with the same output checks and atomic writes as a local run. A server
that stops answering is one ``error:`` line and nothing is written. This module holds what every
``--server`` command shares, and segmentation; `lctfound.cli.remote_enhance` the enhancement and
generation commands.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Optional

from ..errors import LCTfoundError


def add_server_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--server", metavar="URL",
                        help="run on an `lctfound serve` machine (e.g. http://gpu-host:8765); the access token comes "
                             "from $LCTFOUND_SERVER_TOKEN or --token-file, never from the command line")
    parser.add_argument("--token-file", metavar="FILE", help="file holding the server's access token (with --server)")


def _refuse(args: argparse.Namespace, *names: str) -> None:
    for name in names:
        if getattr(args, name, None) not in (None, False, "auto"):
            raise LCTfoundError(f"--{name.replace('_', '-')} is not available with --server yet; run without --server")


def _client(args: argparse.Namespace):
    from ..remote import RemoteClient, read_token

    client = RemoteClient(args.server, read_token(args.token_file))
    client.check_version()
    return client


def _follow_printer(args: argparse.Namespace, description: str, unit: str, show_log: bool = True):
    """An ``on_event`` callback: JSON events passed through under ``--events`` (the server keeps the job's
    ``result`` line, which names its files: the command prints its own), else a progress bar and
    the job's own text lines (``warning:`` lines on stderr, as a local run prints them; the other lines
    only with ``show_log``, for a command that prints its own account of the result)."""
    import sys

    from ..progress import TqdmProgress, print_event

    if args.events:
        return print_event, None
    bar = TqdmProgress(description, unit=unit)

    def show(event: dict) -> None:
        text = str(event.get("text", ""))
        if event.get("event") == "progress":
            bar.update(int(event.get("done", 0)), int(event.get("total", 0)), str(event.get("message", "")))
        elif event.get("event") == "log" and text.startswith("warning:"):
            print(text, file=sys.stderr)
        elif event.get("event") == "log" and show_log:
            print(text)
    return show, bar


def _run(args: argparse.Namespace, client, task: str, volumes: dict, options: dict, description: str, unit: str,
         show_log: bool = True):
    on_event, bar = _follow_printer(args, description, unit, show_log)
    try:
        return client.run(task, volumes, options, on_event=on_event)
    finally:
        if bar is not None:
            bar.close()
        client.close()


def _slices(args: argparse.Namespace) -> Optional[str]:
    """``--slices`` as the server's option takes it (no spaces), None when not given."""
    return args.slices.replace(" ", "") if args.slices else None


def _geometry(volume) -> tuple:
    return (volume.array, volume.spacing, volume.origin, volume.direction)


def run_segment_train(args: argparse.Namespace) -> int:
    import numpy as np

    from ..io.volume import read_label_volume, read_volume
    from ..remote.wire import check_name

    _refuse(args, "register", "device")
    name = check_name(args.output, "with --server, -o names the model on the server;")
    client = _client(args)
    volume = read_volume(args.volume)
    label = read_label_volume(args.labels, reference=volume)
    options = {"model": name, "names": args.names, "slices": _slices(args),
               "epochs": args.epochs, "recipe": args.recipe, "window": args.window, "backbone": args.backbone,
               "init": args.init, "overwrite": bool(args.overwrite)}
    labels = label.array.astype(np.int16)
    result, _ = _run(args, client, "segment-train", {"volume": _geometry(volume),
                                                     "labels": (labels, *_geometry(volume)[1:])},
                     options, "segment train", "step")
    names = ", ".join(f"{value}={label_name}" for value, label_name in sorted(result.get("labels", {}).items()))
    print(f"model {result['model']!r} ({names}) is on {client.url}; predict with "
          f"`lctfound segment predict VOLUME --model {result['model']} --server {client.url} -o OUT`")
    return 0


def run_segment_predict(args: argparse.Namespace) -> int:
    from ..atomic import check_outputs
    from ..io.volume import find_volumes, read_label_volume, read_volume, write_volume

    _refuse(args, "device")
    source, output = Path(args.input).expanduser(), Path(args.output).expanduser()
    inputs = find_volumes(source)
    if source.is_dir() and not (len(inputs) == 1 and inputs[0] == source):
        raise LCTfoundError("with --server, segment predict takes one volume, not a folder")
    check_outputs([output], [source] + ([Path(args.annotation)] if args.annotation else []), args.overwrite)
    client = _client(args)
    volume = read_volume(inputs[0])
    volumes = {"volume": _geometry(volume)}
    if args.annotation:
        annotation = read_label_volume(args.annotation, reference=volume).array.astype("int16")
        volumes["annotation"] = (annotation, *_geometry(volume)[1:])
    options = {"model": args.model, "backbone": args.backbone, "postprocess": args.postprocess.replace(" ", ""),
               "extent_margin": args.extent_margin.replace(" ", ""), "whole_volume": bool(args.whole_volume)}
    result, labels = _run(args, client, "segment-predict", volumes, options, "segment", "slice")
    write_volume(volume.with_array(labels), output)
    print(f"wrote {output}: " + ", ".join(f"{label_name} {int((labels == int(value)).sum())} voxels"
                                          for value, label_name in sorted(result.get("labels", {}).items())))
    return 0
