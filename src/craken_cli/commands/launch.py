"""`craken launch`: the user's own training script with craken's resolved, planned and checked configs."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from ..config.options import SpecArgs, spec_flags
from ..report.verdict import TEST_STEPS


@spec_flags
def launch(
    ctx: typer.Context,
    script: Annotated[str, typer.Argument(metavar="SCRIPT [ARGS]...", help="Your training script (a .py file), or "
                                          "with -m a module; "
                                          "everything after it goes to the script unparsed.")],
    module: Annotated[bool, typer.Option("-m", "--module", help="SCRIPT names a module, run as python -m "
                                         "MODULE.")] = False,
    auto: Annotated[bool, typer.Option("--auto", help="Plan ZeRO stage, offload and micro-batch from the detected "
                                       "GPUs for the model your script trains (needs --model).")] = False,
    ds_optimizer: Annotated[Optional[bool], typer.Option(
        "--ds-optimizer/--no-ds-optimizer", help="Keep DeepSpeed's optimizer and scheduler in the JSON (the script "
        "then takes accelerate's DummyOptim/DummyScheduler; the HF Trainer does so by itself). Default: under "
        "optimizer offload, where DeepSpeed steps the states with its CPU Adam, for a script that builds "
        "DummyOptim (DummyScheduler) outside any condition, and for a deepspeed.initialize without an "
        "optimizer.")] = None,
    test: Annotated[bool, typer.Option("--test", help=f"Smoke test: at most {TEST_STEPS} steps of exactly this run "
                                       "(the plan's max_steps) into runs/<name>-test.")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the launch command, its environment and the "
                                          "rendered files; launch nothing.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Start over in an existing run folder.")] = False,
    *,
    spec_args: SpecArgs,
) -> None:
    """Launch your own script: resolve, plan, render and check the configs, then accelerate launch it.

    The script gets the planned values as CRAKEN_PLAN_* variables (micro-batch, accumulation, lr, ...);
    an HF Trainer script's TrainingArguments are filled from the plan. Exit code: the script's own.
    """
    import os

    from ..console import err, out
    from ..launch.process import execute
    from ..launch.prepare import TrainRequest, prepare
    from ..report.summary import prepared_summary
    from ..launch.userscript import Target

    target = Target(module=script, args=tuple(ctx.args)) if module else Target(script=script, args=tuple(ctx.args))
    request = TrainRequest(spec_args=spec_args, auto=auto, test=test, dry_run=dry_run, force=force, script=target,
                           ds_optimizer=ds_optimizer)
    prepared = prepare(request, environ=os.environ)
    for warning in prepared.warnings:
        err.print(f"warning: {warning}", style="yellow")
    for line in prepared_summary(prepared):
        err.print(line, highlight=False)
    if dry_run:
        out.print_json(data={"argv": prepared.argv_shown, "env": prepared.env_shown, "files": prepared.files_shown})
        return
    raise typer.Exit(execute(prepared))
