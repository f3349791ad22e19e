"""User-facing errors. Anything raised as `CrakenError` ends the CLI with exit code 2, its message
and no traceback; nothing is written before the error is raised."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Refusal:
    """One thing the machine or the settings cannot do, kept as its two parts so a reader that shows them
    apart (the doctor's detail and fix columns) never has to cut the sentence; `str()` is the sentence
    the CLI prints: 'WHAT: FIX'."""

    what: str  # what is wrong, with the values that make it so
    fix: str  # what to change, naming the flag

    def __str__(self) -> str:
        return f"{self.what}: {self.fix}"


class CrakenError(Exception):
    """A problem the user can fix; `problems` lists every one found, each naming what to change."""

    exit_code = 2

    def __init__(self, problems: str | Refusal | list[str | Refusal], title: str = "invalid configuration"):
        from .launch.command import redact_text

        listed = [problems] if isinstance(problems, (str, Refusal)) else list(problems)
        self.problems = [redact_text(str(p)) for p in listed]
        self.title = title
        super().__init__(self.render())

    def render(self) -> str:
        return problems_text(self.title, self.problems)


def problems_text(title: str, problems: list[str]) -> str:
    """'craken: TITLE: PROBLEM', or one line per problem under 'craken: TITLE (N problems):'."""
    if len(problems) == 1:
        return f"craken: {title}: {problems[0]}"
    lines = [f"craken: {title} ({len(problems)} problems):"]
    lines += [f"  - {p}" for p in problems]
    return "\n".join(lines)
