"""`craken doctor [--json] [--deep]`: check this machine for the run the current settings describe.

The command only parses, calls `doctor.gather` / `doctor.run_checks` and prints; the checks live in
`craken_cli/doctor/`. Without --deep nothing heavy (torch, deepspeed) is imported.
"""

from __future__ import annotations

import json
import sys
from typing import Annotated

import typer

from ..config.options import SpecArgs, spec_flags

# The epilog (exit codes, examples) is registered with the command in app.py's LAZY_COMMANDS.


@spec_flags
def doctor(
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON for scripts.")] = False,
    deep: Annotated[bool, typer.Option(
        "--deep", help="Also import torch and DeepSpeed and build the ops the run needs (slow).")] = False,
    *,
    spec_args: SpecArgs,
) -> None:
    """Check the environment for the run the settings describe; every problem comes with its fix."""
    from .. import doctor as d
    from ..errors import CrakenError
    from ..plan.hardware import detect
    from ..config.options import load_spec

    hw = detect()
    view, spec_problems = None, []
    try:
        view = d.run_view(load_spec(spec_args), hw)
    except CrakenError as exc:  # report bad settings next to the rest instead of stopping at them
        spec_problems = exc.problems
    facts = d.gather(hw, view)
    checks = d.run_checks(facts, view, spec_problems)
    if deep:
        checks += d.deep_checks(view)
    if as_json:
        typer.echo(json.dumps(d.report_dict(checks, facts), indent=2))
    else:
        _print(checks)
    raise typer.Exit(d.exit_code(checks))


def _print(checks) -> None:
    from ..doctor import render_plain, verdict, verdict_line

    if not sys.stdout.isatty():  # pipes and logs: plain lines, and rich is never imported
        sys.stdout.write(render_plain(checks) + "\n")
        return
    from rich.table import Table
    from rich.text import Text

    from ..console import out

    style = {"ok": "green", "warn": "yellow", "fail": "bold red"}
    table = Table("area", "check", "status", "detail", "fix", show_lines=False, pad_edge=False)
    area = None
    for c in checks:
        if area is not None and c.area != area:
            table.add_section()
        table.add_row(c.area if c.area != area else "", c.name, Text(c.status, style=style[c.status]), c.detail,
                      c.fix if c.status != "ok" else "")
        area = c.area
    out.print(table)
    v = verdict(checks)
    out.print(verdict_line(checks), style=style[v])
