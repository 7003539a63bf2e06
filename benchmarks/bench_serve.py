"""The cost of the department server's remote path (issue 14): a 512×512×300 CT predicted with a
distilled student, locally and through ``lctfound serve`` on loopback, and the server's throughput
with 1, 2 and 4 clients at once.

Local: ``lctfound segment predict big.nii.gz --model STUDENT -o out.nii.gz`` as a fresh process.
Remote: the same command with ``--server URL`` against a server started here with
``--models student=STUDENT`` (one CPU worker), so the difference is reading and compressing the
volume, the upload, the queue, the server's job process (reading the upload, loading the model), the
download and writing — the prediction itself is the same code on the same CPU. Both outputs must be
identical voxel for voxel. Then N clients (distinct client ids) submit the same prediction at once;
throughput = N / wall time of the slowest. The local/remote figures are the median of ``--runs``
(alternated), the concurrent ones of ``--concurrent-runs``; the load average before each run is
printed (the CPU is shared).

    python benchmarks/bench_student.py --skip-speed --workdir W        # makes W/student (once)
    python benchmarks/bench_serve.py --student W/student --runs 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "Testing"))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def load_average() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


def timed(argv: list[str], env: dict) -> float:
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "lctfound", *argv], env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"lctfound {' '.join(argv)} failed ({done.returncode}): {done.stderr[-1500:]}")
    return time.perf_counter() - start


def concurrent(argvs: list[list[str]], envs: list[dict]) -> float:
    start = time.perf_counter()
    processes = [subprocess.Popen([sys.executable, "-m", "lctfound", *argv], env=env, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.PIPE, text=True) for argv, env in zip(argvs, envs)]
    for process in processes:
        _, err = process.communicate()
        if process.returncode != 0:
            raise SystemExit(f"a concurrent client failed: {err[-1500:]}")
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--student", required=True, help="a distilled student model folder")
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--clients", default="1,2,4")
    parser.add_argument("--concurrent-runs", type=int, default=1, help="runs per client count (median reported)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--json", help="append the results as one JSON line to this file")
    args = parser.parse_args()

    from bench_student import big_volume
    from server_helpers import Server

    from lctfound.io.sample_data import load_sample
    from lctfound.io.volume import read_label_volume

    work = Path(args.workdir or tempfile.mkdtemp(prefix="lctfound-bench-serve-"))
    work.mkdir(parents=True, exist_ok=True)
    big = work / "big.nii.gz"
    if not big.is_file():
        big_volume(big, args.slices, load_sample("lung2")[0])
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", OMP_NUM_THREADS=str(args.threads),
               LCTFOUND_CACHE_DIR=str(work / "cache"))
    server = Server(work / "server-data", work / "server-cache",
                    ["--models", f"student={Path(args.student).resolve()}", "--max-jobs-per-client", "8",
                     "--max-upload-mb", "4096"], env={"OMP_NUM_THREADS": str(args.threads)})  # as the local run
    results: dict = {"volume": f"lung2 cycled to 512×512×{args.slices}, NIfTI", "threads": args.threads}
    try:
        client_env = dict(env, LCTFOUND_SERVER_TOKEN=server.token, LCTFOUND_CLIENT_ID="bench")
        local, remote = [], []
        for run in range(args.runs):  # alternated, so a load change hits both alike
            load = load_average()
            local.append(timed(["segment", "predict", str(big), "--model", args.student, "-o",
                                str(work / f"local_{run}.nii.gz"), "--overwrite"], env))
            remote.append(timed(["segment", "predict", str(big), "--model", "student", "--server", server.url,
                                 "-o", str(work / f"remote_{run}.nii.gz"), "--overwrite"], client_env))
            print(f"run {run + 1}: local {local[-1]:.1f} s, remote {remote[-1]:.1f} s (load {load:.2f})", flush=True)
        same = np.array_equal(read_label_volume(work / "local_0.nii.gz").array,
                              read_label_volume(work / "remote_0.nii.gz").array)
        results.update(local_s=statistics.median(local), remote_s=statistics.median(remote), local_runs=local,
                       remote_runs=remote, identical=bool(same))
        results["overhead_s"] = results["remote_s"] - results["local_s"]
        results["overhead_ratio"] = results["overhead_s"] / results["local_s"]
        print(f"local {results['local_s']:.1f} s, remote {results['remote_s']:.1f} s: overhead "
              f"{results['overhead_s']:.1f} s ({100 * results['overhead_ratio']:.1f} %), identical: {same}", flush=True)

        throughput = {}
        for count in (int(c) for c in args.clients.split(",")):
            walls = []
            for run in range(args.concurrent_runs):
                argvs = [["segment", "predict", str(big), "--model", "student", "--server", server.url, "-o",
                          str(work / f"c{count}_{i}.nii.gz"), "--overwrite"] for i in range(count)]
                envs = [dict(client_env, LCTFOUND_CLIENT_ID=f"bench-{i}") for i in range(count)]
                walls.append(concurrent(argvs, envs))
            wall = statistics.median(walls)
            throughput[count] = {"wall_s": wall, "ct_per_min": 60 * count / wall, "runs": walls}
            print(f"{count} client(s) at once: {wall:.1f} s for all, {60 * count / wall:.2f} CT/min", flush=True)
        results["concurrent"] = throughput
    finally:
        server.stop()
    if args.json:
        with open(args.json, "a", encoding="utf-8") as handle:
            handle.write(json.dumps({"benchmark": "serve", "date": time.strftime("%Y-%m-%d %H:%M"), **results}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
