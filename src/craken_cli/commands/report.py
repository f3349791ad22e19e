"""`craken report RUN_DIR`: summary table and PNG plots from a run's metrics.jsonl."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

EPILOG = "Example: craken report runs/tiny-zero2 --json"


def report(
    run_dir: Annotated[Path, typer.Argument(metavar="RUN_DIR",
        help="Run folder written by `craken train` (holds metrics.jsonl).",
                                            show_default=False)],
    out: Annotated[Optional[Path], typer.Option("--out", metavar="DIR",
        help="Folder for the PNGs (default: RUN_DIR/report/).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON for scripts.")] = False,
) -> None:
    """Plot loss, learning rate, tokens/s and GPU memory against steps, and summarize the run.

    Writes loss.png, lr.png, tokens_per_s.png, gpu_memory.png (GPU runs only) and overview.png.
    """
    from ..console import err, out as stdout
    from ..report.report import json_safe, summary_rows, write_report

    metrics, summary, plots = write_report(run_dir, out)
    for warning in metrics.warnings:
        err.print(f"warning: {warning}", markup=False, highlight=False)
    if as_json:
        typer.echo(json.dumps({**json_safe(summary), "plots": [str(p) for p in plots]}, indent=2))
        return

    from rich.table import Table

    table = Table(title=f"run {metrics.path.parent}", box=None, pad_edge=False, show_header=False,
                  title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    for label, value in summary_rows(summary):
        table.add_row(label, value)
    stdout.print(table)
    for path in plots:
        stdout.print(f"wrote {path}", markup=False)
