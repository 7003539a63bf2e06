"""Low-dose simulation + denoising baselines, and sparse-view reconstruction, on the sample CTs (issue 6).

Tasks (``--task``, default both):

* ``low-dose`` — the central slices of lung1 and lung2 at full resolution (512², 0.57/0.59 mm)
  simulated at ``--dose`` (default 10 %) with `simulate_low_dose` (fan beam, 720 views, I0 1e5
  photons per bin per view, noise insertion, the input's own noise accounted for, seed 0), then
  denoised by TV (scikit-image `denoise_tv_chambolle`) and non-local means (`denoise_nl_means`,
  patch 5, distance 6). Their parameters (TV weight, NLM h) are chosen on two held-out slices (slice 10 of each
  scan, not evaluated) by mean PSNR. The reference is the full-dose slice (itself noisy). With
  ``--cold-diffusion-steps N`` (or an existing ``--low-dose-model``) the LCTfound cold-diffusion
  enhancer is a fourth method: `lctfound enhance train-low-dose` on the embedded backbone for N
  optimiser steps, on the same scans' slices outside the evaluated block ±2 (``--training-slices``
  on each side; simulated at the same dose by the same code, other noise), then 10 cold-diffusion
  steps on the evaluated slices, their low-dose neighbours as context.
* ``sparse-view`` — the same slices resampled to the model's 128² (anti-aliased, 2.3 mm pixels;
  values below −1000 HU set to −1000, i.e. μ = 0), noise-free parallel-beam sinograms of
  ``--views`` (default 16 and 32), reconstructed by FBP (ramp), TV (50 FISTA-SIRT iterations,
  weight 0.005) and LCTfound-guided diffusion (embedded cpu-tiny model, DDIM ``--steps``, LSQR
  data consistency ``--dc-iterations`` per step, from pure noise; optionally the warm start from
  TV at ``--warm-strength``, with its ablation: the same number of LSQR iterations from the TV
  image without the network).

Metrics: `lctfound.metrics.image.slice_metrics` (PSNR and SSIM over −1000..1000 HU, RMSE in HU,
whole slice); paired tests over slices (`lctfound.metrics.statistics.paired_tests`: Wilcoxon
signed-rank and paired t-test). Time per slice is wall-clock and CPU seconds of this process (the
CPU may be shared: the load average before and after is recorded). ``--json`` appends one JSON
line per task to a results file.

    python benchmarks/bench_enhance.py --threads 1 --json benchmarks/results.jsonl
    python benchmarks/bench_enhance.py --task low-dose --threads 2 --cold-diffusion-steps 300
    python benchmarks/bench_enhance.py --task sparse-view --views 16 --slices 2 --steps 5   # quick
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lctfound.io.sample_data import fetch_sample  # noqa: E402
from lctfound.io.volume import read_volume  # noqa: E402
from lctfound.metrics.image import METRICS, slice_metrics  # noqa: E402
from lctfound.metrics.statistics import paired_tests  # noqa: E402
from lctfound.compat import strict_zip

HU_RANGE = (-1000.0, 1000.0)
HELD_OUT_SLICE = 10
TV_WEIGHTS = (0.02, 0.04, 0.08, 0.16)  # denoise_tv_chambolle weight on HU / 1000
NLM_H = (0.03, 0.045, 0.065, 0.09, 0.13, 0.18)  # denoise_nl_means h on HU / 1000 (30-180 HU)


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def git_commit() -> str:
    root = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=root, capture_output=True, text=True).stdout
        return commit + ("+uncommitted" if dirty.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


class Clock:
    """Wall and CPU seconds of a block."""

    def __enter__(self) -> "Clock":
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc) -> None:
        self.wall = time.perf_counter() - self.wall
        self.cpu = time.process_time() - self.cpu


def central_slices(count: int, per_volume: int) -> list[int]:
    first = count // 2 - per_volume // 2
    return list(range(first, first + per_volume))


def score(images: dict[str, list[np.ndarray]], truth: list[np.ndarray]) -> dict[str, dict[str, np.ndarray]]:
    return {name: {metric: np.array([slice_metrics(image, reference, HU_RANGE)[metric]
                                     for image, reference in strict_zip(stack, truth)])
                   for metric in METRICS}
            for name, stack in images.items()}


def summary_rows(scores, seconds, comparisons, n_resamples=1000):
    rows, tests = {}, []
    for name, values in scores.items():
        rows[name] = {metric: {"median": float(np.median(v)), "mean": float(np.mean(v)),
                               "q1": float(np.percentile(v, 25)), "q3": float(np.percentile(v, 75)),
                               "per_slice": [float(x) for x in v]} for metric, v in values.items()}
        if name in seconds:
            wall, cpu = seconds[name]
            rows[name]["seconds_per_slice"] = {"wall_median": float(np.median(wall)),
                                               "cpu_median": float(np.median(cpu))}
    for first, second in comparisons:
        entry = {"a": first, "b": second}
        for metric in ("psnr", "ssim", "rmse_hu"):
            test = paired_tests(scores[first][metric], scores[second][metric], n_resamples=n_resamples)
            entry[metric] = {"mean_difference": test["mean_difference"], "wilcoxon_p": test["wilcoxon"]["p_value"],
                             "t_test_p": test["t_test"]["p_value"]}
        tests.append(entry)
    return rows, tests


def print_table(title: str, rows, tests) -> None:
    print(f"\n### {title}\n")
    print("| method | PSNR dB median [IQR] | SSIM median [IQR] | RMSE HU median [IQR] | s/slice wall (CPU) |")
    print("|---|---|---|---|---|")
    for name, row in rows.items():
        cells = []
        for metric, digits in (("psnr", 2), ("ssim", 3), ("rmse_hu", 1)):
            m = row[metric]
            cells.append(f"{m['median']:.{digits}f} [{m['q1']:.{digits}f}, {m['q3']:.{digits}f}]")
        timing = row.get("seconds_per_slice")
        cells.append(f"{timing['wall_median']:.2f} ({timing['cpu_median']:.2f})" if timing else "-")
        print(f"| {name} | " + " | ".join(cells) + " |")
    print("\n| comparison (a − b) | ΔPSNR dB (Wilcoxon p) | ΔSSIM (p) | ΔRMSE HU (p) |")
    print("|---|---|---|---|")
    for test in tests:
        cells = [f"{test[m]['mean_difference']:+.{d}f} ({_p(test[m]['wilcoxon_p'])})"
                 for m, d in (("psnr", 2), ("ssim", 3), ("rmse_hu", 1))]
        print(f"| {test['a']} − {test['b']} | " + " | ".join(cells) + " |")


def _p(value) -> str:
    return "n/a" if value is None else ("<0.001" if value < 0.001 else f"{value:.3f}")


# --------------------------------------------------------------------------------------------
# Low dose
# --------------------------------------------------------------------------------------------


def denoise_tv(hu: np.ndarray, weight: float) -> np.ndarray:
    from skimage.restoration import denoise_tv_chambolle

    return denoise_tv_chambolle(hu / 1000.0, weight=weight) * 1000.0


def denoise_nlm(hu: np.ndarray, h: float) -> np.ndarray:
    # h is chosen on held-out slices (skimage's estimate_sigma would need PyWavelets, not installed)
    from skimage.restoration import denoise_nl_means

    return denoise_nl_means(hu / 1000.0, h=h, patch_size=5, patch_distance=6, fast_mode=True) * 1000.0


def train_cold_diffusion(args, volumes, evaluated: dict[str, list[int]]) -> Path:
    """A cold-diffusion task model trained on the slices outside each scan's evaluated block ±2."""
    from lctfound.cli import main as lctfound
    from lctfound.io.volume import write_volume

    workdir = Path(args.workdir)
    data = workdir / "cold-diffusion-data"
    data.mkdir(parents=True, exist_ok=True)
    command = ["enhance", "train-low-dose", "--simulate-dose", str(args.dose), "--max-steps",
               str(args.cold_diffusion_steps), "--batch-size", "4", "--checkpoint-every",
               str(args.cold_diffusion_steps), "--seed", "1", "--device", "cpu"]
    for name, volume in volumes.items():
        first, last = evaluated[name][0] - 2, evaluated[name][-1] + 2
        n = args.training_slices
        below, above = (max(0, first - n), first), (last + 1, min(volume.shape[0], last + 1 + n))
        for start, stop in (below, above):
            if stop - start >= 3:
                path = data / f"{name}_{start}-{stop - 1}.nii.gz"
                if not path.is_file():
                    write_volume(volume.slab(start, stop), path)
                command += ["--full-dose", str(path)]
    run = workdir / f"cold-diffusion-{args.cold_diffusion_steps}-{args.training_slices}"
    if not (run / "model").is_dir():
        with Clock() as clock:
            code = lctfound(command + ["-o", str(run)] + (["--resume"] if run.is_dir() else []))
        if code != 0:
            raise SystemExit(f"training the cold-diffusion model failed ({code})")
        print(f"cold-diffusion model trained in {clock.wall:.0f} s wall, {clock.cpu:.0f} s CPU", flush=True)
    return run / "model"


def run_low_dose(args, volumes) -> dict:
    from lctfound.pipelines.low_dose import simulate_low_dose

    def simulate(volume, indices):
        clock = Clock()
        with clock:
            result = simulate_low_dose(volume, args.dose, slices=indices, seed=0)
        return result.array.astype(np.float32), clock

    evaluated = {name: central_slices(volume.shape[0], args.slices) for name, volume in volumes.items()}
    enhancer, cold = None, "LCTfound cold diffusion"
    if args.cold_diffusion_steps and not args.low_dose_model:
        args.low_dose_model = str(train_cold_diffusion(args, volumes, evaluated))
    if args.low_dose_model:
        from lctfound.pipelines.cold_diffusion import ColdDiffusionEnhancer

        enhancer = ColdDiffusionEnhancer.load(args.low_dose_model, device="cpu")

    # parameter choice on the held-out slices
    held_low, held_truth = [], []
    for volume in volumes.values():
        low, _ = simulate(volume, [HELD_OUT_SLICE])
        held_low.append(low[HELD_OUT_SLICE].astype(np.float64))
        held_truth.append(volume.array[HELD_OUT_SLICE].astype(np.float64))

    def mean_psnr(function, parameter):
        return np.mean([slice_metrics(function(image, parameter), truth, HU_RANGE)["psnr"]
                        for image, truth in strict_zip(held_low, held_truth)])

    tv_weight = max(TV_WEIGHTS, key=lambda w: mean_psnr(denoise_tv, w))
    nlm_h = max(NLM_H, key=lambda h: mean_psnr(denoise_nlm, h))
    print(f"held-out choice: TV weight {tv_weight}, NLM h {nlm_h}")
    images = {"low dose (input)": [], "TV denoised": [], "NLM denoised": []}
    if enhancer is not None:
        images[cold] = []
    seconds = {name: ([], []) for name in images}
    truth, slices = [], []
    for name, volume in volumes.items():
        indices = evaluated[name]
        # the evaluated slices' neighbours too: the cold-diffusion enhancer reads them as context
        context = list(range(max(indices[0] - 1, 0), min(indices[-1] + 2, volume.shape[0])))
        low_volume, clock = simulate(volume, context)
        if enhancer is not None:
            with Clock() as c:
                enhanced = enhancer.enhance_array(low_volume[context[0]:context[-1] + 1],
                                                  slices=[k - context[0] for k in indices])
            for k in indices:
                images[cold].append(enhanced[k - context[0]].astype(np.float64))
                seconds[cold][0].append(c.wall / len(indices))
                seconds[cold][1].append(c.cpu / len(indices))
        for k in indices:
            image = low_volume[k].astype(np.float64)
            slices.append(f"{name}:{k}")
            truth.append(volume.array[k].astype(np.float64))
            images["low dose (input)"].append(image)
            seconds["low dose (input)"][0].append(clock.wall / len(context))
            seconds["low dose (input)"][1].append(clock.cpu / len(context))
            for method, function, parameter in (("TV denoised", denoise_tv, tv_weight),
                                                ("NLM denoised", denoise_nlm, nlm_h)):
                with Clock() as c:
                    images[method].append(function(image, parameter))
                seconds[method][0].append(c.wall)
                seconds[method][1].append(c.cpu)
    scores = score(images, truth)
    comparisons = [("TV denoised", "low dose (input)"), ("NLM denoised", "low dose (input)"),
                   ("NLM denoised", "TV denoised")]
    if enhancer is not None:
        comparisons += [(cold, "low dose (input)"), (cold, "TV denoised"), (cold, "NLM denoised")]
    rows, tests = summary_rows(scores, seconds, comparisons)
    print_table(f"Low dose {args.dose:.0%} vs full dose, {len(truth)} slices at 512² (s/slice of the input row = "
                "simulation)", rows, tests)
    return {"task": "low-dose", "slices": slices, "settings": {
        "dose_fraction": args.dose, "geometry": "fan, 720 views (default)", "incident_photons": 1e5,
        "method": "noise-insertion", "input_noise": True, "seed": 0, "tv_weight": tv_weight,
        "nlm_h": nlm_h, "nlm": "patch 5, distance 6, fast mode, h on HU/1000", "tv_grid": TV_WEIGHTS,
        "nlm_grid": NLM_H,
        "held_out_slices": HELD_OUT_SLICE, "reference": "full-dose slice", "mask": "none (whole slice)",
        "cold_diffusion": None if enhancer is None else {
            "model": args.low_dose_model, "training_steps": args.cold_diffusion_steps, "steps": enhancer.steps,
            "training_slices": f"{args.training_slices} per side outside the evaluated block ±2, simulated at the "
                               "same dose with seeds 1-4 (evaluation: seed 0)"}},
        "results": rows, "tests": tests}


# --------------------------------------------------------------------------------------------
# Sparse view
# --------------------------------------------------------------------------------------------


def run_sparse_view(args, volumes) -> list[dict]:
    from skimage.transform import resize

    from lctfound.pipelines.sparse_view import SparseViewDiffusionPipeline, data_consistency, load_diffusion_model
    from lctfound.tomography import Geometry, Projector, hu_to_mu, mu_to_hu, tv_reconstruction

    model = load_diffusion_model(args.model, "cpu")
    size = model.sample_size
    truth, slices, pixels = [], [], []
    for name, volume in volumes.items():
        for k in central_slices(volume.shape[0], args.slices):
            image = resize(volume.array[k].astype(np.float64), (size, size), anti_aliasing=True, preserve_range=True)
            truth.append(np.maximum(image, -1000.0))
            pixels.append(volume.spacing[0] * volume.shape[2] / size)
            slices.append(f"{name}:{k}")
    records = []
    for views in args.views:
        images = {"FBP": [], "TV": [], "LCTfound diffusion": []}
        warm = f"LCTfound diffusion (TV start, strength {args.warm_strength})"
        # the warm start's data consistency without the network: as many LSQR iterations from the TV image
        lsqr_iterations = math.ceil(args.warm_strength * args.steps) * args.dc_iterations if args.warm_strength else 0
        ablation = f"TV + {lsqr_iterations} LSQR iterations (no network)"
        if args.warm_strength:
            images[warm] = []
            images[ablation] = []
        seconds = {name: ([], []) for name in images}
        for image, pixel in strict_zip(truth, pixels):
            geometry = Geometry.for_image("parallel", views, size, pixel)
            projector = Projector(geometry, size, pixel)
            sinogram = projector.forward(hu_to_mu(image))
            with Clock() as c:
                images["FBP"].append(mu_to_hu(projector.fbp(sinogram)))
            seconds["FBP"][0].append(c.wall), seconds["FBP"][1].append(c.cpu)
            with Clock() as c:
                tv_mu = tv_reconstruction(sinogram, geometry, size, pixel, 50, 0.005, projector)
                images["TV"].append(mu_to_hu(tv_mu))
            seconds["TV"][0].append(c.wall), seconds["TV"][1].append(c.cpu)
            if args.warm_strength:
                with Clock() as c:
                    images[ablation].append(mu_to_hu(data_consistency(projector, tv_mu, sinogram, lsqr_iterations)))
                seconds[ablation][0].append(c.wall), seconds[ablation][1].append(c.cpu)
            variants = [("LCTfound diffusion", 1.0)]
            if args.warm_strength:
                variants.append((warm, args.warm_strength))
            for label, strength in variants:
                pipeline = SparseViewDiffusionPipeline(model, steps=args.steps, strength=strength,
                                                       dc_iterations=args.dc_iterations, batch_size=1)
                with Clock() as c:
                    result, _ = pipeline(sinogram[None], geometry, size, pixel, seed=0)
                images[label].append(result[0])
                seconds[label][0].append(c.wall), seconds[label][1].append(c.cpu)
            print(f"  {views} views: slice {len(images['FBP'])}/{len(truth)} done (load {loadavg()})", flush=True)
        scores = score(images, truth)
        comparisons = [("TV", "FBP"), ("LCTfound diffusion", "FBP"), ("LCTfound diffusion", "TV")]
        if args.warm_strength:
            comparisons += [(warm, "TV"), (warm, ablation), (ablation, "TV")]
        rows, tests = summary_rows(scores, seconds, comparisons)
        print_table(f"Sparse view, {views} parallel views, {len(truth)} slices at {size}² (noise-free)", rows, tests)
        records.append({"task": "sparse-view", "views": views, "slices": slices, "settings": {
            "geometry": "parallel, 180°", "image_size": size, "truth": "slice resized to model size, anti-aliased, "
            "clipped below at -1000 HU", "fbp_filter": "ramp", "tv": "50 iterations, weight 0.005",
            "diffusion": {"model": args.model, "steps": args.steps, "dc_iterations": args.dc_iterations,
                          "strength": 1.0, "warm_strength": args.warm_strength, "eta": 0.0, "window": "lung",
                          "seed": 0}, "mask": "none (whole slice)"},
            "results": rows, "tests": tests})
    return records


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--task", choices=("low-dose", "sparse-view", "all"), default="all")
    parser.add_argument("--slices", type=int, default=8, help="central slices per scan (default 8)")
    parser.add_argument("--dose", type=float, default=0.1)
    parser.add_argument("--views", default="16,32", help="comma list (default 16,32)")
    parser.add_argument("--model", default="default")
    parser.add_argument("--steps", type=int, default=20, help="DDIM steps of the diffusion reconstruction")
    parser.add_argument("--dc-iterations", type=int, default=10)
    parser.add_argument("--warm-strength", type=float, default=None,
                        help="also run the diffusion warm-started from TV at this strength (e.g. 0.3)")
    parser.add_argument("--cold-diffusion-steps", type=int, default=0,
                        help="train the LCTfound cold-diffusion enhancer for this many steps and evaluate it")
    parser.add_argument("--training-slices", type=int, default=8,
                        help="cold-diffusion training slices per side of each scan's evaluated block (default 8)")
    parser.add_argument("--low-dose-model", help="an existing low-dose enhancement model to evaluate instead")
    parser.add_argument("--workdir", default="/tmp/lctfound-bench-enhance", help="training data and runs")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--json", help="append one JSON line per task to this file")
    args = parser.parse_args()
    args.views = [int(v) for v in args.views.split(",") if v.strip()]
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    torch.set_num_threads(args.threads)
    sample = fetch_sample()
    volumes = {name: read_volume(Path(sample.folder) / f"{name}_image.nrrd") for name in ("lung1", "lung2")}
    started = loadavg()
    records = []
    if args.task in ("low-dose", "all"):
        records.append(run_low_dose(args, volumes))
    if args.task in ("sparse-view", "all"):
        records += run_sparse_view(args, volumes)
    finished = loadavg()
    print(f"\nload average before {started}, after {finished}")
    if args.json:
        command = "python benchmarks/bench_enhance.py " + " ".join(sys.argv[1:])
        with open(args.json, "a", encoding="utf-8") as handle:
            for record in records:
                handle.write(json.dumps({"what": f"enhance/{record['task']}", "machine": "2-core CPU",
                                         "threads": args.threads, "date": _dt.date.today().isoformat(),
                                         "git_commit": git_commit(), "command": command, "loadavg_before": started,
                                         "loadavg_after": finished, **record}) + "\n")
        print(f"appended {len(records)} line(s) to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
