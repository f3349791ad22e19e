"""`craken cluster slurm|hostfile`: the files that run one spec on several machines."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

app = typer.Typer(help="Write files for several machines: a SLURM batch script, a DeepSpeed hostfile.",
                  no_args_is_help=True, rich_markup_mode=None)

_OUT_HELP = "Write to this file instead of stdout (an existing file needs --force)."


def _emit(text: str, out: Path | None, force: bool) -> None:
    from ..launch.cluster import write_new

    if out is None:
        typer.echo(text, nl=False)
    else:
        write_new(out, text, force=force)
        typer.echo(str(out), err=True)


@app.command(epilog="Example: craken cluster slurm --nodes 2 --gpus-per-node 8 --time 12:00:00 "
                    "--config craken.yaml -- --zero 3 > job.sbatch")
def slurm(
    nodes: Annotated[int, typer.Option("--nodes", metavar="N",
        help="Machines (SLURM nodes); one craken train runs on each.")],
    gpus_per_node: Annotated[int, typer.Option("--gpus-per-node", metavar="N",
        help="GPUs of each node; one process each.")],
    config: Annotated[Optional[Path], typer.Option(
        "--config", "-c", metavar="FILE",
            help="Run file every node reads, on a shared file system (default: ./craken.yaml if present; "
                 "without one the flags after -- are the whole run).")] = None,
    partition: Annotated[Optional[str], typer.Option("--partition", metavar="NAME", help="SLURM partition.")] = None,
    time: Annotated[Optional[str], typer.Option("--time", metavar="TIME",
        help="Time limit in SLURM's formats: MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS.")] = None,
    account: Annotated[Optional[str], typer.Option("--account", metavar="NAME",
        help="SLURM account to charge.")] = None,
    job_name: Annotated[Optional[str], typer.Option("--job-name", metavar="NAME",
        help="SLURM job name (default: craken).")] = None,
    cpus_per_task: Annotated[Optional[int], typer.Option("--cpus-per-task", metavar="N",
        help="CPUs for each node's task.")] = None,
    port: Annotated[int, typer.Option("--port", metavar="PORT", help="Rendezvous TCP port on the first node.")] = 29500,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", metavar="FILE", help=_OUT_HELP)] = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite --out if it exists.")] = False,
    train_args: Annotated[Optional[list[str]], typer.Argument(metavar="TRAIN_ARGS",
        help="Extra `craken train` arguments, after `--`.", show_default=False)] = None,
) -> None:
    """Print an sbatch script that runs `craken train` on every node with its own machine rank."""
    from ..launch.cluster import check_run_file, slurm_job, slurm_script
    from ..config.sources import PROJECT_FILE

    if config is None and Path(PROJECT_FILE).is_file():
        config = Path(PROJECT_FILE)
    job = slurm_job(nodes, gpus_per_node, config, port=port, partition=partition, time=time, account=account,
                    job_name=job_name, cpus_per_task=cpus_per_task, train_args=train_args or [])
    check_run_file(job, _train_spec_args(job.train_args))
    _emit(slurm_script(job), out, force)


def _train_spec_args(train_args: list[str]):
    """The run flags among the arguments after `--`, parsed by craken train's own parser: a flag it does not
    know, or a value it refuses, stops here instead of on every node once the job has queued."""
    from typer._click.exceptions import UsageError

    from ..app import LAZY_COMMANDS, _build
    from ..config.options import spec_args_of
    from ..errors import CrakenError

    command = _build("train", *LAZY_COMMANDS["train"])
    try:
        params = command.make_context("craken train", list(train_args)).params
    except UsageError as exc:
        raise CrakenError(f"the craken train arguments after --: {exc.format_message()}",
                          title="invalid cluster job") from None
    return spec_args_of(dict(params))


@app.command(epilog="Example: craken cluster hostfile node1:8 node2:8 --out hostfile")
def hostfile(
    hosts: Annotated[list[str], typer.Argument(metavar="HOSTS",
        help="HOST or HOST:SLOTS (slots = processes, usually GPUs).",
                                               show_default=False)],
    slots: Annotated[Optional[int], typer.Option("--slots", metavar="N",
        help="Slots of hosts given without :SLOTS.")] = None,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", metavar="FILE", help=_OUT_HELP)] = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite --out if it exists.")] = False,
) -> None:
    """Write a DeepSpeed hostfile (`host slots=N` lines) for `--launcher deepspeed`."""
    from ..launch.cluster import hostfile_text, parse_hosts

    _emit(hostfile_text(parse_hosts(hosts, slots)), out, force)
