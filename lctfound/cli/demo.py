"""``lctfound demo``: the main job on built-in defaults (sample CT + embedded model).

Runs the most complete pipeline available on the real sample CT and writes everything under
one output folder: the denoising features of every slice, a picture of what the features
see on the lesion slice, synthetic slices from the model, and a summary with timings.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import LCTfoundError

if TYPE_CHECKING:  # numpy is imported when the demo runs: --help stays fast
    import numpy as np


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "demo", help="run the main pipeline on the sample CT with the embedded model",
        description="Fetch the sample CT (once), extract LCTfound features of every slice with the default model, "
                    "and write previews, synthetic slices and a summary to --output.")
    parser.add_argument("--output", "-o", default="outputs/demo", help="output folder (default outputs/demo)")
    parser.add_argument("--model", default="default", help="model name or folder (default: the embedded model)")
    parser.add_argument("--sample", default="lung1", choices=("lung1", "lung2"), help="sample CT (default lung1)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    parser.set_defaults(func=run)


def _pca_rgb(features: np.ndarray) -> np.ndarray:
    """(C, H, W) features → (H, W, 3) in [0, 1]: the first three principal components."""
    import numpy as np
    import torch

    channels, height, width = features.shape
    rows = torch.from_numpy(features.reshape(channels, -1).T.astype(np.float32))
    rows = rows - rows.mean(0, keepdim=True)
    _, _, components = torch.pca_lowrank(rows, q=3, center=False)
    projected = (rows @ components[:, :3]).numpy()
    low, high = np.percentile(projected, 1, axis=0), np.percentile(projected, 99, axis=0)
    return np.clip((projected - low) / np.maximum(high - low, 1e-6), 0, 1).reshape(height, width, 3)


def _save_preview(ct_slice: np.ndarray, label_slice: np.ndarray, features: np.ndarray, path: Path) -> None:
    import numpy as np
    from PIL import Image

    from ..atomic import atomic_file
    from ..preprocessing import window_to_unit

    size = 256
    grey = (window_to_unit(ct_slice, "lung", "fixed").numpy() * 255).astype(np.uint8)
    ct = Image.fromarray(grey).convert("RGB").resize((size, size), Image.BILINEAR)
    overlay = np.asarray(ct).copy()
    mask = np.asarray(Image.fromarray(label_slice.astype(np.uint8) * 255).resize((size, size), Image.NEAREST)) > 0
    overlay[mask] = (0.5 * overlay[mask] + 0.5 * np.array([255, 60, 40])).astype(np.uint8)
    pca = Image.fromarray((_pca_rgb(features) * 255).astype(np.uint8)).resize((size, size), Image.BILINEAR)
    canvas = Image.new("RGB", (3 * size, size))
    for index, tile in enumerate((ct, Image.fromarray(overlay), pca)):
        canvas.paste(tile, (index * size, 0))
    with atomic_file(path) as tmp:
        canvas.save(tmp, format="PNG")


def run(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    from ..atomic import atomic_directory
    from ..devices import resolve_device
    from ..features import FeatureExtractor, FeatureSpec, load_volume_features, save_volume_features
    from ..io.sample_data import load_sample
    from ..models import load_model, resolve_model
    from ..pipelines.generation import GenerationPipeline, save_image_grid
    from ..progress import TqdmProgress

    output = Path(args.output)
    if output.exists() and not output.is_dir():
        raise LCTfoundError(f"{output}: is a file; choose a folder for --output")
    if output.exists() and any(output.iterdir()) and not args.overwrite:
        raise LCTfoundError(f"{output}: already exists; pass --overwrite or choose another --output")
    from ..atomic import check_writable

    check_writable(output)  # before the sample and the model are loaded
    timings: dict[str, float] = {}
    start = time.perf_counter()
    with TqdmProgress("sample data", unit="step") as progress:
        image, label = load_sample(args.sample, progress=progress)
    timings["load_sample_s"] = time.perf_counter() - start

    start = time.perf_counter()
    model_path = resolve_model(args.model)
    model = load_model(model_path, device=resolve_device(args.device))
    timings["load_model_s"] = time.perf_counter() - start

    with atomic_directory(output, overwrite=True) as tmp:
        extractor = FeatureExtractor(model, FeatureSpec(resolution=64))
        start = time.perf_counter()
        with TqdmProgress("features", unit="slice") as progress:
            save_volume_features(extractor, image.array, tmp / "features", progress=progress,
                                 extra_metadata={"volume": f"sample:{args.sample}", "spacing": image.spacing})
        timings["features_s"] = time.perf_counter() - start

        lesion_slices = np.flatnonzero(label.array.reshape(label.shape[0], -1).any(axis=1))
        slice_index = int(lesion_slices[len(lesion_slices) // 2]) if lesion_slices.size else image.shape[0] // 2
        features, _ = load_volume_features(tmp / "features")
        _save_preview(image.array[slice_index], label.array[slice_index], np.asarray(features[slice_index], np.float32),
                      tmp / f"features_slice{slice_index:03d}.png")
        del features

        start = time.perf_counter()
        pipeline = GenerationPipeline(model, "ddim")
        images = [pipeline(window, num_images=4, steps=25, seed=0) for window in ("lung", "mediastinal")]
        save_image_grid(np.concatenate(images), tmp / "generated.png", columns=4,
                        labels=["lung"] * 4 + ["mediastinal"] * 4)
        timings["generate_8_slices_s"] = time.perf_counter() - start

        summary = {
            "sample": args.sample, "volume_shape_kji": list(image.shape), "spacing": image.spacing,
            "model": str(model_path), "preset": model.preset, "device": str(model.device),
            "torch_threads": torch.get_num_threads(), "feature_channels": extractor.channels,
            "feature_resolution": extractor.resolution, "preview_slice": slice_index,
            "timings": {k: round(v, 2) for k, v in timings.items()},
            "outputs": ["features/features.npy", "features/features.json",
                        f"features_slice{slice_index:03d}.png", "generated.png"],
        }
        (tmp / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"wrote {output}: features of {image.shape[0]} slices ({extractor.channels} channels at 64×64), "
          f"features_slice{slice_index:03d}.png, generated.png, summary.json")
    return 0
