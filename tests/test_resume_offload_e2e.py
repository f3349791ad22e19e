"""Exact resume with the shipped `--zero 2` and `--zero 3` presets (both with CPU offload): a run
SIGKILLed after its checkpoint at step 15 and resumed logs, at every logged step, the losses of a
run never stopped, to the last bit; the first line after the resume (step 20, steps_per_print 10)
covers steps 11-20 as in that run, and metrics.jsonl holds no line of the steps trained again.

DeepSpeed's CPU Adam computed the bias correction of a resumed run with pow() where the run never
stopped multiplied beta once per step (checkpoint.replay_cpu_adam_steps); the partial loss sum was
lost at a resume (TrainState.loss_sums)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_reliability import kill_everything

ARGS = ["--num-processes", "2", "--seq-len", "32", "--micro-batch", "4", "--max-steps", "30", "--save-every", "15",
        "--steps-per-print", "10", "--eval-every", "0", "--keep-checkpoints", "5"]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CRAKEN_")}
    return {**env, "CRAKEN_NO_PROGRESS": "1"}


def start(run_dir: Path, *args: str) -> subprocess.Popen:
    log = open(run_dir.parent / f"{run_dir.name}-{len(list(run_dir.parent.glob('*.log')))}.log", "w")
    return subprocess.Popen([sys.executable, "-m", "craken_cli", "train", "--output-dir", str(run_dir), *args],
                            cwd=run_dir.parent, env=_env(), stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)


def losses(run_dir: Path) -> dict[int, float]:
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "loss" in record:
            assert record["step"] not in out, f"step {record['step']} logged twice"
            out[record["step"]] = record["loss"]
    return out


@pytest.mark.e2e
@pytest.mark.parametrize("preset", ["2", "3"])
def test_sigkill_and_resume_are_bit_exact_with_cpu_offload(preset, tmp_path):
    from craken_cli.train import checkpoint

    args = ["--preset", f"ds_zero{preset}", *ARGS]
    a_dir, b_dir = tmp_path / "A", tmp_path / "B"
    assert start(a_dir, *args).wait(timeout=900) == 0, (tmp_path / "A-0.log").read_text()[-3000:]
    proc = start(b_dir, *args)
    deadline = time.time() + 600
    while not checkpoint.list_checkpoints(b_dir) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before the kill"
    kill_everything(proc)
    assert [checkpoint.step_of(p) for p in checkpoint.list_checkpoints(b_dir)] == [15]
    assert start(b_dir, *args, "--resume", "auto").wait(timeout=900) == 0, \
        sorted(tmp_path.glob("B-*.log"))[-1].read_text()[-3000:]
    a, b = losses(a_dir), losses(b_dir)
    assert sorted(a) == [10, 20, 30] and a == b, (a, b)
    events = [json.loads(line).get("event") for line in (b_dir / "metrics.jsonl").read_text().splitlines()]
    assert events.count("start") == 1 and events.count("resume") == 1 and events[-1] == "end"
