"""The `craken` command: mounts one Typer app per subcommand module; all of them are light to import
(no torch, no deepspeed) so that `craken --help` answers at once."""

from __future__ import annotations

import sys

import typer

from .commands import cluster as cluster_cmd
from .commands import config as config_cmd
from .commands import report as report_cmd
from .errors import CrakenError

app = typer.Typer(
    name="craken",
    help="Train language models with DeepSpeed ZeRO through Accelerate, from one validated run description.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=True,
    rich_markup_mode="rich",
)
app.add_typer(config_cmd.app, name="config")
app.add_typer(cluster_cmd.app, name="cluster")
app.command(name="report", epilog=report_cmd.EPILOG)(report_cmd.report)


def main(argv: list[str] | None = None) -> None:
    try:
        app(args=argv, prog_name="craken", standalone_mode=True)
    except CrakenError as exc:
        from .console import err

        err.print(exc.render(), markup=False)
        sys.exit(exc.exit_code)
