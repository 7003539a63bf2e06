"""Feature-extraction speed and memory (issue: foundation).

Measures, on the device it runs on:
  forward  — median seconds per 256² slice-forward of each preset (batch 1);
  sample   — the 48-slice sample CT (lung1): features at every slice with the paper's recipe
             (4 timesteps × up blocks 1-4), stored float16 at 64², total time and peak RSS
             increase beyond the loaded model;
  large    — a synthetic 512×512×300 int16 volume streamed the same way (the 4 GB bound).
Weights are random (the timing and memory of a network do not depend on its weights); use
``--model`` to time a trained folder instead.

    python benchmarks/bench_features.py forward --presets official cpu-base cpu-tiny --repeats 3
    python benchmarks/bench_features.py sample --preset cpu-tiny
    python benchmarks/bench_features.py large --preset cpu-tiny --slices 300
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from memory import PeakRSS  # noqa: E402

from lctfound.devices import resolve_device  # noqa: E402
from lctfound.features import FeatureExtractor, FeatureSpec, human_bytes, save_volume_features  # noqa: E402
from lctfound.models import load_model, new_model  # noqa: E402


def machine() -> str:
    device = "cpu" if not torch.cuda.is_available() else torch.cuda.get_device_name(0)
    return f"{platform.node()} {platform.machine()}, {torch.get_num_threads()} threads, {device}, torch {torch.__version__}"


def get_model(args):
    device = resolve_device(args.device)
    if args.model:
        return load_model(args.model, device=device)
    model = new_model(args.preset, seed=0)
    model.unet.eval().requires_grad_(False)
    model.condition_encoder.eval()
    return model.to(device)


def bench_forward(args) -> dict:
    results = {}
    for preset in args.presets:
        model = new_model(preset, seed=0).to(resolve_device(args.device))
        model.unet.eval()
        x = torch.randn(1, 3, 256, 256, device=model.device)
        condition = model.condition("lung")
        t = torch.tensor([50], device=model.device)
        times = []
        with torch.no_grad():
            model.unet(x, t, encoder_hidden_states=condition)  # warm-up
            for _ in range(args.repeats):
                start = time.perf_counter()
                model.unet(x, t, encoder_hidden_states=condition)
                times.append(time.perf_counter() - start)
        results[preset] = {"median_s": statistics.median(times), "runs": times}
        print(f"{preset}: median {statistics.median(times):.3f} s per 256² forward ({args.repeats} runs)", flush=True)
        del model
    return results


def bench_volume(args, volume: np.ndarray, label: str, slices=None) -> dict:
    model = get_model(args)
    extractor = FeatureExtractor(model, FeatureSpec(resolution=args.resolution))
    count = volume.shape[0] if slices is None else len(slices)
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        with PeakRSS() as peak:
            start = time.perf_counter()
            save_volume_features(extractor, volume, Path(tmp) / "features", slices=slices, batch_size=args.batch_size)
            seconds = time.perf_counter() - start
        stored = (Path(tmp) / "features" / "features.npy").stat().st_size
    result = {"volume": label, "shape": list(volume.shape), "slices_extracted": count, "preset": model.preset,
              "model_input": model.sample_size, "channels": extractor.channels,
              "resolution": extractor.resolution, "batch_size": args.batch_size, "seconds": seconds,
              "seconds_per_slice": seconds / count, "peak_rss_increase": peak.increase,
              "peak_rss_increase_h": human_bytes(peak.increase),
              "peak_anonymous_increase": peak.anonymous_increase,
              "peak_anonymous_increase_h": human_bytes(peak.anonymous_increase), "stored_bytes_h": human_bytes(stored)}
    print(json.dumps(result, indent=2), flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=("forward", "sample", "large"))
    parser.add_argument("--presets", nargs="+", default=["cpu-tiny", "cpu-base", "official"])
    parser.add_argument("--preset", default="cpu-tiny")
    parser.add_argument("--model", help="time a trained model folder instead of a random preset")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--limit-slices", type=int,
                        help="large: extract only the first N slices (the whole volume stays in memory); shows the "
                             "per-batch memory of models too slow for 300 slices on a CPU")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--workdir", default=None, help="where temporary feature files go")
    parser.add_argument("--json", help="append the result as one JSON line to this file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"machine: {machine()}", flush=True)
    if args.what == "forward":
        result = bench_forward(args)
    elif args.what == "sample":
        from lctfound.io.sample_data import load_sample

        image, _ = load_sample("lung1")
        result = bench_volume(args, image.array, "pyradiomics lung1 (512×512×48)")
    else:
        rng = np.random.default_rng(0)
        volume = rng.integers(-1024, 1500, size=(args.slices, 512, 512), dtype=np.int16)
        slices = list(range(args.limit_slices)) if args.limit_slices else None
        result = bench_volume(args, volume, f"synthetic 512×512×{args.slices}", slices)
    if args.json:
        with open(args.json, "a") as handle:
            handle.write(json.dumps({"what": args.what, "machine": machine(), "date": time.strftime("%Y-%m-%d"),
                                     "argv": sys.argv[1:], "result": result}) + "\n")


if __name__ == "__main__":
    main()
