"""Distilled student versus its few-shot teacher on the real sample CTs, and whole-CT speed on a CPU (issue 4).

Quality
-------
Teacher: `FewShotSegmenter` on the embedded default backbone (cpu-tiny, 128² input, default
recipe), trained on lung2 (512×512×61, lesion on slices 15–25) with k = 3 fully labelled lesion
slices (16, 20, 24: the evenly spread choice) plus three fully labelled background slices
(5, 40, 55); every other slice is unlabelled. Student: `distill` on every slice of lung2 and
lung1 (512×512×48), with the six annotated lung2 slices also supervising it (CE + focal) and
the teacher's soft probabilities on all 109 slices (KL, T = 3).

Reported (3D Dice, `monai.metrics.compute_dice`): on lung2's held-out slices (all but the six
labelled ones) teacher vs reference, student vs reference, student vs teacher; on lung1 (never
labelled; the teacher saw no lung1 label) the same three.

Speed
-----
A 512×512×300 CT built by cycling lung2's slices back and forth (0…60, 59…0, …), written as
NIfTI, then ``lctfound segment predict big.nii.gz --model student -o out.nii.gz`` as a fresh
process (reading, model loading, prediction and writing included) with 2 threads, ``--runs``
times; the median wall time and the peak RSS of the process (`benchmarks/memory.py`, sampled
inside it) are reported, with the load average before each run (the CPU is shared). The
teacher runs the same command on the first ``--teacher-slices`` slices (fresh feature cache)
and its time is extrapolated linearly to 300 slices, unless ``--teacher-slices 300``.

    python benchmarks/bench_student.py --json benchmarks/results.jsonl
    python benchmarks/bench_student.py --skip-quality --student DIR   # timing only, an existing student
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

LESION_SLICES = (16, 20, 24)
BACKGROUND_SLICES = (5, 40, 55)


def machine(threads: int) -> str:
    return f"{platform.machine()} CPU, {threads} threads, torch {torch.__version__}"


def load_average() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


def dice(prediction: np.ndarray, truth: np.ndarray) -> float:
    from monai.metrics import compute_dice

    value = compute_dice(torch.from_numpy(prediction)[None, None].float(), torch.from_numpy(truth)[None, None].float(),
                         include_background=True)
    return float(value.item())


# ---------------------------------------------------------------------------------- quality
def quality(args, workdir: Path, samples: dict) -> dict:
    from lctfound.models import load_model, resolve_model
    from lctfound.pipelines.segmentation import UNLABELLED, FewShotConfig, FewShotSegmenter
    from lctfound.pipelines.student import StudentConfig, distill

    (lung2, lung2_label), (lung1, lung1_label) = samples["lung2"], samples["lung1"]
    truth2, truth1 = lung2_label.array == 1, lung1_label.array == 1
    labelled = sorted(LESION_SLICES + BACKGROUND_SLICES)
    labels = np.full(lung2.shape, UNLABELLED, dtype=np.int16)
    labels[labelled] = lung2_label.array[labelled]

    backbone = load_model(resolve_model("default"))
    teacher = FewShotSegmenter(backbone, {1: "Lesion"}, FewShotConfig(seed=args.seed))
    start = time.perf_counter()
    teacher.fit(lung2.array, labels)
    teacher_train_s = time.perf_counter() - start
    teacher_folder = workdir / "teacher"
    teacher.save(teacher_folder, extra={"name": "bench-teacher"}, overwrite=True)

    config = StudentConfig(architecture=args.architecture, features=tuple(args.features), resolution=args.resolution,
                           epochs=args.epochs, batch_size=args.batch_size, learning_rate=args.learning_rate,
                           seed=args.seed)
    from lctfound.progress import Progress

    shown = set()

    def report_epochs(done: int, total: int, message: str) -> None:
        key = message.split(":")[0] if message.startswith("teacher") else message
        if key not in shown:
            shown.add(key)
            print(f"  {time.strftime('%H:%M:%S')} {message} (load {load_average():.1f})", flush=True)

    student = distill(teacher, [lung2.array, lung1.array], [labels, None], config, Progress(report_epochs))
    student_folder = workdir / "student"
    student.save(student_folder, extra={"name": "bench-student"}, overwrite=True)
    report = student.report
    print(f"distilled: teacher pass {report.teacher_seconds:.0f} s, training {report.training_seconds:.0f} s, "
          f"losses {[round(x, 4) for x in report.losses]}", flush=True)

    held_out = [s for s in range(lung2.shape[0]) if s not in labelled]
    t2, s2 = teacher(lung2.array) == 1, student.predict(lung2.array) == 1
    t1, s1 = teacher(lung1.array) == 1, student.predict(lung1.array) == 1
    result = {
        "labelled_slices": labelled, "teacher_train_s": round(teacher_train_s, 1),
        "distill_teacher_pass_s": round(report.teacher_seconds, 1),
        "distill_training_s": round(report.training_seconds, 1),
        "student": {"architecture": args.architecture, "features": list(args.features),
                    "resolution": student.config.resolution,
                    "epochs": args.epochs, "batch_size": args.batch_size, "learning_rate": args.learning_rate,
                    "parameters": sum(p.numel() for p in student.network.parameters())},
        "lung2_heldout": {"teacher": dice(t2[held_out], truth2[held_out]),
                          "student": dice(s2[held_out], truth2[held_out]),
                          "student_vs_teacher": dice(s2[held_out], t2[held_out])},
        "lung1": {"teacher": dice(t1, truth1), "student": dice(s1, truth1), "student_vs_teacher": dice(s1, t1)},
        "agreement_distillation_slices": report.agreement,
    }
    result["lung2_heldout"]["student_minus_teacher"] = (result["lung2_heldout"]["student"]
                                                        - result["lung2_heldout"]["teacher"])
    return {"result": result, "teacher": teacher_folder, "student": student_folder}


# ---------------------------------------------------------------------------------- speed
def big_volume(path: Path, slices: int, lung2) -> Path:
    """lung2's slices cycled back and forth to ``slices`` slices, written as NIfTI."""
    from lctfound.io.volume import CTVolume, write_volume

    n = lung2.shape[0]
    cycle = list(range(n)) + list(range(n - 2, 0, -1))
    order = [cycle[i % len(cycle)] for i in range(slices)]
    volume = CTVolume(np.ascontiguousarray(lung2.array[order]), lung2.spacing, lung2.origin, lung2.direction)
    return write_volume(volume, path)


def run_cli(argv: list[str], threads: int, env_extra: dict | None = None) -> dict:
    """``lctfound <argv>`` as a fresh process (this script's ``_cli`` mode); wall time and peak RSS."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1",
           **(env_extra or {})}
    load = load_average()
    start = time.perf_counter()
    done = subprocess.run([sys.executable, __file__, "_cli", *argv], env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"lctfound {' '.join(argv)} failed ({done.returncode}):\n{done.stderr[-2000:]}")
    memory = json.loads(done.stdout.strip().splitlines()[-1])
    return {"seconds": wall, "load_before": load, "load_after": load_average(), **memory}


def cli_mode(argv: list[str]) -> int:
    """Run the CLI inside this process under `PeakRSS` and print the memory figures as JSON."""
    from memory import PeakRSS

    with PeakRSS() as peak:
        from lctfound.cli import main

        code = main(argv)
    print(json.dumps({"code": code, "peak_rss": peak.peak, "peak_rss_increase": peak.increase,
                      "peak_anonymous_increase": peak.anonymous_increase}))
    return code


def speed(args, workdir: Path, samples: dict, student: Path, teacher: Path | None) -> dict:
    big = workdir / "big.nii.gz"
    if not big.is_file():
        big_volume(big, args.slices, samples["lung2"][0])
    runs = []
    for run in range(args.runs):
        measured = run_cli(["segment", "predict", str(big), "--model", str(student), "-o",
                            str(workdir / f"student_out_{run}.nii.gz")], args.threads)
        print(f"student run {run + 1}: {measured['seconds']:.1f} s, peak RSS {measured['peak_rss'] / 2**20:.0f} MiB, "
              f"load {measured['load_before']:.2f}", flush=True)
        runs.append(measured)
    result = {"volume": f"lung2 slices cycled to 512×512×{args.slices}, NIfTI", "runs": runs,
              "student_median_s": statistics.median(r["seconds"] for r in runs),
              "student_peak_rss_mib": max(r["peak_rss"] for r in runs) / 2**20}
    if teacher is not None and args.teacher_slices:
        from lctfound.io.volume import read_volume, write_volume

        part = workdir / f"big_{args.teacher_slices}.nii.gz"
        if not part.is_file():
            volume = read_volume(big)
            write_volume(volume.slab(0, args.teacher_slices), part)
        cache = workdir / f"teacher-cache-{time.time_ns()}"
        measured = run_cli(["segment", "predict", str(part), "--model", str(teacher), "-o",
                            str(workdir / "teacher_out.nii.gz")], args.threads, {"LCTFOUND_CACHE_DIR": str(cache)})
        cache_bytes = sum(p.stat().st_size for p in cache.rglob("*") if p.is_file())
        import shutil

        shutil.rmtree(cache, ignore_errors=True)
        result["teacher"] = {**measured, "slices": args.teacher_slices, "feature_cache_bytes": cache_bytes,
                             "extrapolated_300_s": measured["seconds"] * args.slices / args.teacher_slices,
                             "extrapolated": args.teacher_slices != args.slices}
        print(f"teacher on {args.teacher_slices} slices: {measured['seconds']:.1f} s (load "
              f"{measured['load_before']:.2f}); linear extrapolation to {args.slices}: "
              f"{result['teacher']['extrapolated_300_s']:.0f} s", flush=True)
    return result


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_cli":
        sys.exit(cli_mode(sys.argv[2:]))
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="/tmp/lctfound-bench-student", help="models, volumes and caches")
    parser.add_argument("--architecture", default="basic", choices=["basic", "residual"])
    parser.add_argument("--features", type=lambda s: [int(x) for x in s.split(",")], default=[16, 32, 64, 128, 256])
    parser.add_argument("--resolution", type=int, help="student working resolution (default: the teacher's input)")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--slices", type=int, default=300, help="slices of the big volume (default 300)")
    parser.add_argument("--runs", type=int, default=3, help="timed student runs (median reported)")
    parser.add_argument("--teacher-slices", type=int, default=30, help="slices the teacher is timed on (0: skip)")
    parser.add_argument("--skip-quality", action="store_true", help="only the timing (needs --student)")
    parser.add_argument("--skip-speed", action="store_true", help="only the quality part")
    parser.add_argument("--student", help="existing student model folder (with --skip-quality)")
    parser.add_argument("--teacher", help="existing teacher model folder (with --skip-quality)")
    parser.add_argument("--json", help="append the results as JSON lines to this file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    print(f"machine: {machine(args.threads)}; load {load_average():.2f}", flush=True)
    from lctfound.io.sample_data import load_sample

    samples = {name: load_sample(name) for name in ("lung1", "lung2")}
    # Features go to a cache of the benchmark's own (the sample CTs stay in the user's cache).
    os.environ["LCTFOUND_CACHE_DIR"] = str(workdir / "feature-cache")
    lines = []
    if args.skip_quality:
        if not args.student:
            parser.error("--skip-quality needs --student")
        student, teacher = Path(args.student), Path(args.teacher) if args.teacher else None
    else:
        measured = quality(args, workdir, samples)
        student, teacher = measured["student"], measured["teacher"]
        print(json.dumps(measured["result"], indent=2), flush=True)
        lines.append({"what": "student-quality", **measured["result"]})
    if not args.skip_speed:
        timing = speed(args, workdir, samples, student, teacher)
        print(json.dumps({k: v for k, v in timing.items() if k != "runs"}, indent=2, default=str), flush=True)
        lines.append({"what": "student-speed", **timing})
    if args.json:
        with open(args.json, "a") as handle:
            for line in lines:
                handle.write(json.dumps({"what": line.pop("what"), "machine": machine(args.threads),
                                         "date": time.strftime("%Y-%m-%d"), "argv": sys.argv[1:], "result": line},
                                        default=str) + "\n")


if __name__ == "__main__":
    main()
