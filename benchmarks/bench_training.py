"""Pretraining throughput of each preset (images/s), with model FLOPs utilisation on a GPU.

For every preset: a few warm-up steps, then timed optimizer steps of the real training module
(ε-MSE, AdamW, clipping; bf16 autocast on GPUs that support it) at the given resolution and
batch. FLOPs per image come from PyTorch's FlopCounterMode on one forward + backward; on a GPU
the achieved FLOP rate is compared with the GPU's measured bf16 matrix-multiply peak (MFU).
Reference point (the paper): 28M images per 144 h epoch on 16 V100s ≈ 3.4 images/s per GPU.

    python benchmarks/bench_training.py --presets cpu-tiny cpu-base official --resolution 256 --batch-size 4
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lctfound.models import new_model  # noqa: E402
from lctfound.training.pretrain import DiffusionModule  # noqa: E402
from lctfound.windows import WINDOWS  # noqa: E402


def matmul_peak_tflops(device: torch.device, dtype=torch.bfloat16, size: int = 8192, repeats: int = 20) -> float:
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    torch.cuda.synchronize(device)
    return 2 * size**3 * repeats / (time.perf_counter() - start) / 1e12


def flops_per_image(module: DiffusionModule, batch: dict) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        module(batch).backward()
    module.zero_grad(set_to_none=True)
    return counter.get_total_flops() / batch["pixel_values"].shape[0]


def make_batch(batch_size: int, resolution: int, device: torch.device) -> dict:
    generator = torch.Generator().manual_seed(0)
    prompts = [WINDOWS["lung" if i % 2 else "mediastinal"].prompt() for i in range(batch_size)]
    return {"pixel_values": torch.rand((batch_size, 3, resolution, resolution), generator=generator).to(device) * 2 - 1,
            "noise": torch.randn((batch_size, 3, resolution, resolution), generator=generator).to(device),
            "timesteps": torch.randint(0, 1000, (batch_size,), generator=generator).to(device), "prompt": prompts}


def bench(preset: str, args, device: torch.device) -> dict:
    model = new_model(preset, seed=0)
    module = DiffusionModule(model.unet, model.condition_encoder).to(device).train()
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-4)
    batch = make_batch(args.batch_size, args.resolution, device)
    use_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if use_bf16 else torch.autocast("cpu", enabled=False)
    flops = flops_per_image(module, batch)

    def step():
        with autocast:
            loss = module(batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(module.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(args.warmup):
        step()
    times = []
    for _ in range(args.steps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    median = statistics.median(times)
    images_per_second = args.batch_size / median
    result = {"preset": preset, "parameters": sum(p.numel() for p in module.unet.parameters()),
              "resolution": args.resolution, "batch_size": args.batch_size, "median_step_s": median,
              "images_per_second": images_per_second, "gflops_per_image_fwd_bwd": flops / 1e9,
              "achieved_tflops": flops * images_per_second / 1e12, "precision": "bf16" if use_bf16 else "fp32"}
    print(json.dumps(result), flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["cpu-tiny", "cpu-base", "official"])
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", help="append results as JSON lines to this file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    machine = (torch.cuda.get_device_name(0) if device.type == "cuda"
               else f"{platform.machine()} CPU, {torch.get_num_threads()} threads")
    print(f"machine: {machine}, torch {torch.__version__}", flush=True)
    peak = matmul_peak_tflops(device) if device.type == "cuda" else None
    if peak:
        print(f"measured bf16 matmul peak: {peak:.1f} TFLOP/s", flush=True)
    results = []
    for preset in args.presets:
        result = bench(preset, args, device)
        if peak:
            result["mfu"] = result["achieved_tflops"] / peak
            print(f"{preset}: MFU {result['mfu']:.1%} of the measured bf16 peak", flush=True)
        results.append(result)
    if args.json:
        with open(args.json, "a") as handle:
            for result in results:
                handle.write(json.dumps({"machine": machine, "date": time.strftime("%Y-%m-%d"),
                                         "peak_bf16_tflops": peak, **result}) + "\n")


if __name__ == "__main__":
    main()
