"""Official-configuration features on the CPU: which way of running the network is fastest at
≤ 1 % error (issue 13, "Official inference that is fast where users are").

One run, one machine, the official preset (random weights: speed does not depend on them), one
real slice (the sample CT lung1, slice 24, mediastinal window, the engine's preprocessing), the
paper's four timesteps with the engine's seeded noise. For every variant:

  seconds per 256² forward (median of ``--repeats`` after a warm-up), slices/s with 4 timesteps,
  achieved GFLOP/s (model FLOPs counted with ``torch.utils.flop_counter``) against the measured
  fp32 matmul rate of this CPU (the bound), and the features' relative error against fp32 eager:
  ‖f − f_fp32‖ / ‖f_fp32‖ over the outputs of up blocks 1–4 at all four timesteps (what the
  features are resized from), and the worst single (timestep, block).

Variants: fp32 eager (the reference); fp32 channels-last; bf16 autocast (what
`lctfound.devices.resolve_precision` picks on CPUs with native bf16); bf16 weights; fp32
``torch.compile``; ONNX Runtime fp32 and OpenVINO (its default CPU precision) where those packages
import (``PYTHONPATH`` to a folder holding them: they are not project dependencies).

    python benchmarks/bench_cpu_inference.py --threads 2 --json benchmarks/results.jsonl
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from lctfound.devices import cpu_has_native_bf16
from lctfound.features import FeatureExtractor, FeatureSpec
from lctfound.models import new_model

BLOCKS = (1, 2, 3, 4)


class TappedUNet(torch.nn.Module):
    """The U-Net returning the outputs of up blocks 1–4 (what the features are made of) instead of
    its noise prediction, so exporters and compilers see the tapped tensors as outputs."""

    def __init__(self, unet: torch.nn.Module):
        super().__init__()
        self.unet = unet
        self._captured: dict[int, torch.Tensor] = {}
        for block in BLOCKS:
            unet.up_blocks[block - 1].register_forward_hook(self._keeper(block))

    def _keeper(self, block: int):
        def keep(_module, _inputs, output):
            self._captured[block] = output[0] if isinstance(output, tuple) else output
        return keep

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, condition: torch.Tensor):
        self.unet(sample, timestep, encoder_hidden_states=condition)
        return tuple(self._captured[block] for block in BLOCKS)


class FP32Attention:
    """An attention processor run outside autocast, in fp32: attention logits are where bf16 loses most."""

    def __init__(self, inner):
        self.inner = inner

    def __call__(self, attn, hidden_states, *args, **kwargs):
        def fp32(value):
            return value.float() if torch.is_tensor(value) and value.is_floating_point() else value

        with torch.autocast("cpu", enabled=False):
            return self.inner(attn, fp32(hidden_states), *[fp32(a) for a in args],
                              **{k: fp32(v) for k, v in kwargs.items()})


def matmul_gflops(size: int = 2048, repeats: int = 5) -> float:
    """The fp32 matmul rate this CPU reaches (GFLOP/s): the compute bound of a convolutional net."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    torch.mm(a, b)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        times.append(time.perf_counter() - start)
    return 2 * size ** 3 / statistics.median(times) / 1e9


def forward_flops(tapped: TappedUNet, inputs) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        tapped(*inputs)
    return int(counter.get_total_flops())


def relative_error(outputs: list[tuple[torch.Tensor, ...]], reference: list[tuple[torch.Tensor, ...]]):
    """Overall ‖Δ‖/‖ref‖ over every tapped tensor of every timestep, and the worst single tensor."""
    squared_error = squared_norm = 0.0
    worst = 0.0
    for got, want in zip(outputs, reference):
        for a, b in zip(got, want):
            a, b = a.float(), b.float()
            diff = float(torch.linalg.vector_norm(a - b)) ** 2
            norm = float(torch.linalg.vector_norm(b)) ** 2
            squared_error, squared_norm = squared_error + diff, squared_norm + norm
            worst = max(worst, (diff / norm) ** 0.5)
    return (squared_error / squared_norm) ** 0.5, worst


def torch_runner(tapped: TappedUNet, autocast: bool = False, dtype: torch.dtype = torch.float32,
                 channels_last: bool = False) -> Callable:
    def run(sample, timestep, condition):
        sample, condition = sample.to(dtype), condition.to(dtype)
        if channels_last:
            sample = sample.contiguous(memory_format=torch.channels_last)
        with torch.no_grad():
            if autocast:
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    return tapped(sample, timestep, condition)
            return tapped(sample, timestep, condition)
    return run


def onnxruntime_runner(tapped: TappedUNet, inputs, folder: Path, threads: int) -> Callable:
    import onnxruntime

    path = folder / "unet.onnx"
    # The dynamo exporter with external weights: the TorchScript exporter (dynamo=False) needed more
    # than 22 GB of RAM for the official network here and was OOM-killed.
    torch.onnx.export(tapped, inputs, str(path), input_names=["sample", "timestep", "condition"],
                      output_names=[f"up{b}" for b in BLOCKS], dynamo=True, external_data=True)
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def run(sample, timestep, condition):
        outputs = session.run(None, {"sample": sample.numpy(), "timestep": timestep.numpy(),
                                     "condition": condition.numpy()})
        return tuple(torch.from_numpy(o) for o in outputs)
    return run


def openvino_runner(tapped: TappedUNet, inputs, threads: int) -> Callable:
    import openvino

    model = openvino.convert_model(tapped, example_input=inputs)
    core = openvino.Core()
    compiled = core.compile_model(model, "CPU", {"INFERENCE_NUM_THREADS": threads})
    precision = compiled.get_property("INFERENCE_PRECISION_HINT")

    def run(sample, timestep, condition):
        result = compiled([sample.numpy(), timestep.numpy(), condition.numpy()])
        return tuple(torch.from_numpy(result[compiled.output(i)].copy()) for i in range(len(BLOCKS)))
    run.precision = str(precision)
    return run


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="official")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--variants", nargs="+",
                        default=["fp32", "fp32-channels-last", "bf16-autocast", "bf16-weights", "fp32-compile",
                                 "onnxruntime", "openvino"])
    parser.add_argument("--input-size", type=int,
                        help="feed the slice at this size instead of the model's (e.g. 64: the error of bf16, "
                             "which this CPU only emulates ~90× slower than fp32, measured on a 16× smaller input)")
    parser.add_argument("--json", help="append the results as one JSON line to this file")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    from lctfound.io.sample_data import load_sample

    model = new_model(args.preset, seed=0)
    model.unet.eval().requires_grad_(False)
    model.condition_encoder.eval()
    extractor = FeatureExtractor(model, FeatureSpec(), precision="fp32")
    image, _ = load_sample("lung1")
    x0 = extractor.prepare(image.array[24:25])
    if args.input_size:
        x0 = torch.nn.functional.interpolate(x0, size=(args.input_size, args.input_size), mode="area")
    noise = extractor.noise_for([24], tuple(x0.shape[1:]))
    condition = extractor._condition(1)
    timesteps = list(FeatureSpec().timesteps)
    inputs_per_t = [(model.scheduler.add_noise(x0, noise, torch.tensor([t])), torch.tensor([t]), condition)
                    for t in timesteps]
    tapped = TappedUNet(model.unet).eval()
    peak = matmul_gflops()
    flops = forward_flops(tapped, inputs_per_t[0])
    info = {"machine": f"{platform.node()} {platform.processor() or platform.machine()}",
            "cpu": torch.cpu.get_capabilities().get("cpu_name") if hasattr(torch.cpu, "get_capabilities") else "",
            "native_bf16": cpu_has_native_bf16(), "threads": args.threads, "torch": torch.__version__,
            "preset": args.preset, "input_size": int(x0.shape[-1]), "forward_gflop": flops / 1e9, "fp32_matmul_gflops": peak,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    print(json.dumps(info), flush=True)
    reference = None
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for variant in args.variants:
            setup_start = time.perf_counter()
            note = ""
            tapped_cl = tapped_bf16 = compiled = None  # a variant's own network copy, dropped after it
            try:
                if variant == "fp32":
                    run = torch_runner(tapped)
                elif variant == "fp32-channels-last":
                    tapped_cl = TappedUNet(new_model(args.preset, seed=0).unet.eval().requires_grad_(False)
                                           .to(memory_format=torch.channels_last))
                    run = torch_runner(tapped_cl, channels_last=True)
                elif variant == "bf16-autocast":
                    run = torch_runner(tapped, autocast=True)
                elif variant == "bf16-autocast-fp32-attention":
                    copy = new_model(args.preset, seed=0).unet.eval().requires_grad_(False)
                    copy.set_attn_processor({name: FP32Attention(p) for name, p in copy.attn_processors.items()})
                    tapped_bf16 = TappedUNet(copy)
                    run = torch_runner(tapped_bf16, autocast=True)
                elif variant == "bf16-weights":
                    tapped_bf16 = TappedUNet(new_model(args.preset, seed=0).unet.eval().requires_grad_(False)
                                             .to(torch.bfloat16))
                    run = torch_runner(tapped_bf16, dtype=torch.bfloat16)
                elif variant == "fp32-compile":
                    compiled = torch.compile(tapped)
                    run = torch_runner(compiled)
                elif variant == "onnxruntime":
                    run = onnxruntime_runner(tapped, inputs_per_t[0], Path(tmp), args.threads)
                elif variant == "openvino":
                    run = openvino_runner(tapped, inputs_per_t[0], args.threads)
                    note = f"inference precision {run.precision}"
                else:
                    raise SystemExit(f"unknown variant {variant}")
                outputs = [run(*inputs) for inputs in inputs_per_t]  # also the warm-up (and compilation)
            except ImportError as error:
                rows.append({"variant": variant, "skipped": f"not installed ({error.name})"})
                print(json.dumps(rows[-1]), flush=True)
                continue
            except Exception as error:  # a runtime that cannot take this network is a result too
                rows.append({"variant": variant, "skipped": f"failed: {type(error).__name__}: "
                                                           f"{str(error).splitlines()[0][:200] if str(error) else ''}"})
                print(json.dumps(rows[-1]), flush=True)
                continue
            setup = time.perf_counter() - setup_start
            times = []
            for repeat in range(args.repeats):
                inputs = inputs_per_t[repeat % len(inputs_per_t)]
                start = time.perf_counter()
                run(*inputs)
                times.append(time.perf_counter() - start)
            seconds = statistics.median(times)
            if reference is None:
                reference = [tuple(o.float().clone() for o in out) for out in outputs]
            overall, worst = relative_error(outputs, reference)
            rows.append({"variant": variant, "s_per_forward": seconds, "runs": times,
                         "slices_per_s": 1 / (seconds * len(timesteps)), "gflops": flops / seconds / 1e9,
                         "fraction_of_matmul_peak": flops / seconds / 1e9 / peak,
                         "relative_error": overall, "worst_block_error": worst, "setup_s": setup, "note": note})
            print(json.dumps(rows[-1]), flush=True)
            del run, outputs, tapped_cl, tapped_bf16, compiled  # one network copy at a time (official: 1.2 GB)
            gc.collect()
    base = next(r for r in rows if r["variant"] == "fp32")["s_per_forward"]
    print()
    print(f"| variant | s / forward | slices/s (4 timesteps) | speed-up | GFLOP/s (% of {peak:.0f} matmul) | "
          "feature error | worst block | setup s |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for row in rows:
        if "skipped" in row:
            print(f"| {row['variant']} | — | — | — | — | — | — | {row['skipped']} |")
            continue
        print(f"| {row['variant']}{' (' + row['note'] + ')' if row['note'] else ''} | {row['s_per_forward']:.2f} | "
              f"{row['slices_per_s']:.4f} | {base / row['s_per_forward']:.2f}× | {row['gflops']:.0f} "
              f"({100 * row['fraction_of_matmul_peak']:.0f} %) | {100 * row['relative_error']:.3f} % | "
              f"{100 * row['worst_block_error']:.3f} % | {row['setup_s']:.0f} |")
    if args.json:
        with open(args.json, "a") as handle:
            handle.write(json.dumps({"what": "cpu_inference", "argv": sys.argv[1:], **info, "rows": rows}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
