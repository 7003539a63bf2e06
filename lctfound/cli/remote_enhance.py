"""``--server URL`` for ``lctfound enhance ...`` and ``lctfound generate``: the same tasks on an
`lctfound serve` machine (its tasks ``enhance-*`` and ``generate``, `lctfound.server.tasks`).

Each ``run_remote_<task>(args)`` makes the task's options (as the local command takes them; the
server checks every value), names and checks the output before anything is uploaded, and hands
over to `run_on_server`. Model names (``--model``, ``--backbone``) resolve on the server. The result
is written here by `write_server_result`: the server's volume with ITS geometry (super-resolution
changes the grid), and the server's provenance with the paths said for this machine. Needs no
torch: a CPU-only machine runs these against a GPU server.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable, Optional, Union

from ..errors import LCTfoundError
from .remote import _client, _geometry, _refuse, _run, _slices


def write_server_result(args: argparse.Namespace, url: str, result: dict, array, output: Path,
                        name: Optional[str], source: Optional[str]) -> Path:
    """Write a server job's result volume to ``output`` (atomically, with ``OUT.json``) on the grid the
    server sent, and report it as `lctfound.cli.enhance._publish` does a local result. The provenance is
    the server's (same task, parameters, models and compute) with ``name``, ``output`` and ``source``
    said for this machine and ``server`` recorded. Returns the provenance file."""
    from ..io.provenance import write_volume_with_provenance
    from ..io.volume import CTVolume
    from ..progress import print_event

    header = result["header"]
    volume = CTVolume(array, header["spacing"], header["origin"], header["direction"])
    provenance = dict(result.get("provenance") or {})
    provenance.update({"output": str(output), "server": url})
    if name is not None:
        provenance["name"] = name
    if source is not None and "source" in provenance:
        provenance["source"] = str(source)
    side = write_volume_with_provenance(volume, output, provenance)
    task = provenance.get("task", "result")
    print(f"wrote {output} ({task}) on {url}; provenance in {side}", file=sys.stderr if args.events else sys.stdout)
    if args.events:
        print_event({"event": "result", "task": task, "output": str(output), "provenance": str(side),
                     "name": provenance.get("name"), "seconds_per_slice": provenance.get("seconds_per_slice")})
    return side


def run_on_server(args: argparse.Namespace, task: str, options: dict, output: Path,
                  name: Union[str, Callable[[dict], str], None], description: str, unit: str) -> int:
    """Run ``task`` on ``args.server`` with ``args.volume`` (read and checked here; none for generate)
    and write its result to ``output``, already checked. ``name`` may be a function of the server's
    provenance when it depends on what only the server knows (a task model's own defaults)."""
    from ..io.volume import read_volume

    source = getattr(args, "volume", None)
    client = _client(args)
    volumes = {}
    if source is not None:
        volumes["volume"] = _geometry(read_volume(source, validate=not args.no_validate))
    url = client.url
    result, array = _run(args, client, task, volumes, options, description, unit)
    if callable(name):
        name = name(result.get("provenance") or {})
    write_server_result(args, url, result, array, output, name, source)
    return 0


def _common(args: argparse.Namespace) -> dict:
    """The options every ``enhance`` task shares (`lctfound.cli.enhance._add_output_options`)."""
    options = {"slices": _slices(args), "no_validate": bool(args.no_validate)}
    if hasattr(args, "seed"):
        options["seed"] = args.seed
    return options


def run_remote_low_dose(args: argparse.Namespace, method: str) -> int:
    from ..io.volume import volume_stem
    from ..pipelines.names import classical_denoise_name, cold_diffusion_name
    from .enhance import _output_path

    _refuse(args, "device")
    stem = volume_stem(args.volume)
    if method != "cold-diffusion":
        name = classical_denoise_name(stem, method)
        output = _output_path(args, lambda: name)
    elif args.steps is not None:
        name = cold_diffusion_name(stem, args.steps)
        output = _output_path(args, lambda: name)
    else:  # the task model's own number of steps is known on the server only: the name follows its record
        def no_folder():
            raise LCTfoundError("with --server, an output folder needs --steps (the result is named after them; "
                                "the model's default is known on the server only): give --steps or an output file")

        output = _output_path(args, no_folder)
        name = lambda record: cold_diffusion_name(stem, record.get("steps", "default"))  # noqa: E731
    options = {**_common(args), "method": method, "strength": args.strength, "model": args.model,
               "backbone": args.backbone, "steps": args.steps,
               "batch_size": args.batch_size if method == "cold-diffusion" else None}
    return run_on_server(args, "enhance-low-dose", options, output, name, f"low-dose {method}", "slice")


def run_remote_simulate_low_dose(args: argparse.Namespace) -> int:
    from ..io.volume import volume_stem
    from ..pipelines.names import low_dose_name
    from .enhance import _output_path

    name = low_dose_name(volume_stem(args.volume), args.dose)
    output = _output_path(args, lambda: name)
    options = {**_common(args), "dose": args.dose, "photons": args.photons, "electronic_noise": args.electronic_noise,
               "method": args.method, "input_noise_free": bool(args.input_noise_free), "geometry": args.geometry,
               "views": args.views}
    return run_on_server(args, "enhance-simulate-low-dose", options, output, name, "simulate low dose", "slice")


def run_remote_sparse_view(args: argparse.Namespace) -> int:
    from ..io.volume import volume_stem
    from ..pipelines.names import sparse_view_name
    from .enhance import _output_path

    # Measured sinograms are files of this machine with a sidecar; the server simulates from a volume.
    _refuse(args, "sinogram", "save_sinogram", "device")
    name = sparse_view_name(volume_stem(args.volume), args.method, args.views, args.geometry or "parallel")
    output = _output_path(args, lambda: name)
    options = {**_common(args), "views": args.views, "geometry": args.geometry, "method": args.method,
               "mu_water": args.mu_water, "filter": args.filter, "tv_iterations": args.tv_iterations,
               "tv_weight": args.tv_weight}
    if args.method == "diffusion":
        options.update({"model": args.model, "steps": args.steps, "strength": args.strength,
                        "dc_iterations": args.dc_iterations, "eta": args.eta, "window": args.window,
                        "batch_size": args.batch_size, "refine_iterations": args.refine_iterations})
    unit = "step" if args.method == "diffusion" else "slice"
    return run_on_server(args, "enhance-sparse-view", options, output, name, f"sparse-view {args.method}", unit)


def run_remote_super_resolution(args: argparse.Namespace) -> int:
    from ..io.volume import volume_stem
    from ..pipelines.names import super_resolution_name
    from .enhance import _output_path

    _refuse(args, "device")
    name = super_resolution_name(volume_stem(args.volume), args.method, args.factor, args.axis, args.slice_model)
    output = _output_path(args, lambda: name)
    options = {**_common(args), "factor": args.factor, "axis": args.axis, "method": args.method,
               "slice_model": args.slice_model}
    if args.method == "ddnm":
        options.update({"model": args.model, "steps": args.steps, "eta": args.eta, "noise_hu": args.noise_hu,
                        "window": args.window, "intensity": args.intensity, "batch_size": args.batch_size})
    unit = "step" if args.method == "ddnm" else "slice"
    return run_on_server(args, "enhance-super-resolution", options, output, name,
                         f"super-resolution {args.method}", unit)


def run_remote_vcta(args: argparse.Namespace) -> int:
    from ..io.volume import volume_stem
    from ..pipelines.names import vcta_name
    from .enhance import _output_path

    _refuse(args, "device")
    name = vcta_name(volume_stem(args.volume), args.steps, args.seed, args.strength)
    output = _output_path(args, lambda: name)
    options = {**_common(args), "model": args.model, "backbone": args.backbone, "steps": args.steps, "eta": args.eta,
               "strength": args.strength, "batch_size": args.batch_size}
    return run_on_server(args, "enhance-vcta", options, output, name, "virtual CTA", "step")


def run_remote_generate(args: argparse.Namespace, output: Path) -> int:
    """``output``: a volume file, checked by `lctfound.cli.generate.run`."""
    _refuse(args, "device")
    options = {"model": args.model, "window": args.window, "disease": args.disease, "prompt": args.prompt,
               "num_images": args.num_images, "steps": args.steps, "sampler": args.sampler,
               "guidance_scale": args.guidance_scale, "seed": args.seed, "size": args.size,
               "batch_size": args.batch_size, "spacing": args.spacing.replace(" ", "")}
    return run_on_server(args, "generate", options, output, None, "generate", "step")
