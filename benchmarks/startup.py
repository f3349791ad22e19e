"""Start-up time of the commands people type most: `craken --help` and `craken config render`.

Each command runs as a fresh process, 7 times (after one warm-up run that fills the bytecode cache);
the median wall time is printed, with the minimum, the median CPU time (user + system, which
other load on the machine disturbs much less than wall time) and whether torch or deepspeed got
imported.
`--reference` also times `ds_report` and `accelerate env` (3 runs each), the figures quoted in
docs/performance.md next to craken's.

    python benchmarks/startup.py [--runs 7] [--reference] [--json]

The `craken` run is the console script installed beside this Python, not a shell shim in front of
it (pyenv's bash shim alone adds ~0.1 s on the 2-core CI machine).

Bytecode: craken's modules are compiled first (`compileall`), as `pip install` does for a wheel and as
Python's first run does by itself, unless PYTHONDONTWRITEBYTECODE is set, as it is on the CI
machine: there an editable checkout recompiles every module on every run (~0.2 s more; measure that
with `--no-compile` after deleting src/craken_cli/**/__pycache__).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# Prints which heavy modules a command imported, from inside the measured process.
_PROBE = ("import atexit, sys; atexit.register(lambda: sys.stderr.write("
          "'\\nHEAVY=' + ','.join(m for m in ('torch', 'deepspeed') if m in sys.modules) + '\\n')); "
          "from craken_cli.app import main; sys.argv[0] = 'craken'; main(sys.argv[1:])")


def craken_executable() -> list[str]:
    script = Path(sys.executable).with_name("craken")
    if script.is_file():
        return [str(script)]
    found = shutil.which("craken")
    return [found] if found else [sys.executable, "-m", "craken_cli"]


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def time_command(argv: list[str], runs: int, cwd: str) -> tuple[list[float], list[float]]:
    """(wall seconds, CPU seconds) of each run."""
    subprocess.run(argv, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # warm-up
    wall, cpu = [], []
    for _ in range(runs):
        c0, t0 = _children_cpu(), time.perf_counter()
        proc = subprocess.run(argv, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        wall.append(time.perf_counter() - t0)
        cpu.append(_children_cpu() - c0)
        if proc.returncode != 0:
            raise SystemExit(f"{' '.join(argv)} failed ({proc.returncode}):\n{proc.stderr}")
    return wall, cpu


def heavy_imports(args: list[str], cwd: str) -> str:
    proc = subprocess.run([sys.executable, "-c", _PROBE, *args], cwd=cwd, capture_output=True, text=True)
    line = [ln for ln in proc.stderr.splitlines() if ln.startswith("HEAVY=")]
    return (line[-1].removeprefix("HEAVY=") if line else "?") or "none"


def _row(label: str, wall: list[float], cpu: list[float], heavy: str) -> dict:
    return {"command": label, "median_s": round(statistics.median(wall), 3), "min_s": round(min(wall), 3),
            "cpu_median_s": round(statistics.median(cpu), 3), "runs": len(wall), "heavy_imports": heavy}


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--reference", action="store_true", help="also time ds_report and accelerate env")
    ap.add_argument("--json", action="store_true", help="print JSON instead of a table")
    ap.add_argument("--no-compile", action="store_true", help="do not compile craken's bytecode first")
    opts = ap.parse_args()

    if not opts.no_compile:
        import compileall

        import craken_cli

        compileall.compile_dir(Path(craken_cli.__file__).parent, quiet=1)
    exe = craken_executable()
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="craken-startup-") as tmp:
        out_dir = str(Path(tmp) / "out")
        cases = {
            "craken --help": ["--help"],
            "craken config render": ["config", "render", "--out", out_dir, "--force"],
        }
        rows = []
        for label, args in cases.items():
            rows.append(_row(label, *time_command(exe + args, opts.runs, tmp), heavy_imports(args, tmp)))
        if opts.reference:
            for label, argv in {"ds_report": ["ds_report"], "accelerate env": ["accelerate", "env"]}.items():
                if shutil.which(argv[0]) is None:
                    continue
                path = str(Path(sys.executable).with_name(argv[0]))
                argv = [path if Path(path).is_file() else argv[0], *argv[1:]]
                rows.append(_row(label, *time_command(argv, 3, tmp), "torch"))
    machine = {"cpu": cpu_model(), "cores": os.cpu_count(), "python": platform.python_version(),
               "executable": " ".join(exe), "load_average": round(load, 2), "bytecode_compiled": not opts.no_compile}
    if opts.json:
        print(json.dumps({"machine": machine, "results": rows}, indent=2))
        return
    print(f"{machine['cores']} cores, {machine['cpu']}, Python {machine['python']}; craken = {machine['executable']}")
    print(f"load average before the runs: {load:.2f}")
    print("| command | wall median (s) | wall min (s) | CPU median (s) | runs | torch/deepspeed imported |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| `{r['command']}` | {r['median_s']:.3f} | {r['min_s']:.3f} | {r['cpu_median_s']:.3f} | {r['runs']} "
              f"| {r['heavy_imports']} |")


if __name__ == "__main__":
    main()
