"""One lr schedule for both engines: the plain engine's LambdaLR, stepped beside DeepSpeed's own
scheduler class built from the rendered block, gives the same lr at every optimizer step.

The plain engine had its own formula before (loop.lr_factor): its cosine decay ran one step behind
DeepSpeed's, a warm-up of 1 step was DeepSpeed's 2, and `warmup_steps: 0` rendered a block DeepSpeed
refuses at start-up (warmup_num_steps must be positive)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from craken_cli.launch.render import deepspeed_config  # noqa: E402
from craken_cli.config.spec import RunSpec  # noqa: E402
from craken_cli.train import schedule  # noqa: E402

LR = 3e-4


def _spec(kind: str, warmup: int, total: int) -> RunSpec:
    return RunSpec.model_validate({"schedule": {"kind": kind, "warmup_steps": warmup, "min_lr_ratio": 0.1},
                                   "train": {"max_steps": total}, "optimizer": {"lr": LR}, "precision": "bf16",
                                   "cluster": {"num_processes": 1, "use_cpu": True}, "zero": {"stage": 2}})


def _deepspeed_scheduler(block: dict, optimizer):
    from deepspeed.runtime import lr_schedules

    return getattr(lr_schedules, block["type"])(optimizer, **block["params"])


@pytest.mark.parametrize("kind", ["cosine", "linear", "constant"])
@pytest.mark.parametrize("warmup, total", [(0, 20), (1, 20), (2, 20), (5, 20), (10, 12), (30, 20), (10, 200)])
def test_plain_engine_lr_equals_deepspeeds_at_every_step(kind, warmup, total):
    spec = _spec(kind, warmup, total)
    block = schedule.deepspeed_block(spec)
    assert deepspeed_config(spec)["scheduler"] == block  # what DeepSpeed runs is this block
    param = torch.nn.Parameter(torch.zeros(1))
    ds_opt = torch.optim.SGD([param], lr=LR)
    plain_opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=LR)
    ds_sched = _deepspeed_scheduler(block, ds_opt)
    plain_sched = torch.optim.lr_scheduler.LambdaLR(plain_opt, schedule.lr_lambda(block, LR))
    lrs = []
    for step in range(total + 3):  # the lr each optimizer step uses, one step past the end too
        ds_lr, plain_lr = ds_opt.param_groups[0]["lr"], plain_opt.param_groups[0]["lr"]
        assert plain_lr == pytest.approx(ds_lr, rel=1e-9, abs=1e-15), (step, plain_lr, ds_lr)
        lrs.append(plain_lr)
        plain_opt.step()
        plain_sched.step()
        ds_sched.step()
    assert 0.5 * LR < max(lrs) <= LR * (1 + 1e-9)  # DeepSpeed's cosine decays from the step after warm-up
    if warmup == 0:  # no warm-up: the full lr from the first step (from the second: DeepSpeed's cosine)
        assert lrs[1 if kind == "cosine" else 0] == pytest.approx(LR)
    else:  # DeepSpeed's warm-up starts at 0 and stays there for two steps (its iterations -1 and 0)
        assert lrs[:2] == [0.0, 0.0]
        assert lrs[0] == 0.0


def test_a_scheduler_the_plain_engine_cannot_run_is_named():
    with pytest.raises(ValueError, match="WarmupLR, WarmupDecayLR or WarmupCosineLR with linear warm-up"):
        schedule.lr_lambda({"type": "OneCycle", "params": {}}, LR)
    with pytest.raises(ValueError, match="warmup_type log"):
        schedule.lr_lambda({"type": "WarmupLR", "params": {"warmup_num_steps": 5}}, LR)
