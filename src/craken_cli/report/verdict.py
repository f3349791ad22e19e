"""After a run: the report (machine 0) and the smoke-test verdict of `craken train --test`."""

from __future__ import annotations

import json
import math
from pathlib import Path

from ..config.sources import Layer
from ..runfolder import REPORT, note_written

TEST_STEPS = 20


def smoke_test_layer(spec) -> Layer:
    """--test: the same run, 20 steps, into its own folder."""
    every = max(1, TEST_STEPS // 2)
    return Layer("flag", "--test", {
        "train": {"max_steps": min(TEST_STEPS, spec.train.max_steps), "eval_every": every, "save_every": 0},
        "logging": {"steps_per_print": min(spec.logging.steps_per_print, 5)},
        "output": {"name": f"{spec.output.name}-test",
                   "dir": f"{spec.output.dir.rstrip('/')}-test" if spec.output.dir else None},
    })


def write_report(run_dir: Path) -> None:
    from ..console import err

    try:
        from .report import read_metrics, summarize, write_plots
    except ImportError:
        return
    try:
        metrics = read_metrics(run_dir)
        note_written(run_dir / REPORT, write_plots(metrics, run_dir / REPORT))
        summary = summarize(metrics)
        err.print(f"report: {run_dir / REPORT} ({summary.get('steps')} steps)")
    except Exception as exc:  # a plotting failure must not fail a finished training
        err.print(f"warning: report not written: {exc}", style="yellow")


def smoke_test_health(metrics: Path) -> tuple[bool, str]:
    losses = []
    for line in metrics.read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if "loss" in rec:
            losses.append(rec["loss"])
    if not losses:
        return False, "no training loss was logged"
    if not all(math.isfinite(x) for x in losses):
        return False, f"non-finite loss: {losses}"
    return True, f"{len(losses)} log lines, loss {losses[0]:.4f} -> {losses[-1]:.4f}, all finite"
