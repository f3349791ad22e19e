"""Wall time of `craken doctor` (default path, no --deep): median of 7 runs.

    python benchmarks/startup_doctor.py [--runs 7]

Each run is a fresh `python -m craken_cli doctor` process with stdout to a pipe, as a script or CI
job would call it; the exit code (0/1/2) is the verdict and does not matter here. The budget is
1.0 s on the 2-core CI machine without GPUs (docs/performance.md, section "craken doctor").
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import statistics
import subprocess
import sys
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args()
    argv = [sys.executable, "-m", "craken_cli", "doctor"]
    subprocess.run(argv, capture_output=True, check=False)  # warm the file cache and .pyc files
    times, cpu = [], []
    for _ in range(args.runs):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.perf_counter()
        done = subprocess.run(argv, capture_output=True, check=False)
        times.append(time.perf_counter() - start)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu.append(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime)
        if done.returncode not in (0, 1, 2):
            sys.exit(f"craken doctor crashed (exit {done.returncode}):\n{done.stderr.decode()}")
    print(f"craken doctor: median {statistics.median(times):.3f} s, min {min(times):.3f} s, "
          f"max {max(times):.3f} s over {args.runs} runs; CPU time (user+sys) median {statistics.median(cpu):.3f} s")
    print(f"machine: {os.cpu_count()} cores, {platform.processor() or platform.machine()}, "
          f"Python {platform.python_version()}, load average {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
