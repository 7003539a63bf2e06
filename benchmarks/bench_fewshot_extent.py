"""Few-shot results on the WHOLE volume (issue 15, item 1): Dice over every slice and voxels predicted
outside the structure's extent, before (every slice predicted, no post-processing) and after (the
defaults of `segment predict`: the annotated extent ± 15 mm, then ``connected`` post-processing).

Protocol: the sample CTs lung1/lung2, label 1 = lesion; k labelled slices chosen as in
`bench_fewshot.labelled_choices` (choice r trains with seed r); the embedded model with its default
(fast) recipe; the annotated slices shown as painted (as the panel does), so both scores count every
slice: ``Dice volume`` = 3D Dice over all slices; ``outside`` = voxels labelled lesion on slices with
no lesion in the ground truth; ``predicted`` / ``true`` = lesion voxels in total.

    python benchmarks/bench_fewshot_extent.py --shots 2 --repeats 3

``--intensity`` (issue 15, item 3) instead compares, at the same k and slices, the fast recipe
without and with its intensity channels and the raw 5×5 + MLP baseline
(`lctfound.pipelines.baselines`), scored as `bench_fewshot`'s ``Dice held-out volume`` (every
unlabelled slice, no post-processing) and over every slice after the default extent + connected:

    python benchmarks/bench_fewshot_extent.py --intensity --shots 1 --repeats 1
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_fewshot import labelled_choices  # noqa: E402

from lctfound.io.sample_data import load_sample  # noqa: E402
from lctfound.metrics.segmentation import dice  # noqa: E402
from lctfound.models import load_model, resolve_model  # noqa: E402
from lctfound.pipelines.baselines import IntensityPatchSegmenter  # noqa: E402
from lctfound.pipelines.segmentation import (UNLABELLED, FewShotConfig, FewShotSegmenter,  # noqa: E402
                                             parse_extent_margin, postprocess_labels, prediction_slices)


def scores(prediction: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    outside = ~truth.reshape(truth.shape[0], -1).any(axis=1)
    mask = prediction == 1
    return {"dice": dice(mask, truth == 1), "outside": int(mask[outside].sum()), "predicted": int(mask.sum())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--volumes", nargs="+", default=["lung1", "lung2"])
    parser.add_argument("--shots", nargs="+", type=int, default=[2])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--margin", default="15mm")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--intensity", action="store_true", help="compare the intensity channels and the baseline")
    parser.add_argument("--method", choices=("lctfound", "raw"), default="lctfound",
                        help="lctfound: the embedded model, fast recipe; raw: the raw 5×5 + MLP baseline (no "
                             "backbone: seconds, where the backbone's features of a whole CT take a loaded CPU an hour)")
    args = parser.parse_args()
    if args.intensity:
        return compare_intensity(args)
    torch.set_num_threads(args.threads)
    model = load_model(resolve_model("default")) if args.method == "lctfound" else None
    rows = []
    for name in args.volumes:
        image, label = load_sample(name)
        volume, truth = np.asarray(image.array), (label.array == 1).astype(np.uint8)
        lesion = [s for s in range(truth.shape[0]) if truth[s].any()]
        margin = parse_extent_margin(args.margin, image.spacing[2])
        for k in args.shots:
            for seed, chosen in enumerate(labelled_choices(lesion[0], lesion[-1], k, args.repeats)):
                labels = np.full(volume.shape, UNLABELLED, dtype=np.int16)
                labels[list(chosen)] = truth[list(chosen)]
                torch.manual_seed(seed)
                config = FewShotConfig.for_recipe("fast", seed=seed)
                segmenter = (FewShotSegmenter(model, {1: "Lesion"}, config) if model is not None
                             else IntensityPatchSegmenter({1: "Lesion"}, config))
                start = time.perf_counter()
                segmenter.fit(volume, labels)
                raw = segmenter(volume)
                seconds = time.perf_counter() - start
                raw[list(chosen)] = truth[list(chosen)]  # the painted slices as the annotator left them
                before = scores(raw, truth)
                restricted = np.zeros_like(raw)
                keep = prediction_slices(volume.shape[0], labels, margin)
                restricted[keep] = raw[keep]
                after = scores(postprocess_labels(restricted, ["connected"], labels), truth)
                row = {"volume": name, "k": k, "slices": chosen, "seed": seed, "true": int(truth.sum()),
                       "before": before, "after": after, "seconds": round(seconds, 1)}
                rows.append(row)
                print(row, flush=True)
    print()
    print(f"| volume | k | runs | Dice volume before | Dice volume after | outside before | outside after | "
          f"predicted before | predicted after | true |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for name in args.volumes:
        for k in args.shots:
            group = [r for r in rows if r["volume"] == name and r["k"] == k]
            if not group:
                continue

            def med(when, key, digits=3):
                values = [r[when][key] for r in group]
                return f"{statistics.median(values):.{digits}f} [{min(values):.{digits}f}–{max(values):.{digits}f}]"

            print(f"| {name} | {k} | {len(group)} | {med('before', 'dice')} | {med('after', 'dice')} | "
                  f"{med('before', 'outside', 0)} | {med('after', 'outside', 0)} | {med('before', 'predicted', 0)} | "
                  f"{med('after', 'predicted', 0)} | {group[0]['true']} |")


def compare_intensity(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    model = load_model(resolve_model("default"))
    methods = {
        "LCTfound + MLP (before: features only)":
            lambda seed: FewShotSegmenter(model, {1: "Lesion"}, FewShotConfig(seed=seed, intensity_features=False)),
        "LCTfound + intensity + MLP (now)":
            lambda seed: FewShotSegmenter(model, {1: "Lesion"}, FewShotConfig(seed=seed)),
        "raw 5×5 + MLP (baseline)": lambda seed: IntensityPatchSegmenter({1: "Lesion"}, FewShotConfig(seed=seed)),
    }
    print("| volume | k | slices | method | Dice held-out volume | Dice volume, extent + connected |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name in args.volumes:
        image, label = load_sample(name)
        volume, truth = np.asarray(image.array), (label.array == 1).astype(np.uint8)
        lesion = [s for s in range(truth.shape[0]) if truth[s].any()]
        margin = parse_extent_margin(args.margin, image.spacing[2])
        for k in args.shots:
            for seed, chosen in enumerate(labelled_choices(lesion[0], lesion[-1], k, args.repeats)):
                labels = np.full(volume.shape, UNLABELLED, dtype=np.int16)
                labels[list(chosen)] = truth[list(chosen)]
                held_out = [s for s in range(volume.shape[0]) if s not in chosen]
                for method, build in methods.items():
                    torch.manual_seed(seed)
                    segmenter = build(seed)
                    segmenter.fit(volume, labels)
                    raw = segmenter(volume)
                    heldout = dice(raw[held_out] == 1, truth[held_out] == 1)
                    shown = raw.copy()
                    shown[list(chosen)] = truth[list(chosen)]
                    restricted = np.zeros_like(shown)
                    keep = prediction_slices(volume.shape[0], labels, margin)
                    restricted[keep] = shown[keep]
                    after = scores(postprocess_labels(restricted, ["connected"], labels), truth)["dice"]
                    print(f"| {name} | {k} | {list(chosen)} | {method} | {heldout:.3f} | {after:.3f} |", flush=True)


if __name__ == "__main__":
    main()
