"""The two consoles: results to stdout, problems and progress to stderr.

`from craken_cli.console import out, err` works as usual; rich is imported when a console is first
asked for, not when this module is, to keep start-up fast (docs/performance.md). Neither reads Rich
markup: what craken prints holds the user's text (paths like `data/[v2]/`, `craken[tensorboard]`),
so colour is given as a `style=` or a `rich.text.Text`, never as `[green]...[/]` in a string."""

from __future__ import annotations

_consoles: dict = {}


def __getattr__(name: str):
    if name not in ("out", "err"):
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    if name not in _consoles:
        from rich.console import Console

        _consoles[name] = Console(stderr=name == "err", highlight=False, soft_wrap=True, markup=False)
    return _consoles[name]
