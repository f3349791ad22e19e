"""Faults of issue 24 that the bad-input catalogue cannot show: a second run into a live run's
folder, a signal sent to craken's own process, credentials inside environment values, and the log
and schedule of a resumed run. All fast but the pdsh launch (marked e2e: it starts DeepSpeed's runner).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_bad_input_catalog import snapshot

ENV = {**{k: v for k, v in os.environ.items() if not k.startswith("CRAKEN_")}, "CRAKEN_NO_PROGRESS": "1"}


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 60) -> str:
    end = time.time() + timeout
    while not (path.is_file() and path.read_text().strip()):
        assert proc.poll() is None and time.time() < end, f"{path} never written (exit {proc.poll()})"
        time.sleep(0.02)
    return path.read_text().strip()


def test_a_second_run_into_a_live_runs_folder_is_refused(craken, workdir):
    """Two `craken train` into one folder interleaved their metrics and deleted each other's
    checkpoints: the folder's lock, taken by the live run as `craken train` takes it, refuses the
    second whatever its flags, and the second writes nothing."""
    run = workdir / "run"
    ready = workdir / "held"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import pathlib, sys, time; from craken_cli.ckpt.startover import claim_run_folder; "
         f"claim_run_folder(pathlib.Path({str(run)!r}), 0); pathlib.Path({str(ready)!r}).write_text('1'); "
         "time.sleep(120)"], env=ENV)
    try:
        wait_for(ready, holder)
        ready.unlink()
        (run / "metrics.jsonl").write_text('{"step": 1, "loss": 5.0}\n')  # what the live run has logged
        before = snapshot(workdir)
        for extra in ([], ["--resume", "auto"], ["--force"]):
            result = craken("train", "--output-dir", "run", "--num-processes", "2", "--max-steps", "2", *extra)
            assert result.code == 2 and "Traceback" not in result.output, result.output
            message = result.err.strip()
            assert message == (f"craken: cannot start this run: run folder run is in use by a live craken train "
                               f"(process {holder.pid}): one run per folder; wait for it to end (or stop it), or "
                               "choose another --name/--output-dir"), message
            assert snapshot(workdir) == before
    finally:
        holder.kill()
        holder.wait()
    # the lock died with its holder: the folder is free again (a resume is refused for want of a
    # checkpoint, not for the lock)
    result = craken("train", "--output-dir", "run", "--num-processes", "2", "--resume", "auto", "--dry-run")
    assert result.code == 2 and "no complete checkpoint" in result.err, result.output


LAUNCHER = """
import signal, subprocess, sys
for sig in (signal.SIGINT, signal.SIGTERM):  # a launcher that only notes a signal
    signal.signal(sig, lambda signum, frame: open(sys.argv[1] + ".launcher", "w").write(signal.Signals(signum).name))
worker = subprocess.Popen([sys.executable, "-c", sys.argv[2], sys.argv[1]], start_new_session=True)
sys.exit(worker.wait())
"""
WORKER = """
import os, signal, sys, time
def stop(signum, frame):
    open(sys.argv[1], "w").write(signal.Signals(signum).name)
    sys.exit(128 + signum)
for sig in (signal.SIGINT, signal.SIGTERM):
    signal.signal(sig, stop)
open(sys.argv[1] + ".ready", "w").write(str(os.getpid()))
time.sleep(60)
"""


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_to_craken_alone_reaches_workers_in_sessions_of_their_own(sig, tmp_path):
    """`kill -INT <craken's pid>` (a container's PID 1, a scheduler) was ignored: torchrun starts each
    worker in a session of its own, so only craken can pass the signal on, SIGINT like SIGTERM."""
    seen = tmp_path / "worker"
    craken = subprocess.Popen(
        [sys.executable, "-c", "import os, sys; from craken_cli.launch import command as launch; sys.exit(launch.run("
         f"[sys.executable, '-c', {LAUNCHER!r}, {str(seen)!r}, {WORKER!r}], dict(os.environ)))"],
        env=ENV, start_new_session=True)
    try:
        wait_for(Path(f"{seen}.ready"), craken)
        os.kill(craken.pid, sig)  # craken's own pid only: neither the launcher's group nor the worker's session
        assert craken.wait(timeout=30) == 128 + sig  # the worker's exit code, passed on by the launcher
    finally:
        craken.kill()
    assert seen.read_text() == sig.name
    # not to the launcher: torchrun, signalled while it waits for its workers' checkpoint, gives up waiting
    assert not Path(f"{seen}.launcher").exists()


def test_metrics_after_the_checkpoint_resumed_from_are_dropped(tmp_path):
    """A resume from step 4 trains steps 5.. again: their old lines (and a line cut by the kill) go,
    so metrics.jsonl reads as one run and no step is logged twice."""
    from craken_cli import runfolder

    lines = [{"event": "start", "step": 0}, {"step": 2, "loss": 5.0}, {"step": 4, "loss": 4.0},
             {"event": "eval", "step": 4, "eval_loss": 4.1}, {"step": 6, "loss": 3.0}, {"event": "eval", "step": 6},
             {"event": "end", "steps": 6, "exit_code": 143}]
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"step": 8, "lo')
    runfolder.drop_metrics_after(metrics, 4)
    assert [json.loads(line) for line in metrics.read_text().splitlines()] == lines[:4]


def test_a_resume_that_changes_the_lr_schedule_says_how(tmp_path):
    """A new --max-steps stretches the cosine schedule (the lr jumped from 2.97e-3 to 4.9e-4 in
    issue 21): the resume names the lr of its next step before and after, and the flag that keeps it."""
    from craken_cli.ckpt.resume import schedule_change
    from craken_cli.config.spec import RunSpec
    from craken_cli.train import checkpoint
    from craken_cli.train.schedule import deepspeed_block, lr_lambda

    def spec(max_steps: int, lr: float = 3e-3) -> RunSpec:
        return RunSpec.model_validate({"cluster": {"num_processes": 2}, "optimizer": {"lr": lr},
                                       "train": {"max_steps": max_steps}})

    saved = spec(100)
    state = checkpoint.TrainState(step=80, **{k: v for k, v in checkpoint.data_shape(saved).items()})
    assert schedule_change(state, spec(100)) is None
    before = lr_lambda(deepspeed_block(saved), 3e-3)(81) * 3e-3
    after = lr_lambda(deepspeed_block(spec(300)), 3e-3)(81) * 3e-3
    assert after > 3 * before  # step 81 of 100 is near the floor, of 300 still high
    assert schedule_change(state, spec(300)) == (
        f"the lr schedule differs from the one it was trained with: the lr of step 81 is {after:.3g} instead of "
        f"{before:.3g}; resume with --max-steps 100 to keep it")
    assert "resume with --lr 0.003 to keep it" in schedule_change(state, spec(100, lr=1e-3))
    old = checkpoint.TrainState(step=80)  # a checkpoint of an older craken records no schedule
    assert schedule_change(old, spec(300)) is None


def test_a_resume_on_other_data_says_so(tmp_path):
    """The data position counts micro-batches into a shuffled stream: on an edited, grown or other data
    set it points into another stream. The resume says which files differ before launch."""
    from craken_cli.ckpt.resume import data_change
    from craken_cli.config.spec import RunSpec
    from craken_cli.train import checkpoint
    from craken_cli.train.data import fingerprint

    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "a.jsonl").write_text("".join(json.dumps({"text": f"row {i}"}) + "\n" for i in range(50)))
    (folder / "b.jsonl").write_text(json.dumps({"text": "b"}) + "\n")

    def spec(dataset=folder) -> RunSpec:
        return RunSpec.model_validate({"data": {"dataset": str(dataset)}})

    state = checkpoint.TrainState(step=8, epoch=1, batch_in_epoch=3, data=fingerprint(spec()))
    assert set(state.data["files"]) == {"a.jsonl", "b.jsonl"}
    assert data_change(state, spec()) is None
    with open(folder / "a.jsonl", "a") as fh:  # rows appended
        fh.write(json.dumps({"text": "new"}) + "\n")
    (folder / "b.jsonl").unlink()
    (folder / "c.jsonl").write_text(json.dumps({"text": "c"}) + "\n")
    note = data_change(state, spec())
    assert note.startswith("the data differs from what it was trained on (a.jsonl changed, b.jsonl removed, "
                           "c.jsonl added): the run continues at its data position (epoch 1, 3 micro-batches")
    same_size = checkpoint.TrainState(data=fingerprint(spec()))
    text = (folder / "c.jsonl").read_text()
    (folder / "c.jsonl").write_text(text.replace("c", "d"))  # an edit that keeps the size
    assert "c.jsonl changed" in data_change(same_size, spec())
    assert "dataset" in data_change(state, spec("builtin:counting"))
    assert data_change(checkpoint.TrainState(step=8), spec()) is None  # a checkpoint of an older craken


def test_export_takes_the_checkpoint_folder_a_refused_resume_names(tmp_path):
    from craken_cli.ckpt.manage import pick
    from craken_cli.errors import CrakenError
    from craken_cli.train import checkpoint

    ckpt = tmp_path / "run" / "checkpoints" / "step_00000004"
    (ckpt / "pytorch_model").mkdir(parents=True)
    (ckpt / "pytorch_model" / "mp_rank_00_model_states.pt").write_bytes(b"x" * 8)
    checkpoint.write_state(ckpt, checkpoint.TrainState(step=4, world_size=2))
    assert pick(ckpt, None) == ckpt == pick(ckpt, 4) == pick(tmp_path / "run", 4)
    with pytest.raises(CrakenError, match="is the checkpoint of step 4"):
        pick(ckpt, 8)


SECRET_VALUES = {"DATABASE_URL": ("postgres://u:PgFAKEpass0@db:5432/x", "postgres://***@db:5432/x"),
                 "MLFLOW_TRACKING_URI": ("https://bob:MlFAKEpass1@ml.example", "https://***@ml.example"),
                 "PROXY_HEADERS": ("Authorization: Bearer FAKEbearer0123456789", "***")}


def test_credentials_inside_values_are_shown_redacted():
    from craken_cli.launch import command as launch

    shown = launch.redact_env({k: v for k, (v, _) in SECRET_VALUES.items()} | {"PATH": "/usr/bin"})
    assert shown == {k: red for k, (_, red) in SECRET_VALUES.items()} | {"PATH": "/usr/bin"}


@pytest.mark.e2e
def test_url_credentials_are_in_no_file_of_a_pdsh_launch(tmp_path, free_port):
    """--launcher deepspeed over two machines: accelerate writes the whole environment into DeepSpeed's
    env file (RUN/.deepspeed_env), and DATABASE_URL=postgres://u:<pw>@... went in; credentials inside
    values are held back like HF_TOKEN. The launch itself fails here (no pdsh): what it wrote counts."""
    env = {**ENV, **{k: v for k, (v, _) in SECRET_VALUES.items()}}
    done = subprocess.run([sys.executable, "-m", "craken_cli", "train", "--launcher", "deepspeed", "--num-machines", "2",
                           "--num-processes", "2", "--main-process-ip", "127.0.0.1", "--main-process-port", str(free_port),
                           "--max-steps", "2",
                           "--output-dir", "run"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    env_file = tmp_path / "run" / ".deepspeed_env"
    assert env_file.is_file() and "DS_ACCELERATOR=cpu" in env_file.read_text(), (done.stdout + done.stderr)[-3000:]
    assert "not passed to the other machines" in done.stderr and "DATABASE_URL" in done.stderr
    secrets = [v.split("@")[0].split(":")[-1] if "@" in v else v.split()[-1] for v, _ in SECRET_VALUES.values()]
    hits = [f"{p}: {s}" for p in tmp_path.rglob("*") if p.is_file() for s in secrets if s.encode() in p.read_bytes()]
    assert not hits and not any(s in done.stdout + done.stderr for s in secrets), hits


def test_a_resume_with_another_micro_batch_converts_the_data_position():
    """The same samples count as consumed: 3 micro-batches of 8 on 2 processes are 48 samples, 6
    micro-batches of 4 on 2 processes, or 6 of 8 on 1 (the global batch kept: `resume` refuses the rest)."""
    from craken_cli.train import checkpoint

    state = checkpoint.TrainState(step=3, batch_in_epoch=3, world_size=2, micro_batch=8)
    assert checkpoint.data_position(state, world=2, micro_batch=8) == 3
    assert checkpoint.data_position(state, world=2, micro_batch=4) == 6
    assert checkpoint.data_position(state, world=1, micro_batch=8) == 6
    assert checkpoint.data_position(state, world=4, micro_batch=4) == 3
