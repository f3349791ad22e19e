"""Pure decisions of the training loop (train/loop.py) that CPU trainings cannot reach."""

from __future__ import annotations

import math

import pytest
import torch

from craken_cli.train.loop import nonfinite_update

INF, NAN = math.inf, math.nan


@pytest.mark.parametrize("precision, loss, norm, stops", [
    ("bf16", 2.5, 1.3, False),
    ("bf16", 2.5, INF, True),  # the bf16 update would reach the weights: DeepSpeed's own check is off
    ("fp32", 2.5, NAN, True),
    ("bf16", NAN, 1.3, True),
    ("bf16", 2.5, None, False),  # no norm this step (ZeRO-3 before its first step)
    # fp16: DeepSpeed's loss scaler skipped the overflowed step and reports inf; routine in the first
    # steps, so it must not stop the run (auto precision is fp16 on every GPU before Ampere)
    ("fp16", 2.5, INF, False),
    ("fp16", 2.5, torch.tensor(INF), False),
    ("fp16", INF, 1.3, True),  # a diverged loss still stops it
])
def test_which_steps_stop_the_run(precision, loss, norm, stops):
    assert bool(nonfinite_update(torch.tensor(loss), norm, precision)) is stops
