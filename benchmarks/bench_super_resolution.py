"""Zero-shot ×4 in-plane super-resolution on the real sample CTs (issue 6): DDNM with the embedded
model versus bicubic and cubic B-spline interpolation.

Protocol
--------
Data: the ``--slices`` (8) central slices of each sample CT (``lung1``: slices 20–27 of 48;
``lung2``: 26–33 of 61), 512×512 HU.

Ground truth at the model's scale: each 512² slice is reduced to 128² by exact 4×4 area
averaging (the operator A itself), i.e. 2.3–2.5 mm pixels — the scale the embedded model was
trained at (whole slices resized to 128²). No crop.

Low resolution: ``y = A₄(x)``, 4×4 area averaging of the 128² truth → 32² (9–10 mm pixels),
noise-free.

Caveat: the embedded model was pretrained (2,000 steps, unlabelled) on every slice of these two
CTs at 128², so the test slices are training images. ``--data unseen`` runs the same protocol on
the one real CT slice at hand that no LCTfound model saw: pydicom's ``CT_small.dcm`` (128², a
crop around the spine at 0.66 mm pixels — also a scale the model never saw); one slice, no test.
The defaults compared (η = 0.85, the ``official`` intensity mapping) were chosen after trying
η ∈ {0, 0.85} and both mappings on 4 of the 16 sample slices.

Methods (all produce 128²):

* ``DDNM`` — `SuperResolutionPipeline` with the embedded model (cpu-tiny, 128² input, so a
  single tile, no tiling), lung window prompt, the default ``official`` intensity mapping (each
  slice's window-clipped range ↔ [−1, 1], as in training), DDIM schedule ``--steps`` (50),
  η = 0.85 (the DDNM default), seed 0; ``A(x̂) = y`` holds exactly;
* ``DDNM (fixed mapping)`` — the same with the ``fixed`` mapping (lung window ↔ [−1, 1]);
* ``bicubic`` — Keys cubic convolution, a = −0.5 (PIL BICUBIC on float32);
* ``B-spline`` — interpolating cubic B-spline (``scipy.ndimage.zoom`` order 3, prefilter);
* ``bicubic + projection`` (ablation) — bicubic followed by one null-space projection
  ``x + A⁺(y − A x)``: data consistency without the model, to separate the model's prior from
  the consistency DDNM enforces.

Metrics, per slice, with `lctfound.metrics.image.slice_metrics` over the lung window
[−1250, 250] (the range the model sees; data range 1500 HU): PSNR (dB), SSIM (Gaussian window
σ = 1.5) and VIF-P on the clipped images, RMSE (HU) on the unclipped ones. Without that module
the script falls back to scikit-image with the same definitions (stated in the output). Paired two-sided Wilcoxon
signed-rank tests (scipy) compare DDNM with each baseline over the 16 slices.

Time per slice: wall-clock of the method over all slices / number of slices (DDNM runs
``--batch`` slices together), with ``--threads`` torch threads (1 by default: on the shared
2-core machine two OpenMP threads oversubscribe). The load average is recorded before and after.

    python benchmarks/bench_super_resolution.py --json benchmarks/results.jsonl
    python benchmarks/bench_super_resolution.py --data unseen --json benchmarks/results.jsonl
    python benchmarks/bench_super_resolution.py --steps 5 --slices 2      # smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from lctfound.io.sample_data import fetch_sample  # noqa: E402
from lctfound.io.volume import read_volume  # noqa: E402
from lctfound.models import load_model, resolve_model  # noqa: E402
from lctfound.pipelines.super_resolution import (  # noqa: E402
    DEFAULT_ETA,
    BlockAverage,
    SuperResolutionPipeline,
    interpolate,
)
from lctfound.windows import get_window  # noqa: E402

FACTOR = 4
MODEL_REDUCTION = 4  # 512² → 128²
WINDOW = "lung"


def git_commit() -> str:
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "lctfound", "benchmarks"], cwd=ROOT,
                               capture_output=True, text=True, check=True).stdout.strip()
        return commit + ("+uncommitted" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "unknown"


def central(count: int, wanted: int) -> list[int]:
    start = max(0, (count - wanted) // 2)
    return list(range(start, min(count, start + wanted)))


def image_metrics():
    """(source, function(truth, estimate) -> dict): `lctfound.metrics.image.slice_metrics` over the lung
    window when that module exists, else scikit-image with the same range and definitions."""
    window = get_window(WINDOW)
    hu_range = (window.low, window.high)
    try:
        from lctfound.metrics.image import slice_metrics
    except ImportError:
        slice_metrics = None
    if slice_metrics is not None:
        def measure(truth, estimate):
            values = slice_metrics(estimate, truth, hu_range)
            return {"psnr": values["psnr"], "ssim": values["ssim"], "rmse": values["rmse_hu"], "vif": values["vif"]}
        return "lctfound.metrics.image.slice_metrics", measure

    from skimage.metrics import structural_similarity

    def measure(truth, estimate):
        t, e = np.clip(truth, *hu_range), np.clip(estimate, *hu_range)
        mse = float(np.mean((t - e) ** 2))
        return {"psnr": 10 * np.log10(window.width ** 2 / mse),
                "ssim": float(structural_similarity(t, e, data_range=window.width, gaussian_weights=True, sigma=1.5,
                                                    use_sample_covariance=False)),
                "rmse": float(np.sqrt(np.mean((truth - estimate) ** 2))), "vif": float("nan")}
    return "skimage.metrics (Gaussian SSIM, σ 1.5)", measure


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--data", choices=["sample", "unseen"], default="sample",
                        help="sample: central slices of lung1 + lung2 (the embedded model was trained on these CTs); "
                             "unseen: pydicom's CT_small.dcm, one 128² slice no LCTfound model was trained on")
    parser.add_argument("--slices", type=int, default=8, help="central slices per sample CT (default 8)")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--eta", type=float, default=DEFAULT_ETA)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch", type=int, default=4, help="slices restored together by DDNM")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", help="append one JSON line per method to this file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load_before = loadavg()

    truths, cases = [], []
    if args.data == "sample":
        sample = fetch_sample()
        reduce = BlockAverage(MODEL_REDUCTION)
        for name in ("lung1", "lung2"):
            volume = read_volume(sample.image(name))
            indices = central(volume.shape[0], args.slices)
            hu = torch.from_numpy(np.asarray(volume.array[indices], dtype=np.float64))
            truths.append(reduce(hu).numpy())  # 128², exact area average
            cases += [f"{name}:{i}" for i in indices]
    else:  # one slice the embedded model never saw
        import pydicom
        from pydicom.data import get_testdata_file

        dataset = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
        hu = dataset.pixel_array * float(dataset.RescaleSlope) + float(dataset.RescaleIntercept)
        truths.append(np.asarray(hu, dtype=np.float64)[None])
        cases.append("pydicom:CT_small.dcm")
    truth = np.concatenate(truths)
    operator = BlockAverage(FACTOR)
    low = operator(torch.from_numpy(truth)).numpy()  # 32²
    print(f"{len(cases)} slices, truth {truth.shape[1:]}, low resolution {low.shape[1:]}", flush=True)

    model = load_model(resolve_model(args.model))
    def ddnm(intensity):
        pipeline = SuperResolutionPipeline(model, window=WINDOW, batch_size=args.batch, intensity=intensity)
        return lambda: pipeline(low, FACTOR, "in-plane", steps=args.steps, eta=args.eta, seed=args.seed)

    def bicubic_projected():
        estimate = interpolate(low, FACTOR, "in-plane", "bicubic").astype(np.float64)
        return operator.project(torch.from_numpy(estimate), torch.from_numpy(low)).numpy()

    methods = {
        "DDNM": ddnm("official"),
        "DDNM (fixed mapping)": ddnm("fixed"),
        "bicubic": lambda: interpolate(low, FACTOR, "in-plane", "bicubic"),
        "B-spline": lambda: interpolate(low, FACTOR, "in-plane", "bspline"),
        "bicubic + projection": bicubic_projected,
    }
    metric_source, measure = image_metrics()
    results: dict[str, dict] = {}
    for method, run in methods.items():
        start = time.perf_counter()
        estimate = np.asarray(run(), dtype=np.float64)
        seconds = time.perf_counter() - start
        consistency = float(np.abs(operator(torch.from_numpy(estimate)).numpy() - low).max())
        per_slice = [measure(truth[s], estimate[s]) for s in range(len(cases))]
        results[method] = {"seconds_per_slice": seconds / len(cases), "max_consistency_error_hu": consistency,
                           "per_slice": per_slice}
        medians = {k: statistics.median(m[k] for m in per_slice) for k in per_slice[0]}
        results[method]["median"] = medians
        print(f"{method}: PSNR {medians['psnr']:.2f} dB, SSIM {medians['ssim']:.4f}, RMSE {medians['rmse']:.1f} HU, "
              f"VIF {medians['vif']:.3f}, {seconds / len(cases):.3f} s/slice, "
              f"max |A(x̂) − y| {consistency:.2g} HU", flush=True)

    from scipy.stats import wilcoxon

    tests = {}
    for other in ("bicubic", "B-spline", "bicubic + projection", "DDNM (fixed mapping)") if len(cases) > 1 else ():
        tests[other] = {}
        for key in ("psnr", "ssim", "rmse"):
            a = np.array([m[key] for m in results["DDNM"]["per_slice"]])
            b = np.array([m[key] for m in results[other]["per_slice"]])
            difference = a - b
            p = float(wilcoxon(a, b).pvalue) if np.any(difference != 0) else 1.0
            better = difference < 0 if key == "rmse" else difference > 0
            tests[other][key] = {"median_difference": float(np.median(difference)), "p": p,
                                 "ddnm_better": int(np.sum(better)), "n": len(difference)}
    load_after = loadavg()

    command = "python benchmarks/bench_super_resolution.py " + " ".join(sys.argv[1:])
    what = (f"{len(cases)} central slices of lung1 + lung2 (512² → 128² truth by 4×4 area averaging → 32² input)"
            if args.data == "sample" else "pydicom CT_small.dcm (128² truth, 0.66 mm pixels, unseen → 32² input)")
    lines = [f"×4 in-plane super-resolution, {what}; `{command.strip()}`; 2-core CPU ({args.threads} thread(s), "
             f"shared machine; load average {load_before} before, {load_after} after); {time.strftime('%Y-%m-%d')}; "
             f"commit {git_commit()}; metrics: {metric_source}; PSNR, SSIM and VIF on HU clipped to the lung window "
             "[−1250, 250] (data range 1500 HU), RMSE on unclipped HU.", "",
             "| method | PSNR dB | SSIM | RMSE HU | VIF | s/slice | max abs(A(x̂) − y) HU |",
             "|---|---|---|---|---|---|---|"]
    for method, result in results.items():
        m = result["median"]
        lines.append(f"| {method} | {m['psnr']:.2f} | {m['ssim']:.4f} | {m['rmse']:.1f} | {m['vif']:.3f} | "
                     f"{result['seconds_per_slice']:.3f} | {result['max_consistency_error_hu']:.2g} |")
    if tests:
        lines += ["", "Medians over slices. Paired Wilcoxon signed-rank (two-sided), DDNM − baseline:", "",
                  "| baseline | ΔPSNR dB (p) | ΔSSIM (p) | ΔRMSE HU (p) | slices with DDNM better (PSNR/SSIM/RMSE) |",
                  "|---|---|---|---|---|"]
        for other, t in tests.items():
            lines.append(f"| {other} | {t['psnr']['median_difference']:+.2f} ({t['psnr']['p']:.2g}) | "
                         f"{t['ssim']['median_difference']:+.4f} ({t['ssim']['p']:.2g}) | "
                         f"{t['rmse']['median_difference']:+.1f} ({t['rmse']['p']:.2g}) | "
                         f"{t['psnr']['ddnm_better']}/{t['ssim']['ddnm_better']}/{t['rmse']['ddnm_better']} of "
                         f"{t['psnr']['n']} |")
    print("\n".join(lines), flush=True)
    if args.json:
        common = {"what": "super-resolution", "machine": "2-core CPU", "threads": args.threads,
                  "date": time.strftime("%Y-%m-%d"), "git_commit": git_commit(), "command": command.strip(),
                  "loadavg_before": load_before, "loadavg_after": load_after, "metrics": metric_source,
                  "settings": {"data": args.data, "factor": FACTOR, "axis": "in-plane", "slices": cases,
                               "steps": args.steps, "eta": args.eta, "seed": args.seed, "window": WINDOW,
                               "model": args.model,
                               "truth": "512² → 128² by 4×4 area averaging" if args.data == "sample"
                               else "CT_small.dcm as is (128²)", "input": "32² = A4(truth)",
                               "torch_threads": args.threads, "cpu_count": os.cpu_count()}}
        with open(args.json, "a") as handle:
            for method, result in results.items():
                row = {"method": method, "median": result["median"], "seconds_per_slice": result["seconds_per_slice"],
                       "max_consistency_error_hu": result["max_consistency_error_hu"],
                       "per_slice": result["per_slice"], "wilcoxon_vs": tests if method == "DDNM" else None}
                handle.write(json.dumps({**common, "result": row}) + "\n")


if __name__ == "__main__":
    main()
