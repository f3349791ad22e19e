"""The two consoles: results to stdout, problems and progress to stderr.

`from craken_cli.console import out, err` works as usual; rich is imported when a console is first
asked for, not when this module is, to keep start-up fast (docs/performance.md)."""

from __future__ import annotations

_consoles: dict = {}


def __getattr__(name: str):
    if name not in ("out", "err"):
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    if name not in _consoles:
        from rich.console import Console

        _consoles[name] = Console(stderr=name == "err", highlight=False, soft_wrap=True)
    return _consoles[name]
