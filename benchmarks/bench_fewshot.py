"""Few-shot lesion segmentation on the two real sample CTs (issue 4): LCTfound features + pixel MLP
versus a MONAI UNet trained from scratch versus the same pixel MLP on raw intensities.

Protocol
--------
Data: the sample CTs ``lung1`` (512×512×48, lesion on slices 32–34) and ``lung2`` (512×512×61,
lesion on slices 15–25); label 1 = lesion, 0 = background.

Labelled slices: for k = 1, 2, 3 an annotator fully labels k lesion slices (lesion and
background on the whole slice); every other slice is unlabelled (−1). The k slices are chosen
from the lesion's slice range [a, b] (n = b − a + 1 slices):

* if the range has at most ``--repeats`` k-subsets, all of them (lung1: k = 1 → {32}, {33},
  {34}; k = 2 → {32, 33}, {32, 34}, {33, 34});
* otherwise the evenly spread set — the centres of k equal parts of the range,
  ``a + round((i + ½)·n/k − ½)`` — and that set shifted by −1 and +1 slice (lung2: k = 1 →
  {19}, {20}, {21}; k = 2 → {16, 22}, {17, 23}, {18, 24}; k = 3 → {15, 19, 23}, {16, 20, 24},
  {17, 21, 25}).
* k = n leaves no held-out lesion slice, so lung1 is reported for k = 1, 2 only.

Choice number r (0, 1, 2) trains every method with seed r, so the reported range covers both
the slice choice and the training seed; the median and [min–max] over the choices are reported.

Methods (all see the same k slices and labels, the same window, the same seed):

* ``LCTfound + MLP`` — `FewShotSegmenter` with the embedded default backbone (cpu-tiny, 128²
  input), its default recipe: features of timesteps 0/50/100/150 × up blocks 1–4 (832 channels)
  on a 128² grid, `PixelMLPHead`, 30 epochs, CE + focal, AdamW 1e-3 with cosine decay, at most
  20,000 pixels per class per slice; logits upsampled bilinearly to 512².
* ``raw 5×5 + MLP`` — `IntensityPatchSegmenter`: the same head, training and grid, on the
  windowed intensity of each grid pixel's 5×5 neighbourhood (25 values: the backbone's own
  input — per-slice official normalisation to [−1, 1] — resized to 128², replicate-padded).
* ``MONAI UNet`` — `monai.networks.nets.UNet` (2D, channels 16/32/64/128/256, strides 2,
  2 residual units, instance norm) from scratch on the same slices windowed and normalised the
  same way (1 channel, [−1, 1]) at ``--unet-size`` (256²: twice the LCTfound model's 128²
  input, so the baseline is not starved of resolution). Each step is a batch of ``--unet-batch``
  crops of ``--unet-crop``² drawn by `RandCropByPosNegLabeld` (lesion : background centres
  1 : 1) from the labelled slices, then `RandFlipd` on both axes (p = ½ each) and `RandAffined`
  (p = ½, rotation ±15°, scale ±10 %); DiceCE loss, Adam 1e-3 with cosine decay, a fixed
  budget of ``--unet-steps`` steps (200 by default, chosen for the shared 2-core CPU).
  Prediction: whole 256² slices, logits upsampled bilinearly to 512².

The UNet runs in the first ``--windows`` entry (mediastinal); the two MLP methods in every
window given (``--windows mediastinal lung`` adds the lung window; the default is mediastinal only,
to keep the full run near 25 min on the shared CPU). Every method is built right after
``torch.manual_seed(seed)``, so each run is reproducible on its own.

Evaluation, per run (the annotated slices are kept as painted — the tool shows the annotator's
own labels there — and never scored):

* ``Dice held-out volume``: 3D Dice of lesion over every slice that was not labelled (the
  whole volume minus the k slices), so false positives anywhere in the scan count;
* ``Dice near lesion``: 3D Dice over the slices within ±2 of a held-out lesion slice (minus
  the labelled ones).

Dice is `lctfound.metrics.segmentation.dice` (MONAI's `compute_dice`) on the binary masks.
Post-processing: none (the main table), and ``largest`` (largest 3D connected component of the
prediction with the painted slices in place, `lctfound.pipelines.segmentation.postprocess_labels`)
as extra rows.

Times (``--threads``, 1 by default): ``train s`` = fitting (the MLP head on cached features / the
UNet), ``predict s`` = labelling the whole volume. LCTfound's feature extraction for the whole volume
is done once per volume and window before the runs (the annotator pays it once; every retrain
and prediction reuses the cache); it is reported separately as ``features s``. Features are
cached in a fresh temporary folder (``--workdir``) so that time is always measured.

Caveat: the embedded backbone is a tiny model pretrained 2,000 steps on exactly these two CTs
(unlabelled), so its features have seen the test volumes; it has never seen a label.

    python benchmarks/bench_fewshot.py --table benchmarks/fewshot_table.md --json benchmarks/results.jsonl
    python benchmarks/bench_fewshot.py --quick          # smoke run: lung1, k = 1, one choice, tiny budgets
"""

from __future__ import annotations

import argparse
import itertools
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from lctfound.io.sample_data import load_sample
from lctfound.metrics.segmentation import dice
from lctfound.models import load_model, resolve_model
from lctfound.pipelines.baselines import IntensityPatchSegmenter
from lctfound.pipelines.segmentation import (
    UNLABELLED,
    FeatureCache,
    FewShotConfig,
    FewShotSegmenter,
    postprocess_labels,
)
from lctfound.preprocessing import prepare_slices, resize_labels

ROOT = Path(__file__).resolve().parents[1]
NEAR = 2  # "near lesion": held-out lesion slices ± this many slices
POSTPROCESSING = ("none", "largest")


# ---------------------------------------------------------------------------------- protocol
def labelled_choices(first: int, last: int, k: int, repeats: int) -> list[tuple[int, ...]]:
    """The labelled-slice sets for k slices of the lesion range [first, last] (module docstring)."""
    n = last - first + 1
    if k >= n:
        return []  # no held-out lesion slice would be left
    subsets = list(itertools.combinations(range(first, last + 1), k))
    if len(subsets) <= repeats:
        return subsets
    base = [first + int(round((i + 0.5) * n / k - 0.5)) for i in range(k)]
    shifts = sorted(range(-(repeats // 2), repeats - repeats // 2), key=abs)[:repeats]
    choices = []
    for shift in sorted(shifts):
        chosen = tuple(min(last, max(first, s + shift)) for s in base)
        if len(set(chosen)) == k and chosen not in choices:
            choices.append(chosen)
    return choices


def evaluate(prediction: np.ndarray, truth: np.ndarray, labelled: tuple[int, ...]) -> dict[str, dict[str, float]]:
    """Held-out-volume and near-lesion Dice, without and with largest-component post-processing."""
    slices = truth.shape[0]
    held_out = [s for s in range(slices) if s not in labelled]
    lesion_held_out = [s for s in held_out if truth[s].any()]
    near = sorted({s for h in lesion_held_out for s in range(h - NEAR, h + NEAR + 1)
                   if 0 <= s < slices and s not in labelled})
    shown = prediction.copy()
    shown[list(labelled)] = truth[list(labelled)]  # the painted slices as the annotator left them
    out = {}
    for post in POSTPROCESSING:
        mask = (postprocess_labels(shown.astype(np.uint8), ["largest"]) if post == "largest" else shown) == 1
        out[post] = {"heldout": dice(mask[held_out], truth[held_out] == 1),
                     "near": dice(mask[near], truth[near] == 1),
                     "predicted_voxels": int(mask[held_out].sum()), "true_voxels": int((truth[held_out] == 1).sum())}
    return out


# ---------------------------------------------------------------------------------- methods
def seeded(seed: int, factory: Callable, *args):
    """Build with the global torch RNG seeded: the MLP head's initial weights are drawn at construction
    (before `fit` seeds its own training), so without this they would depend on what ran before."""
    torch.manual_seed(seed)
    return factory(*args)


def run_mlp(segmenter, volume: np.ndarray, labels: np.ndarray, cache: Path) -> tuple[np.ndarray, float, float]:
    start = time.perf_counter()
    segmenter.fit(volume, labels, cache_root=cache)
    trained = time.perf_counter()
    prediction = segmenter(volume, cache_root=cache)
    return prediction, trained - start, time.perf_counter() - trained


def unet_inputs(hu: np.ndarray, window: str, size: int) -> torch.Tensor:
    """HU slices → (B, 1, size, size) in [−1, 1], the normalisation the backbone sees."""
    return prepare_slices(hu, window, size)[:, :1].contiguous()


def run_unet(volume: np.ndarray, labels: np.ndarray, labelled: tuple[int, ...], window: str, seed: int,
             args) -> tuple[np.ndarray, float, float, float]:
    from monai.losses import DiceCELoss
    from monai.networks.nets import UNet
    from monai.transforms import Compose, RandAffined, RandCropByPosNegLabeld, RandFlipd

    start = time.perf_counter()
    torch.manual_seed(seed)
    images = unet_inputs(volume[list(labelled)], window, args.unet_size)
    targets = resize_labels(torch.as_tensor(labels[list(labelled)], dtype=torch.long), args.unet_size)[:, None]
    crop = Compose([
        RandCropByPosNegLabeld(["image", "label"], "label", (args.unet_crop,) * 2, pos=1, neg=1, num_samples=1),
        RandFlipd(["image", "label"], prob=0.5, spatial_axis=0),
        RandFlipd(["image", "label"], prob=0.5, spatial_axis=1),
        RandAffined(["image", "label"], prob=0.5, rotate_range=(np.pi / 12,), scale_range=(0.1, 0.1),
                    mode=("bilinear", "nearest"), padding_mode="border"),
    ])
    crop.set_random_state(seed=seed)
    net = UNet(spatial_dims=2, in_channels=1, out_channels=2, channels=(16, 32, 64, 128, 256),
               strides=(2, 2, 2, 2), num_res_units=2)
    loss_function = DiceCELoss(to_onehot_y=True, softmax=True)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, args.unet_steps)
    order = np.random.default_rng(seed)
    net.train()
    loss = torch.zeros(())
    for _ in range(args.unet_steps):
        picks = order.integers(0, len(labelled), args.unet_batch)
        samples = [crop({"image": images[i], "label": targets[i]})[0] for i in picks]
        x = torch.stack([torch.as_tensor(s["image"]) for s in samples])
        y = torch.stack([torch.as_tensor(s["label"]) for s in samples]).round().long()
        loss = loss_function(net(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    trained = time.perf_counter()
    net.eval()
    prediction = np.zeros(volume.shape, dtype=np.uint8)
    with torch.no_grad():
        for first in range(0, volume.shape[0], 8):
            batch = slice(first, min(first + 8, volume.shape[0]))
            logits = net(unet_inputs(volume[batch], window, args.unet_size))
            logits = F.interpolate(logits, size=volume.shape[1:], mode="bilinear", align_corners=False)
            prediction[batch] = logits.argmax(1).numpy().astype(np.uint8)
    return prediction, trained - start, time.perf_counter() - trained, float(loss.detach())


# ---------------------------------------------------------------------------------- reporting
def git_commit() -> str:
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "lctfound", "benchmarks"], cwd=ROOT,
                               capture_output=True, text=True, check=True).stdout.strip()
        return commit + ("+uncommitted" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def span(values: list[float], digits: int = 3) -> str:
    return f"{statistics.median(values):.{digits}f} [{min(values):.{digits}f}–{max(values):.{digits}f}]"


def aggregate(runs: list[dict]) -> list[dict]:
    rows: dict[tuple, dict] = {}
    for run in runs:
        key = (run["volume"], run["k"], run["method"])
        row = rows.setdefault(key, {"volume": run["volume"], "k": run["k"], "method": run["method"], "runs": []})
        row["runs"].append(run)
    out = []
    for row in rows.values():
        runs_ = row.pop("runs")
        for post in POSTPROCESSING:
            row[post] = {metric: {"median": statistics.median(r["dice"][post][metric] for r in runs_),
                                  "min": min(r["dice"][post][metric] for r in runs_),
                                  "max": max(r["dice"][post][metric] for r in runs_)}
                         for metric in ("heldout", "near")}
        row["per_choice"] = [{key: r[key] for key in ("labelled", "seed", "dice", "train_s", "predict_s")}
                             for r in runs_]
        row["train_s"] = statistics.median(r["train_s"] for r in runs_)
        row["predict_s"] = statistics.median(r["predict_s"] for r in runs_)
        out.append(row)
    return out


def markdown(rows: list[dict], features: dict, header: str) -> str:
    lines = [header, ""]
    for post, title in (("none", "No post-processing"), ("largest", "Post-processing: largest 3D connected component")):
        lines += [f"### {title}", "",
                  "| volume | k | method | Dice held-out volume, median [min–max] | Dice near lesion (±2 slices) "
                  "| train s | predict s |",
                  "| --- | ---: | --- | ---: | ---: | ---: | ---: |"]
        for row in rows:
            held, near = row[post]["heldout"], row[post]["near"]
            lines.append(f"| {row['volume']} | {row['k']} | {row['method']} | "
                         f"{held['median']:.3f} [{held['min']:.3f}–{held['max']:.3f}] | "
                         f"{near['median']:.3f} [{near['min']:.3f}–{near['max']:.3f}] | "
                         f"{row['train_s']:.1f} | {row['predict_s']:.1f} |")
        lines.append("")
    lines.append("LCTfound feature extraction, whole volume, once per volume and window (not in the times above): "
                 + "; ".join(f"{name} {seconds:.1f} s" for name, seconds in features.items()) + ".")
    lines += ["", "Best method per volume and k (median Dice held-out volume, no post-processing):", ""]
    for (volume, k), group in itertools.groupby(rows, key=lambda r: (r["volume"], r["k"])):
        best = max(group, key=lambda r: r["none"]["heldout"]["median"])
        lines.append(f"- {volume}, k = {k}: {best['method']} ({best['none']['heldout']['median']:.3f})")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: lung1, k = 1, one choice, mediastinal, 3 MLP epochs, 10 UNet steps")
    parser.add_argument("--volumes", nargs="+", default=["lung1", "lung2"], choices=["lung1", "lung2"])
    parser.add_argument("--shots", nargs="+", type=int, default=[1, 2, 3], help="k values")
    parser.add_argument("--repeats", type=int, default=3, help="labelled-slice choices (and seeds) per volume and k")
    parser.add_argument("--windows", nargs="+", default=["mediastinal"],
                        help="windows of the MLP methods (the UNet uses the first)")
    parser.add_argument("--model", default="default", help="LCTfound backbone (default: the embedded model)")
    parser.add_argument("--epochs", type=int, default=FewShotConfig.epochs, help="MLP head epochs")
    parser.add_argument("--patch", type=int, default=5, help="raw-intensity neighbourhood width")
    parser.add_argument("--unet-steps", type=int, default=200)
    parser.add_argument("--unet-size", type=int, default=256)
    parser.add_argument("--unet-crop", type=int, default=96)
    parser.add_argument("--unet-batch", type=int, default=4)
    parser.add_argument("--methods", nargs="+", default=["lctfound", "raw", "unet"],
                        choices=["lctfound", "raw", "unet"])
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads; 1 by default: on a 2-core machine shared with other jobs, 2 OpenMP "
                             "threads measured 5× slower than 1 (oversubscription)")
    parser.add_argument("--workdir", default=None, help="where the temporary feature cache goes")
    parser.add_argument("--table", help="write the markdown table to this file")
    parser.add_argument("--json", help="append one JSON line per (volume, k, method) to this file")
    args = parser.parse_args()
    if args.quick:
        args.volumes, args.shots, args.repeats, args.windows = ["lung1"], [1], 1, args.windows[:1]
        args.epochs, args.unet_steps = 3, 10
    torch.set_num_threads(args.threads)
    wall = time.perf_counter()

    data = {}
    for name in args.volumes:
        image, label = load_sample(name)
        truth = (label.array == 1).astype(np.uint8)
        lesion = [s for s in range(truth.shape[0]) if truth[s].any()]
        data[name] = (np.asarray(image.array), truth, lesion[0], lesion[-1])
    model = load_model(resolve_model(args.model)) if "lctfound" in args.methods else None

    runs: list[dict] = []
    features: dict[str, float] = {}
    cache = Path(tempfile.mkdtemp(prefix="lctfound-fewshot-", dir=args.workdir))
    try:
        for name, (volume, truth, first, last) in data.items():
            if model is not None:
                for window in args.windows:
                    extractor = FewShotSegmenter(model, {1: "Lesion"}, FewShotConfig(window=window)).extractor
                    start = time.perf_counter()
                    feature_cache = FeatureCache(extractor, volume, cache)
                    for s in range(volume.shape[0]):
                        feature_cache.get([s])
                    features[f"{name} {window}"] = time.perf_counter() - start
                    print(f"{name}: LCTfound features ({window}) of {volume.shape[0]} slices in "
                          f"{features[f'{name} {window}']:.1f} s", flush=True)
            for k in args.shots:
                choices = labelled_choices(first, last, k, args.repeats)
                if not choices:
                    print(f"{name}, k = {k}: skipped (no held-out lesion slice would remain)", flush=True)
                for seed, labelled in enumerate(choices):
                    labels = np.full(volume.shape, UNLABELLED, dtype=np.int16)
                    labels[list(labelled)] = truth[list(labelled)]
                    methods: list[tuple[str, str, object]] = []  # (name, kind, FewShotConfig or window)
                    for window in args.windows:
                        config = FewShotConfig(window=window, epochs=args.epochs, seed=seed)
                        if model is not None:
                            methods.append((f"LCTfound + MLP ({window})", "lctfound", config))
                        if "raw" in args.methods:
                            methods.append((f"raw {args.patch}×{args.patch} + MLP ({window})", "raw", config))
                    if "unet" in args.methods:
                        methods.append((f"MONAI UNet ({args.windows[0]})", "unet", args.windows[0]))
                    for method, kind, setting in methods:
                        extra = {}
                        if kind == "unet":
                            prediction, train_s, predict_s, extra["final_loss"] = run_unet(
                                volume, labels, labelled, setting, seed, args)
                        else:
                            segmenter = (seeded(seed, FewShotSegmenter, model, {1: "Lesion"}, setting)
                                         if kind == "lctfound" else
                                         seeded(seed, IntensityPatchSegmenter, {1: "Lesion"}, setting, args.patch))
                            prediction, train_s, predict_s = run_mlp(segmenter, volume, labels, cache)
                        scores = evaluate(prediction, truth, labelled)
                        runs.append({"volume": name, "k": k, "labelled": list(labelled), "seed": seed,
                                     "method": method, "train_s": train_s, "predict_s": predict_s,
                                     "dice": scores, **extra})
                        print(f"{name} k={k} slices={list(labelled)} {method}: Dice held-out "
                              f"{scores['none']['heldout']:.3f}, near {scores['none']['near']:.3f} "
                              f"(largest: {scores['largest']['heldout']:.3f} / {scores['largest']['near']:.3f}); "
                              f"predicted {scores['none']['predicted_voxels']} lesion voxels held out "
                              f"(truth {scores['none']['true_voxels']}); "
                              f"train {train_s:.1f} s, predict {predict_s:.1f} s", flush=True)
    finally:
        shutil.rmtree(cache, ignore_errors=True)

    total = time.perf_counter() - wall
    rows = aggregate(runs)
    command = "python benchmarks/bench_fewshot.py " + " ".join(sys.argv[1:])
    header = (f"Few-shot lesion segmentation, sample CTs; `{command.strip()}`; 2-core CPU "
              f"({args.threads} thread{'s' if args.threads > 1 else ''}, shared machine); "
              f"{time.strftime('%Y-%m-%d')}; commit {git_commit()}; "
              f"total wall-clock {total / 60:.1f} min.")
    table = markdown(rows, features, header)
    print(table, flush=True)
    if args.table:
        Path(args.table).write_text(table)
    if args.json:
        common = {"what": "fewshot", "machine": "2-core CPU", "threads": args.threads,
                  "date": time.strftime("%Y-%m-%d"),
                  "git_commit": git_commit(), "command": command.strip(),
                  "settings": {"repeats": args.repeats, "mlp_epochs": args.epochs, "patch": args.patch,
                               "unet_steps": args.unet_steps, "unet_size": args.unet_size,
                               "unet_crop": args.unet_crop, "unet_batch": args.unet_batch, "near_slices": NEAR},
                  "features_s": features, "total_s": total}
        with open(args.json, "a") as handle:
            for row in rows:
                handle.write(json.dumps({**common, "result": row}) + "\n")


if __name__ == "__main__":
    main()
