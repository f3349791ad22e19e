"""ZeRO-1 with fp32 gradient accumulation (DeepSpeed's BF16 optimizer, `zero.fp32_grad_accum`), for real:
2-process CPU trainings of the built-in tiny model. A trains on 2 processes with it on, B the same with
DeepSpeed's ZeRO optimizer (off, the default with several processes). The BF16 optimizer's
checkpoint files are of its own kind (only it and DeepSpeed's universal converter read them), which
export and the resume must read: C resumes A on 1 process (on by default there), D resumes C on 2 processes with
it off, so the universal conversion crosses the two optimizers.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

COMMON = ["--zero", "1", "--seq-len", "32", "--micro-batch", "8", "--global-batch", "16", "--steps-per-print", "1",
          "--eval-every", "0", "--save-every", "4", "--keep-checkpoints", "10", "--max-steps", "12"]


def train(run_dir: Path, *args: str) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CRAKEN_")}
    proc = subprocess.run([sys.executable, "-m", "craken_cli", "train", "--output-dir", str(run_dir), *COMMON, *args],
                          cwd=run_dir.parent, env={**env, "CRAKEN_NO_PROGRESS": "1"}, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return proc.stdout + proc.stderr


def losses(run_dir: Path) -> dict[int, float]:
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return {r["step"]: r["loss"] for r in lines if "loss" in r}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("fp32accum")
    a, b, c, d = root / "A", root / "B", root / "C", root / "D"
    train(a, "--num-processes", "2", "--set", "zero.fp32_grad_accum=true", "--main-process-port", "29631")
    train(b, "--num-processes", "2", "--save-every", "0", "--main-process-port", "29634")  # the ZeRO optimizer
    c_log = train(c, "--num-processes", "1", "--resume", str(a / "checkpoints" / "step_00000008"),
                  "--main-process-port", "29632")
    d_log = train(d, "--num-processes", "2", "--resume", str(c / "checkpoints" / "step_00000012"),
                  "--max-steps", "16", "--main-process-port", "29633")
    e = root / "E"  # A's processes, the ZeRO optimizer
    e_log = train(e, "--num-processes", "2", "--resume", str(a / "checkpoints" / "step_00000008"),
                  "--set", "zero.fp32_grad_accum=false", "--main-process-port", "29635")
    return {"A": a, "B": b, "C": c, "D": d, "E": e, "c_log": c_log, "d_log": d_log, "e_log": e_log}


def test_bf16_optimizer_trains_and_writes_its_own_checkpoints(runs):
    a = runs["A"]
    assert json.loads((a / "ds_config.json").read_text())["data_types"] == {"grad_accum_dtype": "fp32"}
    from craken_cli.train import checkpoint

    # which optimizer wrote a checkpoint is recorded (both name their files bf16_zero_*)
    assert checkpoint.read_state(a / "checkpoints" / "step_00000012").fp32_grad_accum is True
    assert checkpoint.read_state(runs["B"] / "checkpoints" / "step_00000012").fp32_grad_accum is False
    loss, zero_optimizer = losses(a), losses(runs["B"])
    assert loss[12] < loss[1] - 0.5, loss
    # the same AdamW on the same fp32 master weights: only where the gradients are summed differs
    assert all(abs(loss[s] - zero_optimizer[s]) / zero_optimizer[s] < 0.01 for s in loss), (loss, zero_optimizer)
    # with one process fp32 accumulation is on by default, with two it is off
    assert json.loads((runs["C"] / "ds_config.json").read_text())["data_types"] == {"grad_accum_dtype": "fp32"}
    assert "data_types" not in json.loads((runs["D"] / "ds_config.json").read_text())


def test_resume_on_another_number_of_processes_crosses_the_optimizers(runs):
    a, c, d = losses(runs["A"]), losses(runs["C"]), losses(runs["D"])
    for log in (runs["c_log"], runs["d_log"]):
        assert "converting it to a universal checkpoint" in log
    assert min(c) == 9 and min(d) == 13
    # the first resumed step continues from the weights and moments of the checkpoint
    assert abs(c[9] - a[9]) / a[9] < 0.02, (c[9], a[9])
    assert abs(d[13] - c[12]) / c[12] < 0.05, (d[13], c[12])
    assert d[16] < c[12] < a[1] - 0.5
    # same processes, the other optimizer: converted too (each optimizer reads only its own files)
    assert "accumulated in fp32, this run accumulates in 16 bits: converting it to a universal" in runs["e_log"]
    e = losses(runs["E"])
    assert min(e) == 9 and abs(e[9] - a[9]) / a[9] < 0.02, (e[9], a[9])


def test_export_reads_bf16_optimizer_checkpoints(runs, tmp_path):
    import torch
    from safetensors.torch import load_file

    out = tmp_path / "exported"
    proc = subprocess.run([sys.executable, "-m", "craken_cli", "ckpt", "export", str(runs["A"]), "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    exported, saved = load_file(out / "model.safetensors"), load_file(runs["A"] / "final" / "model.safetensors")
    # final/ also names the tied output head; the export keeps one copy, which from_pretrained ties
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is True
    assert set(saved) - set(exported) == {"lm_head.weight"} and set(exported) < set(saved)
    # The fp32 master weights, cast to the model's 16-bit dtype, are the 16-bit weights trained with.
    assert all(torch.equal(exported[k].to(saved[k].dtype), saved[k]) for k in exported)
