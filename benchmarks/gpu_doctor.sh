#!/usr/bin/env bash
# craken doctor on a GPU machine: the report a person reads, then the JSON a script reads.
# Run from the repository root with craken installed (pip install -e .):
#     bash benchmarks/gpu_doctor.sh
# Paste both outputs into the closing note of issue 3 (GPU names, memory, capability, links).
set -u
echo "== nvidia-smi (for comparison)"
nvidia-smi --query-gpu=index,name,memory.total,memory.free,compute_cap,driver_version --format=csv || true
nvidia-smi topo -m || true
echo
echo "== python3 -m craken_cli doctor"
python3 -m craken_cli doctor
echo "exit code: $?"
echo
echo "== python3 -m craken_cli doctor --json"
python3 -m craken_cli doctor --json
echo "exit code: $?"
echo
echo "== wall time, median of 7 (benchmarks/startup_doctor.py)"
python3 benchmarks/startup_doctor.py
