"""Real trainings: `craken train` launches 2 CPU processes through `accelerate launch` with real
DeepSpeed (gloo). Each run is shared by several assertions to keep CI time down."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[1]


def craken(*args: str, cwd: Path, env: dict | None = None, timeout: int = 900) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "CRAKEN_NO_PROGRESS": "0", **(env or {})}
    return subprocess.run([sys.executable, "-m", "craken_cli", *args], cwd=cwd, env=full_env, capture_output=True,
                          text=True, timeout=timeout)


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def train_losses(records: list[dict]) -> list[float]:
    return [r["loss"] for r in records if "loss" in r]


def eval_losses(records: list[dict]) -> list[float]:
    return [r["eval_loss"] for r in records if "eval_loss" in r]


def assert_reload_matches(run_dir: Path, atol: float) -> None:
    """final/ reloads with transformers and reproduces the trained model's logits on a fixed batch."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    check = torch.load(run_dir / "final_check.pt", weights_only=True)
    model = AutoModelForCausalLM.from_pretrained(run_dir / "final", dtype=torch.bfloat16)
    AutoTokenizer.from_pretrained(run_dir / "final")  # the tokenizer is saved beside the weights
    with torch.no_grad():
        logits = model(input_ids=check["input_ids"]).logits.float()
    assert logits.shape == check["logits"].shape
    assert logits.abs().max() > 0.1  # not an empty / zero model
    diff = (logits - check["logits"]).abs().max().item()
    assert diff <= atol, f"reloaded logits differ from the trained model's by {diff}"


def assert_trained(run_dir: Path, result: subprocess.CompletedProcess) -> list[dict]:
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    records = metrics(run_dir)
    losses = train_losses(records)
    assert losses and all(l == l and abs(l) != float("inf") for l in losses)  # finite
    assert losses[-1] < losses[0], f"loss did not fall: {losses}"
    return records


@pytest.fixture(scope="module")
def jsonl_data(tmp_path_factory) -> Path:
    from craken_cli.train import builtin

    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    with open(path, "w") as fh:
        for i, line in enumerate(builtin.pattern_lines(1500, seed=99)):
            fh.write(json.dumps({"id": i, "content": line}) + "\n")
    return path


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    """`craken train` with no arguments, output piped (not a terminal)."""
    cwd = tmp_path_factory.mktemp("default")
    result = craken("train", cwd=cwd)
    return cwd / "runs" / "default", result


def test_embedded_default_trains_and_eval_loss_halves(default_run):
    run_dir, result = default_run
    records = assert_trained(run_dir, result)
    evals = eval_losses(records)
    assert len(evals) >= 2
    assert evals[-1] <= evals[0] / 2, f"eval loss {evals[0]:.3f} -> {evals[-1]:.3f} did not halve"
    start = records[0]
    assert start["event"] == "start" and start["num_processes"] == 2 and start["precision"] == "bf16"
    # DeepSpeed's bf16 weights and its fp32 master copy, read from the live optimizer; its Adam states
    # exist from its first step on, and the line after that step shows them fp32
    assert (start["module_dtype"], start["master_dtype"], start["final_dtype"]) == ("bfloat16", "float32", "bfloat16")
    measured = next(r for r in records if r.get("event") == "precision")
    assert measured["step"] == 1 and (measured["master_dtype"], measured["optimizer_state_dtype"]) == \
        ("float32", "float32")
    assert records[-1]["event"] == "end" and records[-1]["exit_code"] == 0
    phases = records[-1]["startup"]  # where launch-to-first-step went, in order
    assert list(phases) == ["imports_s", "data_s", "model_s", "prepare_s"]
    assert 0 < phases["imports_s"] <= phases["data_s"] <= phases["model_s"] <= phases["prepare_s"] \
        <= records[-1]["first_step_s"]
    assert_reload_matches(run_dir, atol=0.05)


def test_embedded_default_writes_configs_and_report(default_run):
    run_dir, _ = default_run
    ds = json.loads((run_dir / "ds_config.json").read_text())
    assert ds["train_batch_size"] == ds["train_micro_batch_size_per_gpu"] * ds["gradient_accumulation_steps"] * 2
    for png in ("loss.png", "lr.png", "tokens_per_s.png"):
        data = (run_dir / "report" / png).read_bytes()
        assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 5000


def test_piped_output_has_no_progress_bar_control_characters(default_run):
    _, result = default_run
    output = result.stdout + result.stderr
    assert "step 10/" in output  # the plain progress lines are there
    assert "\r" not in output and "\x1b" not in output


def test_zero1_local_model_and_jsonl(tmp_path, tiny_model_dir, jsonl_data):
    result = craken("train", "--zero", "1", "--model", str(tiny_model_dir), "--dataset", str(jsonl_data),
                    "--text-column", "content", "--seq-len", "48", "--micro-batch", "4", "--grad-accum", "2",
                    "--max-steps", "30", "--lr", "3e-3", "--clip", "0.5", "--name", "z1",
                    "--set", "cluster.main_process_port=29611", cwd=tmp_path)
    run_dir = tmp_path / "runs" / "z1"
    records = assert_trained(run_dir, result)
    assert records[0]["strategy"] == "zero1" and records[0]["grad_accum"] == 2
    ds = json.loads((run_dir / "ds_config.json").read_text())
    assert ds["gradient_clipping"] == 0.5 and ds["bf16"]["enabled"] is True
    assert_reload_matches(run_dir, atol=0.05)


def test_zero2_optimizer_offload(tmp_path):
    result = craken("train", "--preset", "ds_zero2", "--max-steps", "30", "--grad-accum", "2", "--name", "z2",
                    "--set", "cluster.main_process_port=29612", cwd=tmp_path)
    run_dir = tmp_path / "runs" / "z2"
    records = assert_trained(run_dir, result)
    assert records[0]["strategy"] == "zero2+offload_optimizer_cpu"
    ds = json.loads((run_dir / "ds_config.json").read_text())
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert_reload_matches(run_dir, atol=0.05)


def test_zero3_param_offload_saves_gathered_weights(tmp_path):
    result = craken("train", "--zero", "3", "--offload-optimizer", "none", "--offload-param", "cpu",
                    "--max-steps", "30", "--grad-accum", "2", "--name", "z3",
                    "--set", "cluster.main_process_port=29613", cwd=tmp_path)
    run_dir = tmp_path / "runs" / "z3"
    records = assert_trained(run_dir, result)
    assert records[0]["strategy"] == "zero3+offload_param_cpu"
    ds = json.loads((run_dir / "ds_config.json").read_text())
    assert ds["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
    from safetensors import safe_open

    with safe_open(run_dir / "final" / "model.safetensors", "pt") as f:
        shapes = {k: f.get_slice(k).get_shape() for k in f.keys()}
    assert shapes and all(all(d > 0 for d in s) for s in shapes.values())  # no empty ZeRO-3 shards
    assert_reload_matches(run_dir, atol=0.05)


def test_tensorboard_gets_the_logged_losses_and_the_run_exits_cleanly(tmp_path):
    """--report-to through Accelerate on 2 processes. ZeRO-3 with optimizer offload is the run whose
    process teardown aborted 1 in 6 times (SIGABRT after the last step): it must exit 0."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    result = craken("train", "--zero", "3", "--offload-optimizer", "cpu", "--offload-param", "none",
                    "--max-steps", "8", "--report-to", "tensorboard", "--name", "tb", "--steps-per-print", "2",
                    "--set", "cluster.main_process_port=29614", cwd=tmp_path)
    run_dir = tmp_path / "runs" / "tb"
    records = assert_trained(run_dir, result)
    logged = {r["step"]: r["loss"] for r in records if "loss" in r}
    events = EventAccumulator(str(run_dir / "tensorboard" / "tb")).Reload()
    scalars = {e.step: e.value for e in events.Scalars("loss")}
    assert scalars.keys() == logged.keys() == {2, 4, 6, 8}
    assert all(abs(scalars[k] - logged[k]) <= 1e-4 * abs(logged[k]) for k in logged)
    assert "eval_loss" in events.Tags()["scalars"]


def test_resume_across_zero_stages_where_deepspeed_can_and_refused_where_it_cannot(tmp_path):
    """ZeRO-1 and -2 share one optimizer format: ZeRO-1's checkpoint resumes at ZeRO-2. ZeRO-3, or
    optimizer offload (DeepSpeed's CPU Adam), lay the state out differently: DeepSpeed fails after
    the launch there (KeyError 'bias_correction'), so craken refuses before it, naming the flags."""
    common = ["--max-steps", "4", "--save-every", "2", "--seq-len", "32", "--name", "st", "--eval-every", "0",
              "--steps-per-print", "1",
              "--set", "cluster.main_process_port=29615"]
    first = craken("train", "--zero", "1", *common, cwd=tmp_path)
    run_dir = tmp_path / "runs" / "st"
    assert_trained(run_dir, first)
    resumed = craken("train", "--zero", "2", "--offload-optimizer", "none", *common[2:], "--max-steps", "6",
                     "--resume", "auto", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout + resumed.stderr
    assert max(r["step"] for r in metrics(run_dir) if "loss" in r) == 6
    before = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    for flags, saved_as in ((["--zero", "3", "--offload-optimizer", "none", "--offload-param", "none"], "ZeRO-3"),
                            (["--zero", "2", "--offload-optimizer", "cpu"], "ZeRO-1/2 with optimizer offload")):
        refused = craken("train", *flags, *common[2:], "--max-steps", "8", "--resume", "auto", cwd=tmp_path)
        assert refused.returncode == 2 and "Traceback" not in refused.stderr, refused.stderr[-3000:]
        assert "saved at ZeRO-1/2 without optimizer offload" in refused.stderr and saved_as in refused.stderr
        assert "--zero 2 --offload-optimizer none" in refused.stderr
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == before


def test_no_zero_runs_without_deepspeed(tmp_path, monkeypatch):
    """ZeRO stage 0 on a GPU machine runs plain Accelerate (no DeepSpeed JSON at all). The GPU is
    faked through the hardware probe; accelerate then runs that one process on the CPU, which is
    enough to exercise the real render -> launch -> loop path of the plain engine."""
    from craken_cli.plan.hardware import GPU, FakeProbe, detect
    from craken_cli.config.options import SpecArgs
    from craken_cli.launch.process import execute
    from craken_cli.launch.prepare import TrainRequest, prepare

    monkeypatch.chdir(tmp_path)
    one_gpu = detect(FakeProbe(gpus=[GPU(0, "NVIDIA H100 80GB HBM3", 80 * 2**30, 79 * 2**30, (9, 0))]))
    args = SpecArgs(flags={"--zero": 0, "--max-steps": 16, "--steps-per-print": 4, "--name": "plain",
                           "--main-process-port": 29614})
    prepared = prepare(TrainRequest(spec_args=args), environ=dict(os.environ), hardware=one_gpu)
    run_dir = tmp_path / "runs" / "plain"
    assert not (run_dir / "ds_config.json").exists()
    import yaml

    accel = yaml.safe_load((run_dir / "accelerate.yaml").read_text())
    assert accel["distributed_type"] == "NO" and accel["mixed_precision"] == "bf16"
    assert "deepspeed_config" not in accel
    assert execute(prepared) == 0
    records = metrics(run_dir)
    assert records[0]["strategy"] == "zero0"  # planner.strategy_name, as `craken plan` shows it
    losses = train_losses(records)
    assert losses[-1] < losses[0]
    lrs = [r["lr"] for r in records if "lr" in r]
    assert lrs[-1] == pytest.approx(3e-3 * 0.1)  # warm-up then cosine to min_lr_ratio, as DeepSpeed's schedule
    assert_reload_matches(run_dir, atol=0.1)


def test_nonfinite_stops_with_exit_3_and_no_checkpoint_after_it(tmp_path):
    """A learning rate of 1e30 drives the weights past bf16's range within a few steps. DeepSpeed's own
    overflow check is off (render), so craken's loop must stop the run itself, before any checkpoint of
    those weights, and report its own exit code, not the launcher's 1."""
    import torch

    from craken_cli.train import checkpoint

    result = craken("train", "--zero", "2", "--offload-optimizer", "none", "--lr", "1e30", "--max-steps", "20",
                    "--save-every", "1", "--steps-per-print", "5", "--eval-every", "0", "--seq-len", "32",
                    "--micro-batch", "8", "--global-batch", "16", "--name", "nan",
                    "--set", "cluster.main_process_port=29617", cwd=tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode == 3, output[-3000:]
    run_dir = tmp_path / "runs" / "nan"
    stop = next(r for r in metrics(run_dir) if r.get("event") == "nonfinite")["step"]
    assert f"non-finite loss or gradient norm at step {stop}" in output
    assert f"stopped at step {stop} on a non-finite loss or gradient norm" in output
    saved = [checkpoint.read_state(p).step for p in checkpoint.list_checkpoints(run_dir)]
    assert saved and max(saved) < stop and not (run_dir / "final").exists()
    export = craken("ckpt", "export", str(run_dir), "--out", str(tmp_path / "exported"), cwd=tmp_path)
    assert export.returncode == 0, export.stderr[-3000:]
    from safetensors.torch import load_file

    weights = load_file(tmp_path / "exported" / "model.safetensors")
    assert weights and all(torch.isfinite(w).all() for w in weights.values())
