"""One lr schedule for both engines: the plain engine's LambdaLR, stepped beside DeepSpeed's own
scheduler class built from the rendered block, gives the same lr at every optimizer step. End to end
too: DeepSpeed's config parser and scheduler factory read the ds_config.json `craken config render`
wrote, beside the real PlainEngine of the same run at ZeRO-0.

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


@pytest.mark.parametrize("kind, warmup, total", [  # linear without warm-up is refused (test below)
    (kind, warmup, total) for kind in ("cosine", "linear", "constant")
    for warmup, total in [(0, 20), (1, 20), (2, 20), (5, 20), (10, 12), (30, 20), (10, 200)]
    if (kind, warmup) != ("linear", 0)])
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


class _OneProcess:
    """The few Accelerator members the plain engine calls, for one process and no accumulation."""

    sync_gradients = True

    def prepare(self, *objects):
        return objects

    def register_for_checkpointing(self, obj):
        pass

    def backward(self, loss):
        loss.backward()

    def clip_grad_norm_(self, params, max_norm):
        return torch.nn.utils.clip_grad_norm_(params, max_norm)


def _deepspeeds_scheduler_from_file(path, optimizer):
    """The scheduler DeepSpeed's engine builds at start-up: the file parsed by DeepSpeedConfig, the object
    made by DeepSpeedEngine._scheduler_from_config (its own code, called on a holder of that config)."""
    from types import SimpleNamespace

    from deepspeed.runtime.config import DeepSpeedConfig
    from deepspeed.runtime.engine import DeepSpeedEngine

    parsed = DeepSpeedConfig(str(path))
    holder = SimpleNamespace(scheduler_name=lambda: parsed.scheduler_name,
                             scheduler_params=lambda: parsed.scheduler_params)
    return DeepSpeedEngine._scheduler_from_config(holder, optimizer)


def test_linear_without_warmup_is_refused_before_anything_is_written(craken, workdir):
    """DeepSpeed's WarmupDecayLR decays to the lr its warm-up starts from, so linear with no warm-up
    (start = lr) would keep the full lr to the end on both engines: refused, naming the fix."""
    result = craken("config", "render", "--cpu", "--set", "schedule.kind=linear", "--set", "schedule.warmup_steps=0",
                    "--out", "cfg")
    assert result.code == 2 and "schedule.warmup_steps to 1 or more" in result.output, result.output
    assert not (workdir / "cfg").exists()


@pytest.mark.parametrize("kind, warmup, total", [
    (kind, warmup, total) for kind in ("cosine", "linear") for warmup, total in [(0, 16), (1, 16), (4, 16), (10, 12)]
    if (kind, warmup) != ("linear", 0)])
def test_rendered_ds_config_and_the_plain_engine_step_the_same_lr(craken, workdir, kind, warmup, total):
    """End to end on both sides: `craken config render` writes ds_config.json, DeepSpeed's own config
    parser and scheduler factory build the scheduler from that file; the same run at ZeRO-0 on a GPU (the
    plain engine) is the real PlainEngine, stepped through backward_step. Same lr at every step."""
    from craken_cli.config import yamlio
    from craken_cli.config.sources import Layer, build_spec
    from craken_cli.launch import render
    from craken_cli.train.engine import PlainEngine

    result = craken("config", "render", "--zero", "2", "--cpu", "--num-processes", "1", "--lr", LR,
                    "--max-steps", total, "--clip", "1.0", "--set", f"schedule.kind={kind}",
                    "--set", f"schedule.warmup_steps={warmup}", "--set", "schedule.min_lr_ratio=0.1", "--out", "cfg")
    assert result.code == 0, result.output
    ds_file = workdir / "cfg" / render.DS_FILE
    run_file = workdir / "cfg" / render.RUN_FILE
    ds_opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=LR)
    ds_sched = _deepspeeds_scheduler_from_file(ds_file, ds_opt)
    assert type(ds_sched).__name__ == schedule.SCHEDULERS[kind]

    run_layer = Layer("file", str(run_file), yamlio.read_mapping(run_file))
    ds_spec = build_spec([run_layer]).spec
    on_a_gpu_at_zero0 = Layer("flag", "test", {"zero": {"stage": 0}, "cluster": {"use_cpu": False}})
    plain_spec = build_spec([run_layer, on_a_gpu_at_zero0]).spec
    assert ds_spec.uses_deepspeed and not plain_spec.uses_deepspeed
    assert (plain_spec.schedule, plain_spec.optimizer.lr, plain_spec.train.max_steps) == \
        (ds_spec.schedule, ds_spec.optimizer.lr, ds_spec.train.max_steps)
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 4)
    engine = PlainEngine(plain_spec, _OneProcess())
    engine.prepare(model, [])
    x = torch.randn(2, 4)
    for step in range(total + 3):  # the lr each optimizer step uses, one step past the end too
        ds_lr = ds_opt.param_groups[0]["lr"]
        plain_lrs = [group["lr"] for group in engine.optimizer.param_groups]  # decay and no-decay groups
        assert plain_lrs == [pytest.approx(ds_lr, rel=1e-9, abs=1e-15)] * 2, (step, plain_lrs, ds_lr)
        engine.backward_step(model(x).square().mean())
        ds_opt.step()
        ds_sched.step()
        assert engine.lr() == pytest.approx(ds_opt.param_groups[0]["lr"], rel=1e-9, abs=1e-15), step
    # and it is the schedule asked for: cosine ends at min_lr_ratio, linear at 0 (min_lr_ratio is cosine's)
    assert engine.lr() == pytest.approx(0.1 * LR if kind == "cosine" else 0.0, abs=1e-12)


def _imported(block: dict, stage: int) -> RunSpec:
    return RunSpec.model_validate({"optimizer": {"lr": LR}, "train": {"max_steps": 40}, "zero": {"stage": stage},
                                   "precision": "bf16", "cluster": {"num_processes": 1, "use_cpu": stage != 0},
                                   "deepspeed": {"extra": {"scheduler": block}}})


def test_an_imported_scheduler_block_is_what_both_engines_run():
    """A user's WarmupDecayLR (imported verbatim, "auto" filled from the run) is the block the rendered
    file holds and the block the plain engine steps: not craken's own schedule."""
    block = {"type": "WarmupDecayLR", "params": {"warmup_min_lr": 1e-5, "warmup_max_lr": "auto",
                                                 "warmup_num_steps": 5, "total_num_steps": "auto",
                                                 "warmup_type": "linear"}}
    spec = _imported(block, 0)
    ran = schedule.run_block(spec)
    assert ran["params"]["warmup_max_lr"] == LR and ran["params"]["total_num_steps"] == 40
    assert deepspeed_config(_imported(block, 2))["scheduler"] == ran
    factor = schedule.lr_lambda(ran, LR)
    assert factor(1) * LR == pytest.approx(1e-5) and factor(41) * LR == pytest.approx(1e-5)
    assert ran != schedule.deepspeed_block(spec)


def test_an_imported_scheduler_the_plain_engine_cannot_run_is_refused_before_launch():
    from craken_cli.launch import preflight

    one_cycle = {"type": "OneCycle", "params": {"cycle_min_lr": 1e-5, "cycle_max_lr": 1e-3}}
    problems = preflight.schedule_problems(_imported(one_cycle, 0))
    assert len(problems) == 1 and "OneCycle" in problems[0] and "--zero 1" in problems[0]
    assert preflight.schedule_problems(_imported(one_cycle, 2)) == []  # DeepSpeed runs it itself
    no_total = {"type": "WarmupDecayLR", "params": {"warmup_num_steps": 5, "warmup_type": "linear"}}
    assert preflight.schedule_problems(_imported(no_total, 0)) == [
        "deepspeed.extra.scheduler has no params.total_num_steps, which its type needs; or use --zero 1, or drop "
        "the imported block to train craken's schedule"]
