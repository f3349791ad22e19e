"""Real 2-process CPU trainings: `accelerate launch --config_file <rendered accelerate.yaml>` of
tests/assets/tiny_ds_train.py, for every ZeRO stage and offload (`zero_case`, see conftest.py).

DeepSpeed runs on CPU through its CPU accelerator with the gloo backend (DS_ACCELERATOR=cpu, as
`craken train` sets it). Each run takes 30-60 s on 2 cores; the first optimizer-offload run also
builds DeepSpeed's cpu_adam op once (~60 s, cached in ~/.cache/torch_extensions).

    pytest -m e2e tests/test_render_launch.py
"""

from __future__ import annotations

import math
import os
import re
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

SCRIPT = Path(__file__).parent / "assets" / "tiny_ds_train.py"
STEPS = 3


def test_launch_rendered_configs(zero_case, craken, workdir, free_port, python):
    out = workdir / "run"
    result = craken("config", "render", "--out", out, *zero_case.flags(), "--cpu", "--num-processes", "2",
                    "--micro-batch", "2", "--grad-accum", "2", "--max-steps", STEPS, "--main-process-port", free_port)
    assert result.code == 0, result.output
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([python, "-m", "accelerate.commands.launch", "--config_file", str(out / "accelerate.yaml"),
                           str(SCRIPT), "--steps", str(STEPS)],
                          cwd=workdir, env=env, capture_output=True, text=True, timeout=900)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-6000:]
    match = re.search(r"TINY_DS_TRAIN processes=(\d+) stage=(\d) steps=(\d+) micro_steps=(\d+) "
                      r"first_loss=(\S+) final_loss=(\S+)", proc.stdout)
    assert match, log[-6000:]
    processes, stage, steps, micro_steps = map(int, match.groups()[:4])
    assert (processes, stage, steps, micro_steps) == (2, zero_case.stage, STEPS, STEPS * 2)
    assert all(math.isfinite(float(x)) for x in match.groups()[4:])
