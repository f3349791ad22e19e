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


COMPILED_SCRIPT = '''
"""A plain Accelerate loop: what accelerate's prepare made of the model, then a few steps."""
import json, os, sys
import torch
from accelerate import Accelerator
from transformers import AutoModelForCausalLM

accelerator = Accelerator()
model = AutoModelForCausalLM.from_pretrained(sys.argv[1])
optimizer = torch.optim.AdamW(model.parameters(), lr=float(os.environ["CRAKEN_PLAN_LR"]))
model, optimizer = accelerator.prepare(model, optimizer)
compiled = sum(type(m).__name__ == "OptimizedModule" or getattr(m, "_compiled_call_impl", None) is not None
               for m in model.modules())
shape = (int(os.environ["CRAKEN_PLAN_MICRO_BATCH"]), int(os.environ["CRAKEN_PLAN_SEQ_LEN"]))
batch = torch.randint(0, accelerator.unwrap_model(model).config.vocab_size, shape, device=accelerator.device)
losses = []
for step in range(4):  # the same batch each step: its loss must fall
    loss = model(input_ids=batch, labels=batch).loss
    accelerator.backward(loss)
    optimizer.step()
    optimizer.zero_grad()
    losses.append(loss.item())
plugin = accelerator.state.dynamo_plugin
print("RAN " + json.dumps({"backend": str(plugin.backend), "regional": bool(plugin.use_regional_compilation),
                           "compiled_modules": compiled, "losses": losses,
                           "master_dtype": str(next(model.parameters()).dtype)}), flush=True)
'''


def test_launch_compiles_a_user_scripts_model_through_accelerate(tmp_path):
    """`craken launch` with model.compile hands accelerate a dynamo_config, so accelerate's prepare
    compiles the script's repeated blocks (inductor, regional): this needs a GPU, as CPU runs never compile."""
    from transformers import AutoModelForCausalLM

    from craken_cli.train import builtin

    model_dir = tmp_path / "tiny"
    cfg = builtin.model_config(builtin.build_tokenizer())
    AutoModelForCausalLM.from_config(cfg).save_pretrained(model_dir)
    (tmp_path / "train.py").write_text(COMPILED_SCRIPT)
    argv = [sys.executable, "-m", "craken_cli", "launch", "--zero", "0", "--num-processes", "1",
            "--set", "model.compile=true", "--output-dir", str(tmp_path / "run"), "train.py", str(model_dir)]
    proc = subprocess.run(argv, capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ran = json.loads(next(l for l in proc.stdout.splitlines() if l.startswith("RAN "))[4:])
    assert ran["backend"].endswith("INDUCTOR") and ran["regional"], ran
    assert ran["compiled_modules"] >= cfg.num_hidden_layers, ran  # each decoder layer, as craken's loop does
    assert ran["master_dtype"] == "torch.float32", ran
    assert all(loss == loss for loss in ran["losses"]) and ran["losses"][-1] < ran["losses"][0], ran


def test_deepspeed_extra_monitor_section_passes_the_check_and_writes_on_the_gpu(tmp_path):
    """A valid deepspeed.extra section (DeepSpeed's CSV monitor) passes the pre-launch parse of
    DeepSpeedConfig and reaches the engine: ZeRO-2 on the GPU writes its CSV files."""
    monitor = tmp_path / "monitor"
    proc, records = train(tmp_path, "monitored", "--zero", "2", "--precision", "bf16", "--set",
                          f"deepspeed.extra.csv_monitor={{enabled: true, output_path: '{monitor}/', job_name: mon}}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert start_line(records)["strategy"].startswith("zero2")
    written = sorted(p.name for p in monitor.rglob("*.csv"))
    assert written, f"no CSV under {monitor}: {sorted(str(p) for p in monitor.rglob('*'))}"
