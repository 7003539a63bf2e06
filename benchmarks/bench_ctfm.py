"""CT-FM speed and memory (issue 7) on the sample CTs with a full-size CT-FM encoder.

Tasks (``--task``):

* ``embed`` (default) — preprocessing (SPL, 3×1×1 mm, body crop, scaling, pad), window count,
  whole-scan embedding time and peak RSS of lung1;
* ``probe`` — linear probe on lung1 + lung2 (one class each): embedding both scans with a cold
  cache, training the probe through the training loop on the cached embeddings, predicting lung1
  from the cache and with no cache;
* ``decoder`` — segmentation decoder (frozen encoder, freshly initialised decoder): sliding-window
  prediction of lung1 back onto its own grid, and optionally the seconds per training step.

The weights are random unless ``--model`` names a real CT-FM folder: only speed and memory are
meaningful, never the predictions. The CPU may be shared: the 1-minute load average before and
after each timing is recorded. ``--json`` appends one JSON line per run to a results file.

    python benchmarks/bench_ctfm.py --threads 2                                  # embedding of lung1
    python benchmarks/bench_ctfm.py --task probe --threads 2 --json benchmarks/results.jsonl
    python benchmarks/bench_ctfm.py --task decoder --threads 2 --train-steps 3 --json benchmarks/results.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from memory import PeakRSS  # noqa: E402

from lctfound.ctfm.features import WindowSettings, embed_volume, window_count  # noqa: E402
from lctfound.ctfm.model import load_model, new_model  # noqa: E402
from lctfound.ctfm.preprocess import prepare_volume  # noqa: E402
from lctfound.devices import resolve_device  # noqa: E402
from lctfound.io.sample_data import fetch_sample  # noqa: E402
from lctfound.io.volume import read_volume  # noqa: E402
from lctfound.compat import strict_zip

RANDOM_NOTE = "random weights: only speed and memory are meaningful"


def load() -> float:
    return os.getloadavg()[0]


class Timed:
    """Wall time, CPU time of this process (all its threads: on a shared CPU, CPU seconds / threads
is what the wall time would be on an idle one, roughly), peak RSS (and its anonymous part) and
the load average around a block."""

    def __enter__(self) -> "Timed":
        self.load_before = load()
        self.peak = PeakRSS().__enter__()
        self.start, self.cpu_start = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self.start
        self.cpu_seconds = time.process_time() - self.cpu_start
        self.peak.__exit__(*exc)
        self.load_after = load()

    def result(self, **extra) -> dict:
        return {"seconds": round(self.seconds, 2), "cpu_seconds": round(self.cpu_seconds, 2),
                "peak_rss_increase_mb": round(self.peak.increase / 2**20, 1),
                "peak_anonymous_increase_mb": round(self.peak.anonymous_increase / 2**20, 1),
                "peak_rss_mb": round(self.peak.peak / 2**20, 1),
                "loadavg_1min": [round(self.load_before, 2), round(self.load_after, 2)], **extra}


def machine(device) -> str:
    return f"{platform.node()} {platform.machine()}, {os.cpu_count()} CPUs, {torch.get_num_threads()} threads, " \
           f"{device}, torch {torch.__version__}"


def bench_embed(args, model, settings) -> dict:
    from lctfound.errors import Cancelled
    from lctfound.progress import Progress

    volume = read_volume(args.volume or fetch_sample().image("lung1"))
    start = time.perf_counter()
    prepared = prepare_volume(volume)
    prepare_s = time.perf_counter() - start
    total = window_count(prepared.shape, settings)
    done = {"windows": 0}
    progress = Progress()

    def on_update(count: int, _total: int, _message: str) -> None:
        done["windows"] = count
        if args.max_windows and count >= args.max_windows:
            progress.cancel_token.cancel()

    progress.add_callback(on_update)
    stopped = False
    with Timed() as timed:
        try:
            embed_volume(model, prepared, args.aggregation, settings, progress=progress)
        except Cancelled:
            stopped = True
    windows = done["windows"] if args.aggregation != "whole" else 1
    return timed.result(volume=args.volume or "lung1", source_shape=list(volume.shape),
                        prepared_shape=list(prepared.shape), preprocess_seconds=round(prepare_s, 3),
                        windows_total=total, windows_run=windows, complete=not stopped,
                        seconds_per_window=round(timed.seconds / max(windows, 1), 3))


def bench_probe(args, model, settings, work: Path) -> dict:
    from lctfound.ctfm.probe import EmbeddingRecipe, LinearProbe, predict_probe, train_probe
    from lctfound.training.loop import LoopConfig

    sample = fetch_sample()
    table = work / "cases.csv"
    table.write_text(f"image,label\n{sample.image('lung1')},first\n{sample.image('lung2')},second\n")
    recipe = EmbeddingRecipe(settings, args.aggregation)
    cache = work / "cache"
    events: list[dict] = []
    loop = LoopConfig(str(work / "probe"), batch_size=2, max_steps=args.probe_steps, learning_rate=1e-3,
                      checkpoint_every=args.probe_steps, device="cpu", log_every=max(1, args.probe_steps // 10))
    with Timed() as cold:
        result = train_probe(model, table, loop, recipe, cache_root=cache, on_event=events.append)
    loop2 = LoopConfig(str(work / "probe2"), batch_size=2, max_steps=args.probe_steps, learning_rate=1e-3,
                       checkpoint_every=args.probe_steps, device="cpu", log_every=max(1, args.probe_steps // 10))
    with Timed() as warm:
        train_probe(model, table, loop2, recipe, cache_root=cache)
    probe = LinearProbe.load(result.model_folder, model, batch_size=settings.batch_size)
    with Timed() as predict_cached:
        predict_probe(probe, [sample.image("lung1")], work / "cached.csv", cache_root=cache)
    with Timed() as predict_cold:
        predict_probe(probe, [sample.image("lung1")], work / "cold.csv", use_cache=False)
    return {
        "scans": ["lung1", "lung2"], "probe_steps": args.probe_steps, "embedding": recipe.as_dict()["windows"],
        "train_cold_cache": cold.result(note="embeds both scans, then trains"),
        "train_warm_cache": warm.result(note="embeddings from the cache"),
        "predict_lung1_cached": predict_cached.result(),
        "predict_lung1_no_cache": predict_cold.result(note="one embedding of lung1 + the linear layer"),
        "embedding_events": [e for e in events if e["event"] == "embedding"],
    }


def bench_decoder(args, model, work: Path) -> dict:
    from lctfound.ctfm.decoder import DecoderSegmenter, new_segmenter, prepare_case, train_decoder
    from lctfound.ctfm.tasks import load_ctfm_task_model
    from lctfound.io.volume import read_label_volume
    from lctfound.training.loop import LoopConfig

    sample = fetch_sample()
    volume = read_volume(sample.image("lung1"))
    labels = read_label_volume(sample.label("lung1"), reference=volume)
    roi = tuple(int(v) for v in args.patch.split(","))
    result: dict = {"patch": list(roi), "overlap": args.decoder_overlap}
    steps = max(1, args.train_steps)
    loop = LoopConfig(str(work / "decoder"), batch_size=args.decoder_batch, max_steps=steps, learning_rate=1e-3,
                      checkpoint_every=steps, device="cpu", log_every=1)
    with Timed() as prepare_timed:
        prepare_case(volume, labels, [0, 1], roi, "lung1")
    result["prepare_case"] = prepare_timed.result(note="preprocess image + resample labels into CT-FM space")
    with Timed() as train_timed:
        trained = train_decoder(model, [("lung1", volume, labels)], loop, {1: "Lesion"}, "frozen", roi, 4)
    rows = (work / "decoder" / "metrics.csv").read_text().splitlines()[1:]
    elapsed = [float(row.split(",")[6]) for row in rows]
    per_step = np.diff(elapsed).tolist() if len(elapsed) > 1 else elapsed
    result["train_frozen"] = train_timed.result(steps=steps, batch=args.decoder_batch,
                                                seconds_per_step_median=round(float(np.median(per_step)), 2),
                                                note="includes preprocessing and one checkpoint")
    segmenter = DecoderSegmenter.load(trained.model_folder, model)
    segmenter.segmenter.to(model.device)
    with Timed() as predict_timed:
        predicted = segmenter.predict(volume, args.decoder_overlap, args.decoder_batch)
    prepared_shape = list(prepare_volume(volume).shape)
    total = window_count([max(s, r) for s, r in strict_zip(prepared_shape, roi)],
                         WindowSettings(roi, args.decoder_overlap, args.decoder_batch))
    result["predict_lung1"] = predict_timed.result(prepared_shape=prepared_shape, windows=total,
                                                   output_on_input_grid=bool(predicted.same_grid(volume)))
    task_model = load_ctfm_task_model(trained.model_folder, "ctfm-segmentation")
    decoder_parameters = sum(p.numel() for p in new_segmenter(model, [0, 1]).decoder.parameters())
    result["decoder_parameters"] = decoder_parameters
    result["task_model_parts"] = sorted(task_model.parts)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=("embed", "probe", "decoder"), default="embed")
    parser.add_argument("--volume", help="embed: CT volume (default: the sample CT lung1)")
    parser.add_argument("--model", help="CT-FM folder (default: a random-init full-size encoder)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--window", default="32,128,128", help="embedding windows (embed, probe)")
    parser.add_argument("--overlap", type=float, default=0.5, help="embedding window overlap (embed, probe)")
    parser.add_argument("--batch-size", type=int, default=1, help="windows per forward pass (embed, probe)")
    parser.add_argument("--aggregation", choices=("mean", "min", "whole"), default="mean")
    parser.add_argument("--max-windows", type=int, default=0,
                        help="embed: stop after this many windows (a short run; time per window is reported)")
    parser.add_argument("--probe-steps", type=int, default=100, help="probe: optimizer steps (default 100)")
    parser.add_argument("--patch", default="32,128,128", help="decoder: patch / prediction window (default 32,128,128)")
    parser.add_argument("--decoder-overlap", type=float, default=0.5, help="decoder: prediction overlap (default 0.5)")
    parser.add_argument("--decoder-batch", type=int, default=1, help="decoder: patches per step / windows per pass")
    parser.add_argument("--train-steps", type=int, default=2, help="decoder: frozen-mode training steps (default 2)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--json", help="append one JSON line with the results to this file")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    device = resolve_device(args.device)
    start = time.perf_counter()
    model = load_model(args.model, device=device) if args.model else new_model(seed=0).to(device)
    load_s = time.perf_counter() - start
    settings = WindowSettings(tuple(int(v) for v in args.window.split(",")), args.overlap, args.batch_size)
    with tempfile.TemporaryDirectory(prefix="bench-ctfm-") as tmp:
        if args.task == "embed":
            result = bench_embed(args, model, settings)
        elif args.task == "probe":
            result = bench_probe(args, model, settings, Path(tmp))
        else:
            result = bench_decoder(args, model, Path(tmp))
    record = {"what": f"ctfm-{args.task}", "machine": machine(device), "date": time.strftime("%Y-%m-%d"),
              "argv": sys.argv[1:], "model": args.model or "random-init full-size CT-FM encoder",
              "parameters": model.parameters_count(), "model_load_seconds": round(load_s, 2),
              "note": RANDOM_NOTE if not args.model else "", "result": result}
    print(json.dumps(record, indent=2))
    if args.json:
        with open(args.json, "a") as handle:
            handle.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
