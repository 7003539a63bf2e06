"""Start-up time of the command line (issue 15, item 6): a fresh ``python -m lctfound ARGS`` process
per run, from a neutral folder, output discarded; median wall-clock and CPU (user + sys of the child)
seconds over ``--runs`` runs for each command. The load average before the runs is printed: wall time
on a busy machine is inflated, CPU time much less.

    python benchmarks/bench_startup.py --runs 10
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = (("--help",), ("segment", "predict", "--help"), ("enhance", "sparse-view", "--help"),
            ("data", "--help"), ("--version",))


def time_command(args: tuple[str, ...], runs: int, folder: str) -> tuple[float, float]:
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1")
    walls, cpus = [], []
    for _ in range(runs):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = os.times().elapsed
        subprocess.run([sys.executable, "-m", "lctfound", *args], cwd=folder, env=env, check=False,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        walls.append(os.times().elapsed - start)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpus.append(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)
    return statistics.median(walls), statistics.median(cpus)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=10)
    args = parser.parse_args()
    print(f"load average before: {Path('/proc/loadavg').read_text().split()[0] if Path('/proc/loadavg').exists() else '?'}")
    print("| command | wall (median) | CPU (median) |")
    print("| --- | ---: | ---: |")
    with tempfile.TemporaryDirectory() as folder:
        for command in COMMANDS:
            wall, cpu = time_command(command, args.runs, folder)
            print(f"| `lctfound {' '.join(command)}` | {wall:.2f} s | {cpu:.2f} s |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
