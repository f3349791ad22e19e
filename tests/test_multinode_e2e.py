"""Beyond one machine, on localhost: two `craken train` "machines" train one model together, and a
run with --max-restarts survives the death of a worker. Real processes, DeepSpeed on gloo."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

pytestmark = pytest.mark.e2e


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(args: list[str], cwd: Path, log: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "craken_cli", "train", *args], cwd=cwd,
                            stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)


def losses(path: Path) -> dict[int, float]:
    out = {}
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        if "loss" in rec:
            out[rec["step"]] = rec["loss"]
    return out


def two_machines(tmp_path: Path, folders: tuple[str, str], extra: tuple[str, ...] = ()) -> list[int]:
    """Both "machines" of a 2-machine job (one process each) on localhost; their exit codes."""
    port = str(free_port())
    common = ["--num-machines", "2", "--num-processes", "2", "--main-process-ip", "127.0.0.1",
              "--main-process-port", port, "--max-steps", "10", "--steps-per-print", "1", "--eval-every", "0",
              "--zero", "2", "--offload-optimizer", "none", "--seq-len", "32", *extra]
    procs = [start([*common, "--machine-rank", str(r), "--output-dir", str(tmp_path / folders[r])], tmp_path,
                   tmp_path / f"m{r}.log") for r in (0, 1)]
    try:
        return [p.wait(timeout=600) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)


def test_two_machines_on_localhost_train_together_in_one_shared_run_folder(tmp_path):
    """What `craken cluster slurm` runs: every node starts `craken train` with the same --output-dir."""
    from craken_cli.train import checkpoint

    codes = two_machines(tmp_path, ("shared", "shared"), ("--save-every", "5"))
    logs = [(tmp_path / f"m{r}.log").read_text()[-3000:] for r in (0, 1)]
    assert codes == [0, 0], logs
    run = tmp_path / "shared"
    rank0 = losses(run / "metrics.jsonl")
    rank1 = losses(run / "metrics-machine1.jsonl")
    assert sorted(rank0) == list(range(1, 11))
    assert rank0 == rank1  # one model, trained together: the same loss at every step on both machines
    start_line = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    assert start_line["num_processes"] == 2
    # each machine launched from its own files: neither overwrote what the other one's processes read
    assert "machine_rank: 0" in (run / "accelerate.yaml").read_text()
    accel1 = (run / "accelerate-machine1.yaml").read_text()
    assert "machine_rank: 1" in accel1 and "deepspeed_multinode_launcher: standard" in accel1
    assert str(run / "ds_config-machine1.json") in accel1
    assert "machine_rank: 1" in (run / "run-machine1.yaml").read_text()
    # checkpoints hold the shards of both machines' processes, sealed once
    saved = checkpoint.list_checkpoints(run)
    assert [checkpoint.step_of(c) for c in saved] == [5, 10]
    files = checkpoint.read_state(saved[-1]).files
    assert any("rank_0" in f for f in files) and any("rank_1" in f for f in files), sorted(files)
    assert (run / "final" / "config.json").is_file() and (run / "report").is_dir()


def test_machines_that_do_not_share_the_run_folder_are_refused_before_training(tmp_path):
    """Separate folders (no shared filesystem) would seal checkpoints without the other machine's
    shards: refused at start-up, on every machine, naming --output-dir."""
    codes = two_machines(tmp_path, ("m0", "m1"))
    assert codes[0] != 0 and codes[1] != 0
    log1 = (tmp_path / "m1.log").read_text()
    for log in ((tmp_path / "m0.log").read_text(), log1):
        assert "machine(s) 1 do not see what machine 0 wrote" in log and "--output-dir" in log, log[-3000:]
    assert not (tmp_path / "m0" / "checkpoints").exists()


def loop_workers(pid: int) -> list[psutil.Process]:
    """The training processes below craken. The launcher's own command line ends with
    `-m craken_cli.train.loop RUN/run.yaml` too, so it is told apart by its module."""
    out = []
    for child in psutil.Process(pid).children(recursive=True):
        try:
            cmd = " ".join(child.cmdline())
            if (child.status() != psutil.STATUS_ZOMBIE and "craken_cli.train.loop" in cmd
                    and "accelerate.commands.launch" not in cmd and "craken_cli.launch.launcher" not in cmd):
                out.append(child)
        except psutil.Error:  # exited while we looked
            pass
    return out


def test_max_restarts_recovers_from_a_killed_worker(tmp_path):
    """A resumed launch (--resume auto) whose worker dies later: the restarted group continues from
    the newest checkpoint, not from the one the launch began with (pruned by then: keep 1)."""
    run_dir = tmp_path / "elastic"
    common = ["--save-every", "4", "--steps-per-print", "1", "--eval-every", "0", "--seq-len", "64",
              "--keep-checkpoints", "1", "--output-dir", str(run_dir)]
    first = start([*common, "--max-steps", "4", "--main-process-port", str(free_port())], tmp_path,
                  tmp_path / "first.log")
    assert first.wait(timeout=300) == 0, (tmp_path / "first.log").read_text()[-3000:]
    proc = start(["--max-restarts", "1", "--max-steps", "60", "--resume", "auto", *common,
                  "--main-process-port", str(free_port())], tmp_path, tmp_path / "elastic.log")
    workers: list[psutil.Process] = []
    try:
        deadline = time.time() + 300
        killed_at = None
        while time.time() < deadline and proc.poll() is None:
            metrics = run_dir / "metrics.jsonl"
            step = max(losses(metrics) or [0]) if metrics.exists() else 0
            # Mid-run: after this launch's first checkpoint (step 8), well before the end (step 60).
            if 10 <= step <= 40:
                workers = loop_workers(proc.pid)
                if len(workers) == 2:
                    workers[-1].kill()  # one worker dies, as on a node failure
                    killed_at = step
                    break
            time.sleep(0.2)
        assert killed_at is not None, (tmp_path / "elastic.log").read_text()[-3000:]
        code = proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            try:
                workers = loop_workers(proc.pid)
            except psutil.Error:
                pass
            os.killpg(proc.pid, signal.SIGKILL)
        for w in workers:  # torchrun starts them in sessions of their own: killpg misses them
            try:
                w.kill()
            except psutil.Error:
                pass
    log = (tmp_path / "elastic.log").read_text()
    assert code == 0, log[-4000:]
    assert "worker group restarted" in log
    events = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    resumed = [e for e in events if e.get("event") == "resume"]
    # the launch resumed at 4; the restart from a checkpoint this launch wrote before the kill
    assert [e["step"] for e in resumed][:1] == [4] and len(resumed) == 2, resumed
    assert 8 <= resumed[1]["step"] <= killed_at, (resumed, killed_at)
    assert events[-1]["event"] == "end" and events[-1]["steps"] == 60 and events[-1]["exit_code"] == 0
    assert sorted(losses(run_dir / "metrics.jsonl"))[-1] == 60
