"""User-script shapes found by real 2-process CPU launches (each failed inside every worker before):
DeepSpeed's own non-Adam optimizers given craken's Adam params, a deepspeed.extra optimizer dropped for a
script, a torch optimizer beside the JSON's block, a --local_rank written on the command line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from craken_cli.config.options import SpecArgs, load_run
from craken_cli.launch import preflight, render, userscript
from craken_cli.plan.hardware import FakeProbe, detect


def spec_of(flags: dict, sets: tuple = ()):
    args = SpecArgs(flags={"--cpu": True, "--zero": 2, **flags}, sets=list(sets))
    resolved, _ = load_run(args, hardware=detect(FakeProbe()), environ={})
    return resolved.spec


def extra_optimizer(kind: str) -> tuple:
    return (f"deepspeed.extra.optimizer={json.dumps({'type': kind})}",)


@pytest.mark.parametrize("kind, taken", [("Lamb", {"lr", "betas", "eps", "weight_decay"}),
                                         ("Lion", {"lr", "betas", "weight_decay"}),
                                         ("adagrad", {"lr", "eps", "weight_decay"}),
                                         ("MuAdamW", {"lr", "betas", "eps", "weight_decay"}),
                                         ("MuSGD", {"lr", "weight_decay"})])
def test_deepspeeds_own_optimizers_get_only_the_params_they_take(kind, taken):
    """Before: torch_adam, betas, eps went to every type, and FusedLamb / FusedLion / torch's Adagrad
    stopped every worker with "unexpected keyword argument"."""
    params = render.deepspeed_config(spec_of({}, extra_optimizer(kind)))["optimizer"]["params"]
    assert set(params) == taken


@pytest.mark.parametrize("kind, taken", [("SGD", {"lr", "weight_decay"}), ("Adamax", {"lr", "betas", "eps", "weight_decay"}),
                                         ("RMSprop", {"lr", "eps", "weight_decay"})])
def test_a_torch_optimizer_gets_the_params_of_its_own_signature(kind, taken):
    """DeepSpeed builds a type it does not know from torch.optim with the whole params block; before, craken's
    torch_adam and fused went with it and every torch class refused them."""
    params = render.deepspeed_config(spec_of({}, extra_optimizer(kind)))["optimizer"]["params"]
    assert set(params) == taken
    import torch

    getattr(torch.optim, kind)([torch.nn.Parameter(torch.zeros(1))], **params)  # the class takes them


def test_a_torch_optimizer_with_the_zero_switch_passes_every_check_before_launch():
    from craken_cli.launch import preflight

    sets = (f"deepspeed.extra.optimizer={json.dumps({'type': 'SGD', 'params': {'momentum': 0.9}})}",
            "deepspeed.extra.zero_allow_untested_optimizer=true")
    spec = spec_of({}, sets)
    assert render.deepspeed_config(spec)["optimizer"]["params"]["momentum"] == 0.9
    assert preflight.deepspeed_extra_problems(spec) == []


def test_deepspeeds_mup_optimizers_without_mup_are_refused_before_launch(monkeypatch):
    """Before: DeepSpeed's MuAdam branch logs "Install mup" and every worker stopped on an UnboundLocalError
    (a real 2-process CPU run)."""
    import importlib.util

    from craken_cli.config import dscheck

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mup" else real(name, *a))
    [problem] = preflight.deepspeed_extra_problems(spec_of({}, extra_optimizer("MuAdam")))
    assert problem.startswith("deepspeed.extra.optimizer.type 'muadam' is DeepSpeed's wrapper of mup's MuAdam,")
    assert "pip install mup" in problem
    assert dscheck.MUP_OPTIMIZERS == {"muadam": "MuAdam", "muadamw": "MuAdamW", "musgd": "MuSGD"}


@pytest.mark.parametrize("sets, refused", [
    ((*extra_optimizer("Lamb"),), "'lamb' is DeepSpeed's FusedLamb, which DeepSpeed has not tested with ZeRO"),
    ((*extra_optimizer("Lamb"), "deepspeed.extra.zero_allow_untested_optimizer=true"), None),
    ((*extra_optimizer("Lion"),), None),
    ((*extra_optimizer("Adagrad"),), None),
    ((*extra_optimizer("Adam"),), None),
])
def test_an_optimizer_deepspeed_has_not_tested_with_zero_needs_its_switch_before_launch(sets, refused):
    """Before: every worker stopped at deepspeed.initialize on 'You are using an untested ZeRO Optimizer'
    (engine._do_optimizer_sanity_check: FusedLamb is not in zero.utils.ZERO_SUPPORTED_OPTIMIZERS)."""
    problems = preflight.deepspeed_extra_problems(spec_of({}, sets))
    assert (problems == []) if refused is None else (len(problems) == 1 and refused in problems[0]), problems
    if refused:
        assert "set deepspeed.extra.zero_allow_untested_optimizer to true" in problems[0]


def test_adam_types_keep_craken_params():
    params = render.deepspeed_config(spec_of({}, extra_optimizer("Adam")))["optimizer"]["params"]
    assert "torch_adam" in params and "betas" in params


def test_the_cuda_only_optimizers_are_refused_on_cpu_processes_before_launch():
    """DeepSpeed has no CPU FusedLamb, and a CPU Lion only for offloaded states ("This op had not been
    implemented on CPU backend" in every worker)."""
    [lamb] = preflight.cpu_optimizer_problems(spec_of({}, extra_optimizer("Lamb")))
    assert lamb.startswith("deepspeed.extra.optimizer.type 'Lamb' is DeepSpeed's FusedLamb")
    [lion] = preflight.cpu_optimizer_problems(spec_of({}, extra_optimizer("Lion")))
    assert "pass --offload-optimizer cpu" in lion
    assert preflight.cpu_optimizer_problems(spec_of({"--offload-optimizer": "cpu"}, extra_optimizer("Lion"))) == []
    assert preflight.cpu_optimizer_problems(spec_of({}, extra_optimizer("Adagrad"))) == []


def test_a_lamb_run_is_refused_with_exit_2_and_nothing_written(craken, workdir):
    (workdir / "x.py").write_text("print(1)\n")
    result = craken("launch", "--cpu", "--zero", "2", "--set", 'deepspeed.extra.optimizer={"type":"Lamb"}', "x.py")
    assert result.code == 2 and "Traceback" not in result.output
    assert "FusedLamb, a CUDA kernel" in result.err and not (workdir / "runs").exists()


def test_a_deepspeed_extra_optimizer_keeps_its_block_for_a_script():
    """Before: the script's JSON lost the Lamb/Adagrad block without a word, and the script's own AdamW
    trained instead of the optimizer the user asked for."""
    spec = spec_of({}, extra_optimizer("Adagrad"))
    assert userscript.keeps_ds_optimizer(spec, None) and userscript.keeps_ds_scheduler(spec, None)
    plain = spec_of({}, extra_optimizer("AdamW"))  # restates craken's own: the script's AdamW is that
    assert not userscript.keeps_ds_optimizer(plain, None)
    schedule = spec_of({}, ('deepspeed.extra.scheduler={"type":"WarmupLR","params":{"warmup_num_steps":3}}',))
    assert userscript.keeps_ds_scheduler(schedule, None) and not userscript.keeps_ds_optimizer(schedule, None)
    [problem] = userscript.dummy_problems(spec, False, userscript.DummyUse())
    assert problem.startswith("deepspeed.extra.optimizer asks for DeepSpeed's Adagrad, and --no-ds-optimizer drops")


def test_a_deepspeed_extra_scheduler_under_no_ds_optimizer_is_refused_as_an_extra_optimizer_is():
    """Before: --no-ds-optimizer dropped the scheduler block the user wrote (or `config import` kept) without a
    word, and the script's own schedule (or none) ran."""
    schedule = spec_of({}, ('deepspeed.extra.scheduler={"type":"WarmupLR","params":{"warmup_num_steps":3}}',))
    [problem] = userscript.dummy_problems(schedule, False, userscript.DummyUse())
    assert problem.startswith("deepspeed.extra.scheduler is a schedule for DeepSpeed to step, and --no-ds-optimizer")
    assert userscript.dummy_problems(schedule, None, userscript.DummyUse()) == []
    both = spec_of({}, (*extra_optimizer("Adagrad"), 'deepspeed.extra.scheduler={"type":"WarmupLR","params":{}}'))
    assert len(userscript.dummy_problems(both, False, userscript.DummyUse())) == 2


def test_a_torch_optimizer_beside_the_jsons_block_is_named_with_the_fix():
    """Before: accelerate's "You cannot specify an optimizer in the config file and in the code at the same
    time" in every worker, exit 1 (an always-AdamW script under --offload-optimizer cpu)."""
    ds = {"optimizer": {"type": "AdamW"}, "scheduler": {"type": "WarmupCosineLR"}}
    opt, sched = userscript.client_block_problems(["AdamW"], ["LambdaLR"], ds)
    assert opt.startswith("the script hands accelerator.prepare its own optimizer (AdamW) and craken's DeepSpeed "
                          "JSON holds DeepSpeed's (AdamW")
    assert "accelerate.utils.DummyOptim(model.parameters()) when CRAKEN_PLAN_DS_OPTIMIZER is 1" in opt
    assert "DummyScheduler(optimizer) when CRAKEN_PLAN_DS_SCHEDULER is 1" in sched
    assert "a deepspeed.extra scheduler" in sched and "a deepspeed.extra scheduler" not in opt  # why each is kept
    assert userscript.client_block_problems(["AdamW"], ["LambdaLR"], {}) == []
    assert userscript.client_block_problems([], [], ds) == []  # DummyOptim / DummyScheduler


def test_the_hosts_prepare_check_finds_a_torch_optimizer_beside_the_jsons():
    import torch
    from accelerate.utils import DummyOptim

    from craken_cli.launch.script_host import PlanConflict, patch_accelerator_prepare

    class Accelerator:
        def prepare(self, *objects):
            return objects

    patch_accelerator_prepare(Accelerator, micro_batch=4, lr=1e-3, ds_config={"optimizer": {"type": "AdamW"}})
    model = torch.nn.Linear(2, 1)
    with pytest.raises(PlanConflict) as info:
        Accelerator().prepare(model, torch.optim.AdamW(model.parameters(), lr=1e-3))
    assert "its own optimizer (AdamW)" in info.value.problems[0]
    Accelerator().prepare(model, DummyOptim(model.parameters()))


@pytest.mark.parametrize("args", [("--local_rank", "0"), ("--local_rank=0",), ("--model", "m", "--local-rank", "1")])
def test_a_local_rank_on_the_scripts_command_line_is_refused(args):
    """Before: `craken launch ... old.py --local_rank 0` gave both processes local_rank 0 (one GPU for all)."""
    spec = spec_of({})
    [problem] = userscript.local_rank_problems(args)
    assert problem.startswith("the script gets --local") and "drop it" in problem
    assert problem in userscript.arg_problems(spec, Path(spec.output.run_dir()), userscript.Target("x.py", args=args),
                                              False, False)
    assert userscript.local_rank_problems(("--rank", "0", "--local_ranks")) == []


def test_a_trainers_own_deepspeed_file_is_refused_with_how_to_import_it():
    """Before: "drop it and set the run with craken's flags", without the --config import the same file on the
    script's command line is told, and a dict printed whole."""
    message = userscript.trainer_deepspeed_message("own_ds.json")
    assert "TrainingArguments(deepspeed='own_ds.json')" in message
    assert "craken launch --config own_ds.json ... imports it" in message
    shown = userscript.trainer_deepspeed_message({"zero_optimization": {"stage": 3}, "bf16": {"enabled": True}})
    assert "a dict of its own" in shown and "zero_optimization" not in shown
