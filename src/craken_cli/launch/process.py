"""Launch a prepared run, relaunch it under --auto after an out-of-memory, and turn the workers'
own exit (from the metrics' end line, or the failure file of `craken_cli.launch.launcher`: which rank failed
and its exception's last line) into craken's exit code and one message."""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import replace
from pathlib import Path

from ..errors import problems_text
from ..report.verdict import smoke_test_health, write_report
from ..runfolder import EXIT_CODES, OOM_MARKER_PREFIX, RUN_FILE, machine_file, metrics_file
from . import command, launcher
from .prepare import Prepared, prepare


def execute(prepared: Prepared) -> int:
    from ..console import err

    machine_rank = prepared.resolved.spec.cluster.machine_rank
    metrics = prepared.run_dir / metrics_file(machine_rank)
    offset = metrics.stat().st_size if metrics.exists() else 0
    code, failures = run_workers(prepared)
    while code != 0 and (step := oom_step(prepared)) is not None:
        # The existing troubleshooting advice, made automatic: the next strategy in speed order.
        req = prepared.request
        micro_batch = prepared.resolved.spec.batch.micro_batch
        excluded = (*req.exclude, (prepared.auto_choice, micro_batch))
        err.print(f"craken: out of GPU memory with {prepared.auto_choice} at micro-batch {micro_batch}, step {step}; "
                  "relaunching with the next fastest setting the planner predicts to fit: a smaller micro-batch "
                  "or the next strategy (--no-oom-fallback turns this off)", markup=False)
        prepared = prepare(replace(req, exclude=excluded, force=True), environ=os.environ)
        for warning in prepared.warnings:
            err.print(f"warning: {warning}", markup=False)
        code, failures = run_workers(prepared)
    if prepared.request is not None and prepared.request.script is not None:
        return script_verdict(prepared, code, failures)
    if code == 0 and metrics.exists() and machine_rank == 0:  # one report per job, from machine 0's log
        write_report(prepared.run_dir)
    if prepared.test:
        healthy, message = smoke_test_health(metrics) if code == 0 else (False, f"the run exited with code {code}")
        err.print(("test training healthy: " if healthy else "test training failed: ") + message,
                  style="green" if healthy else "red")
        return 0 if healthy else (code or 1)
    # The launcher returns the first failed worker's code; why it stopped is in the metrics' end line.
    end = last_end_event(metrics, offset) if code != 0 else {}
    if end.get("exit_code") in (EXIT_CODES["sigint"], EXIT_CODES["sigterm"]):
        # A signal (craken_cli.launch.launcher keeps torchrun's SignalException quiet); the workers finished their step and
        # saved a checkpoint: say so, and exit 143 (SIGTERM) / 130 (SIGINT).
        code = end["exit_code"]
        err.print(f"craken: stopped by a signal at step {end.get('steps')}; its checkpoint is saved. Resume with: "
                  f"craken train --config {prepared.run_dir / machine_file(RUN_FILE, machine_rank)} --resume auto",
                  markup=False)
    elif end.get("exit_code") == EXIT_CODES["nonfinite"]:
        code = EXIT_CODES["nonfinite"]
        err.print(f"craken: stopped at step {end.get('steps')} on a non-finite loss or gradient norm (advice above); "
                  "no checkpoint was written after it", markup=False)
    elif code != 0:
        why = launcher.failure_summary(failures)
        err.print(f"craken: training exited with code {code}{f' ({why})' if why else ''}; run folder: "
                  f"{prepared.run_dir}", markup=False)
    return code


def run_workers(prepared: Prepared) -> tuple[int, list[dict]]:
    """The launcher's exit code and the failed workers it reported (rank, exit code, last line)."""
    with tempfile.TemporaryDirectory(prefix="craken-launch-") as tmp:
        failure_file = Path(tmp) / "failures.json"
        code = command.run(command.with_failure_file(prepared.argv, failure_file), prepared.env,
                          keep_fds=lock_fds(prepared))
        return code, launcher.read_failures(failure_file) if code != 0 else []


def script_verdict(prepared: Prepared, code: int, failures: list[dict]) -> int:
    """`craken launch`: the script's own exit code, and on failure one line naming the rank and its error."""
    from ..console import err

    target = prepared.request.script
    if code == 0:
        err.print(f"craken: {target.shown} finished; run folder: {prepared.run_dir}", markup=False)
    elif code in (EXIT_CODES["sigint"], EXIT_CODES["sigterm"]):
        err.print(f"craken: {target.shown} was stopped by a signal (exit {code}); run folder: {prepared.run_dir}",
                  markup=False)
    elif code == EXIT_CODES["bad_input"] and failures and failures[0].get("problems"):  # script_host's PlanConflict
        err.print(problems_text(f"{target.shown} was stopped before training", failures[0]["problems"]), markup=False)
    else:
        why = launcher.failure_summary(failures) or f"exited with code {code}"
        err.print(f"craken: {target.shown} failed: {why}; run folder: {prepared.run_dir}", markup=False)
    return code


def lock_fds(prepared: Prepared) -> tuple[int, ...]:
    return () if prepared.lock_fd is None else (prepared.lock_fd,)


def last_end_event(metrics: Path, offset: int = 0) -> dict:
    """The end line of this launch (metrics written after `offset`), or {} when it wrote none."""
    try:
        with open(metrics, "rb") as fh:
            fh.seek(offset)
            last = json.loads(fh.read().decode().strip().splitlines()[-1])
    except (OSError, ValueError, IndexError):
        return {}
    return last if last.get("event") == "end" else {}


def oom_step(prepared: Prepared) -> int | None:
    """The step at which a process of an --auto run ran out of memory (its marker), if it did."""
    req = prepared.request
    if req is None or not req.auto or not req.oom_fallback or prepared.auto_choice is None:
        return None
    steps = []
    for marker in prepared.run_dir.glob(f"{OOM_MARKER_PREFIX}*.json"):
        try:
            steps.append(int(json.loads(marker.read_text())["step"]))
        except (OSError, ValueError, KeyError, TypeError):
            steps.append(0)
    return min(steps) if steps else None
