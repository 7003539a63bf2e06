"""One prepared GPU check for the official LCTfound configuration (issue: official weights).

Run it once whenever a GPU is at hand (``bash benchmarks/gpu_check.sh OUT``); everything it
measures lands in ``OUT/gpu_check.json`` (and a readable ``OUT/gpu_check.md``):

  peak       — the measured dense bf16 matmul rate (TFLOP/s) of this device: the MFU denominator;
  features   — official-config feature throughput (slice-forwards/s and slices/s with the paper's
               4 timesteps) at batch 1..64 in bf16, with the model FLOPs per forward (counted with
               ``torch.utils.flop_counter``) and the MFU against ``peak``;
  training   — one DDPM training step (AdamW, bf16 autocast): images/s and MFU (3× forward FLOPs);
  agreement  — features of one slice on this device against fp32 on the CPU (relative error);
  fewshot    — the few-shot loop end to end on the sample CT (lung1, 2 labelled slices, predict 32),
               official configuration with random weights: seconds per stage and the Dice on the
               labelled slices (random weights: a smoke figure, not a quality figure);
  memory     — peak device memory.

``--smoke`` runs the same code on the CPU with the ``cpu-tiny`` preset at 64² and small sizes, so
the script itself is tested in CI (Testing/test_gpu_check.py). Weights are random: speed does not
depend on them. It stops each stage when ``--budget-s`` is spent so a lease is never overrun.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from lctfound.features import FeatureExtractor, FeatureSpec
from lctfound.models import new_model


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(function: Callable[[], Any], device: torch.device, repeats: int, warmup: int = 1) -> list[float]:
    """Seconds per call, measured ``repeats`` times after ``warmup`` untimed calls."""
    for _ in range(warmup):
        function()
    synchronize(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return times


def matmul_peak(device: torch.device, size: int, repeats: int) -> dict[str, Any]:
    """Dense bf16 (GPU) or fp32 (CPU smoke) matmul rate: the roofline MFU is measured against."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    chain = 8  # several products per timing so launch overhead does not count

    def run():
        for _ in range(chain):
            torch.mm(a, b)

    seconds = statistics.median(timed(run, device, repeats))
    return {"dtype": str(dtype).replace("torch.", ""), "size": size,
            "tflops": 2 * size ** 3 * chain / seconds / 1e12}


def forward_flops(model, batch: int) -> int:
    """Model FLOPs of one U-Net forward at ``batch`` (counted, not estimated)."""
    from torch.utils.flop_counter import FlopCounterMode

    size = model.sample_size
    device = model.device
    x = torch.randn(batch, 3, size, size, device=device)
    t = torch.full((batch,), 50, dtype=torch.long, device=device)
    condition = model.condition("mediastinal", batch=batch)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model.unet(x.to(model.unet.dtype), t, encoder_hidden_states=condition)
    return int(counter.get_total_flops())


def autocast(device: torch.device):
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()


def feature_throughput(model, batches: list[int], repeats: int, peak_tflops: float, budget_s: float) -> list[dict]:
    extractor = FeatureExtractor(model, FeatureSpec(resolution=min(model.sample_size, 128)))
    size = model.sample_size
    flops_one = forward_flops(model, 1)
    rows = []
    started = time.monotonic()
    for batch in batches:
        if time.monotonic() - started > budget_s:
            rows.append({"batch": batch, "skipped": "time budget spent"})
            continue
        x0 = torch.rand(batch, 3, size, size) * 2 - 1
        try:
            seconds = statistics.median(timed(lambda: extractor(x0, list(range(batch))), model.device, repeats))
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            rows.append({"batch": batch, "skipped": "out of device memory"})
            continue
        forwards = batch * len(extractor.spec.timesteps)
        tflops = flops_one * forwards / seconds / 1e12
        rows.append({"batch": batch, "seconds": seconds, "slice_forwards_per_s": forwards / seconds,
                     "slices_per_s": batch / seconds, "tflops": tflops, "mfu": tflops / peak_tflops})
    return rows


def training_step(model, batch: int, repeats: int, peak_tflops: float) -> dict[str, Any]:
    from lctfound.training.pretrain import DiffusionModule

    device = model.device
    module = DiffusionModule(model.unet, model.condition_encoder).to(device).train()
    optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-4)
    size = model.sample_size
    data = {"pixel_values": torch.rand(batch, 3, size, size, device=device) * 2 - 1,
            "noise": torch.randn(batch, 3, size, size, device=device),
            "timesteps": torch.randint(0, 1000, (batch,), device=device),
            "prompt": ["window width and window level is 400 and 0."] * batch}

    def step():
        with autocast(device):
            loss = module(data)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    seconds = statistics.median(timed(step, device, repeats))
    model.unet.eval()
    tflops = 3 * forward_flops(model, batch) / seconds / 1e12  # forward + backward ≈ 3 forwards
    return {"batch": batch, "seconds": seconds, "images_per_s": batch / seconds, "tflops": tflops,
            "mfu": tflops / peak_tflops}


def cpu_agreement(model, device: torch.device) -> dict[str, Any]:
    """Features of one slice on ``device`` (bf16 autocast on CUDA) against fp32 on the CPU."""
    size = model.sample_size
    x0 = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(0)) * 2 - 1
    spec = FeatureSpec(resolution=min(size, 128))
    here = FeatureExtractor(model, spec)(x0, [0])
    model.to("cpu")
    reference = FeatureExtractor(model, spec)(x0, [0])
    model.to(device)
    relative = float((here - reference).norm() / reference.norm())
    return {"device": str(device), "relative_error": relative, "max_abs_error": float((here - reference).abs().max())}


def fewshot_loop(model, labelled: int, predicted: int) -> dict[str, Any]:
    """Sample CT lung1: train the few-shot head on ``labelled`` lesion slices, predict ``predicted``."""
    from lctfound.io.sample_data import fetch_sample
    from lctfound.io.volume import read_volume
    from lctfound.pipelines.segmentation import FewShotConfig, FewShotSegmenter
    import tempfile

    sample = fetch_sample()
    image, label = sample.paths("lung1")
    volume = read_volume(image).array
    labels = read_volume(label, labels=True).array.astype(np.int64)
    lesion = [int(k) for k in np.flatnonzero(labels.reshape(labels.shape[0], -1).any(1))]
    chosen = lesion[:labelled]
    partial = np.full(labels.shape, -1, dtype=np.int64)
    partial[chosen] = labels[chosen] > 0
    segmenter = FewShotSegmenter(model, {1: "Lesion"}, FewShotConfig(epochs=1, min_steps=20))
    timings = {}
    with tempfile.TemporaryDirectory() as cache:
        start = time.perf_counter()
        report = segmenter.fit(volume, partial, cache_root=Path(cache))
        timings["fit_s"] = time.perf_counter() - start
        around = sorted(set(range(max(0, chosen[0] - predicted // 2), chosen[0] - predicted // 2 + predicted))
                        & set(range(volume.shape[0])))
        start = time.perf_counter()
        out = {index: p.argmax(0) for index, p in segmenter.predict_probabilities(volume, around,
                                                                                    cache_root=Path(cache))}
        timings["predict_s"] = time.perf_counter() - start
    truth = labels[chosen] > 0
    guess = np.stack([out[k] > 0 for k in chosen]) if all(k in out for k in chosen) else None
    dice = None
    if guess is not None:
        dice = float(2 * (truth & guess).sum() / max(1, truth.sum() + guess.sum()))
    return {"labelled_slices": chosen, "predicted_slices": len(around), "pixels": report.pixels,
            "final_loss": report.final_loss, "dice_on_labelled_slices": dice, **timings}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="folder for gpu_check.json and gpu_check.md (created)")
    parser.add_argument("--smoke", action="store_true", help="CPU, cpu-tiny preset at 64², small sizes")
    parser.add_argument("--device", default=None, help="default: cuda if available (cpu with --smoke)")
    parser.add_argument("--budget-s", type=float, default=420.0, help="stop starting new stages after this")
    args = parser.parse_args(argv)

    device = torch.device(args.device or ("cpu" if args.smoke or not torch.cuda.is_available() else "cuda"))
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: no CUDA device here; run with --smoke on a CPU", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    if args.smoke:
        preset, sample_size, batches, repeats, peak_size, train_batch = "cpu-tiny", 64, [1, 2], 2, 256, 2
    else:
        preset, sample_size, batches, repeats, peak_size, train_batch = "official", None, [1, 2, 4, 8, 16, 32, 64], 5, 8192, 8
        torch.backends.cuda.matmul.allow_tf32 = True
    results: dict[str, Any] = {
        "machine": {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
                    or platform.machine(), "torch": torch.__version__, "smoke": args.smoke, "preset": preset,
                    "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "threads": torch.get_num_threads()},
    }

    def stage(name: str, function: Callable[[], Any]) -> None:
        if time.monotonic() - started > args.budget_s:
            results[name] = {"skipped": "time budget spent"}
            return
        print(f"[gpu_check] {name} …", flush=True)
        try:
            results[name] = function()
        except Exception as error:  # one stage failing must not lose the others' figures
            results[name] = {"error": f"{type(error).__name__}: {error}"}
        (args.out / "gpu_check.json").write_text(json.dumps(results, indent=2) + "\n")

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    stage("peak", lambda: matmul_peak(device, peak_size, repeats))
    peak = results["peak"].get("tflops", float("nan"))
    model = new_model(preset, seed=0, sample_size=sample_size).to(device)
    model.unet.eval()
    stage("agreement", lambda: cpu_agreement(model, device) if device.type != "cpu" else
          {"skipped": "the CPU is the reference"})
    remaining = max(10.0, args.budget_s - (time.monotonic() - started))
    stage("features", lambda: feature_throughput(model, batches, repeats, peak, remaining * 0.5))
    stage("training", lambda: training_step(model, train_batch, max(2, repeats - 2), peak))
    model.unet.eval()
    stage("fewshot", lambda: fewshot_loop(model, 2, 4 if args.smoke else 32))
    if device.type == "cuda":
        results["memory"] = {"peak_allocated_gib": torch.cuda.max_memory_allocated(device) / 2 ** 30}
    results["wall_s"] = time.monotonic() - started
    (args.out / "gpu_check.json").write_text(json.dumps(results, indent=2) + "\n")
    (args.out / "gpu_check.md").write_text(markdown(results))
    print(markdown(results))
    return 0


def markdown(results: dict[str, Any]) -> str:
    machine = results["machine"]
    lines = [f"# gpu_check — {machine['device']}, torch {machine['torch']}, preset {machine['preset']}"
             f"{' (smoke)' if machine['smoke'] else ''}, {machine['date']}", ""]
    peak = results.get("peak", {})
    if "tflops" in peak:
        lines.append(f"Measured {peak['dtype']} matmul peak: {peak['tflops']:.1f} TFLOP/s ({peak['size']}²)")
    lines += ["", "| batch | slice-forwards/s | slices/s (4 timesteps) | TFLOP/s | MFU |", "|---:|---:|---:|---:|---:|"]
    for row in results.get("features", []) if isinstance(results.get("features"), list) else []:
        if "seconds" in row:
            lines.append(f"| {row['batch']} | {row['slice_forwards_per_s']:.1f} | {row['slices_per_s']:.2f} | "
                         f"{row['tflops']:.2f} | {row['mfu']:.1%} |")
        else:
            lines.append(f"| {row['batch']} | {row.get('skipped', '')} | | | |")
    for name in ("training", "agreement", "fewshot", "memory"):
        if name in results:
            lines.append(f"\n{name}: `{json.dumps(results[name])}`")
    lines.append(f"\nwall: {results.get('wall_s', 0):.0f} s")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
