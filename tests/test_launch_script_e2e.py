"""Real user scripts through `craken launch`: 2 CPU processes, real DeepSpeed (gloo), real accelerate and
transformers. The scripts are written here; each prints what DeepSpeed's engine actually runs, which
must equal `craken config show --json` for the same flags. Few short runs, each checking several things."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

ACCELERATE_SCRIPT = '''
"""A plain Accelerate loop sized by craken's CRAKEN_PLAN_* variables, with its own torch AdamW."""
import json, os, sys
import torch
from accelerate import Accelerator
from accelerate.utils import DummyOptim, DummyScheduler
from transformers import AutoModelForCausalLM

plan = {k[len("CRAKEN_PLAN_"):].lower(): v for k, v in os.environ.items() if k.startswith("CRAKEN_PLAN_")}
micro, seq, steps = int(plan["micro_batch"]), int(plan["seq_len"]), int(plan["max_steps"])
accelerator = Accelerator()
torch.manual_seed(int(plan["seed"]))
model = AutoModelForCausalLM.from_pretrained(sys.argv[1])
data = torch.randint(0, model.config.vocab_size, (int(plan["global_batch"]) * steps, seq),
                     generator=torch.Generator().manual_seed(0))
loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(data), batch_size=micro)
if plan["ds_optimizer"] == "1":
    optimizer = DummyOptim(model.parameters())
    scheduler = DummyScheduler(optimizer)
else:
    optimizer = torch.optim.AdamW(model.parameters(), lr=float(plan["lr"]), weight_decay=float(plan["weight_decay"]),
                                  betas=(float(plan["adam_beta1"]), float(plan["adam_beta2"])))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / int(plan["warmup_steps"])))
model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
engine, inner = model, getattr(model.optimizer, "optimizer", model.optimizer)
offload = engine.zero_offload_optimizer()
report = {"world": accelerator.num_processes, "train_batch_size": engine.train_batch_size(),
          "micro_batch": engine.train_micro_batch_size_per_gpu(), "grad_accum": engine.gradient_accumulation_steps(),
          "accelerator_grad_accum": accelerator.gradient_accumulation_steps, "clip": engine.gradient_clipping(),
          "stage": engine.zero_optimization_stage(), "offload_optimizer": str(offload.device) if offload else "none",
          "optimizer": type(inner).__name__, "scheduler": type(engine.lr_scheduler).__name__,
          "batches_per_process": len(loader)}
if accelerator.is_main_process:
    print("DEEPSPEED_RAN " + json.dumps(report), flush=True)
losses = []
for (batch,) in loader:
    with accelerator.accumulate(model):  # DeepSpeed steps at the JSON's accumulation boundary only inside it
        loss = model(input_ids=batch, labels=batch).loss
        accelerator.backward(loss)
        optimizer.step(); scheduler.step(); optimizer.zero_grad()
    losses.append(loss.item())
    if engine.global_steps >= steps:
        break
if accelerator.is_main_process:
    print("DONE " + json.dumps({"step": engine.global_steps, "losses": losses}), flush=True)
'''

TRAINER_SCRIPT = '''
"""An HF Trainer script that sets none of the batch, optimizer or schedule values: craken launch fills them."""
import json, os, sys
import torch
from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments

model = AutoModelForCausalLM.from_pretrained(sys.argv[1])
seq = int(os.environ["CRAKEN_PLAN_SEQ_LEN"])
rows = torch.randint(0, model.config.vocab_size, (256, seq), generator=torch.Generator().manual_seed(0))
dataset = [{"input_ids": r, "labels": r} for r in rows]


class Report(TrainerCallback):
    def on_train_begin(self, args, state, control, **kwargs):
        engine = trainer.model_wrapped
        inner = getattr(engine.optimizer, "optimizer", engine.optimizer)
        offload = engine.zero_offload_optimizer()
        if state.is_world_process_zero:
            print("DEEPSPEED_RAN " + json.dumps({
                "world": args.world_size, "train_batch_size": engine.train_batch_size(),
                "micro_batch": engine.train_micro_batch_size_per_gpu(), "grad_accum": engine.gradient_accumulation_steps(),
                "clip": engine.gradient_clipping(), "stage": engine.zero_optimization_stage(),
                "offload_optimizer": str(offload.device) if offload else "none", "optimizer": type(inner).__name__,
                "lr": args.learning_rate, "max_steps": args.max_steps, "start_step": state.global_step,
                "scheduler": str(getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type)),
                "output_dir": args.output_dir}), flush=True)


args = TrainingArguments(report_to="none", save_strategy="steps", dataloader_drop_last=True, disable_tqdm=True)
trainer = Trainer(model=model, args=args, train_dataset=dataset, callbacks=[Report()])
trainer.train(resume_from_checkpoint="--resume" in sys.argv)
if trainer.is_world_process_zero():
    print("DONE " + json.dumps({"step": trainer.state.global_step}), flush=True)
'''

RAW_DEEPSPEED_SCRIPT = '''
"""A raw DeepSpeed script as DeepSpeedExamples writes them, for the deepspeed launcher: its --local_rank,
add_config_arguments' --deepspeed/--deepspeed_config, the optimizer from the JSON."""
import argparse, json, os
import torch
import deepspeed
from transformers import AutoModelForCausalLM

parser = argparse.ArgumentParser()
parser.add_argument("model")
parser.add_argument("--local_rank", type=int, default=-1, help="local rank passed from distributed launcher")
parser = deepspeed.add_config_arguments(parser)
args = parser.parse_args()
parsed_local_rank = args.local_rank  # deepspeed.initialize later sets it from LOCAL_RANK itself
model = AutoModelForCausalLM.from_pretrained(args.model)
engine, optimizer, _, _ = deepspeed.initialize(args=args, model=model, model_parameters=model.parameters())
inner = getattr(optimizer, "optimizer", optimizer)
print("DEEPSPEED_RAN " + json.dumps({
    "world": engine.world_size, "local_rank": parsed_local_rank, "env_local_rank": int(os.environ["LOCAL_RANK"]),
    "deepspeed_flag": args.deepspeed, "train_batch_size": engine.train_batch_size(),
    "micro_batch": engine.train_micro_batch_size_per_gpu(), "grad_accum": engine.gradient_accumulation_steps(),
    "clip": engine.gradient_clipping(), "stage": engine.zero_optimization_stage(), "offload_optimizer": "none",
    "optimizer": type(inner).__name__, "lr": engine.optimizer_params()["lr"]}), flush=True)
seq, steps = int(os.environ["CRAKEN_PLAN_SEQ_LEN"]), int(os.environ["CRAKEN_PLAN_MAX_STEPS"])
while engine.global_steps < steps:
    batch = torch.randint(0, model.config.vocab_size, (engine.train_micro_batch_size_per_gpu(), seq))
    engine.backward(engine(input_ids=batch, labels=batch).loss)
    engine.step()
if engine.global_rank == 0:
    print("DONE " + json.dumps({"step": engine.global_steps}), flush=True)
'''

SLEEPING_SCRIPT = '''
import time
from accelerate import Accelerator
accelerator = Accelerator()
print("ready", accelerator.process_index, flush=True)
time.sleep(120)
'''

FAILING_SCRIPT = '''
from accelerate import Accelerator
accelerator = Accelerator()
if accelerator.process_index == 1:
    raise ValueError("boom on rank one")
accelerator.wait_for_everyone()
'''


def craken(*args, cwd: Path, timeout: int = 900) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CRAKEN_")}
    return subprocess.run([sys.executable, "-m", "craken_cli", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def line(result: subprocess.CompletedProcess, tag: str) -> dict:
    found = [l for l in result.stdout.splitlines() if l.startswith(tag + " ")]
    assert found, result.stdout[-3000:] + result.stderr[-5000:]
    return json.loads(found[-1][len(tag) + 1:])


def planned(flags: list, cwd: Path) -> dict:
    shown = craken("config", "show", "--json", *flags, cwd=cwd)
    assert shown.returncode == 0, shown.stderr
    return json.loads(shown.stdout)["spec"]


def assert_ran_as_planned(ran: dict, spec: dict) -> None:
    world = spec["cluster"]["num_processes"]
    b = spec["batch"]
    assert ran["world"] == world == 2  # each process saw the whole group (gloo), so data is sharded
    assert (ran["micro_batch"], ran["grad_accum"]) == (b["micro_batch"], b["grad_accum"])
    assert ran["train_batch_size"] == b["micro_batch"] * b["grad_accum"] * world
    assert ran["clip"] == spec["optimizer"]["clip"]
    assert ran["stage"] == spec["zero"]["stage"]
    assert ran["offload_optimizer"] == spec["offload"]["optimizer"]["device"]


def assert_no_launcher_traceback(result: subprocess.CompletedProcess) -> None:
    text = result.stdout + result.stderr
    for launcher_words in ("ChildFailedError", "SignalException", "torch/distributed/run.py", "accelerate/commands"):
        assert launcher_words not in text, text[-4000:]


def test_accelerate_script_at_zero1_runs_the_plan_with_its_own_adamw(tmp_path, tiny_model_dir, free_port):
    (tmp_path / "train.py").write_text(ACCELERATE_SCRIPT)
    flags = ["--zero", "1", "--micro-batch", "2", "--grad-accum", "2", "--max-steps", "3", "--clip", "0.7",
             "--main-process-port", free_port]
    result = craken("launch", *flags, "train.py", tiny_model_dir, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    ran = line(result, "DEEPSPEED_RAN")
    assert_ran_as_planned(ran, planned(flags, tmp_path))
    assert ran["accelerator_grad_accum"] == ran["grad_accum"]  # accelerate reads the JSON's
    assert ran["optimizer"] == "AdamW"  # the script's own: no "optimizer in the config and in the code"
    assert ran["batches_per_process"] == 2 * 2 * 2 * 3 // (2 * 2)  # the data split over both processes
    done = line(result, "DONE")
    assert done["step"] == 3 and len(done["losses"]) == 3 * 2
    assert "finished" in result.stderr


def test_accelerate_script_at_zero3_with_offload_takes_deepspeeds_optimizer(tmp_path, tiny_model_dir, free_port):
    """Offloaded states are stepped by DeepSpeed's CPU Adam only: the JSON keeps its optimizer, and the
    script, told by CRAKEN_PLAN_DS_OPTIMIZER=1, passes accelerate's DummyOptim / DummyScheduler."""
    (tmp_path / "train.py").write_text(ACCELERATE_SCRIPT)
    flags = ["--zero", "3", "--offload-optimizer", "cpu", "--offload-param", "cpu", "--micro-batch", "2",
             "--grad-accum", "1", "--max-steps", "2", "--main-process-port", free_port]
    result = craken("launch", *flags, "train.py", tiny_model_dir, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    ran = line(result, "DEEPSPEED_RAN")
    assert_ran_as_planned(ran, planned(flags, tmp_path))
    assert ran["optimizer"] == "DeepSpeedCPUAdam"
    assert line(result, "DONE")["step"] == 2


def test_accelerate_script_that_always_builds_dummy_optim_trains_with_the_jsons_optimizer(tmp_path, tiny_model_dir,
                                                                                         free_port):
    """A script that builds DummyOptim / DummyScheduler whatever the plan (no offload, no --ds-optimizer):
    the JSON keeps DeepSpeed's optimizer and scheduler, instead of accelerate's "You cannot create a
    `DummyOptim` without specifying an optimizer in the config file" in every worker."""
    head, rest = ACCELERATE_SCRIPT.split('if plan["ds_optimizer"] == "1":')
    tail = rest[rest.index("model, optimizer, loader, scheduler = accelerator.prepare"):]
    built = "optimizer = DummyOptim(model.parameters())\nscheduler = DummyScheduler(optimizer)\n"
    (tmp_path / "train.py").write_text(head + built + tail)
    flags = ["--zero", "1", "--micro-batch", "2", "--grad-accum", "1", "--max-steps", "2", "--main-process-port",
             free_port]
    result = craken("launch", *flags, "train.py", tiny_model_dir, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    ran = line(result, "DEEPSPEED_RAN")
    assert_ran_as_planned(ran, planned(flags, tmp_path))
    shown = json.loads((tmp_path / "runs" / "default" / "ds_config.json").read_text())
    assert ran["scheduler"] == shown["scheduler"]["type"]  # DeepSpeed's, built from the JSON's block
    assert line(result, "DONE")["step"] == 2


def test_trainer_script_at_zero2_with_offload_trains_and_resumes_without_a_mismatch(tmp_path, tiny_model_dir, free_port):
    (tmp_path / "train.py").write_text(TRAINER_SCRIPT)
    flags = ["--zero", "2", "--offload-optimizer", "cpu", "--micro-batch", "2", "--grad-accum", "2",
             "--save-every", "2", "--main-process-port", free_port]
    first = craken("launch", *flags, "--max-steps", "2", "train.py", tiny_model_dir, cwd=tmp_path)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-5000:]
    assert "mismatch TrainingArguments" not in first.stderr
    ran = line(first, "DEEPSPEED_RAN")
    spec = planned([*flags, "--max-steps", "2"], tmp_path)
    assert_ran_as_planned(ran, spec)
    assert ran["optimizer"] == "DeepSpeedCPUAdam"  # the JSON's, through the Trainer's DummyOptim
    assert (ran["lr"], ran["max_steps"]) == (spec["optimizer"]["lr"], 2)
    run_dir = tmp_path / "runs" / "default"
    assert ran["output_dir"] == str(run_dir / "output") and (run_dir / "output" / "checkpoint-2").is_dir()

    again = craken("launch", *flags, "--max-steps", "4", "--force", "train.py", tiny_model_dir, "--resume", cwd=tmp_path)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-5000:]
    assert line(again, "DEEPSPEED_RAN")["start_step"] == 2  # the Trainer's own resume_from_checkpoint
    assert line(again, "DONE")["step"] == 4


def test_trainer_script_at_zero3_builds_its_own_optimizer_and_schedule_from_the_plan(tmp_path, tiny_model_dir, free_port):
    """Without offload the JSON has no optimizer: the Trainer makes its torch AdamW and its schedule from the
    TrainingArguments the host filled, and DeepSpeed partitions them at stage 3."""
    (tmp_path / "train.py").write_text(TRAINER_SCRIPT)
    flags = ["--zero", "3", "--offload-optimizer", "none", "--offload-param", "none", "--micro-batch", "2",
             "--grad-accum", "1", "--max-steps", "2", "--lr", "0.002", "--main-process-port", free_port]
    result = craken("launch", *flags, "train.py", tiny_model_dir, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    assert "mismatch TrainingArguments" not in result.stderr
    ran = line(result, "DEEPSPEED_RAN")
    spec = planned(flags, tmp_path)
    assert_ran_as_planned(ran, spec)
    assert ran["optimizer"] == "AdamW" and ran["lr"] == spec["optimizer"]["lr"] == 0.002
    assert ran["scheduler"] == "cosine_with_min_lr" and ran["max_steps"] == 2
    assert line(result, "DONE")["step"] == 2


def test_raw_deepspeed_script_trains_with_the_rendered_json_and_its_local_rank(tmp_path, tiny_model_dir, free_port):
    """The deepspeed launcher's script: no config file given (craken's goes to deepspeed.initialize), its
    --local_rank filled per process, DeepSpeed's optimizer kept in the JSON because the script brings none."""
    (tmp_path / "ds_train.py").write_text(RAW_DEEPSPEED_SCRIPT)
    flags = ["--zero", "1", "--micro-batch", "2", "--grad-accum", "2", "--max-steps", "2", "--lr", "0.002",
             "--main-process-port", free_port]
    result = craken("launch", *flags, "ds_train.py", tiny_model_dir, "--deepspeed", cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    ran = [json.loads(l.split(" ", 1)[1]) for l in result.stdout.splitlines() if l.startswith("DEEPSPEED_RAN ")]
    assert sorted(r["local_rank"] for r in ran) == [0, 1] and all(r["local_rank"] == r["env_local_rank"] for r in ran)
    spec = planned(flags, tmp_path)
    assert_ran_as_planned(ran[0], spec)
    assert ran[0]["deepspeed_flag"] is True and ran[0]["optimizer"] == "AdamW"
    assert ran[0]["lr"] == spec["optimizer"]["lr"] == 0.002
    assert line(result, "DONE")["step"] == 2


def test_a_failing_script_gets_one_message_naming_its_rank_and_error(tmp_path, free_port):
    (tmp_path / "fail.py").write_text(FAILING_SCRIPT)
    result = craken("launch", "--zero", "1", "--main-process-port", free_port, "fail.py", cwd=tmp_path)
    assert result.returncode == 1
    assert "craken: fail.py failed: rank 1 exited with code 1: ValueError: boom on rank one" in result.stderr
    assert_no_launcher_traceback(result)


def test_sigterm_stops_the_script_with_143_and_one_line(tmp_path, free_port):
    import signal
    import time

    (tmp_path / "sleepy.py").write_text(SLEEPING_SCRIPT)
    env = {k: v for k, v in os.environ.items() if not k.startswith("CRAKEN_")}
    out, err = tmp_path / "out.txt", tmp_path / "err.txt"
    with open(out, "w") as stdout, open(err, "w") as stderr:
        proc = subprocess.Popen([sys.executable, "-m", "craken_cli", "launch", "--main-process-port", str(free_port),
                                 "sleepy.py"], cwd=tmp_path, env=env, stdout=stdout, stderr=stderr)
        deadline = time.monotonic() + 300
        while out.read_text().count("ready") < 2 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=120)
    result = subprocess.CompletedProcess(proc.args, code, out.read_text(), err.read_text())
    assert code == 143, result.stderr[-4000:]
    assert "craken: sleepy.py was stopped by a signal (exit 143)" in result.stderr
    assert_no_launcher_traceback(result)
    assert "Traceback" not in result.stderr


def test_a_trainer_value_set_against_the_plan_stops_before_training_with_exit_2(tmp_path, tiny_model_dir, free_port):
    (tmp_path / "train.py").write_text(TRAINER_SCRIPT.replace('report_to="none",', 'report_to="none", max_grad_norm=0.5,'))
    result = craken("launch", "--zero", "1", "--clip", "0.3", "--main-process-port", free_port, "train.py", tiny_model_dir,
                    cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-4000:]
    assert ("craken: train.py was stopped before training: the script sets max_grad_norm=0.5 against craken's plan, "
            "max_grad_norm=0.3: give it the plan's value, or drop it where the HF "
            "Trainer reads it (craken fills the Trainer's), or change the plan with --clip") in result.stderr
    assert "DEEPSPEED_RAN" not in result.stdout and "Traceback" not in result.stderr
    assert_no_launcher_traceback(result)


def test_an_accelerate_script_with_its_own_batch_size_stops_before_deepspeed_runs(tmp_path, tiny_model_dir, free_port):
    """run_clm_no_trainer's shape: the loader from the script's own --per_device_train_batch_size default;
    DeepSpeed would count the JSON's micro-batch and train the loader's."""
    (tmp_path / "train.py").write_text(ACCELERATE_SCRIPT.replace("batch_size=micro)", "batch_size=8)"))
    result = craken("launch", "--zero", "1", "--micro-batch", "2", "--main-process-port", free_port, "train.py",
                    tiny_model_dir, cwd=tmp_path)
    assert result.returncode == 2, result.stdout[-3000:] + result.stderr[-5000:]
    assert ("craken: train.py was stopped before training: the script's DataLoader gives batches of 8 against "
            "craken's plan, micro-batch 2") in result.stderr
    assert "DEEPSPEED_RAN" not in result.stdout and "Traceback" not in result.stderr
    assert_no_launcher_traceback(result)


def always_building(optimizer_lines: str) -> str:
    """ACCELERATE_SCRIPT building `optimizer_lines` whatever CRAKEN_PLAN_DS_OPTIMIZER says."""
    head, rest = ACCELERATE_SCRIPT.split('if plan["ds_optimizer"] == "1":')
    return head + optimizer_lines + rest[rest.index("model, optimizer, loader, scheduler = accelerator.prepare"):]


def test_an_always_adamw_script_under_offload_stops_before_training_with_the_fix(tmp_path, tiny_model_dir, free_port):
    """Before: accelerate's "You cannot specify an optimizer in the config file and in the code" in every worker."""
    (tmp_path / "train.py").write_text(always_building(
        "optimizer = torch.optim.AdamW(model.parameters(), lr=float(plan['lr']))\n"
        "scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)\n"))
    result = craken("launch", "--zero", "2", "--offload-optimizer", "cpu", "--main-process-port", free_port,
                    "train.py", tiny_model_dir, cwd=tmp_path)
    assert result.returncode == 2, result.stdout[-3000:] + result.stderr[-5000:]
    assert ("the script hands accelerator.prepare its own optimizer (AdamW) and craken's DeepSpeed JSON holds "
            "DeepSpeed's (AdamW") in result.stderr
    assert "DEEPSPEED_RAN" not in result.stdout and "Traceback" not in result.stderr
    assert_no_launcher_traceback(result)


def test_deepspeeds_adagrad_from_deepspeed_extra_trains_a_dummy_optim_script(tmp_path, tiny_model_dir, free_port):
    """Before: craken's Adam params (betas, torch_adam) went to torch's Adagrad, which refused them in every worker."""
    (tmp_path / "train.py").write_text(always_building(
        "optimizer = DummyOptim(model.parameters())\nscheduler = DummyScheduler(optimizer)\n"))
    flags = ["--zero", "2", "--micro-batch", "2", "--grad-accum", "1", "--max-steps", "2",
             "--set", 'deepspeed.extra.optimizer={"type":"Adagrad"}', "--main-process-port", free_port]
    result = craken("launch", *flags, "train.py", tiny_model_dir, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    ran = line(result, "DEEPSPEED_RAN")
    assert_ran_as_planned(ran, planned(flags, tmp_path))
    assert ran["optimizer"] == "Adagrad" and line(result, "DONE")["step"] == 2
