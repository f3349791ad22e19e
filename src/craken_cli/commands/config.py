"""`craken config render|show|validate|import|schema`: the run's files, its values and their sources."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from ..config.options import SpecArgs, load_run, spec_flags

app = typer.Typer(help="Render, show, validate and describe run configurations.", no_args_is_help=True,
                  rich_markup_mode=None)


@app.command(epilog="Example: craken config render --zero 2 --out configs/ --force")
@spec_flags
def render(
    out: Annotated[Optional[Path], typer.Option("--out", metavar="DIR",
        help="Folder to write into (default: the run folder).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite existing files.")] = False,
    *,
    spec_args: SpecArgs,
) -> None:
    """Write ds_config.json, accelerate.yaml and run.yaml without launching anything."""
    from ..launch.render import rendered_files, write_files

    resolved, decisions = load_run(spec_args)
    target = out if out is not None else Path(resolved.spec.output.run_dir())
    written = write_files(rendered_files(resolved.spec, resolved.sources, target), target, force=force)
    if decisions.warnings:
        from ..console import err  # rich costs ~40 ms to import: only when there is something to say

        for warning in decisions.warnings:
            err.print(f"warning: {warning}", style="yellow")
    for path in written:
        typer.echo(str(path))


@app.command(epilog="Example: craken config show --zero 3 --sources")
@spec_flags
def show(
    show_sources: Annotated[bool, typer.Option("--sources", help="Also show where each value came from.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")] = False,
    *,
    spec_args: SpecArgs,
) -> None:
    """Print the resolved settings (after presets, craken.yaml, CRAKEN_* and flags)."""
    from rich.table import Table

    from ..console import out
    from ..config.sources import flatten

    resolved, _ = load_run(spec_args)
    values = flatten(resolved.spec.model_dump(mode="json"))
    if as_json:
        payload = {"spec": resolved.spec.model_dump(mode="json")}
        if show_sources:
            payload["sources"] = resolved.sources
        typer.echo(json.dumps(payload, indent=2))
        return
    table = Table("setting", "value", *(["source"] if show_sources else []), box=None, pad_edge=False)
    for path, value in values.items():
        row = [path, json.dumps(value)]
        if show_sources:
            row.append(resolved.sources.get(path, "default"))
        table.add_row(*row)
    out.print(table)


@app.command(epilog="Example: craken config validate ds_config.json accelerate.yaml")
def validate(
    files: Annotated[list[Path], typer.Argument(metavar="FILES",
        help="craken.yaml, or a DeepSpeed JSON and/or accelerate YAML.")],
    num_processes: Annotated[Optional[int], typer.Option("--num-processes", metavar="N",
        help="World size to check a lone DeepSpeed JSON's batch triple against.")] = None,
) -> None:
    """Check files and list every problem at once, each with the key and the fix."""
    from ..console import out
    from ..errors import CrakenError
    from ..config.validate import validate_files

    report = validate_files(files, num_processes=num_processes)
    if report.problems:  # the problems alone: notes on a file that fails would bury them
        raise CrakenError(report.problems, title="validation failed")
    for note in report.notes:
        out.print(f"note: {note}", markup=False)
    out.print(f"ok: {', '.join(str(f) for f in files)}", markup=False)


@app.command("import", epilog="Example: craken config import ds_config.json accelerate.yaml --out craken.yaml")
def import_(
    files: Annotated[list[Path], typer.Argument(metavar="FILES", help="A DeepSpeed JSON and/or an accelerate YAML.")],
    out_file: Annotated[Path, typer.Option("--out", metavar="FILE", help="Run file to write.")] = Path("craken.yaml"),
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing run file.")] = False,
) -> None:
    """Turn a DeepSpeed JSON / accelerate YAML into a craken run file that renders back to the same run."""
    from ..console import err
    from ..errors import CrakenError
    from ..config.importers import import_files, run_file_text
    from ..launch.render import write_files
    from ..config.sources import Layer, build_spec, unflatten

    if len(files) > 2 or sum(Path(f).suffix == ".json" for f in files) > 1:
        raise CrakenError("give one DeepSpeed JSON and/or one accelerate YAML", title="cannot import")
    imported = import_files(files)
    if imported.problems:
        raise CrakenError(imported.problems, title="cannot import")
    build_spec([Layer("file", " + ".join(str(f) for f in files), unflatten(imported.values))])  # craken's own rules
    for note in imported.notes:
        err.print(f"note: {note}", markup=False, highlight=False)
    text = run_file_text(imported.values, [str(f) for f in files])
    written = write_files({out_file.name: text}, out_file.parent if str(out_file.parent) else Path("."), force=force)
    typer.echo(str(written[0]))


@app.command()
def schema() -> None:
    """Print the JSON Schema of the run file (craken.yaml / run.yaml)."""
    from ..config.spec import RunSpec

    typer.echo(json.dumps(RunSpec.model_json_schema(), indent=2))
