"""Reliability (issue 6): exact resume after a crash, preemption, resume on another number of
processes, export of ZeRO-3 weights, secrets, and checkpoint integrity.

The e2e tests run real 2-process DeepSpeed trainings on CPU (gloo) of the built-in tiny model. Runs
are shared between assertions through module-scoped fixtures: ZeRO-2 A, B (crash, SIGTERM, end),
C (2 -> 1 processes), D (1 -> 2); ZeRO-3 A and B (crash, end). Nine launches in all.

    pytest -m e2e tests/test_reliability.py -s     # prints the measured numbers
"""

from __future__ import annotations

import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

STEPS = 24  # 2N
SAVE_EVERY = 4
# Small and fast; the same global batch on any number of processes (grad-accum follows), so a
# resume on another process count sees the same samples per step.
COMMON = ["--seq-len", "32", "--micro-batch", "8", "--global-batch", "16", "--offload-optimizer", "none",
          "--steps-per-print", "1", "--eval-every", "0", "--save-every", str(SAVE_EVERY), "--keep-checkpoints", "20",
          "--max-steps", str(STEPS)]
# Fake secrets: present in every training's environment, and must appear in no file of a run folder.
SECRETS = {"HF_TOKEN": "hf_FAKEfakeFAKE0123456789secret", "WANDB_API_KEY": "wandbFAKE9876543210fake0secret0key"}
RNG = random.Random(int(os.environ.get("RELIABILITY_TEST_SEED", time.time_ns() % 10**6)))
MEASURED: dict[str, object] = {}


# ---------------------------------------------------------------------------------------------
# helpers


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CRAKEN_")}
    return {**env, **SECRETS, "CRAKEN_NO_PROGRESS": "1"}


def start(run_dir: Path, *args: str, log: str) -> subprocess.Popen:
    """`craken train` in its own session, so the test can signal its whole process group."""
    log_path = run_dir.parent / f"{run_dir.name}.{log}.log"
    with open(log_path, "w") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "craken_cli", "train", "--output-dir", str(run_dir), *args],
                                cwd=run_dir.parent, env=_env(), stdout=fh, stderr=subprocess.STDOUT,
                                start_new_session=True)
    proc.log_path = log_path
    return proc


def finish(proc: subprocess.Popen, timeout: float = 600) -> tuple[int, str]:
    """Exit code and output of a launch."""
    code = proc.wait(timeout=timeout)
    return code, proc.log_path.read_text()


def run(run_dir: Path, *args: str, log: str) -> tuple[int, str]:
    code, text = finish(start(run_dir, *args, log=log))
    assert code == 0, text[-4000:]
    return code, text


def records(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:  # a line cut by SIGKILL
            pass
    return out


def segments(run_dir: Path) -> list[dict]:
    """One entry per launch: {"resumed_at": step or None, "losses": {step: loss}, "end": record}."""
    out: list[dict] = []
    for r in records(run_dir):
        if r.get("event") in ("start", "resume"):
            out.append({"resumed_at": r.get("step"), "losses": {}, "end": None})
        elif r.get("event") == "end":
            out[-1]["end"] = r
        elif "loss" in r:
            out[-1]["losses"][r["step"]] = r["loss"]
    return out


def last_step(run_dir: Path) -> int:
    steps = [r["step"] for r in records(run_dir) if "loss" in r]
    return steps[-1] if steps else 0


def wait_until(pred, timeout: float = 300, what: str = "") -> None:
    end = time.time() + timeout
    while not pred():
        if time.time() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def kill_everything(proc: subprocess.Popen) -> None:
    """SIGKILL the whole tree at once: craken, the launcher and the workers. torchrun starts each
    worker in a session of its own, so killpg alone would leave them training."""
    from craken_cli.launch.command import descendants

    for pid in descendants(proc.pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)


def crash_after_first_checkpoint(run_dir: Path, args: list[str], latest_kill_step: int) -> int:
    """Start a run, SIGKILL everything at a random step after its first checkpoint; -> that step."""
    from craken_cli.train import checkpoint

    target = RNG.randint(SAVE_EVERY, latest_kill_step)
    proc = start(run_dir, *args, log="crash")
    wait_until(lambda: checkpoint.list_checkpoints(run_dir) and last_step(run_dir) >= target or proc.poll() is not None,
               what=f"step {target} of {run_dir}")
    time.sleep(RNG.uniform(0, 0.15))  # anywhere inside the step, a checkpoint save included
    assert proc.poll() is None, "the run ended before the kill"
    kill_everything(proc)
    assert not (run_dir / "final").exists()
    return last_step(run_dir)  # the last step logged before the kill


def assert_exact(a: dict[int, float], seg: dict) -> list[int]:
    """Every loss of a resumed launch equals run A's at the same step, to the last bit."""
    steps = sorted(seg["losses"])
    assert steps and steps[0] == seg["resumed_at"] + 1, (steps, seg["resumed_at"])
    for step in steps:
        assert seg["losses"][step] == a[step], f"step {step}: {seg['losses'][step]!r} != {a[step]!r}"
    return steps


def leaked_secrets(root: Path) -> list[str]:
    hits = []
    for path in root.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            hits += [f"{path}: {name}" for name, value in SECRETS.items() if value.encode() in data]
    return hits


# ---------------------------------------------------------------------------------------------
# shared runs


@pytest.fixture(scope="module")
def zero2(tmp_path_factory):
    """A: 24 steps. B: killed (SIGKILL, all processes) at a random step after its first checkpoint,
    resumed and stopped by SIGTERM, resumed again to the end."""
    root = tmp_path_factory.mktemp("zero2")
    args = ["--preset", "ds_zero2", *COMMON]
    a_dir, b_dir = root / "A", root / "B"
    t0 = time.time()
    run(a_dir, *args, log="run")
    killed_at = crash_after_first_checkpoint(b_dir, args, latest_kill_step=14)
    proc = start(b_dir, *args, "--resume", "auto", log="resume1")
    resumed_at = {}

    def trained_one_step_after_resume():
        segs = segments(b_dir)
        if len(segs) >= 2 and segs[1]["losses"]:
            resumed_at["step"] = segs[1]["resumed_at"]
            return True
        return proc.poll() is not None

    wait_until(trained_one_step_after_resume, what="the first resumed step")
    os.killpg(proc.pid, signal.SIGTERM)  # preemption: the scheduler signals the job's process group
    term_code, term_log = finish(proc)
    run(b_dir, *args, "--resume", "auto", log="resume2")
    return {"root": root, "A": a_dir, "B": b_dir, "args": args, "killed_at": killed_at,
            "term_code": term_code, "term_log": term_log, "wall_s": time.time() - t0}


@pytest.fixture(scope="module")
def zero3(tmp_path_factory):
    root = tmp_path_factory.mktemp("zero3")
    args = ["--preset", "ds_zero3", "--offload-param", "none", *COMMON]
    a_dir, b_dir = root / "A", root / "B"
    t0 = time.time()
    run(a_dir, *args, log="run")
    killed_at = crash_after_first_checkpoint(b_dir, args, latest_kill_step=STEPS - 2)
    run(b_dir, *args, "--resume", "auto", log="resume")
    return {"root": root, "A": a_dir, "B": b_dir, "killed_at": killed_at, "wall_s": time.time() - t0}


@pytest.fixture(scope="module")
def world_change(zero2):
    """C: 1 process from A's checkpoint at step 20 (2 processes). D: 2 processes from C's at step 22."""
    root = zero2["root"]
    c_dir, d_dir = root / "C", root / "D"
    t0 = time.time()
    _, c_log = run(c_dir, *zero2["args"], "--num-processes", "1", "--save-every", "2",
                   "--resume", str(zero2["A"] / "checkpoints" / "step_00000020"), log="run")
    _, d_log = run(d_dir, *zero2["args"], "--num-processes", "2",
                   "--resume", str(c_dir / "checkpoints" / "step_00000022"), log="run")
    return {"C": c_dir, "D": d_dir, "c_log": c_log, "d_log": d_log, "wall_s": time.time() - t0}


# ---------------------------------------------------------------------------------------------
# e2e


@pytest.mark.e2e
@pytest.mark.parametrize("fixture", ["zero2", "zero3"])
def test_exact_resume_after_sigkill(fixture, request):
    runs = request.getfixturevalue(fixture)
    a_segs, b_segs = segments(runs["A"]), segments(runs["B"])
    a = a_segs[0]["losses"]
    assert sorted(a) == list(range(1, STEPS + 1))
    assert a[STEPS] < a[1] - 0.5, "the loss must fall, or equal losses would prove little"
    crashed, resumed = b_segs[0], b_segs[1:]
    assert crashed["end"] is None  # killed: no end record
    assert max(crashed["losses"]) >= SAVE_EVERY
    for step, loss in crashed["losses"].items():
        assert loss == a[step]
    compared = []
    for seg in resumed:
        compared += assert_exact(a, seg)
    assert compared[-1] == STEPS and resumed[-1]["end"]["exit_code"] == 0
    # the first resume started from the newest complete checkpoint at or before the kill
    assert resumed[0]["resumed_at"] <= runs["killed_at"] and resumed[0]["resumed_at"] % SAVE_EVERY == 0
    MEASURED[f"{fixture} exact resume"] = (f"killed at step {runs['killed_at']}, resumed at "
                                           f"{[s['resumed_at'] for s in resumed]}, {len(compared)} losses "
                                           f"bit-identical to A, {runs['wall_s']:.0f} s for the runs")


@pytest.mark.e2e
def test_sigterm_leaves_a_loadable_checkpoint_and_resume_continues(zero2):
    from craken_cli.train import checkpoint

    b_segs = segments(zero2["B"])
    stopped = b_segs[1]
    assert zero2["term_code"] == 143
    stop_step = max(stopped["losses"])
    assert stopped["end"]["exit_code"] == 143 and stopped["end"]["steps"] == stop_step < STEPS
    assert f"stopped by signal at step {stop_step}" in zero2["term_log"]
    assert "--resume auto" in zero2["term_log"]
    ckpt = zero2["B"] / "checkpoints" / f"step_{stop_step:08d}"
    assert checkpoint.is_complete(ckpt) and checkpoint.read_state(ckpt).step == stop_step
    assert b_segs[2]["resumed_at"] == stop_step  # the next run continued from the SIGTERM checkpoint
    MEASURED["sigterm"] = f"stopped at step {stop_step} (exit {zero2['term_code']}), resumed there"


@pytest.mark.e2e
def test_resume_on_another_number_of_processes(zero2, world_change):
    from craken_cli.train import checkpoint

    a = segments(zero2["A"])[0]["losses"]
    c_seg, d_seg = segments(world_change["C"])[0], segments(world_change["D"])[0]
    assert c_seg["resumed_at"] == 20 and d_seg["resumed_at"] == 22
    for log in (world_change["c_log"], world_change["d_log"]):
        assert "converting it to a universal checkpoint" in log
    assert checkpoint.read_state(world_change["C"] / "checkpoints" / "step_00000022").world_size == 1
    assert checkpoint.read_state(world_change["D"] / "checkpoints" / "step_00000024").world_size == 2
    c = c_seg["losses"]
    d = d_seg["losses"]
    assert a[20] < a[1] - 1.0  # far from the untrained loss: a resume that lost the weights would show
    rel_21 = abs(c[21] - a[20]) / a[20]
    rel_12 = abs(d[23] - c[22]) / c[22]
    assert rel_21 < 0.02, f"2 -> 1: first resumed loss {c[21]} vs {a[20]} before the stop"
    assert rel_12 < 0.02, f"1 -> 2: first resumed loss {d[23]} vs {c[22]} before the stop"
    assert d_seg["end"]["exit_code"] == 0
    MEASURED["2->1"] = (f"loss {a[20]:.4f} at the stop -> {c[21]:.4f} first resumed ({rel_21:.2%}); "
                        f"uninterrupted A at that step {a[21]:.4f}")
    MEASURED["1->2"] = (f"loss {c[22]:.4f} at the stop -> {d[23]:.4f} first resumed ({rel_12:.2%}); "
                        f"uninterrupted A at that step {a[23]:.4f}")


@pytest.mark.e2e
def test_export_of_zero3_run_reproduces_the_trained_logits(zero3, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "exported"
    proc = subprocess.run([sys.executable, "-m", "craken_cli", "ckpt", "export", str(zero3["A"]), "--out", str(out)],
                          env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    from safetensors.torch import load_file

    # The weights are bit-identical to the 16-bit weights DeepSpeed gathered at the end of training.
    exported, gathered = load_file(out / "model.safetensors"), load_file(zero3["A"] / "final" / "model.safetensors")
    assert sorted(exported) == sorted(gathered)
    assert all(torch.equal(exported[k], gathered[k]) for k in exported)
    check = torch.load(zero3["A"] / "final_check.pt", weights_only=True)
    model = AutoModelForCausalLM.from_pretrained(out)
    AutoTokenizer.from_pretrained(out)
    with torch.no_grad():
        logits = model(input_ids=check["input_ids"]).logits.float()
    assert model.dtype == torch.bfloat16 and logits.abs().max() > 0.1
    diff = (logits - check["logits"]).abs().max().item()
    # The logits equal the training model's up to the rounding of one bf16 result: ZeRO-3 computes
    # its linear layers through DeepSpeed's own autograd function, a different CPU kernel path.
    ulp = 2.0 ** (math.floor(math.log2(check["logits"].abs().max().item())) - 7)
    assert diff <= ulp, f"max difference {diff} > one bf16 ulp {ulp}"
    same = (logits == check["logits"]).float().mean().item()
    MEASURED["export zero3"] = (f"weights bit-identical to DeepSpeed's gathered ones; logits {tuple(logits.shape)}: "
                                f"max |diff| {diff} (one bf16 ulp = {ulp}), {same:.1%} of values identical")


@pytest.mark.e2e
def test_no_secret_in_any_run_folder(zero2, zero3, world_change):
    hits = leaked_secrets(zero2["root"]) + leaked_secrets(zero3["root"])
    assert not hits, hits
    assert not any(v in world_change["c_log"] + zero2["term_log"] for v in SECRETS.values())


@pytest.fixture(scope="module", autouse=True)
def print_measurements():
    """What the e2e tests measured, printed once after them (run with -s); not a test, which would assert
    nothing."""
    yield
    for key, value in MEASURED.items():
        print(f"{key}: {value}")


# ---------------------------------------------------------------------------------------------
# fast: integrity rules, secrets in --dry-run, security lint


def _fake_checkpoint(root: Path, step: int, world: int = 2, seal: bool = True) -> Path:
    from craken_cli.train import checkpoint

    path = checkpoint.checkpoint_dir(root) / f"step_{step:08d}"
    (path / "pytorch_model").mkdir(parents=True)
    (path / "pytorch_model" / "mp_rank_00_model_states.pt").write_bytes(b"x" * 100)
    (path / "random_states_0.pkl").write_bytes(b"r" * 10)
    if seal:
        checkpoint.write_state(path, checkpoint.TrainState(step=step, world_size=world))
    return path


def test_partial_and_corrupt_checkpoints_are_skipped(tmp_path):
    from craken_cli.train import checkpoint

    good = _fake_checkpoint(tmp_path, 4)
    partial = _fake_checkpoint(tmp_path, 8, seal=False)  # killed before craken_state.json
    corrupt = _fake_checkpoint(tmp_path, 12)
    (corrupt / "pytorch_model" / "mp_rank_00_model_states.pt").write_bytes(b"x" * 10)  # truncated
    (checkpoint.checkpoint_dir(tmp_path) / "latest").write_text(corrupt.name)
    assert checkpoint.is_complete(good)
    assert "no craken_state.json" in checkpoint.problems(partial)[0]
    assert "10 bytes, 100 were written" in checkpoint.problems(corrupt)[0]
    found, warnings = checkpoint.latest_checkpoint(tmp_path)
    assert found == good
    assert any(str(partial) in w for w in warnings) and any(str(corrupt) in w for w in warnings)
    assert checkpoint.list_checkpoints(tmp_path) == [good]


def test_same_size_scrambled_or_stale_shards_are_refused_by_content(tmp_path, craken, workdir):
    """A shard of the right size but other bytes (scrambled, or copied from an older step) was listed
    complete and loaded: the run hit NaN, and --resume auto loaded it again."""
    from craken_cli.train import checkpoint
    from craken_cli.ckpt.resume import resume_checkpoint

    run = workdir / "run"
    good = _fake_checkpoint(run, 4)
    scrambled = _fake_checkpoint(run, 8)
    stale = _fake_checkpoint(run, 12)
    shard = "pytorch_model/mp_rank_00_model_states.pt"
    (scrambled / shard).write_bytes(bytes(reversed(range(100))))  # same 100 bytes, other content
    (stale / "random_states_0.pkl").write_bytes(b"s" * 10)  # as if copied from another step
    assert checkpoint.problems(scrambled) == []  # sizes alone cannot tell
    assert "checksum differs" in checkpoint.problems(scrambled, verify=True)[0]
    found, warnings = resume_checkpoint(run, "auto")
    assert found == good
    assert any(str(scrambled) in w for w in warnings) and any(str(stale) in w for w in warnings)
    listed = craken("ckpt", "list", "run", "--json")
    rows = {r["step"]: r for r in __import__("json").loads(listed.out)}
    assert rows[4]["complete"] and not rows[8]["complete"] and not rows[12]["complete"]
    assert "random_states_0.pkl does not hold what was written" in rows[12]["problems"][0]
    refused = craken("train", "--resume", str(stale), "--output-dir", "run2", "--dry-run")
    assert refused.code == 2 and "checksum differs" in refused.err and "Traceback" not in refused.output


def test_resume_auto_warns_and_uses_previous_good_checkpoint(tmp_path):
    from craken_cli.ckpt.resume import resume_checkpoint

    good = _fake_checkpoint(tmp_path, 4)
    _fake_checkpoint(tmp_path, 8, seal=False)
    found, warnings = resume_checkpoint(tmp_path, "auto")
    assert found == good and warnings


def test_world_change_dry_run_converts_nothing(tmp_path):
    from types import SimpleNamespace

    from craken_cli.ckpt.resume import convert_if_world_changed, is_universal, with_universal_load

    ckpt = _fake_checkpoint(tmp_path, 4, world=2)
    warnings: list[str] = []
    def zero2(world):
        return SimpleNamespace(world_size=world, uses_deepspeed=True, fp32_grad_accum=False)

    out = convert_if_world_changed(ckpt, zero2(1), warnings, tmp_path, convert=False)
    assert out == tmp_path / "checkpoints" / "universal" / ckpt.name and not out.exists()
    assert "saved by 2 processes, this run has 1" in warnings[0]
    assert is_universal(out)
    same = convert_if_world_changed(ckpt, zero2(2), [], tmp_path)
    assert same == ckpt
    # the same processes with DeepSpeed's other ZeRO-1 optimizer: converted too
    fp32 = SimpleNamespace(world_size=2, uses_deepspeed=True, fp32_grad_accum=True)
    warnings = []
    assert convert_if_world_changed(ckpt, fp32, warnings, tmp_path, convert=False) == out
    assert "accumulated in 16 bits, this run accumulates in fp32: converting it" in warnings[0]
    files = with_universal_load({"ds_config.json": json.dumps({"train_batch_size": 16})})
    assert json.loads(files["ds_config.json"])["checkpoint"] == {"load_universal": True}


def test_dry_run_shows_no_secret(craken, tmp_path):
    result = craken("train", "--dry-run", "--output-dir", str(tmp_path / "run"), env=SECRETS)
    assert result.code == 0, result.output
    assert not any(v in result.output for v in SECRETS.values())
    assert not (tmp_path / "run").exists()


SRC = Path(__file__).resolve().parents[1] / "src" / "craken_cli"


def test_no_shell_and_safe_torch_load():
    """Security rules of issue 6 over craken's own code: no shell=True, torch.load only with weights_only=True."""
    import re

    for path in SRC.rglob("*.py"):
        text = path.read_text()
        assert "shell=True" not in text, path
        for call in re.finditer(r"torch\.load\(([^)]*)\)", text):
            assert "weights_only=True" in call.group(1), f"{path}: {call.group(0)}"
