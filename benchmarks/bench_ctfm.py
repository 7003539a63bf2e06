"""CT-FM embedding speed and memory (issue 7): the sample CT lung1 with a full-size CT-FM encoder.

Measures, on the device it runs on: preprocessing time (SPL, 3×1×1 mm, body crop, scaling, pad),
the number of windows, embedding time and peak RSS increase beyond the loaded model. Weights are
random (speed and memory do not depend on them); pass ``--model`` to time a real CT-FM folder.

    python benchmarks/bench_ctfm.py                         # lung1, 32×128×128 windows, overlap 0.5
    python benchmarks/bench_ctfm.py --max-windows 2         # a short smoke run
    python benchmarks/bench_ctfm.py --aggregation whole     # one forward pass of the whole volume
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from memory import PeakRSS  # noqa: E402

from lctfound.ctfm.features import WindowSettings, embed_volume, window_count  # noqa: E402
from lctfound.ctfm.model import load_model, new_model  # noqa: E402
from lctfound.ctfm.preprocess import prepare_volume  # noqa: E402
from lctfound.devices import resolve_device  # noqa: E402
from lctfound.io.sample_data import fetch_sample  # noqa: E402
from lctfound.io.volume import read_volume  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--volume", help="CT volume to embed (default: the sample CT lung1)")
    parser.add_argument("--model", help="CT-FM folder (default: a random-init full-size encoder)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--window", default="32,128,128")
    parser.add_argument("--overlap", type=float, default=0.5)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--aggregation", choices=("mean", "min", "whole"), default="mean")
    parser.add_argument("--max-windows", type=int, default=0,
                        help="stop after this many windows (a short run; time per window is reported)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    device = resolve_device(args.device)
    if args.volume:
        volume, label = read_volume(args.volume), args.volume
    else:
        volume, label = read_volume(fetch_sample().image("lung1")), "lung1"
    start = time.perf_counter()
    model = load_model(args.model, device=device) if args.model else new_model(seed=0).to(device)
    load_s = time.perf_counter() - start
    start = time.perf_counter()
    prepared = prepare_volume(volume)
    prepare_s = time.perf_counter() - start
    settings = WindowSettings(tuple(int(v) for v in args.window.split(",")), args.overlap, args.batch_size)
    total = window_count(prepared.shape, settings)
    print(f"{label}: source {volume.shape} (k,j,i) spacing {tuple(round(s, 3) for s in volume.spacing)} → "
          f"prepared {prepared.shape} (SPL, 3×1×1 mm) in {prepare_s:.2f} s; {total} windows; model ready in "
          f"{load_s:.1f} s ({model.parameters_count():,} parameters)", flush=True)

    from lctfound.errors import Cancelled
    from lctfound.progress import Progress

    done = {"windows": 0}
    progress = Progress()

    def on_update(count: int, _total: int, _message: str) -> None:
        done["windows"] = count
        if args.max_windows and count >= args.max_windows:
            progress.cancel_token.cancel()

    progress.add_callback(on_update)
    stopped = False
    with PeakRSS() as peak:
        start = time.perf_counter()
        try:
            embed_volume(model, prepared, args.aggregation, settings, progress=progress)
        except Cancelled:
            stopped = True
        elapsed = time.perf_counter() - start
    windows = done["windows"] if args.aggregation != "whole" else 1
    result = {
        "machine": f"{platform.node()} {platform.machine()}, {torch.get_num_threads()} threads, {device}, "
                   f"torch {torch.__version__}",
        "volume": label, "prepared_shape": list(prepared.shape), "window": list(settings.window),
        "overlap": settings.overlap, "aggregation": args.aggregation, "windows_total": total,
        "windows_run": windows, "complete": not stopped, "seconds": round(elapsed, 3),
        "seconds_per_window": round(elapsed / max(windows, 1), 3),
        "estimated_total_seconds": round(elapsed / max(windows, 1) * total, 1) if args.aggregation != "whole" else None,
        "peak_rss_increase_mb": round(peak.increase / 2**20, 1), "peak_rss_mb": round(peak.peak / 2**20, 1),
        "preprocess_seconds": round(prepare_s, 3),
    }
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
