"""Real trainings on a CUDA GPU (marker `gpu`; skipped where torch sees none, as on CI's CPU machine).

Run on a GPU machine with `python -m pytest -m gpu tests/test_gpu_e2e.py -s`. Each run is the built-in
tiny model for a few steps: what is checked is what only a GPU shows (the engine each strategy takes,
fp32 master weights under bf16, resume on the GPU), not speed.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def train(tmp_path: Path, name: str, *flags: str) -> tuple[subprocess.CompletedProcess, list[dict]]:
    run_dir = tmp_path / name
    argv = [sys.executable, "-m", "craken_cli", "train", "--output-dir", str(run_dir), "--max-steps", "6",
            "--steps-per-print", "2", "--eval-every", "0", "--num-processes", "1", *flags]
    proc = subprocess.run(argv, capture_output=True, text=True, cwd=tmp_path, timeout=600)
    metrics = run_dir / "metrics.jsonl"
    records = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.is_file() else []
    return proc, records


def start_line(records: list[dict]) -> dict:
    return next(r for r in records if r.get("event") == "start")


@pytest.mark.parametrize("flags, strategy", [(("--zero", "0"), "zero0"), (("--zero", "2"), "zero2")])
def test_bf16_trains_with_fp32_masters(tmp_path, flags, strategy):
    proc, records = train(tmp_path, strategy, "--precision", "bf16", *flags)
    assert proc.returncode == 0, proc.stderr[-3000:]
    start = start_line(records)
    assert start["strategy"].startswith(strategy), start
    # DeepSpeed's CPU Adam makes its moments at its first step: the line after that step measures them
    measured = next((r for r in records if r.get("event") == "precision"), start)
    assert start["master_dtype"] == measured["master_dtype"] == "float32", start
    assert measured["optimizer_state_dtype"] == "float32", measured
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) >= 2 and all(loss == loss for loss in losses)  # logged, and no NaN
    assert (tmp_path / strategy / "final").is_dir()


def test_resume_on_the_gpu_continues_the_step_count(tmp_path):
    first, _ = train(tmp_path, "resume", "--save-every", "3")
    assert first.returncode == 0, first.stderr[-3000:]
    again, records = train(tmp_path, "resume", "--save-every", "3", "--max-steps", "9", "--resume", "auto")
    assert again.returncode == 0, again.stderr[-3000:]
    steps = [r["step"] for r in records if "loss" in r]
    assert steps and steps[-1] == 9, steps
