"""`craken train`: resolve, check, render into the run folder, launch, and report."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from ..config.options import SpecArgs, spec_flags
from ..report.verdict import TEST_STEPS


@spec_flags
def train(
    ctx: typer.Context,
    auto: Annotated[bool, typer.Option("--auto", help="Choose ZeRO stage, offload, micro-batch and regional "
                                       "compilation from the detected GPUs (craken plan) for what you did not set.")] = False,
    test: Annotated[bool, typer.Option("--test", help=f"Smoke test: {TEST_STEPS} steps of exactly this run into "
                                       "runs/<name>-test; exit 0 when healthy.")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the launch command to copy and the "
                                          "rendered files; launch nothing.")] = False,
    resume: Annotated[Optional[str], typer.Option("--resume", metavar="auto|CHECKPOINT",
        help="Continue a run: 'auto' (latest good "
                                                  "checkpoint of the run folder) or a checkpoint folder.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Start over in an existing run folder.")] = False,
    oom_fallback: Annotated[bool, typer.Option("--oom-fallback/--no-oom-fallback", help="Under --auto, when a "
                                               "process runs out of GPU memory, relaunch with the next strategy "
                                               "the planner predicts to fit.")] = True,
    *,
    spec_args: SpecArgs,
) -> None:
    """Train: detect the GPUs, render the configs into the run folder, launch one process per GPU.

    With no arguments, trains the built-in tiny model on a built-in data set (no download), on all
    GPUs, or on CPU processes where there are none. Arguments after `--` go to `accelerate launch`.
    """
    import os

    from ..console import err, out
    from ..launch.process import execute
    from ..launch.prepare import TrainRequest, prepare
    from ..doctor.dsops import build_note, ops_to_build
    from ..report.summary import WIDTH, dry_run_text, prepared_summary

    request = TrainRequest(spec_args=spec_args, auto=auto, test=test, dry_run=dry_run, resume=resume,
                           force=force, launcher_args=list(ctx.args), oom_fallback=oom_fallback)
    prepared = prepare(request, environ=os.environ)
    for warning in prepared.warnings:
        err.print(f"warning: {warning}", style="yellow")
    for line in prepared_summary(prepared):
        err.print(line, highlight=False)
    for op in ops_to_build(prepared.resolved.spec, os.environ):  # a silent minute otherwise
        err.print(build_note(op, WIDTH), highlight=False)
    if dry_run:
        out.print("\n".join(dry_run_text(prepared)), highlight=False)
        return
    raise typer.Exit(execute(prepared))
