"""Every optimizer step gets the whole global batch, also where an accumulation window spans the end of
an epoch: 47 blocks make 11 micro-batches of 4 per epoch, an odd number for accumulation 2. accelerate's
default stepped early on the last micro-batch of each epoch (6 steps per epoch, one of them half a
global batch) while the metrics counted a whole one. A run SIGKILLed after its checkpoint at step 6 (a
window that began in epoch 0) and resumed ends where the uninterrupted run ends, with its losses."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from test_resume_offload_e2e import losses, start
from test_reliability import kill_everything

pytestmark = pytest.mark.e2e

MICRO, ACCUM, STEPS = 4, 2, 12
ARGS = ["--zero", "1", "--num-processes", "1", "--seq-len", "48", "--micro-batch", str(MICRO), "--grad-accum",
        str(ACCUM), "--max-steps", str(STEPS), "--save-every", "6", "--steps-per-print", "3", "--eval-every", "0",
        "--set", "data.eval_fraction=0", "--set", "cluster.main_process_port=29657"]


@pytest.fixture(scope="module")
def odd_data(tmp_path_factory) -> Path:
    from craken_cli.train import builtin

    path = tmp_path_factory.mktemp("odd") / "train.jsonl"
    with open(path, "w") as fh:
        for line in builtin.pattern_lines(150, seed=5):
            fh.write(json.dumps({"text": line}) + "\n")
    return path


def consumed_micro_batches(run_dir: Path, step: int) -> tuple[int, int]:
    """(micro-batches the checkpoint of `step` has consumed, micro-batches per epoch)."""
    from craken_cli.train import checkpoint

    start_line = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[0])
    per_epoch = start_line["data"]["rows"] // MICRO
    state = checkpoint.read_state(run_dir / "checkpoints" / f"step_{step:08d}")
    return state.epoch * per_epoch + state.batch_in_epoch, per_epoch


def test_windows_across_epoch_ends_hold_the_global_batch_and_resume_exactly(tmp_path, odd_data):
    from craken_cli.train import checkpoint

    args = [*ARGS, "--dataset", str(odd_data)]
    a_dir, b_dir = tmp_path / "A", tmp_path / "B"
    assert start(a_dir, *args).wait(timeout=900) == 0, (tmp_path / "A-0.log").read_text()[-3000:]
    consumed, per_epoch = consumed_micro_batches(a_dir, STEPS)
    assert per_epoch % ACCUM, f"{per_epoch} micro-batches per epoch: the data no longer tests a straddling window"
    assert consumed == STEPS * ACCUM
    assert consumed_micro_batches(a_dir, 6)[0] == 6 * ACCUM

    proc = start(b_dir, *args)
    while not checkpoint.list_checkpoints(b_dir) and proc.poll() is None:
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before the kill"
    kill_everything(proc)
    assert [checkpoint.step_of(p) for p in checkpoint.list_checkpoints(b_dir)] == [6]
    assert start(b_dir, *args, "--resume", "auto").wait(timeout=900) == 0, \
        sorted(tmp_path.glob("B-*.log"))[-1].read_text()[-3000:]
    assert consumed_micro_batches(b_dir, STEPS)[0] == STEPS * ACCUM
    a, b = losses(a_dir), losses(b_dir)
    assert sorted(a) == [3, 6, 9, 12] and a == b, (a, b)
