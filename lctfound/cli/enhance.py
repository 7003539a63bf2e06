"""``lctfound enhance``: image tasks that make a new volume from a CT (simulated low dose, sparse-view reconstruction).

Each subcommand is one ``_add_<name>(commands)`` function listed in `SUBCOMMANDS` plus its
``run_<name>(args)`` handler. They share the output handling: the result is a new volume file
(never the input; an existing file is refused unless ``--overwrite``), written atomically, with
its provenance (task, parameters, source, model and sha256, time per slice) in a JSON file of
the same name (``OUT.nrrd`` → ``OUT.json``). With ``--events`` progress is JSON lines on stdout
and the last line is ``{"event": "result", "output": ..., "provenance": ..., "name": ...}``.
With ``--server URL`` the tasks (not their training) run on an `lctfound serve` machine
(`lctfound.cli.remote_enhance`), with the same output handling here.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional
from ..compat import strict_zip

from .remote import add_server_options
from ..validation import (
    MAX_DIFFUSION_STEPS, MAX_IMAGE_SIZE, batch_int, diffusion_steps_int, float_type, fraction_float, int_type,
    iterations_int, non_negative_float, open_fraction_float, positive_float, seed_int, slice_list_type,
)


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "enhance", help="simulate low-dose scans, reconstruct sparse-view CT",
        description="Image tasks on CT volumes. Every result is a new volume named after the task and its "
                    "parameters, with its provenance in a JSON file beside it.")
    commands = parser.add_subparsers(dest="enhance_command", metavar="SUBCOMMAND")
    commands.required = True
    for add in SUBCOMMANDS:
        add(commands)


def _add_output_options(parser: argparse.ArgumentParser, seed: bool = True) -> None:
    parser.add_argument("--output", "-o", required=True,
                        help="output volume (.nrrd, .nii.gz, .nii, .mha), or an existing folder to write "
                             "<input>_<task>.nrrd into; provenance goes to the same name with .json")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output")
    parser.add_argument("--slices", type=slice_list_type,
                        help="only these slice indices, e.g. 20-27 (the others hold -1024 HU)")
    if seed:  # deterministic tasks (low-dose enhancement) take no seed
        parser.add_argument("--seed", type=seed_int, default=0, help="random seed (default 0)")
    parser.add_argument("--no-validate", action="store_true", help="accept a volume that does not look like CT in HU")
    parser.add_argument("--events", action="store_true", help="print JSON event lines on stdout (for front ends)")


def _add_geometry_options(parser: argparse.ArgumentParser, default_kind: str, default_views: Optional[int]) -> None:
    parser.add_argument("--geometry", choices=("parallel", "fan"), default=None,
                        help=f"beam geometry (default {default_kind}); fan beam: flat detector, source 595 mm and "
                             "detector 490.6 mm from the isocentre, 360°; parallel: 180°")
    parser.add_argument("--views", type=int_type(2, 100_000), default=default_views,
                        help="number of projection views" + (f" (default {default_views})" if default_views else ""))


# --------------------------------------------------------------------------------------------
# simulate-low-dose
# --------------------------------------------------------------------------------------------


def _add_simulate_low_dose(commands) -> None:
    from ..pipelines.choices import DEFAULT_INCIDENT_PHOTONS, DEFAULT_VIEWS, LOW_DOSE_METHODS as METHODS

    parser = commands.add_parser(
        "simulate-low-dose", help="simulate a lower-dose scan in the projection domain (Poisson noise)",
        description="Forward project each slice (μ from HU with μ_water 0.0193/mm at 70 keV), draw Poisson "
                    "photon counts at the dose fraction, take the log and reconstruct by FBP. By default the "
                    "reconstructed noise is added to the input (noise insertion, keeps its resolution), and the "
                    "input's own noise is accounted for (counts drawn at I0·d/(1-d)).")
    parser.add_argument("volume", help="full-dose CT volume: DICOM folder, NIfTI, NRRD or MHA")
    parser.add_argument("--dose", type=open_fraction_float, required=True,
                        help="dose fraction, e.g. 0.1 for 10%% (0 < d < 1)")
    parser.add_argument("--photons", type=positive_float, default=DEFAULT_INCIDENT_PHOTONS,
                        help=f"full-dose photons per detector bin per view (default {DEFAULT_INCIDENT_PHOTONS:g})")
    parser.add_argument("--electronic-noise", type=non_negative_float, default=0.0,
                        help="Gaussian electronic noise, standard deviation in photon counts (default 0)")
    parser.add_argument("--method", choices=METHODS, default="noise-insertion",
                        help="noise-insertion: input + FBP of the projection noise (default); reconstruct: FBP of "
                             "the noisy projections")
    parser.add_argument("--input-noise-free", action="store_true",
                        help="treat the input as noise-free (phantoms): draw counts at I0·d")
    _add_geometry_options(parser, "fan", DEFAULT_VIEWS)
    _add_output_options(parser)
    add_server_options(parser)
    parser.set_defaults(func=run_simulate_low_dose)


def run_simulate_low_dose(args: argparse.Namespace) -> int:
    _check_views(args.views)
    if args.server:  # the dose fraction and views are checked by their option types and on the server
        from .remote_enhance import run_remote_simulate_low_dose

        return run_remote_simulate_low_dose(args)
    from ..features import parse_slices
    from ..io.volume import read_volume, volume_stem
    from ..pipelines.low_dose import check_dose_fraction, result_name, simulate_low_dose
    from ..progress import command_progress
    from ..tomography import square_pixel_mm

    check_dose_fraction(args.dose)
    name = result_name(volume_stem(args.volume), args.dose)
    output = _output_path(args, lambda: name)
    volume = read_volume(args.volume, validate=not args.no_validate)
    square_pixel_mm(volume.spacing)
    slices = parse_slices(args.slices, volume.shape[0])
    with command_progress(args.events, "simulate low dose", unit="slice") as progress:
        result = simulate_low_dose(volume, args.dose, incident_photons=args.photons,
                                   geometry_kind=args.geometry or "fan", views=args.views,
                                   electronic_noise=args.electronic_noise, method=args.method,
                                   input_noise=not args.input_noise_free, seed=args.seed, slices=slices,
                                   progress=progress)
    _publish(args, result, output, name)
    return 0


# --------------------------------------------------------------------------------------------
# sparse-view
# --------------------------------------------------------------------------------------------


def _add_sparse_view(commands) -> None:
    from ..pipelines.choices import SPARSE_VIEW_METHODS as METHODS
    from ..pipelines.choices import MU_WATER_PER_MM

    parser = commands.add_parser(
        "sparse-view", help="reconstruct CT from few projection views (FBP, TV or LCTfound-guided diffusion)",
        description="Simulate VIEWS noise-free projections of each slice of VOLUME (or read measured line integrals "
                    "with --sinogram) and reconstruct them: fbp (filtered back-projection), tv (FISTA-accelerated "
                    "SIRT with a TV proximal step) or diffusion (DDIM sampling with the LCTfound U-Net as the prior "
                    "and LSQR data consistency on the projections at every step, DDNM-style). Diffusion runs at "
                    "the model's image size and is refined by TV iterations on a finer volume grid. TV is the "
                    "default: on the project's benchmark (benchmarks/RESULTS.md, 16 and 32 views) it beats FBP by "
                    "1-5.6 dB and the diffusion prior (embedded model) by 0.3-3.1 dB. --sinogram reads line "
                    "integrals -ln(I/I0) (slices, views, detectors) with a JSON geometry sidecar of the same name "
                    "(sino.npy -> sino.json), e.g. {\"kind\": \"parallel\", \"views\": 32, \"detectors\": 363, "
                    "\"detector_spacing_mm\": 1.0, \"angular_range_deg\": 180, \"image_size\": 256, "
                    "\"pixel_mm\": 1.0, \"mu_water_per_mm\": 0.0193}; fan beam adds source_to_isocentre_mm, "
                    "isocentre_to_detector_mm and detector_shape (flat or curved). Every field, with an example "
                    "file: docs/sinogram-format.md and docs/examples/sinogram-parallel.json. --save-sinogram "
                    "writes such a pair.")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("volume", nargs="?", help="CT volume to simulate the views from")
    source.add_argument("--sinogram", help="measured line integrals (slices, views, detectors) as .npy, .nrrd, "
                                           ".nii(.gz) or .mha, with the geometry in a JSON file of the same name")
    _add_geometry_options(parser, "parallel", None)
    parser.add_argument("--method", choices=METHODS, default="tv",
                        help="reconstruction method (default tv: it beats fbp and diffusion on the project's "
                             "benchmark, benchmarks/RESULTS.md)")
    parser.add_argument("--mu-water", type=float_type(above=0, maximum=1), default=None, metavar="PER_MM",
                        help=f"water's attenuation in 1/mm that maps mu to HU (HU = 1000*(mu/mu_water - 1)); "
                             f"must match how the line integrals were made, else all HU shift (0.0193 vs 0.0192: "
                             f"5 HU at water). Default: the sinogram sidecar's mu_water_per_mm, else "
                             f"{MU_WATER_PER_MM} (water at 70 keV, NIST XCOM). Recorded in the provenance")
    parser.add_argument("--filter", default="ramp", help="FBP filter: ramp, shepp-logan, cosine, hamming, hann")
    parser.add_argument("--tv-iterations", type=iterations_int, default=50, help="TV iterations (default 50)")
    parser.add_argument("--tv-weight", type=non_negative_float, default=0.005,
                        help="TV weight per iteration, in units of water attenuation (default 0.005)")
    diffusion = parser.add_argument_group("diffusion")
    diffusion.add_argument("--model", default="default", help="LCTfound backbone (default: the embedded model)")
    diffusion.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    diffusion.add_argument("--steps", type=diffusion_steps_int, default=50,
                           help="DDIM steps over the full schedule (default 50)")
    diffusion.add_argument("--strength", type=float_type(above=0, maximum=1), default=1.0,
                           help="1: start from noise (default); s<1: start from the TV result noised to s")
    diffusion.add_argument("--dc-iterations", type=iterations_int, default=10,
                           help="LSQR data-consistency iterations per step (default 10)")
    diffusion.add_argument("--eta", type=fraction_float, default=0.0, help="DDIM eta (default 0)")
    diffusion.add_argument("--window", default="lung", help="window of the model's scale (default lung)")
    diffusion.add_argument("--batch-size", type=batch_int, default=4, help="slices per network call (default 4)")
    diffusion.add_argument("--refine-iterations", type=iterations_int, default=10,
                           help="TV iterations on a volume grid finer than the model's (default 10)")
    parser.add_argument("--save-sinogram", metavar="FILE.npy",
                        help="also write the simulated sinograms (and FILE.json geometry) for later --sinogram runs")
    _add_output_options(parser)
    add_server_options(parser)
    parser.set_defaults(func=run_sparse_view)


def run_sparse_view(args: argparse.Namespace) -> int:
    from ..errors import LCTfoundError
    from ..pipelines.choices import FBP_FILTERS

    if args.views is not None:
        _check_views(args.views)
    if args.sinogram and args.save_sinogram:
        raise LCTfoundError("--save-sinogram writes simulated sinograms; with --sinogram there is nothing to simulate")
    if args.volume and args.views is None:
        raise LCTfoundError("give --views, the number of projection views to simulate")
    if args.filter not in FBP_FILTERS:
        raise LCTfoundError(f"unknown FBP filter {args.filter!r}; choose {', '.join(FBP_FILTERS)}")
    if args.server:
        from .remote_enhance import run_remote_sparse_view

        return run_remote_sparse_view(args)
    from ..features import parse_slices
    from ..io.volume import read_volume, volume_stem
    from ..pipelines.sparse_view import (
        SparseViewDiffusionPipeline,
        load_diffusion_model,
        read_sinograms,
        reconstruct_sparse_view,
        result_name,
        sidecar_path,
        simulate_sinograms,
        write_sinograms,
    )
    from ..progress import command_progress
    from ..tomography import square_pixel_mm

    stack = None
    if args.sinogram:
        stack = read_sinograms(args.sinogram, mu_water=args.mu_water)
        if args.views is not None and args.views != stack.geometry.views:
            raise LCTfoundError(f"--views {args.views} does not match {args.sinogram}, which has "
                                f"{stack.geometry.views} views")
        if args.geometry is not None and args.geometry != stack.geometry.kind:
            raise LCTfoundError(f"--geometry {args.geometry} does not match {args.sinogram}, a "
                                f"{stack.geometry.kind}-beam sinogram")
        kind, views, stem = stack.geometry.kind, stack.geometry.views, volume_stem(args.sinogram)
        if args.slices:
            raise LCTfoundError("--slices applies to a volume; select slices of a sinogram file before")
    else:
        kind, views, stem = args.geometry or "parallel", args.views, volume_stem(args.volume)
    name = result_name(stem, args.method, views, kind)
    output = _output_path(args, lambda: name)
    if args.save_sinogram:
        from ..atomic import check_outputs

        check_outputs([args.save_sinogram, sidecar_path(args.save_sinogram)], [output, *_inputs(args)],
                      args.overwrite)
    pipeline = None
    if args.method == "diffusion":
        model = load_diffusion_model(args.model, args.device)
        pipeline = SparseViewDiffusionPipeline(model, window=args.window, steps=args.steps, strength=args.strength,
                                               dc_iterations=args.dc_iterations, eta=args.eta,
                                               batch_size=args.batch_size, refine_iterations=args.refine_iterations,
                                               tv_weight=args.tv_weight, tv_iterations=args.tv_iterations)
    if stack is None:
        volume = read_volume(args.volume, validate=not args.no_validate)
        square_pixel_mm(volume.spacing)
        slices = parse_slices(args.slices, volume.shape[0])
        with command_progress(args.events, "project", unit="slice") as progress:
            stack = simulate_sinograms(volume, kind=kind, views=views, slices=slices, progress=progress,
                                       **({} if args.mu_water is None else {"mu_water": args.mu_water}))
        if args.save_sinogram:
            write_sinograms(stack, args.save_sinogram, overwrite=args.overwrite)
            _say(args, f"wrote {args.save_sinogram} and its geometry {sidecar_path(args.save_sinogram)}")
    unit = "step" if args.method == "diffusion" else "slice"
    with command_progress(args.events, f"sparse-view {args.method}", unit=unit) as progress:
        result = reconstruct_sparse_view(stack, args.method, filter_name=args.filter, tv_iterations=args.tv_iterations,
                                         tv_weight=args.tv_weight, pipeline=pipeline, seed=args.seed,
                                         progress=progress)
    _publish(args, result, output, name)
    return 0


# --------------------------------------------------------------------------------------------
# super-resolution
# --------------------------------------------------------------------------------------------


def _add_super_resolution(commands) -> None:
    from ..pipelines.choices import DEFAULT_ETA, INTENSITY_MAPPINGS, SLICE_MODEL_TEXT

    parser = commands.add_parser(
        "super-resolution", help="zero-shot super-resolution (DDNM) or interpolation, in-plane or thick → thin slices",
        description="Super-resolve a CT ×2, ×4 or ×8. ddnm: zero-shot DDNM with an LCTfound diffusion model; the "
                    "degradation is true area averaging (in-plane: f×f pixel blocks; through-plane: f consecutive "
                    "thin slices make one thick slice), so the result averages back exactly to the input. "
                    "Through-plane runs on coronal planes and assumes, by default, that a thick slice is the average "
                    "of its thin slices (--slice-model average; the thin slices' centres average to the thick "
                    "centre); --slice-model point assumes each thick slice is a point sample equal to the thin "
                    "slice at its centre. The model is recorded in the provenance. bicubic (Keys cubic convolution, a = -0.5) and bspline "
                    "(cubic B-spline) are interpolation baselines.")
    parser.add_argument("volume", help="CT volume: DICOM folder, NIfTI, NRRD or MHA")
    parser.add_argument("--factor", type=int_type(2, 8), default=4, help="2, 4 or 8 (default 4)")
    parser.add_argument("--axis", default="in-plane",
                        help="in-plane (rows and columns, default) or through-plane (thick → thin slices)")
    parser.add_argument("--method", default="ddnm", help="ddnm (default), bicubic or bspline")
    parser.add_argument("--slice-model", default="average", choices=tuple(SLICE_MODEL_TEXT),
                        help="through-plane acquisition model: average (default): "
                             f"{SLICE_MODEL_TEXT['average']}; point: {SLICE_MODEL_TEXT['point']}")
    ddnm = parser.add_argument_group("ddnm")
    ddnm.add_argument("--model", default="default", help="LCTfound diffusion model (default: the embedded model)")
    ddnm.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    ddnm.add_argument("--steps", type=diffusion_steps_int, default=50, help="DDIM schedule steps (default 50)")
    ddnm.add_argument("--eta", type=fraction_float, default=DEFAULT_ETA, help=f"DDNM η, 0..1 (default {DEFAULT_ETA})")
    ddnm.add_argument("--noise-hu", type=non_negative_float, default=0.0,
                      help="noise std of the input in HU for DDNM+ (default 0: exact consistency)")
    ddnm.add_argument("--window", default="lung", help="window of the model's scale and prompt (default lung)")
    ddnm.add_argument("--intensity", default="official",
                      help=f"HU ↔ model mapping: {' or '.join(INTENSITY_MAPPINGS)} (official: each plane's own range, "
                           "as in training; the default)")
    ddnm.add_argument("--batch-size", type=batch_int, default=4, help="slices or planes per network call (default 4)")
    _add_output_options(parser)
    add_server_options(parser)
    parser.set_defaults(func=run_super_resolution)


def run_super_resolution(args: argparse.Namespace) -> int:
    if args.server:
        from .remote_enhance import run_remote_super_resolution

        return run_remote_super_resolution(args)
    from ..errors import LCTfoundError
    from ..features import parse_slices
    from ..io.volume import read_volume, volume_stem
    from ..pipelines.generation import load_diffusion_model
    from ..pipelines.super_resolution import (
        SuperResolutionPipeline,
        check_axis,
        check_factor,
        check_method,
        check_request,
        result_name,
        super_resolve_volume,
    )
    from ..progress import command_progress

    factor, axis, method = check_factor(args.factor), check_axis(args.axis), check_method(args.method)
    if args.steps < 1 or args.batch_size < 1:
        raise LCTfoundError("--steps and --batch-size must be at least 1")
    name = result_name(volume_stem(args.volume), method, factor, axis, args.slice_model)
    output = _output_path(args, lambda: name)
    volume = read_volume(args.volume, validate=not args.no_validate)
    slices = parse_slices(args.slices, volume.shape[0])
    pipeline = None
    if method == "ddnm":
        pipeline = SuperResolutionPipeline(load_diffusion_model(args.model, args.device), args.window,
                                           batch_size=args.batch_size, intensity=args.intensity)
    check_request(volume.shape, factor, axis, method, pipeline, slices, slice_model=args.slice_model)  # before any progress is shown
    with command_progress(args.events, f"super-resolution {method}", unit="step" if pipeline else "slice") as progress:
        result = super_resolve_volume(volume, factor, axis, method, pipeline, steps=args.steps, eta=args.eta,
                                      seed=args.seed, noise_hu=args.noise_hu, slices=slices, progress=progress,
                                      slice_model=args.slice_model)
    _publish(args, result, output, name)
    return 0


# --------------------------------------------------------------------------------------------
# low-dose enhancement (cold diffusion): train-low-dose, low-dose
# --------------------------------------------------------------------------------------------

#: Loop defaults of `enhance train-low-dose` (only the small adjust nets and output head train).
LOW_DOSE_LOOP_DEFAULTS = dict(batch_size=8, lr=5e-4, warmup=100, checkpoint_every=200, epochs=20.0, log_every=10)


def _add_pair_options(parser: argparse.ArgumentParser, first: str, second: str, kinds: tuple[str, str]) -> None:
    parser.add_argument(f"--{first}", action="append", default=[], metavar="PATH",
                        help=f"{kinds[0]} volume, or a folder of them (repeat; paired in order with --{second}; "
                             "folders are paired by file name)")
    parser.add_argument(f"--{second}", action="append", default=[], metavar="PATH",
                        help=f"{kinds[1]} volume on the same voxel grid, or a folder of them (repeat)")
    parser.add_argument("--pairs", metavar="CSV",
                        help=f"CSV with columns {first.replace('-', '_')},{second.replace('-', '_')} "
                             "(paths relative to the CSV)")


def _volume_pairs(firsts: list[str], seconds: list[str], table: Optional[str], columns: tuple[str, str],
                  kinds: tuple[str, str]) -> list[tuple[Path, Path]]:
    """(first, second) volume paths from repeated options (files or folders) and a CSV table."""
    from ..errors import LCTfoundError
    from ..training.enhancement import match_folders
    from ..training.tables import read_case_table, table_path

    if len(firsts) != len(seconds):
        raise LCTfoundError(f"{len(firsts)} {kinds[0]} path(s) for {len(seconds)} {kinds[1]} path(s); "
                            "give them in pairs")
    pairs: list[tuple[Path, Path]] = []
    for first, second in strict_zip(firsts, seconds):
        first, second = Path(first), Path(second)
        for path in (first, second):
            if not path.exists():
                raise LCTfoundError(f"{path}: no such file or folder")
        if first.is_dir() != second.is_dir():
            raise LCTfoundError(f"{first} and {second}: pair a volume with a volume, or a folder with a folder")
        pairs.extend(match_folders(first, second, kinds) if first.is_dir() else [(first, second)])
    if table:
        rows = read_case_table(table, columns)
        pairs.extend((table_path(table, row[columns[0]]), table_path(table, row[columns[1]])) for row in rows)
    if not pairs:
        raise LCTfoundError(f"no {kinds[0]}/{kinds[1]} pairs: give --{columns[0].replace('_', '-')} and "
                            f"--{columns[1].replace('_', '-')} or --pairs")
    return pairs


def _training_backbone(args: argparse.Namespace):
    """The --backbone of a training subcommand, on the device the loop will use (as `train finetune`)."""
    from ..devices import resolve_device
    from ..models import load_model, resolve_model

    return load_model(resolve_model(args.backbone), device=resolve_device("cpu" if args.device == "cpu" else "auto"))


def _add_train_low_dose(commands) -> None:
    from ..pipelines.choices import COLD_DIFFUSION_DEFAULT_STEPS as DEFAULT_STEPS
    from ..pipelines.choices import COLD_DIFFUSION_DEFAULT_TIMESTEP_MAX as DEFAULT_TIMESTEP_MAX
    from ..pipelines.choices import COLD_DIFFUSION_DEFAULT_WINDOW as DEFAULT_WINDOW
    from ..pipelines.choices import DEFAULT_INCIDENT_PHOTONS, DEFAULT_VIEWS, LOSSES
    from .train import add_loop_arguments

    parser = commands.add_parser(
        "train-low-dose", help="train a cold-diffusion low-dose enhancer on a frozen LCTfound backbone",
        description="Cold diffusion (T steps, x_t = ᾱ_t·x0 + (1-ᾱ_t)·x_LD with ᾱ_t = 1 - t/T) on the frozen "
                    "backbone: only the CoreDiff error-modulation sub-networks and a new output layer train, on "
                    "native-resolution patches with the two neighbouring slices as context. Train from paired "
                    "low/full-dose volumes, or from full-dose volumes alone with --simulate-dose (Poisson noise in "
                    "the projection domain, as `enhance simulate-low-dose`). OUTPUT/model is the task model "
                    "(low-dose-enhancement).")
    _add_pair_options(parser, "low-dose", "full-dose", ("low-dose", "full-dose"))
    parser.add_argument("--simulate-dose", type=open_fraction_float, metavar="FRACTION",
                        help="simulate each --full-dose volume's low-dose partner at this dose fraction (e.g. 0.1)")
    parser.add_argument("--photons", type=positive_float, default=DEFAULT_INCIDENT_PHOTONS,
                        help=f"with --simulate-dose: full-dose photons per detector bin per view "
                             f"(default {DEFAULT_INCIDENT_PHOTONS:g})")
    _add_geometry_options(parser, "fan", DEFAULT_VIEWS)  # with --simulate-dose: match your scanner
    parser.add_argument("--backbone", default="default", help="backbone model name or folder (default: embedded)")
    parser.add_argument("--window", default=DEFAULT_WINDOW,
                        help=f"window mapped to the model's [-1, 1] (default {DEFAULT_WINDOW}; values outside it pass "
                             "through unchanged)")
    parser.add_argument("--patch-size", type=int_type(16, MAX_IMAGE_SIZE, multiple_of=16),
                        help="training patch (and inference tile) size, a multiple of 16 "
                                                       "(default: the backbone's input size)")
    parser.add_argument("--diffusion-steps", type=diffusion_steps_int, default=DEFAULT_STEPS,
                        help=f"cold-diffusion steps T (default {DEFAULT_STEPS})")
    parser.add_argument("--timestep-max", type=int_type(1, MAX_DIFFUSION_STEPS - 1), default=DEFAULT_TIMESTEP_MAX,
                        help=f"backbone DDPM timestep given at t = T (default {DEFAULT_TIMESTEP_MAX})")
    parser.add_argument("--loss", choices=LOSSES, default="mse", help="loss on the x0 estimates (default mse)")
    add_loop_arguments(parser, **LOW_DOSE_LOOP_DEFAULTS)
    parser.set_defaults(func=run_train_low_dose)


def run_train_low_dose(args: argparse.Namespace) -> int:
    from ..errors import LCTfoundError
    from ..io.volume import find_volumes
    from ..progress import command_progress
    from ..training.enhancement import LowDoseEnhancementTask, read_paired_volumes, simulated_pairs
    from ..training.loop import TrainingLoop
    from .train import loop_config_from_args, run_training

    kinds = ("low-dose", "full-dose")
    loop = loop_config_from_args(args)
    if args.simulate_dose is not None:
        if args.low_dose or args.pairs:
            raise LCTfoundError("--simulate-dose makes the low-dose partners; give only --full-dose volumes or folders")
        full_paths = [volume for path in args.full_dose for volume in find_volumes(path)]
        if not full_paths:
            raise LCTfoundError("no full-dose volumes: give --full-dose volumes or folders")
        _check_views(args.views)
        kind = args.geometry or "fan"
        with command_progress(args.events, "simulate low dose", unit="slice") as progress:
            low, full, names = simulated_pairs(full_paths, args.simulate_dose, args.seed, progress,
                                               incident_photons=args.photons, geometry_kind=kind, views=args.views)
        data = {"low_dose": f"simulated at dose fraction {args.simulate_dose:g} (projection-domain Poisson, "
                            f"{args.photons:g} photons per bin at full dose, {kind} beam, {args.views} views)",
                "simulation": {"dose_fraction": args.simulate_dose, "incident_photons": args.photons,
                               "geometry_kind": kind, "views": args.views},
                "full_dose": [str(p) for p in full_paths]}
    else:
        pairs = _volume_pairs(args.low_dose, args.full_dose, args.pairs, ("low_dose", "full_dose"), kinds)
        low, full, names = read_paired_volumes(pairs, kinds)
        data = {"pairs_files": [[str(a), str(b)] for a, b in pairs]}
    backbone = _training_backbone(args)
    task = LowDoseEnhancementTask(backbone, low, full, names, window=args.window, patch_size=args.patch_size,
                                  steps=args.diffusion_steps, timestep_max=args.timestep_max, loss=args.loss,
                                  seed=args.seed, name=args.name or args.register, data=data)
    return run_training(args, "train low-dose enhancer",
                        lambda progress, events: TrainingLoop(loop, task, args.resume, progress, events).run())


def _add_low_dose(commands) -> None:
    from ..pipelines.choices import NLM_H_PER_SIGMA, TV_WEIGHT_PER_SIGMA

    parser = commands.add_parser(
        "low-dose", help="denoise a low-dose CT: TV (default), non-local means or a trained cold-diffusion model",
        description="tv: scikit-image total-variation denoising (Chambolle), slice by slice; nlm: scikit-image "
                    "non-local means (5x5 patches, distance 6, fast mode); cold-diffusion: cold-diffusion sampling "
                    "(x_{t-1} = x_t - D(x0, t) + D(x0, t-1), starting from the input) with a low-dose-enhancement "
                    "task model (--model), with the neighbouring slices as context, on tiles of the training patch "
                    "size. Which wins (benchmarks/RESULTS.md, 10 percent dose, 16 slices of two chest CTs): TV 38.16 dB "
                    "PSNR, NLM 36.88, cold diffusion on the embedded backbone 36.75 (input 32.36), so tv is the "
                    "default; cold diffusion is for a task model fine-tuned on your scanner. Noise-adaptive "
                    "strength unless --strength: each slice's noise sigma (HU) is estimated robustly (median "
                    "absolute Laplacian response, Immerkaer's mask) and TV uses weight = "
                    f"{TV_WEIGHT_PER_SIGMA}*sigma/1000 (50 HU -> 0.08, the benchmark's best), NLM h = "
                    f"{NLM_H_PER_SIGMA}*sigma/1000 (scikit-image's recipe); both act on HU/1000. The values used "
                    "are in the provenance. Slices outside --slices are copied from the input.")
    parser.add_argument("volume", help="low-dose CT volume: DICOM folder, NIfTI, NRRD or MHA")
    parser.add_argument("--method", choices=("tv", "nlm", "cold-diffusion"), default=None,
                        help="tv (default), nlm or cold-diffusion (the default when --model is given)")
    parser.add_argument("--strength", type=non_negative_float, default=None,
                        help="tv: weight, nlm: h, both on HU/1000 (default: noise-adaptive, see above)")
    parser.add_argument("--model", help="cold-diffusion: low-dose-enhancement task model (folder or registered name)")
    parser.add_argument("--backbone", help="backbone model (default: the one the task model names)")
    parser.add_argument("--steps", type=diffusion_steps_int,
                        help="sampling steps, 1..T (default T, as trained; fewer skip levels)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    parser.add_argument("--batch-size", type=batch_int, default=4, help="slices per batch (default 4)")
    _add_output_options(parser, seed=False)
    add_server_options(parser)
    parser.set_defaults(func=run_low_dose)


def _low_dose_method(args: argparse.Namespace) -> str:
    """The method of `enhance low-dose` (cold-diffusion when a --model is given), its options checked."""
    from ..errors import LCTfoundError

    method = args.method or ("cold-diffusion" if args.model else "tv")
    if method != "cold-diffusion":
        if args.model or args.backbone or args.steps is not None:
            raise LCTfoundError(f"--model, --backbone and --steps apply to --method cold-diffusion, not {method}")
    elif not args.model:
        raise LCTfoundError("--method cold-diffusion needs --model, a low-dose-enhancement task model "
                            "(train one with `lctfound enhance train-low-dose`)")
    elif args.strength is not None:
        raise LCTfoundError("--strength applies to --method tv or nlm")
    return method


def run_low_dose(args: argparse.Namespace) -> int:
    method = _low_dose_method(args)
    if args.server:
        from .remote_enhance import run_remote_low_dose

        return run_remote_low_dose(args, method)
    if method != "cold-diffusion":
        return _run_classical_low_dose(args, method)
    from ..features import parse_slices
    from ..io.volume import read_volume, volume_stem
    from ..pipelines.cold_diffusion import ColdDiffusionEnhancer, result_name
    from ..progress import command_progress

    enhancer = ColdDiffusionEnhancer.load(args.model, args.backbone, args.device, batch_size=args.batch_size)
    steps = enhancer.steps if args.steps is None else args.steps
    enhancer.network.schedule.levels(steps)  # a clear error before any work
    name = result_name(volume_stem(args.volume), steps)
    output = _output_path(args, lambda: name)
    volume = read_volume(args.volume, validate=not args.no_validate)
    slices = parse_slices(args.slices, volume.shape[0])
    with command_progress(args.events, "low-dose enhancement", unit="slice") as progress:
        result = enhancer(volume, steps=steps, slices=slices, progress=progress)
    _publish(args, result, output, name)
    return 0


def _run_classical_low_dose(args: argparse.Namespace, method: str) -> int:
    from ..features import parse_slices
    from ..io.volume import read_volume, volume_stem
    from ..pipelines.classical_denoise import denoise_volume, result_name
    from ..progress import command_progress

    name = result_name(volume_stem(args.volume), method)
    output = _output_path(args, lambda: name)
    volume = read_volume(args.volume, validate=not args.no_validate)
    slices = parse_slices(args.slices, volume.shape[0])
    with command_progress(args.events, f"low-dose {method}", unit="slice") as progress:
        result = denoise_volume(volume, method, args.strength, slices=slices, progress=progress)
    _publish(args, result, output, name)
    return 0


# --------------------------------------------------------------------------------------------
# virtual CTA: train-vcta, vcta
# --------------------------------------------------------------------------------------------


def _add_train_vcta(commands) -> None:
    from ..pipelines.choices import DEFAULT_MIN_SNR_GAMMA
    from ..pipelines.choices import VCTA_MODES as MODES
    from .train import FINETUNE_LOOP_DEFAULTS, add_loop_arguments

    parser = commands.add_parser(
        "train-vcta", help="fine-tune LCTfound into a non-contrast → contrast-enhanced (virtual CTA) diffusion model",
        description="Conditional DDPM: the non-contrast slice and its neighbours are extra input channels (conv_in "
                    "widened, new channels initialised to zero so training starts from the pretrained model); "
                    "intensities -200..200 HU mapped to [-1, 1]. Pairs must lie on one voxel grid. OUTPUT/model is "
                    "the task model (vcta).")
    _add_pair_options(parser, "non-contrast", "contrast", ("non-contrast", "contrast-enhanced"))
    parser.add_argument("--backbone", default="default", help="backbone model name or folder (default: embedded)")
    parser.add_argument("--mode", choices=MODES, default="full",
                        help="full: every U-Net weight trains (default); adapter: frozen backbone, widened conv_in "
                             "and residual adapters train")
    parser.add_argument("--resolution", type=int_type(16, MAX_IMAGE_SIZE, multiple_of=16),
                        help="working resolution, a multiple of 16 (default: the backbone's input size)")
    parser.add_argument("--min-snr-gamma", type=non_negative_float, default=DEFAULT_MIN_SNR_GAMMA,
                        help=f"min-SNR-γ loss weights (default {DEFAULT_MIN_SNR_GAMMA:g}; 0 = plain ε-MSE)")
    add_loop_arguments(parser, **FINETUNE_LOOP_DEFAULTS)
    parser.set_defaults(func=run_train_vcta)


def run_train_vcta(args: argparse.Namespace) -> int:
    from ..training.enhancement import VCTATask, read_paired_volumes
    from ..training.loop import TrainingLoop
    from .train import loop_config_from_args, run_training

    kinds = ("non-contrast", "contrast-enhanced")
    loop = loop_config_from_args(args)
    pairs = _volume_pairs(args.non_contrast, args.contrast, args.pairs, ("non_contrast", "contrast"), kinds)
    non_contrast, contrast, names = read_paired_volumes(pairs, kinds)
    backbone = _training_backbone(args)
    task = VCTATask(backbone, non_contrast, contrast, names, mode=args.mode, resolution=args.resolution,
                    min_snr_gamma=args.min_snr_gamma or None, seed=args.seed, name=args.name or args.register,
                    data={"pairs_files": [[str(a), str(b)] for a, b in pairs]})
    return run_training(args, "train virtual CTA",
                        lambda progress, events: TrainingLoop(loop, task, args.resume, progress, events).run())


def _add_vcta(commands) -> None:
    parser = commands.add_parser(
        "vcta", help="virtual CT angiography: a contrast-enhanced volume from a non-contrast CT",
        description="DDIM sampling of a vcta task model conditioned on each non-contrast slice and its neighbours "
                    "(every slice starts from the same seeded noise). The result is the input plus the predicted "
                    "enhancement in -200..200 HU; values outside that window and detail finer than the model's "
                    "resolution come from the input. Slices outside --slices are copied from the input.")
    parser.add_argument("volume", help="non-contrast CT volume: DICOM folder, NIfTI, NRRD or MHA")
    parser.add_argument("--model", required=True, help="vcta task model (folder or registered name)")
    parser.add_argument("--backbone", help="backbone model for adapter models (default: the one the model names)")
    parser.add_argument("--steps", type=diffusion_steps_int, default=50, help="DDIM steps (default 50)")
    parser.add_argument("--eta", type=fraction_float, default=0.0, help="DDIM eta, 0..1 (default 0: deterministic)")
    parser.add_argument("--strength", type=float_type(above=0, maximum=1), default=1.0,
                        help="1: start from noise (default); s<1: start from the non-contrast slice noised to s")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    parser.add_argument("--batch-size", type=batch_int, default=4, help="slices per batch (default 4)")
    _add_output_options(parser)
    add_server_options(parser)
    parser.set_defaults(func=run_vcta)


def run_vcta(args: argparse.Namespace) -> int:
    if args.server:
        from .remote_enhance import run_remote_vcta

        return run_remote_vcta(args)
    from ..errors import LCTfoundError
    from ..features import parse_slices
    from ..io.volume import read_volume, volume_stem
    from ..pipelines.vcta import VCTAPipeline, result_name
    from ..progress import command_progress

    if args.steps < 1 or not 0 <= args.eta <= 1 or not 0 < args.strength <= 1:
        raise LCTfoundError("--steps must be at least 1, --eta in 0..1 and --strength in (0, 1]")
    pipeline = VCTAPipeline.load(args.model, args.backbone, args.device, batch_size=args.batch_size)
    name = result_name(volume_stem(args.volume), args.steps, args.seed, args.strength)
    output = _output_path(args, lambda: name)
    volume = read_volume(args.volume, validate=not args.no_validate)
    slices = parse_slices(args.slices, volume.shape[0])
    with command_progress(args.events, "virtual CTA", unit="step") as progress:
        result = pipeline(volume, steps=args.steps, seed=args.seed, eta=args.eta, strength=args.strength,
                          slices=slices, progress=progress)
    _publish(args, result, output, name)
    return 0


#: The ``enhance`` subcommands, in the order ``--help`` lists them.
SUBCOMMANDS = (_add_simulate_low_dose, _add_sparse_view, _add_super_resolution, _add_train_low_dose, _add_low_dose,
               _add_train_vcta, _add_vcta)


# --------------------------------------------------------------------------------------------
# Shared output handling
# --------------------------------------------------------------------------------------------


def _check_views(views: int) -> None:
    from ..errors import LCTfoundError

    if views < 1:
        raise LCTfoundError(f"the number of views must be at least 1, got {views}")


def _inputs(args: argparse.Namespace) -> list:
    """Every file or folder the command reads (volume, sinogram, model folders)."""
    from . import given_paths

    return given_paths(*(getattr(args, key, None) for key in ("volume", "sinogram", "model", "backbone")))


def _output_path(args: argparse.Namespace, default_name) -> Path:
    """The output volume file, checked before any work (`check_new_output`): a file name, or a folder +
    ``default_name()``.nrrd."""
    from ..io.provenance import check_new_output

    path = Path(args.output).expanduser()
    if path.is_dir():
        path = path / f"{default_name()}.nrrd"
    return check_new_output(path, args.overwrite, inputs=_inputs(args))


def _say(args: argparse.Namespace, text: str) -> None:
    print(text, file=sys.stderr if args.events else sys.stdout)


def _publish(args: argparse.Namespace, result, output: Path, name: str) -> None:
    """Write the result volume, then its provenance ``OUT.json`` (each atomically), and report them."""
    from ..io.provenance import write_volume_with_provenance
    from ..progress import print_event

    result.metadata = {**result.metadata, "name": name, "output": str(output)}
    side = write_volume_with_provenance(result, output)
    seconds = result.metadata.get("seconds_per_slice")
    timing = f"; {seconds:.2f} s per slice (median)" if seconds is not None else ""
    _say(args, f"wrote {output} ({result.metadata['task']}){timing}; provenance in {side}")
    if args.events:
        print_event({"event": "result", "task": result.metadata["task"], "output": str(output), "provenance": str(side),
                     "name": name, "seconds_per_slice": seconds})
