"""The `craken` command. Each subcommand lives in its own module under `commands/`. Light modules are
mounted directly; a module that imports pydantic (every command with run flags does, through
`options`) is registered in `LAZY_COMMANDS` instead and imported only when its command runs, so that
`craken --help` and `craken config render` answer in well under 0.5 s and never load torch or
deepspeed (tests/test_config_cli.py, docs/performance.md)."""

from __future__ import annotations

import sys
from typing import Annotated, Any

import typer
from typer._click.exceptions import UsageError
from typer.core import TyperCommand, TyperGroup

from .commands import cluster as cluster_cmd
from .commands import report as report_cmd
from .errors import CrakenError

# name -> ("module:attribute", keyword arguments of `Typer.command`). The attribute is a Typer app (a
# command group) or a function (one command). `craken --help` reads its one-line help from the
# module's source, so listing the commands imports none of them.
LAZY_COMMANDS: dict[str, tuple[str, dict[str, Any]]] = {
    "train": ("craken_cli.commands.train:train", {
        "context_settings": {"allow_extra_args": True},
        "epilog": "Examples: craken train | craken train --zero 2 --auto | "
                  "craken train --test -- --main_process_port 29600"}),
    "launch": ("craken_cli.commands.launch:launch", {
        "context_settings": {"allow_extra_args": True, "allow_interspersed_args": False},
        "epilog": "Examples: craken launch train.py --my-arg 1 | craken launch --zero 3 --micro-batch 4 -m mypkg.train | "
                  "craken launch --auto --model ./my-model train.py"}),
    "config": ("craken_cli.commands.config:app", {}),
    "plan": ("craken_cli.commands.plan:plan", {"epilog": "Examples: craken plan --gpus 8 --gpu-memory 80GiB --model path/to/llama-7b --seq-len 4096 | craken plan --json"}),
    "ckpt": ("craken_cli.commands.ckpt:app", {}),
    "doctor": ("craken_cli.commands.doctor:doctor", {"epilog": "Exit codes: 0 all checks ok, 1 warnings only, 2 a failure or invalid arguments. Examples: craken doctor | craken doctor --zero 3 --offload-optimizer cpu | craken doctor --json | craken doctor --deep"}),
}


class _LazyGroup(TyperGroup):
    """The root group: `LAZY_COMMANDS` are built when resolved, and only listed by `--help`."""

    _listing = False

    def list_commands(self, ctx) -> list[str]:
        return [*(n for n in LAZY_COMMANDS if n not in self.commands), *super().list_commands(ctx)]

    def get_command(self, ctx, cmd_name: str):
        if cmd_name in LAZY_COMMANDS and cmd_name not in self.commands:
            target, kwargs = LAZY_COMMANDS[cmd_name]
            if self._listing:
                return TyperCommand(cmd_name, callback=None, help=_short_help(target))
            self.commands[cmd_name] = _build(cmd_name, target, kwargs)
        command = super().get_command(ctx, cmd_name)
        if command is not None:
            _name_arguments_only(command)
        return command

    def resolve_command(self, ctx, args):
        """Typer's "did you mean" reads only the commands built so far; the lazy ones count too."""
        try:
            return self._click_resolve_command(ctx, args)
        except UsageError as exc:
            import difflib

            close = difflib.get_close_matches(args[0], self.list_commands(ctx)) if args else []
            if close and "Did you mean" not in exc.message:
                exc.message = f"{exc.message.rstrip('.')}. Did you mean {' or '.join(map(repr, close))}?"
            raise

    def format_help(self, ctx, formatter) -> None:
        self._listing = True
        try:
            super().format_help(ctx, formatter)
        finally:
            self._listing = False


def _name_arguments_only(command) -> None:
    """Typer prints an argument's Python type after its name (`RUN_DIR <path>`, `FILES <list[Path]>`);
    the metavar every craken argument has says what to type, so the help shows that alone."""
    for param in getattr(command, "params", ()):
        if param.param_type_name == "argument" and param.metavar:
            param.display_type_rich = lambda ctx: None
    for sub in getattr(command, "commands", {}).values():
        _name_arguments_only(sub)


def _build(name: str, target: str, kwargs: dict[str, Any]):
    import importlib

    module, _, attr = target.partition(":")
    obj = getattr(importlib.import_module(module), attr)
    if isinstance(obj, typer.Typer):
        command = typer.main.get_group(obj)
    else:
        single = typer.Typer(add_completion=False, rich_markup_mode=None)
        single.command(name=name, **kwargs)(obj)
        command = typer.main.get_command(single)
    command.name = name
    return command


def _short_help(target: str) -> str:
    """First paragraph of the function's docstring, or the `help=` of the `typer.Typer(...)`."""
    import ast
    import importlib.util
    from pathlib import Path

    module, _, attr = target.partition(":")
    found = importlib.util.find_spec(module)
    if found is None or not found.origin:
        return ""
    tree = ast.parse(Path(found.origin).read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name == attr:
            return (ast.get_docstring(node) or "").split("\n\n")[0]
        if (isinstance(node, ast.Assign) and isinstance(node.value, ast.Call)
                and any(isinstance(t, ast.Name) and t.id == attr for t in node.targets)):
            for kw in node.value.keywords:
                if kw.arg == "help" and isinstance(kw.value, ast.Constant):
                    return kw.value.value
    return ""


app = typer.Typer(
    name="craken",
    cls=_LazyGroup,
    help="Train language models with DeepSpeed ZeRO through Accelerate, from one validated run description.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=True,
    rich_markup_mode=None,  # help and errors as plain text: user text is never Rich markup, flags never cut
)


def _print_version(value: bool) -> None:
    if value:
        from . import __version__

        typer.echo(f"craken {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: Annotated[bool, typer.Option("--version", is_eager=True, callback=_print_version,
                                                 help="Print craken's version and exit.")] = False) -> None:
    pass


app.command(name="report", epilog=report_cmd.EPILOG)(report_cmd.report)
app.add_typer(cluster_cmd.app, name="cluster")


def main(argv: list[str] | None = None) -> None:
    try:
        app(args=argv, prog_name="craken", standalone_mode=True)
    except CrakenError as exc:
        from .console import err

        err.print(exc.render(), markup=False)
        sys.exit(exc.exit_code)
